"""An emulated network for the benchmark: one network namespace per host.

    with NetworkLab("wan") as lab:
        target = lab.spawn("target", [*server_argv, "--host", "0.0.0.0", "--port", "8080"])
        lab.wait_port("target", 8080)
        host, port = lab.expose("target", 8080)   # what the proxy must dial
        proxy = lab.spawn("proxy", [...])
        print(lab.method, lab.rtt_ms("target"))

A hub namespace (``proxy``) has one veth pair to each other host: link ``i``
(1-based, hosts in order, hub left out) is ``198.18.i.0/24``, hub end ``.1``,
host end ``.2``. 198.18.0.0/15 is RFC 2544's benchmarking range, so no real
network is ever addressed. The veths are created inside the namespaces, never
in the caller's, so they go with them.

A profile's delay is one way and applies in each direction: the round trip is
about twice the figure (``wan``: 25 ms each way, ~50 ms RTT). Jitter is uniform
in ``[delay - jitter, delay + jitter]``. ``lab.method`` says how it is applied:

* ``"netem"``: a netem qdisc on both ends of each veth. Every packet waits,
  handshakes and ACKs too; with jitter netem may reorder packets (TCP copes).
* ``"relay"``: where the kernel lacks netem, a userspace relay
  (``tightwad.suite.delayrelay``) in the server's namespace holds each chunk.
  Handshakes and ACKs pass undelayed: a new connection is an RTT cheaper.
* ``"none"``: a zero-delay profile installs nothing.

Servers must listen on ``0.0.0.0`` (so netem's veth address and the relay's
``127.0.0.1`` both reach them), and clients must dial what ``expose`` returns.
"""

from __future__ import annotations

import itertools
import os
import re
import select
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

from tightwad.suite.netns import (
    NetworkLabError,
    cleanup_stale,
    remove_namespace,
    require_root,
    run_ip,
    socket_in,
    stop_processes,
)

__all__ = ["PROFILES", "NetworkLab", "NetworkLabError", "Profile", "cleanup_stale"]

Method = Literal["netem", "relay", "none"]

_HOST_NAME = re.compile(r"[a-z][a-z0-9_]{0,11}")
_PREFIX = re.compile(r"[A-Za-z0-9_.-]*[A-Za-z0-9_.]-")
_labs = itertools.count()


@dataclass(frozen=True)
class Profile:
    name: str
    delay_ms: float  # one way, in each direction
    jitter_ms: float = 0.0


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (Profile("none", 0), Profile("loopback", 0), Profile("lan", 0.3),
              Profile("wifi", 3.0, 1.0), Profile("wan", 25.0))
}


class NetworkLab:
    """Namespaces ``{prefix}{pid}-{n}-{host}`` joined by veths to the hub, with a delay.

    ``method`` forces ``"netem"`` or ``"relay"``; ``"auto"`` tries netem and
    falls back to the relay when the kernel has no netem qdisc.
    """

    def __init__(
        self,
        profile: Profile | str,
        hosts: tuple[str, ...] = ("proxy", "draft", "target"),
        *,
        hub: str = "proxy",
        prefix: str = "twb-",
        method: Literal["auto", "netem", "relay"] = "auto",
        seed: int | None = None,
        progress: bool = True,
    ) -> None:
        if isinstance(profile, str) and profile not in PROFILES:
            raise ValueError(f"no network profile {profile!r}: {', '.join(PROFILES)}")
        self.profile = PROFILES[profile] if isinstance(profile, str) else profile
        named = all(_HOST_NAME.fullmatch(h) for h in hosts)
        if not named or len(set(hosts)) != len(hosts) or hub not in hosts or len(hosts) > 255:
            raise ValueError(f"hosts must be distinct [a-z][a-z0-9_]{{0,11}} names, "
                             f"the hub {hub!r} among them: {hosts}")
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"prefix must be [A-Za-z0-9_.-]+ ending in '-': {prefix!r}")
        self.hosts, self.hub, self.prefix = hosts, hub, prefix
        self.tag = f"{prefix}{os.getpid()}-{next(_labs)}"
        self.method: Method = "none"
        self._want = method
        self._seed = seed
        self._progress = progress
        self._links = {h: i for i, h in enumerate((h for h in hosts if h != hub), start=1)}
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._exposed: dict[tuple[str, int], tuple[str, int]] = {}
        self._echo: dict[str, tuple[str, int]] = {}
        self._saved_handlers: dict[int, Any] = {}

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> NetworkLab:
        require_root()
        cleanup_stale(self.prefix)
        self._trap_signals()
        try:
            self._build()
        except BaseException:
            self._close(quiet=True)
            raise
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            self._close(quiet=False)
        except NetworkLabError as error:
            if exc is None:
                raise
            print(f"network lab: {error}", file=sys.stderr)

    def _trap_signals(self) -> None:
        # SIGTERM/SIGHUP kill Python without unwinding; as SystemExit they run
        # __exit__ like Ctrl-C does. A handler the caller installed stays.
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if _main_thread() and signal.getsignal(signum) is signal.SIG_DFL:
                self._saved_handlers[signum] = signal.signal(signum, _raise_exit)

    def _build(self) -> None:
        p = self.profile
        for host in self.hosts:
            ns = self.namespace(host)
            run_ip("ip", "netns", "add", ns)
            self._created.append(ns)
            run_ip("ip", "-n", ns, "link", "set", "lo", "up")
        hub_ns = self.namespace(self.hub)
        for host, i in self._links.items():
            ns, hub_end, host_end = self.namespace(host), f"v-{host}", f"v-{self.hub}"
            run_ip("ip", "-n", hub_ns, "link", "add", "name", hub_end, "type", "veth",
                 "peer", "name", host_end, "netns", ns)
            run_ip("ip", "-n", hub_ns, "addr", "add", f"198.18.{i}.1/24", "dev", hub_end)
            run_ip("ip", "-n", ns, "addr", "add", f"198.18.{i}.2/24", "dev", host_end)
            run_ip("ip", "-n", hub_ns, "link", "set", hub_end, "up")
            run_ip("ip", "-n", ns, "link", "set", host_end, "up")
        self.method = self._apply_delay()
        if self._progress:
            jitter = f" ± {p.jitter_ms:g} ms" if p.jitter_ms else ""
            how = "no delay" if self.method == "none" else (
                f"{self.method} delay {p.delay_ms:g} ms{jitter} each way")
            print(f"→ network lab {p.name}: {len(self.hosts)} namespaces {self.tag}-*, {how}",
                  file=sys.stderr)

    def _apply_delay(self) -> Method:
        p = self.profile
        if self._want == "relay":
            return "relay"
        if self._want == "auto" and not (p.delay_ms or p.jitter_ms):
            return "none"
        jitter = [f"{p.jitter_ms:g}ms"] if p.jitter_ms else []
        # netem's default queue of 1000 packets can overflow at 25 ms on a fast veth.
        netem = ("root", "netem", "delay", f"{p.delay_ms:g}ms", *jitter, "limit", "100000")
        hub_ns = self.namespace(self.hub)
        for host in self._links:
            for ns, dev in ((hub_ns, f"v-{host}"), (self.namespace(host), f"v-{self.hub}")):
                argv = ("tc", "-n", ns, "qdisc", "add", "dev", dev, *netem)
                result = run_ip(*argv, check=False)
                error = result.stderr.strip()
                # Only the very first qdisc can meet a kernel without netem.
                if result.returncode and self._want == "auto" and "unknown" in error.lower():
                    return "relay"
                if result.returncode:
                    raise NetworkLabError(f"`{shlex.join(argv)}` failed: {error}")
        return "netem"

    def _close(self, *, quiet: bool) -> None:
        main, blocked = _main_thread(), {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        # A second Ctrl-C must not leave half a lab behind: signals wait until it is gone.
        if main:
            signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            stopped, errors = stop_processes(self._procs), []
            for ns in reversed(self._created):
                try:
                    remove_namespace(ns)
                except NetworkLabError as exc:
                    errors.append(str(exc))
            removed = len(self._created) - len(errors)
            for state in (self._created, self._procs, self._exposed, self._echo):
                state.clear()
            if self._progress and not quiet:
                print(f"← network lab {self.profile.name}: removed {removed} namespaces, "
                      f"stopped {stopped} processes", file=sys.stderr)
            if errors:
                raise NetworkLabError("; ".join(errors))
        finally:
            try:
                if main:  # a signal that came meanwhile raises here, as SystemExit
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
            finally:
                for signum, handler in self._saved_handlers.items():
                    signal.signal(signum, handler)
                self._saved_handlers.clear()

    # -- what the benchmark uses -----------------------------------------------

    def namespace(self, host: str) -> str:
        if host not in self.hosts:
            raise KeyError(f"no host {host!r} in this lab: {self.hosts}")
        return f"{self.tag}-{host}"

    def address(self, host: str) -> str:
        """The host's address as seen from the hub namespace."""
        self.namespace(host)
        return "127.0.0.1" if host == self.hub else f"198.18.{self._links[host]}.2"

    def spawn(self, host: str, argv: list[str], **popen: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside the host's namespace, in its own process group
        (killed with the lab). Keyword arguments go to ``subprocess.Popen``."""
        cmd = ["ip", "netns", "exec", self.namespace(host), *argv]
        proc = subprocess.Popen(cmd, start_new_session=True, **popen)
        self._procs.append(proc)
        return proc

    def expose(self, host: str, port: int) -> tuple[str, int]:
        """Where the hub dials a server on `host` listening on 0.0.0.0:`port`, delayed."""
        if host == self.hub:
            return ("127.0.0.1", port)
        if self.method != "relay":
            return (self.address(host), port)
        if (host, port) not in self._exposed:
            p = self.profile
            argv = [sys.executable, "-m", "tightwad.suite.delayrelay",
                    "--listen", f"{self.address(host)}:0", "--to", f"127.0.0.1:{port}",
                    "--delay-ms", str(p.delay_ms), "--jitter-ms", str(p.jitter_ms)]
            if self._seed is not None:
                argv += ["--seed", str(self._seed + len(self._exposed))]
            ready = self._helper(host, argv, f"delay relay for {host}:{port}")
            addr, _, relay_port = ready.split()[1].rpartition(":")
            self._exposed[(host, port)] = (addr, int(relay_port))
        return self._exposed[(host, port)]

    def connect(self, host: str, address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
        """A TCP connection from inside `host` (e.g. the hub) to `address`, made
        by this process: tests and probes need no helper process in the hub."""
        sock = socket_in(self.namespace(host))
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        return sock

    def wait_port(self, host: str, port: int, timeout: float = 30.0) -> None:
        """Return once something accepts on 127.0.0.1:`port` inside `host`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.connect(host, ("127.0.0.1", port), timeout=1.0).close()
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise NetworkLabError(f"nothing listens on {host}:{port} "
                                          f"after {timeout:g} s: {exc}") from None
                time.sleep(0.05)

    def rtt_samples(self, host: str, count: int = 20, size: int = 64) -> list[float]:
        """Round trips (ms) of a `size`-byte message from the hub to an echo
        server on `host`, over one connection and the same path as expose()."""
        if host not in self._echo:
            argv = [sys.executable, "-m", "tightwad.suite.network", "echo"]
            port = int(self._helper(host, argv, f"echo server on {host}").split()[1])
            self._echo[host] = self.expose(host, port)
        message = b"x" * size
        samples = []
        with self.connect(self.hub, self._echo[host]) as sock:
            for i in range(count + 2):  # two warm-up exchanges
                start = time.perf_counter()
                sock.sendall(message)
                got = 0
                while got < size and (chunk := sock.recv(size - got)):
                    got += len(chunk)
                if got < size:
                    raise NetworkLabError(f"echo server on {host} closed the connection")
                if i >= 2:
                    samples.append((time.perf_counter() - start) * 1000)
        return samples

    def rtt_ms(self, host: str, count: int = 20) -> float:
        """Median round trip (ms) from the hub to `host`."""
        return statistics.median(self.rtt_samples(host, count))

    def _helper(self, host: str, argv: list[str], what: str, timeout: float = 15.0) -> str:
        """Spawn a helper that prints one ``ready ...`` line; return that line."""
        with tempfile.TemporaryFile() as errors:
            proc = self.spawn(host, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=errors)
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], timeout)
            line = proc.stdout.readline().decode().strip() if ready else ""
            if line.startswith("ready "):
                return line
            proc.kill()
            proc.wait()
            errors.seek(0)
            detail = errors.read().decode(errors="replace").strip()[-2000:]
        raise NetworkLabError(f"{what} did not start ({shlex.join(argv)}): "
                              f"{detail or line or 'no output'}")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _echo_server() -> None:
    def echo(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(65536):
                conn.sendall(data)

    # 0.0.0.0 so that both the veth address (netem) and 127.0.0.1 (relay) reach it.
    server = socket.create_server(("0.0.0.0", 0))
    print(f"ready {server.getsockname()[1]}", flush=True)
    while True:
        threading.Thread(target=echo, args=(server.accept()[0],), daemon=True).start()


if __name__ == "__main__":
    if sys.argv[1:] != ["echo"]:
        sys.exit("usage: python -m tightwad.suite.network echo")
    _echo_server()
