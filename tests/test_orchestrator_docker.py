"""The orchestrator against real Docker daemons: two of them act as two hosts.

* h1 is the main daemon (tests/docker/dockerd.sh); it runs the coordinator.
* h2 is a second daemon (tests/docker/second-daemon.sh) with its own bridge, reached
  over tcp://127.0.0.1 (insecure: loopback only); its "GPUs" are two CPU RPC servers
  published on the bridge address, which is its cluster address.

The image is tests/docker/llama-test-image.sh (the host's prebuilt pinned llama.cpp
FROM the local base image; $TIGHTWAD_TEST_LLAMA_IMAGE picks another). Containers of
this run carry the cluster label pytest-<pid> and are removed at the end, and the
second daemon and its bridge are stopped if this module started them.

The tests run in file order and share one cluster: start, status, benchmark, a swap
under load through the orchestrator service and its front, a failed swap that rolls
back, a killed worker, stop.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import numpy as np
import pytest
import yaml
from servers import free_port

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[1]
DOCKER_DIR = REPO / "tests" / "docker"
D2_PORT = int(os.environ.get("TIGHTWAD_D2_PORT", "23751"))
D2_URL = f"tcp://127.0.0.1:{D2_PORT}"
D2_ADDRESS = os.environ.get("TIGHTWAD_D2_ADDRESS", "10.231.0.1")
PROMPTS = ("The capital of France is", "def fibonacci(n):")


def _sh(*argv: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def tightwad(config: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess (its exit code, stdout and stderr)."""
    return subprocess.run([sys.executable, "-m", "tightwad.cli", "-c", str(config), *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def daemons() -> Iterator[tuple[docker.DockerClient, docker.DockerClient]]:
    started_main = _sh("docker", "version", check=False).returncode != 0
    _sh(str(DOCKER_DIR / "dockerd.sh"), "up")  # idempotent: the engine, and the base image
    second_running = "not running" not in _sh(str(DOCKER_DIR / "second-daemon.sh"), "status",
                                              check=False).stdout
    _sh(str(DOCKER_DIR / "second-daemon.sh"), "up")
    d1 = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    d2 = docker.DockerClient(base_url=D2_URL)
    try:
        yield d1, d2
    finally:
        d1.close()
        d2.close()
        if not second_running:
            _sh(str(DOCKER_DIR / "second-daemon.sh"), "down", check=False)
        if started_main:
            _sh(str(DOCKER_DIR / "dockerd.sh"), "down", check=False)


@pytest.fixture(scope="module")
def image(daemons: tuple[docker.DockerClient, docker.DockerClient]) -> str:
    name = os.environ.get("TIGHTWAD_TEST_LLAMA_IMAGE") or _sh(
        str(DOCKER_DIR / "llama-test-image.sh")).stdout.strip().splitlines()[-1]
    _sh(str(DOCKER_DIR / "second-daemon.sh"), "load", name)
    return name


def _free_port_on(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _broken_gguf(path: Path) -> Path:
    """A GGUF with a valid header that llama.cpp cannot load (an unknown architecture)."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "tightwad-broken")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(16)
    w.add_head_count(1)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(16, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def cluster(daemons: tuple[docker.DockerClient, docker.DockerClient], image: str, smollm: Path,
            qwen_draft: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The cluster's config file; everything this cluster started is removed afterwards."""
    folder = tmp_path_factory.mktemp("cluster")
    name = f"pytest-{os.getpid()}"
    previous = os.environ.get("TIGHTWAD_CLUSTER")
    os.environ["TIGHTWAD_CLUSTER"] = name
    config = {
        "hosts": {
            "h1": {"docker": "unix:///var/run/docker.sock",
                   "gpus": [{"vendor": "cpu", "name": "h1 RAM", "vram_gb": 0.2}]},
            "h2": {"docker": D2_URL, "insecure": True, "cluster_address": D2_ADDRESS,
                   "gpus": [{"vendor": "cpu", "name": "h2 RAM a", "vram_gb": 0.6},
                            {"vendor": "cpu", "name": "h2 RAM b", "vram_gb": 0.6}]},
        },
        "coordinator": {"host": "h1", "port": free_port()},
        "workers": [{"host": "h2", "gpus": [
            {"index": 0, "rpc_port": _free_port_on(D2_ADDRESS)},
            {"index": 1, "rpc_port": _free_port_on(D2_ADDRESS)}]}],
        "models": {
            "smollm": {"path": str(smollm), "ctx_size": 1024, "default": True},
            "qwen05": {"path": str(qwen_draft), "ctx_size": 1024},
            "broken": {"path": str(_broken_gguf(folder / "broken.gguf"))},
        },
        "images": {"cpu": image},
    }
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        yield path
    finally:
        tightwad(path, "stop")
        d1, d2 = daemons
        for client in (d1, d2):
            for c in client.containers.list(all=True, filters={"label": f"io.tightwad.cluster={name}"}):
                c.remove(force=True)
            for n in client.networks.list(filters={"label": f"io.tightwad.cluster={name}"}):
                n.remove()
        if previous is None:
            os.environ.pop("TIGHTWAD_CLUSTER", None)
        else:
            os.environ["TIGHTWAD_CLUSTER"] = previous


def _config(cluster: Path) -> dict:
    return yaml.safe_load(cluster.read_text())


def _coordinator_url(cluster: Path) -> str:
    return f"http://127.0.0.1:{_config(cluster)['coordinator']['port']}"


def _workers(d2: docker.DockerClient) -> dict[str, str]:
    cluster = os.environ["TIGHTWAD_CLUSTER"]
    found = d2.containers.list(all=True, filters={"label": [f"io.tightwad.cluster={cluster}",
                                                            "io.tightwad.role=rpc-worker"]})
    return {c.name: c.id for c in found}


def _complete(url: str, prompt: str, n: int = 16) -> str:
    r = httpx.post(f"{url}/completion", json={"prompt": prompt, "n_predict": n, "temperature": 0,
                                              "cache_prompt": False}, timeout=300)
    r.raise_for_status()
    return r.json()["content"]


# --- the tests, in order ---------------------------------------------------------------------


def test_unreachable_daemon_is_a_clear_error(daemons: object, smollm: Path, tmp_path: Path) -> None:
    closed = free_port()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "hosts": {"h1": {"docker": "unix:///var/run/docker.sock"},
                  "gone": {"docker": f"tcp://127.0.0.1:{closed}", "insecure": True,
                           "cluster_address": "10.231.0.1",
                           "gpus": [{"vendor": "cpu", "vram_gb": 1}]}},
        "coordinator": {"host": "h1"}, "workers": [{"host": "gone"}],
        "models": {"smollm": {"path": str(smollm)}}}))
    status = tightwad(path, "status", "--no-vram")
    assert status.returncode == 1, status.stderr
    assert "UNREACHABLE" in status.stdout
    message = f"host 'gone': the Docker daemon at tcp://127.0.0.1:{closed} is unreachable"
    assert message in status.stdout and "Traceback" not in status.stdout + status.stderr
    start = tightwad(path, "start")
    assert start.returncode == 2
    assert f"error: {message}: connection refused" in start.stderr, start.stderr
    assert "Traceback" not in start.stderr


def test_start_places_workers_on_host2_and_matches_a_local_run(
        cluster: Path, daemons: tuple[docker.DockerClient, docker.DockerClient],
        servers: object, smollm: Path) -> None:
    d1, d2 = daemons
    result = tightwad(cluster, "start")
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "✓ smollm is serving at" in result.stdout
    config = _config(cluster)
    workers = d2.containers.list(filters={"label": [f"io.tightwad.cluster={os.environ['TIGHTWAD_CLUSTER']}",
                                                    "io.tightwad.role=rpc-worker"]})
    assert len(workers) == 2
    ports = sorted(g["rpc_port"] for g in config["workers"][0]["gpus"])
    for c in workers:
        bindings = c.attrs["HostConfig"]["PortBindings"]["50052/tcp"]
        assert [b["HostIp"] for b in bindings] == [D2_ADDRESS]  # the cluster address, not 0.0.0.0
        assert int(bindings[0]["HostPort"]) in ports
        assert c.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
        assert c.labels["io.tightwad.role"] == "rpc-worker" and c.labels["io.tightwad.host"] == "h2"
    coordinators = d1.containers.list(filters={"label": [
        f"io.tightwad.cluster={os.environ['TIGHTWAD_CLUSTER']}", "io.tightwad.role=coordinator"]})
    assert [c.labels["io.tightwad.model"] for c in coordinators] == ["smollm"]
    command = coordinators[0].attrs["Config"]["Cmd"]
    rpc = command[command.index("--rpc") + 1].split(",")
    assert rpc == [f"{D2_ADDRESS}:{p}" for p in (g["rpc_port"] for g in config["workers"][0]["gpus"])]
    placement = json.loads(coordinators[0].labels["io.tightwad.placement"])
    assert sum(placement["split"]) == placement["ngl"] > 0

    # Greedy output through host 1's coordinator with host 2's RPC servers equals the
    # same model run locally by the same llama.cpp build.
    local = servers("llama-server", smollm)  # type: ignore[operator]
    for prompt in PROMPTS:
        assert _complete(_coordinator_url(cluster), prompt) == _complete(local.url, prompt)


def test_status_and_benchmark(cluster: Path) -> None:
    status = tightwad(cluster, "status")
    print(status.stdout)
    assert status.returncode == 0, status.stdout + status.stderr
    out = status.stdout
    assert re.search(r"h2/0 .* running +up +reachable", out) and re.search(r"h2/1 .* running +up", out)
    assert re.search(r"smollm +llama-server .* ready +healthy", out)
    assert "SECURITY" not in out and "WARNINGS" not in out
    data = json.loads(tightwad(cluster, "status", "--json").stdout)
    assert {w["state"] for w in data["workers"]} == {"up"}
    assert sum(d["used_bytes"] for d in data["devices"]) > 0

    again = tightwad(cluster, "start")
    assert again.returncode == 0 and "already running" in again.stdout

    bench = tightwad(cluster, "benchmark", "--max-tokens", "8")
    print(bench.stdout)
    assert bench.returncode == 0, bench.stdout + bench.stderr
    assert "gen tok/s" in bench.stdout and "mean" in bench.stdout


class _Load:
    """Clients sending requests to the front while a swap happens: plain and streamed."""

    def __init__(self, url: str):
        self.url = url
        self.results: list[tuple] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._plain, daemon=True),
                         threading.Thread(target=self._plain, daemon=True),
                         threading.Thread(target=self._streamed, daemon=True)]

    def __enter__(self) -> _Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in self._threads), "a client hung"

    def _record(self, started: float, *fields: object) -> None:
        self.results.append((*fields, time.monotonic() - started))

    def _plain(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    r = client.post(f"{self.url}/completion", json={
                        "prompt": "Count: one, two,", "n_predict": 4, "temperature": 0})
                    if r.status_code == 200:
                        self._record(started, 200, r.json()["model"], None)
                    else:
                        self._record(started, r.status_code, r.headers.get("retry-after"), r.text[:80])
                        time.sleep(0.3)
                except httpx.HTTPError as exc:
                    self._record(started, "error", type(exc).__name__, str(exc)[:80])

    def _streamed(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    with client.stream("POST", f"{self.url}/completion", json={
                            "prompt": "Once upon a time", "n_predict": 6, "temperature": 0,
                            "stream": True}) as r:
                        if r.status_code != 200:
                            r.read()
                            self._record(started, r.status_code, r.headers.get("retry-after"),
                                         "stream: " + r.text[:100])
                            time.sleep(0.3)
                            continue
                        events = [json.loads(line[5:]) for line in r.iter_lines()
                                  if line.startswith("data:") and line[5:].strip() != "[DONE]"]
                        complete = bool(events) and events[-1].get("stop") is True
                        self._record(started, 200 if complete else "cut", "stream", None)
                except httpx.HTTPError as exc:
                    self._record(started, "error", type(exc).__name__, str(exc)[:80])


@contextlib.contextmanager
def _service(cluster: Path) -> Iterator[tuple[str, str]]:
    api, front = free_port(), free_port()
    log = cluster.parent / "orchestrator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tightwad.orchestrator", "-c", str(cluster), "serve",
             "--port", str(api), "--front", f"127.0.0.1:{front}", "--watch-interval", "2"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    api_url, front_url = f"http://127.0.0.1:{api}", f"http://127.0.0.1:{front}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{front_url}/health", timeout=2).status_code == 200:
                    break
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the service's front never routed to the coordinator\n" + log.read_text()
            time.sleep(0.3)
        yield api_url, front_url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        print(log.read_text()[-3000:])


def test_swap_under_load_keeps_workers_and_requests_clean(
        cluster: Path, daemons: tuple[docker.DockerClient, docker.DockerClient]) -> None:
    _, d2 = daemons
    workers_before = _workers(d2)
    with _service(cluster) as (api, front):
        with _Load(front) as load:
            time.sleep(3)  # requests flowing to smollm first
            swap = tightwad(cluster, "swap", "qwen05", "--orchestrator", api)
            time.sleep(5)  # and to qwen05 afterwards
        print(swap.stdout, swap.stderr)
        metrics = httpx.get(f"{api}/metrics", timeout=10).text
        status = json.loads(tightwad(cluster, "status", "--json", "--orchestrator", api).stdout)
    assert swap.returncode == 0, swap.stdout + swap.stderr
    for step in ("checking workers", "reading the GGUF header of qwen05", "stop-then-start swap",
                 "stopped smollm", "qwen05 is ready", "downtime"):
        assert step in swap.stdout, step
    downtime = float(re.search(r"downtime: ([\d.]+) s", swap.stdout).group(1))
    print(f"measured swap downtime smollm -> qwen05: {downtime:.2f} s")

    outcomes = collections.Counter(r[:2] for r in load.results)
    print("outcomes:", outcomes)
    bad = [r for r in load.results if not (r[0] == 200 or (r[0] == 503 and r[1] == "2"))]
    assert not bad, f"requests neither completed nor got a clean 503: {bad[:5]}"
    assert outcomes[(200, "smollm")] and outcomes[(200, "qwen05")], outcomes
    assert outcomes[(200, "stream")], outcomes
    assert max(r[-1] for r in load.results) < 60, "a request waited too long"

    assert _workers(d2) == workers_before  # the same containers: RPC workers persist
    assert 'tightwad_orchestrator_swaps_total{model="qwen05",result="ok"} 1.0' in metrics
    assert [c["model"] for c in status["coordinators"]] == ["qwen05"]
    assert status["front"]["url"] == _coordinator_url(cluster)


def test_failed_swap_rolls_back(cluster: Path,
                                daemons: tuple[docker.DockerClient, docker.DockerClient]) -> None:
    d1, d2 = daemons
    workers_before = _workers(d2)
    swap = tightwad(cluster, "swap", "broken")
    print(swap.stdout, swap.stderr)
    assert swap.returncode == 2
    assert "swap to broken failed, rolled back to qwen05" in swap.stderr
    assert "rolling back: restarting qwen05" in swap.stdout and "qwen05 is serving again" in swap.stdout
    assert "Traceback" not in swap.stderr
    assert _workers(d2) == workers_before
    names = [c.labels["io.tightwad.model"] for c in d1.containers.list(all=True, filters={"label": [
        f"io.tightwad.cluster={os.environ['TIGHTWAD_CLUSTER']}", "io.tightwad.role=coordinator"]})]
    assert names == ["qwen05"]
    assert _complete(_coordinator_url(cluster), "def add(a, b):", 4)

    unknown = tightwad(cluster, "swap", "nope")
    assert unknown.returncode == 2
    assert re.search(r"no model named 'nope'; known models: (broken|qwen05|smollm)(, (broken|qwen05|smollm)){2}\n",
                     unknown.stderr), unknown.stderr


def test_killed_worker_shows_down_and_blocks_start(
        cluster: Path, daemons: tuple[docker.DockerClient, docker.DockerClient]) -> None:
    _, d2 = daemons
    victim = next(c for c in d2.containers.list(filters={"label": [
        f"io.tightwad.cluster={os.environ['TIGHTWAD_CLUSTER']}", "io.tightwad.role=rpc-worker",
        "io.tightwad.gpu=1"]}))
    victim.kill()
    status = tightwad(cluster, "status")
    print(status.stdout)
    assert status.returncode == 1
    assert re.search(r"h2/1 .* exited +DOWN", status.stdout)
    assert "worker h2/1 (" in status.stdout and "is down: exited (code 137)" in status.stdout

    start = tightwad(cluster, "start")
    assert start.returncode == 2
    assert f"worker h2/1 (h2 RAM b, container {victim.name}) is exited (code 137)" in start.stderr
    assert "Traceback" not in start.stderr

    stop = tightwad(cluster, "stop")
    assert stop.returncode == 0, stop.stderr
    assert not _workers(d2)
    assert not d2.networks.list(filters={"label": f"io.tightwad.cluster={os.environ['TIGHTWAD_CLUSTER']}"})


def test_overlap_swap_when_the_coordinator_has_room(
        cluster: Path, daemons: tuple[docker.DockerClient, docker.DockerClient]) -> None:
    """With enough memory on the coordinator's own host, the new model starts beside the old
    one (without the RPC workers, which serve one client at a time) and the front switches
    over once it is healthy: no request sees a 503."""
    _, d2 = daemons
    config = _config(cluster)
    config["hosts"]["h1"]["gpus"][0]["vram_gb"] = 2.0
    roomy = cluster.parent / "roomy.yaml"
    roomy.write_text(yaml.safe_dump(config))
    try:
        start = tightwad(roomy, "start")
        assert start.returncode == 0, start.stdout + start.stderr
        workers_before = _workers(d2)
        with _service(roomy) as (api, front):
            with _Load(front) as load:
                time.sleep(3)
                swap = tightwad(roomy, "swap", "qwen05", "--orchestrator", api)
                time.sleep(4)
        print(swap.stdout, swap.stderr)
        assert swap.returncode == 0, swap.stdout + swap.stderr
        assert "(overlap)" in swap.stdout and "downtime: none" in swap.stdout
        outcomes = collections.Counter(r[:2] for r in load.results)
        print("outcomes:", outcomes, [r for r in load.results if r[0] != 200])
        assert set(outcomes) <= {(200, "smollm"), (200, "qwen05"), (200, "stream")}, outcomes
        assert outcomes[(200, "smollm")] and outcomes[(200, "qwen05")]
        assert _workers(d2) == workers_before
    finally:
        assert tightwad(roomy, "stop").returncode == 0
