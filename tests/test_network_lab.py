"""The benchmark's network lab: real namespaces, veths, delays and relays (needs root)."""

from __future__ import annotations

import http.client
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tightwad.suite import netns
from tightwad.suite.network import NetworkLab, NetworkLabError, Profile, cleanup_stale

PREFIX = "twt-"
HOSTS = ("proxy", "draft", "target")
NO_PID = 2**22 + 1  # above Linux's PID_MAX_LIMIT: never a live process

# Echoes each connection; with `sink` it reads to EOF first and then sends it all back.
ECHO = textwrap.dedent("""
    import socket, sys, threading
    server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
    sink = sys.argv[2:] == ["sink"]
    def serve(conn):
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if sink:
                data = b"".join(iter(lambda: conn.recv(65536), b""))
                conn.sendall(data)
                return
            while data := conn.recv(65536):
                conn.sendall(data)
    while True:
        threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
""")


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("tests/test_network_lab.py creates network namespaces: run it as root")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line}


def _pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=True)
    return [int(pid) for pid in out.stdout.split()]


def _alive(pid: int) -> bool:
    # A zombie has left its namespace already; only a running process counts.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _link(ns: str, dev: str) -> str:
    cmd = ["ip", "-d", "-n", ns, "addr", "show", "dev", dev]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _assert_gone(tag: str, pids: list[int]) -> None:
    assert not [ns for ns in _namespaces() if ns.startswith(tag)]
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "v-proxy" not in root_links and "v-target" not in root_links
    assert not [pid for pid in pids if _alive(pid)]


def _echo(lab: NetworkLab, host: str, port: int, *mode: str) -> tuple[str, int]:
    lab.spawn(host, [sys.executable, "-c", ECHO, str(port), *mode])
    lab.wait_port(host, port, timeout=10)
    return lab.expose(host, port)


def _round_trips(sock: socket.socket, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        sock.sendall(b"ping")
        assert sock.recv(16) == b"ping"
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def test_namespaces_and_veths_exist_inside_and_are_removed_after() -> None:
    with NetworkLab("lan", HOSTS, prefix=PREFIX) as lab:
        names = {lab.namespace(h) for h in HOSTS}
        assert names <= _namespaces()
        hub = lab.namespace("proxy")
        for i, host in enumerate(("draft", "target"), start=1):
            hub_end = _link(hub, f"v-{host}")
            assert "veth" in hub_end and f"198.18.{i}.1/24" in hub_end
            host_end = _link(lab.namespace(host), "v-proxy")
            assert "veth" in host_end and f"198.18.{i}.2/24" in host_end
            assert lab.address(host) == f"198.18.{i}.2"
        sleeper = lab.spawn("draft", ["sleep", "60"])
        lab.rtt_ms("target", count=3)  # starts an echo server (and a relay without netem)
        pids = [pid for ns in names for pid in _pids(ns)]
        assert sleeper.pid in pids and len(pids) >= 2
    assert sleeper.poll() is not None
    _assert_gone(lab.tag, pids)


def test_removed_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with NetworkLab("wan", HOSTS, prefix=PREFIX) as lab:
            lab.rtt_ms("draft", count=2)
            pids = [pid for h in HOSTS for pid in _pids(lab.namespace(h))]
            raise RuntimeError("boom")
    _assert_gone(lab.tag, pids)


def test_removed_when_the_process_gets_sigterm() -> None:
    script = textwrap.dedent(f"""
        import time
        from tightwad.suite.network import NetworkLab
        with NetworkLab("wan", prefix={PREFIX!r}) as lab:
            lab.rtt_ms("target", count=2)
            print(lab.tag, flush=True)
            time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    tag = proc.stdout.readline().strip()
    assert tag.startswith(PREFIX)
    pids = [pid for ns in _namespaces() if ns.startswith(tag) for pid in _pids(ns)]
    assert pids
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 128 + signal.SIGTERM
    _assert_gone(tag, pids)


def test_stale_namespaces_of_a_killed_run_are_removed() -> None:
    dead = f"{PREFIX}{NO_PID}-0-proxy"
    live = f"{PREFIX}{os.getpid()}-999-proxy"  # this process's: must survive
    foreign = f"{PREFIX}x{NO_PID}-0-proxy"  # not a name a lab makes
    sleeper = None
    try:
        for ns in (dead, live, foreign):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", dead, "link", "add", "name", "v-target", "type", "veth",
                        "peer", "name", "v-proxy"], check=True)
        sleeper = subprocess.Popen(["ip", "netns", "exec", dead, "sleep", "60"])
        time.sleep(0.2)
        assert cleanup_stale(PREFIX) == [dead]
        assert sleeper.wait(timeout=5) is not None
        assert dead not in _namespaces() and {live, foreign} <= _namespaces()

        subprocess.run(["ip", "netns", "add", dead], check=True)
        with NetworkLab("none", HOSTS, prefix=PREFIX, progress=False):
            assert dead not in _namespaces()
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
        for ns in (dead, live, foreign):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_exposed_server_gets_the_profile_delay_both_ways() -> None:
    with NetworkLab(Profile("twenty", 20.0), HOSTS, prefix=PREFIX) as lab:
        address = _echo(lab, "target", 7000)
        with lab.connect("proxy", address) as sock:
            samples = _round_trips(sock, 8)
        assert 40 <= statistics.median(samples) < 70
        assert 40 <= lab.rtt_ms("target", count=8) < 70
        assert 40 <= lab.rtt_ms("draft", count=8) < 70
    with NetworkLab("loopback", HOSTS, prefix=PREFIX) as lab:
        address = _echo(lab, "target", 7000)
        with lab.connect("proxy", address) as sock:
            assert statistics.median(_round_trips(sock, 20)) < 5
        assert lab.rtt_ms("target") < 5


def test_jitter_varies_round_trips_but_keeps_byte_order() -> None:
    profile = Profile("jittery", 5.0, 4.0)
    with NetworkLab(profile, HOSTS, prefix=PREFIX, method="relay", seed=7) as lab:
        assert lab.method == "relay"
        samples = lab.rtt_samples("target", count=20)
        assert statistics.stdev(samples) > 0.5
        assert 2 <= statistics.median(samples) < 30

        payload = random.Random(1).randbytes(1 << 20)
        address = _echo(lab, "target", 7001, "sink")
        with lab.connect("proxy", address, timeout=20) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            received = b"".join(iter(lambda: sock.recv(1 << 16), b""))
        assert len(received) == len(payload)
        assert received == payload


def test_relay_carries_http(tmp_path: Path) -> None:
    body = random.Random(2).randbytes(300_000)
    (tmp_path / "blob.bin").write_bytes(body)
    with NetworkLab(Profile("http", 2.0), HOSTS, prefix=PREFIX, method="relay") as lab:
        lab.spawn("target", [sys.executable, "-m", "http.server", "8000", "--bind", "0.0.0.0",
                             "--directory", str(tmp_path)],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lab.wait_port("target", 8000, timeout=10)
        host, port = lab.expose("target", 8000)
        assert host == lab.address("target") and port != 8000
        for path, status in (("/blob.bin", 200), ("/missing", 404)):
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.sock = lab.connect("proxy", (host, port))
            conn.request("GET", path)
            response = conn.getresponse()
            data = response.read()
            conn.close()
            assert response.status == status
            if status == 200:
                assert data == body


def test_failures_are_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NetworkLabError, match=r"`ip link show dev twt-nothing` failed .*twt-nothing"):
        netns.run_ip("ip", "link", "show", "dev", "twt-nothing")
    with pytest.raises(ValueError, match="hub"):
        NetworkLab("lan", ("draft", "target"))
    with pytest.raises(ValueError, match="no network profile 'moon': none, loopback, lan"):
        NetworkLab("moon")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NetworkLabError, match="run it as root"):
        with NetworkLab("lan", prefix=PREFIX):
            pass
