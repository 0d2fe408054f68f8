"""Background processes with a pid file and a log, started and stopped from the CLI.

Used by ``tightwad proxy start|stop`` and ``tightwad local up|down``. A process
counts as running while its pid is alive and its command line still matches
(so a recycled pid is never mistaken for ours).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from tightwad.errors import TightwadError


class DaemonError(TightwadError):
    pass


@dataclasses.dataclass
class Daemon:
    name: str
    argv: Sequence[str]
    health_url: str
    run_dir: Path
    env: dict[str, str] | None = None

    @property
    def pidfile(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return self.run_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            return None
        if os.fsencode(self.argv[0]) not in cmdline[:2] and not any(
            os.fsencode(a) in cmdline for a in self.argv[1:3]
        ):
            return None
        return pid

    def healthy(self) -> bool:
        try:
            return httpx.get(self.health_url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self, *, timeout: float = 600.0, log: Callable[[str], None] = print) -> int:
        """Start detached and wait until healthy; returns the pid."""
        pid = self.pid()
        if pid is not None:
            if self.healthy():
                log(f"✓ {self.name} already running (pid {pid})")
                return pid
            raise DaemonError(f"{self.name} (pid {pid}) is running but not healthy; see {self.logfile}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.logfile.open("ab") as out:
            proc = subprocess.Popen(
                list(self.argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})}, start_new_session=True,
            )
        self.pidfile.write_text(f"{proc.pid}\n")
        started = time.monotonic()
        shown = 0.0
        while True:
            if proc.poll() is not None:
                self.pidfile.unlink(missing_ok=True)
                tail = "\n".join(self.logfile.read_text(errors="replace").splitlines()[-15:])
                raise DaemonError(f"{self.name} exited with code {proc.returncode}:\n{tail}")
            if self.healthy():
                log(f"✓ {self.name} healthy (pid {proc.pid}, log {self.logfile})")
                return proc.pid
            waited = time.monotonic() - started
            if waited > timeout:
                self.stop()
                raise DaemonError(f"{self.name} not healthy after {timeout:.0f}s; see {self.logfile}")
            if waited - shown >= 5:
                log(f"  … waiting for {self.name} ({waited:.0f}s, {self.health_url})")
                shown = waited
            time.sleep(0.2)

    def stop(self, *, timeout: float = 20.0) -> bool:
        pid = self.pid()
        self.pidfile.unlink(missing_ok=True)
        if pid is None:
            return False
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
                return True
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)
        return True


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def python_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tightwad.cli", *args]
