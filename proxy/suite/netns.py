"""Network namespace plumbing for the benchmark's network lab (``tightwad.suite.network``).

Thin, checked wrappers around iproute2 and setns(2): run ``ip`` with one clear
error line, list and remove namespaces (killing what still runs in them), clean
up namespaces left by a killed benchmark, open a socket inside a namespace, and
stop a lab's process groups.
"""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_CLONE_NEWNET = 0x40000000


class NetworkLabError(RuntimeError):
    pass


def run_ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NetworkLabError(f"`{argv[0]}` not found: the network lab needs iproute2") from None
    except subprocess.TimeoutExpired:
        raise NetworkLabError(f"`{shlex.join(argv)}` did not finish in 30 s") from None
    if check and proc.returncode:
        detail = proc.stderr.strip() or proc.stdout.strip()
        raise NetworkLabError(f"`{shlex.join(argv)}` failed (exit {proc.returncode}): {detail}")
    return proc


def require_root() -> None:
    if os.geteuid() != 0:
        raise NetworkLabError("the network lab creates network namespaces: run it as root")


def namespaces() -> list[str]:
    # Lines read "NAME" or "NAME (id: N)".
    return [line.split()[0] for line in run_ip("ip", "netns", "list").stdout.splitlines() if line]


def remove_namespace(ns: str) -> None:
    """Kill what still runs inside `ns` (it would keep the namespace alive), then delete it."""
    pids = [int(p) for p in run_ip("ip", "netns", "pids", ns, check=False).stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.02)
    run_ip("ip", "netns", "del", ns)


def running(pid: int) -> bool:
    # A zombie has left its namespaces already; it only waits for its parent.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def cleanup_stale(prefix: str = "twb-") -> list[str]:
    """Remove namespaces named ``{prefix}{pid}-...`` whose creating process has died."""
    require_root()
    stale = []
    for ns in namespaces():
        # Only names a lab makes: another prefix that merely starts with ours is not ours.
        match = re.fullmatch(re.escape(prefix) + r"(\d+)-\d+-[a-z0-9_]+", ns)
        if match is None or running(int(match[1])):
            continue  # a lab that is still running, maybe a concurrent benchmark
        remove_namespace(ns)
        stale.append(ns)
    if stale:
        print(f"→ network lab: removed {len(stale)} stale namespaces: {' '.join(stale)}",
              file=sys.stderr)
    return stale


def socket_in(ns: str) -> socket.socket:
    # A socket belongs to the namespace of the thread that created it, so a
    # throwaway thread enters the namespace and makes it; our own threads stay put.
    def make() -> socket.socket:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
        finally:
            os.close(fd)
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    with ThreadPoolExecutor(1, thread_name_prefix="netns") as thread:
        return thread.submit(make).result()


def stop_processes(procs: list[subprocess.Popen[Any]], grace: float = 3.0) -> int:
    """SIGTERM each process group, SIGKILL what outlives `grace`; count those stopped."""
    running = [p for p in procs if p.poll() is None]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in running:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if all(p.poll() is not None for p in running):
            break
    for proc in procs:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    return len(running)
