"""Real servers for tests: llama-server, ggml-rpc-server and the Tightwad verifier.

Each runs as a subprocess on 127.0.0.1 with a free port, is polled on its
health endpoint until a deadline, and is stopped (SIGTERM, then SIGKILL) when
the test is done. Logs go to a file whose tail is shown when start-up fails.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tightwad import llamacpp


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A request handler for the stand-in servers: no access log, and a JSON answer helper."""

    def answer_json(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def handler_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A threaded ``http.server`` with ``handler`` on a free port; yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, name: str, argv: list[str], *, port: int, health: str | None = "/health",
                 env: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.health = health
        self.log_path = Path(tempfile.mkstemp(prefix=f"tightwad-{name}-", suffix=".log")[1])
        self._env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> ServerProcess:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, env=self._env, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not healthy after {timeout}s:\n{self.log_tail()}")

    def ready(self) -> bool:
        if self.health is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False
        try:
            return httpx.get(self.url + self.health, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, n: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)


def llama_server(model: Path | str, *extra: str, port: int | None = None) -> ServerProcess:
    port = port or free_port()
    argv = [
        str(llamacpp.binary("llama-server")), "-m", str(model), "--host", "127.0.0.1",
        "--port", str(port), "-t", str(cpu_threads()), "-c", "4096", "--no-webui", *extra,
    ]
    return ServerProcess("llama-server", argv, port=port)


def rpc_server(*, port: int | None = None) -> ServerProcess:
    port = port or free_port()
    argv = [str(llamacpp.binary("ggml-rpc-server")), "-H", "127.0.0.1", "-p", str(port)]
    return ServerProcess("rpc-server", argv, port=port, health=None)


def verifier(model: Path | str, *extra: str, port: int | None = None) -> ServerProcess:
    port = port or free_port()
    argv = [
        sys.executable, "-m", "tightwad.cli", "verifier", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--threads", str(cpu_threads()), *extra,
    ]
    return ServerProcess("verifier", argv, port=port)


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0))


def proxy(config_path: Path | str, *, port: int) -> ServerProcess:
    argv = [sys.executable, "-m", "tightwad.cli", "-c", str(config_path), "proxy", "serve"]
    return ServerProcess("proxy", argv, port=port)


def write_proxy_config(path: Path, *, draft_url: str, target_url: str, port: int, mode: str = "fast",
                       draft_backend: str = "llamacpp", target_backend: str = "verifier",
                       max_draft_tokens: int | str = 8, extra: str = "") -> Path:
    path.write_text(
        f"""proxy:
  host: 127.0.0.1
  port: {port}
  mode: {mode}
  max_draft_tokens: {max_draft_tokens}
  fallback_on_draft_failure: true
  draft_timeout_s: 20
{extra}  draft:
    url: {draft_url}
    backend: {draft_backend}
  target:
    url: {target_url}
    backend: {target_backend}
"""
    )
    return path


class InProcessProxy:
    """The proxy app under uvicorn in a thread of this process, so tests can patch it."""

    def __init__(self, proxy_section: dict):
        import threading

        import uvicorn

        from tightwad.app import create_app
        from tightwad.config import parse_config

        self.port = free_port()
        section = {"host": "127.0.0.1", "port": self.port, **proxy_section}
        config = parse_config({"proxy": section}).require_proxy("test")
        self.server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1",
                                                    port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> InProcessProxy:
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("in-process proxy did not become healthy")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
