"""The orchestrator: places, starts, hot-swaps, stops and watches a model across Docker hosts.

    o = Orchestrator(config)
    o.status() -> ClusterStatus             hosts, devices, workers, coordinator, warnings
    o.plan(model) -> Placement              a dry run: nothing is started
    o.start(model, progress=print)          workers (one rpc-server per GPU), then the coordinator
    o.swap(model, progress=print)           a new coordinator; the workers stay
    o.stop(progress=print)                  everything this cluster runs
    o.benchmark(...)                        the coordinator's prompt and generation tok/s

Every operation checks before it touches anything: hosts answer, images are
there, workers are up, and the model fits the pooled free memory (read from
its GGUF header). Containers carry labels (tightwad.orchestrator.containers),
so the state of the cluster is read from the daemons each time; the only
in-process state is each coordinator's Lifecycle, which every change goes
through (tightwad.orchestrator.lifecycle). One operation runs at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import httpx

from tightwad.config import Config, GpuConfig, ModelConfig, WorkerConfig
from tightwad.config_schema import BACKEND_VENDOR
from tightwad.orchestrator import containers as ct
from tightwad.orchestrator.errors import (
    Busy,
    HostUnreachable,
    OrchestratorError,
    StartFailed,
    SwapFailed,
    UnknownModel,
    WorkerDown,
)
from tightwad.orchestrator.front import DirectSwitch, Switch
from tightwad.orchestrator.gguf import NeedMoreBytes, parse_header, read_header
from tightwad.orchestrator.hosts import ContainerSpec, ContainerState, Host, connect
from tightwad.orchestrator.lifecycle import Lifecycle, State
from tightwad.orchestrator.placement import GIB, Device, Footprint, Placement, footprint, gib, place
from tightwad.orchestrator.vram import Measurement, probe

log = logging.getLogger("tightwad.orchestrator")

Progress = Callable[[str], None]
HEADER_READ_START = 8 * 1024**2
HEADER_READ_MAX = 512 * 1024**2
PROBE_CACHE_S = 30.0
PING_EVERY_S = 2.0  # host() pings a daemon at most this often (every call would be chatty)


def _quiet(_: str) -> None:
    pass


# --- what status reports ----------------------------------------------------------


@dataclasses.dataclass
class HostStatus:
    name: str
    endpoint: str
    address: str
    up: bool
    error: str | None = None


@dataclasses.dataclass
class DeviceStatus:
    device: Device
    used_bytes: int | None  # taken by the running model (measured, or the placement's estimate)
    note: str | None = None  # why free memory is the configured figure


@dataclasses.dataclass
class WorkerStatus:
    host: str
    gpu: GpuConfig
    endpoint: str  # address:port the coordinator connects to
    managed: bool  # Tightwad runs it (its host is a hosts entry)
    container: ContainerState | None = None
    reachable: bool | None = None  # RPC port answers (open or busy); None: not probed
    rpc: str | None = None  # open | busy | closed (see rpc_probe); None: not probed
    host_error: str | None = None

    @property
    def id(self) -> str:
        return f"{self.host}/{self.gpu.index}"

    @property
    def state(self) -> str:
        if self.host_error:
            return "unknown"
        if self.managed:
            if self.container is None:
                return "absent"
            if not self.container.running or self.reachable is False:
                return "down"
            return "up"
        return "unknown" if self.reachable is None else "up" if self.reachable else "down"


@dataclasses.dataclass
class CoordinatorStatus:
    model: str
    kind: str
    container: ContainerState
    url: str | None
    healthy: bool
    state: State
    placement: Mapping[str, Any]


@dataclasses.dataclass
class ClusterStatus:
    hosts: list[HostStatus]
    devices: list[DeviceStatus]
    workers: list[WorkerStatus]
    coordinators: list[CoordinatorStatus]
    warnings: list[str]

    @property
    def coordinator(self) -> CoordinatorStatus | None:
        running = [c for c in self.coordinators if c.container.running]
        return running[0] if running else (self.coordinators[0] if self.coordinators else None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "hosts": [dataclasses.asdict(h) for h in self.hosts],
            "devices": [{**dataclasses.asdict(d.device), "used_bytes": d.used_bytes, "note": d.note}
                        for d in self.devices],
            "workers": [{
                "id": w.id, "host": w.host, "gpu": w.gpu.name, "index": w.gpu.index,
                "endpoint": w.endpoint, "managed": w.managed, "state": w.state,
                "reachable": w.reachable, "rpc": w.rpc, "host_error": w.host_error,
                "container": _container_dict(w.container),
            } for w in self.workers],
            "coordinators": [{
                "model": c.model, "kind": c.kind, "url": c.url, "healthy": c.healthy,
                "state": c.state.value, "placement": dict(c.placement),
                "container": _container_dict(c.container),
            } for c in self.coordinators],
            "warnings": list(self.warnings),
        }


def _container_dict(c: ContainerState | None) -> dict[str, Any] | None:
    if c is None:
        return None
    return {"id": c.id, "name": c.name, "status": c.status, "exit_code": c.exit_code,
            "image": c.image, "restart_count": c.restart_count,
            "ports": {k: [list(b) for b in v] for k, v in c.ports.items()}}


@dataclasses.dataclass
class StartResult:
    model: str
    url: str
    placement: Placement
    seconds: float
    already_running: bool = False


@dataclasses.dataclass
class SwapResult:
    old_model: str
    new_model: str
    strategy: str  # overlap | stop-then-start
    url: str
    seconds: float  # the whole swap
    downtime_s: float  # no coordinator could answer (old stopped .. new healthy); 0 for overlap
    held_s: float  # the front refused new requests with 503 (0 without a front)
    drained: int  # requests that finished on the old coordinator before it stopped
    workers_before: dict[str, str]
    workers_after: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- the orchestrator ---------------------------------------------------------------


class Orchestrator:
    def __init__(
        self,
        config: Config,
        *,
        cluster: str | None = None,
        connect_host: Callable[..., Host] = connect,
        switch: Switch | None = None,
        metrics: Any = None,  # tightwad.orchestrator.metrics.OrchestratorMetrics
        kind: str | None = None,
        health_timeout_s: float = 600.0,
        drain_timeout_s: float = 120.0,
        stop_timeout_s: float = 10.0,
        threads: int | None = None,
    ):
        self.config = config
        self.cluster = cluster or ct.cluster_name()
        self.switch: Switch = switch or DirectSwitch()
        self.metrics = metrics
        self.kind = kind or ct.coordinator_kind(config)
        self.health_timeout_s = health_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.threads = threads
        self._connect = connect_host
        self._hosts: dict[str, Host] = {}
        self._pinged: dict[str, float] = {}  # host -> when it last answered a ping
        self._probes: dict[tuple[str, str], tuple[float, dict[int, Measurement], str | None]] = {}
        self._lifecycles: dict[str, Lifecycle] = {}
        self._op_lock = threading.Lock()
        self.operation: str | None = None  # what is running now, for Busy and /v1/status
        if metrics is not None:
            for name in config.models:
                metrics.init_model(name)
            for d in self._configured_devices():
                metrics.init_gpu(d.host, d.name, d.vendor, d.total_bytes / GIB)

    # -- hosts -----------------------------------------------------------------------

    def host(self, name: str) -> Host:
        """The connected host ``name`` (a hosts entry); HostUnreachable if it does not answer."""
        host = self._hosts.get(name)
        if host is None:
            entry = self.config.host_entry(name)
            if entry is None:
                raise OrchestratorError(f"{name!r} is not a hosts entry; Tightwad cannot run "
                                        "containers there")
            host = self._connect(entry)
            self._hosts[name] = host
        if time.monotonic() - self._pinged.get(name, -PING_EVERY_S) >= PING_EVERY_S:
            try:
                host.ping()
            except HostUnreachable:
                self._hosts.pop(name, None)
                self._pinged.pop(name, None)
                raise
            self._pinged[name] = time.monotonic()
        return host

    def managed_hosts(self) -> list[str]:
        """Hosts entries that run the coordinator or workers, in config order."""
        names = []
        coordinator = self.config.coordinator
        if coordinator is not None and coordinator.host in self.config.hosts:
            names.append(coordinator.host)
        for w in self.config.workers:
            if w.host in self.config.hosts and w.host not in names:
                names.append(w.host)
        return names

    def close(self) -> None:
        for host in self._hosts.values():
            with contextlib.suppress(Exception):
                host.close()
        self._hosts.clear()
        self._pinged.clear()

    @contextlib.contextmanager
    def _operation(self, what: str) -> Iterator[None]:
        """One start, stop or swap at a time: a second one gets Busy. A status pass (the
        service's watch loop) also holds the lock, briefly; an operation waits for it."""
        acquired = self._op_lock.acquire(blocking=False)
        if not acquired and self.operation is None:
            acquired = self._op_lock.acquire(timeout=120)
        if not acquired:
            raise Busy(f"cannot {what}: {self.operation or 'another operation'} is in progress")
        self.operation = what
        try:
            yield
        finally:
            self.operation = None
            self._op_lock.release()

    @property
    def busy(self) -> bool:
        """A start, stop or swap is running (status passes do not count)."""
        return self.operation is not None

    # -- models and memory -------------------------------------------------------------

    def model(self, name: str | None) -> ModelConfig:
        self.config.require_cluster()
        if name is None:
            default = self.config.default_model
            if default is None:
                raise UnknownModel(None, list(self.config.models))
            return default
        if name not in self.config.models:
            raise UnknownModel(name, list(self.config.models))
        return self.config.models[name]

    def read_footprint(self, model: ModelConfig, *, offline: bool = False) -> Footprint:
        """From the GGUF header: the local file when it is here, else read on the
        coordinator's host (the first bytes of the file, through a one-shot container)."""
        if os.path.isfile(model.path):
            return footprint(read_header(model.path), model.ctx_size)
        coordinator = self.config.require_cluster()
        if offline or coordinator.host not in self.config.hosts:
            raise OrchestratorError(
                f"models.{model.name}.path: {model.path} is not on this machine"
                + ("" if offline else " and the coordinator's host is not a hosts entry"))
        host = self.host(coordinator.host)
        image = self.config.images.for_backend(coordinator.backend)
        n = HEADER_READ_START
        while True:
            spec = ContainerSpec(
                name=f"tightwad-{self.cluster}-gguf-{os.getpid()}", image=image,
                entrypoint=("head",), command=("-c", str(n), ct.model_in_container(model.path)),
                labels=ct.base_labels(self.cluster, ct.ROLE_PROBE),
                volumes=ct.model_volume(model.path), restart="no", network="none")
            code, data = host.run_once(spec, timeout_s=120)
            if code != 0:
                raise OrchestratorError(f"models.{model.name}.path: cannot read {model.path} on "
                                        f"host {host.name}: {data.decode(errors='replace')[-200:]}")
            try:
                return footprint(parse_header(data), model.ctx_size)
            except NeedMoreBytes as exc:
                if len(data) < n or n >= HEADER_READ_MAX:
                    raise OrchestratorError(f"{model.path}: truncated GGUF header") from exc
                n = min(HEADER_READ_MAX, max(2 * n, exc.needed + 1024**2))

    def _configured_devices(self) -> list[Device]:
        """Every device of the coordinator and workers at its configured size."""
        coordinator = self.config.coordinator
        devices: list[Device] = []
        for worker in self.config.workers:
            address = self.config.address_of(worker.host)
            shown = f"[{address}]" if ":" in address else address
            for gpu in worker.gpus:
                vendor = gpu.vendor or (BACKEND_VENDOR[worker.backend] if worker.backend else "cpu")
                devices.append(Device(
                    id=f"{worker.host}/{gpu.index}", host=worker.host, name=gpu.name, vendor=vendor,
                    kind="rpc", total_bytes=int(gpu.vram_gb * GIB), free_bytes=int(gpu.vram_gb * GIB),
                    endpoint=f"{shown}:{gpu.rpc_port}"))
        if coordinator is not None:
            for gpu in coordinator.gpus:
                vendor = gpu.vendor or BACKEND_VENDOR[coordinator.backend]
                devices.append(Device(
                    id=f"{coordinator.host}/{gpu.index}", host=coordinator.host, name=gpu.name,
                    vendor=vendor, kind="cpu" if vendor == "cpu" else "gpu",
                    total_bytes=int(gpu.vram_gb * GIB), free_bytes=int(gpu.vram_gb * GIB)))
        return devices

    def devices(self, *, offline: bool = False, reclaim: Mapping[str, int] | None = None,
                notes: list[str] | None = None) -> list[Device]:
        """Devices with their free memory now: measured by nvidia-smi / rocm-smi where that
        works (plus ``reclaim``: memory a model about to be stopped holds there), else the
        configured figure. Never more than the configured figure."""
        reclaim = reclaim or {}
        out = []
        by_host: dict[tuple[str, str], list[GpuConfig]] = {}
        configured = self._configured_devices()
        gpus = self._gpus_by_id()
        for d in configured:
            if d.vendor in ("nvidia", "amd") and d.host in self.config.hosts:
                by_host.setdefault((d.host, d.vendor), []).append(gpus[d.id])
        measured: dict[str, Measurement] = {}
        if not offline:
            for (host_name, vendor), host_gpus in by_host.items():
                found, why = self._probe(host_name, vendor, host_gpus)
                for index, m in found.items():
                    measured[f"{host_name}/{index}"] = m
                if why and notes is not None:
                    notes.append(why)
        for d in configured:
            m = measured.get(d.id)
            if m is None:
                out.append(d)
                continue
            free = min(d.total_bytes, m.free_bytes + reclaim.get(d.id, 0))
            out.append(dataclasses.replace(d, free_bytes=free, source=m.source))
        return out

    def _gpus_by_id(self) -> dict[str, GpuConfig]:
        found = {}
        for worker in self.config.workers:
            for gpu in worker.gpus:
                found[f"{worker.host}/{gpu.index}"] = gpu
        if self.config.coordinator is not None:
            for gpu in self.config.coordinator.gpus:
                found[f"{self.config.coordinator.host}/{gpu.index}"] = gpu
        return found

    def _probe(self, host_name: str, vendor: str,
               gpus: Sequence[GpuConfig]) -> tuple[dict[int, Measurement], str | None]:
        cached = self._probes.get((host_name, vendor))
        if cached and time.monotonic() - cached[0] < PROBE_CACHE_S:
            return cached[1], cached[2]
        try:
            found, why = probe(self.host(host_name), self.config, self.cluster, vendor, gpus)
        except HostUnreachable as exc:
            found, why = {}, exc.message
        self._probes[(host_name, vendor)] = (time.monotonic(), found, why)
        return found, why

    def plan(self, model_name: str | None, *, offline: bool = False,
             notes: list[str] | None = None) -> Placement:
        """Where ``model_name`` would go now (free memory measured unless ``offline``);
        DoesNotFit says by how much it is short. Starts nothing."""
        model = self.model(model_name)
        fp = self.read_footprint(model, offline=offline)
        reclaim: dict[str, int] = {}
        if not offline:
            with contextlib.suppress(OrchestratorError):
                for c in self._coordinator_containers():
                    if c.running:
                        for device, used in _placement_label(c).get("use", {}).items():
                            reclaim[device] = reclaim.get(device, 0) + int(used)
        return place(fp, self.devices(offline=offline, reclaim=reclaim, notes=notes),
                     model=model.name, path=model.path)

    # -- observing -----------------------------------------------------------------------

    def _coordinator_containers(self) -> list[ContainerState]:
        coordinator = self.config.require_cluster()
        if coordinator.host not in self.config.hosts:
            raise OrchestratorError(
                f"coordinator.host {coordinator.host!r} is not a hosts entry: Tightwad only "
                "manages a coordinator it runs in Docker")
        labels = {ct.LABEL_CLUSTER: self.cluster, ct.LABEL_ROLE: ct.ROLE_COORDINATOR}
        return self.host(coordinator.host).list(labels)

    def coordinator_url(self, c: ContainerState) -> str | None:
        binding = c.published(f"{ct.HTTP_PORT_IN_CONTAINER}/tcp")
        if binding is None:
            return None
        coordinator = self.config.require_cluster()
        address = self.config.address_of(coordinator.host)
        if binding[0] not in ("0.0.0.0", "::", ""):
            address = binding[0]
        shown = f"[{address}]" if ":" in address else address
        return f"http://{shown}:{binding[1]}"

    def lifecycle(self, model: str) -> Lifecycle:
        lc = self._lifecycles.get(model)
        if lc is None:
            on_change = self._on_state if self.metrics is not None else None
            lc = self._lifecycles[model] = Lifecycle(model, State.STOPPED, on_change)
        return lc

    def _on_state(self, model: str, state: State) -> None:
        if self.metrics is not None and model in self.config.models:
            self.metrics.set_model_state(model, state.value)

    def _observe(self, model: str, running: bool, healthy: bool) -> Lifecycle:
        """Bring the lifecycle in line with what the daemon shows, through valid edges only
        (between operations: something outside this process may have changed it)."""
        lc = self.lifecycle(model)
        want = State.READY if running and healthy else State.STARTING if running else State.STOPPED
        path = {
            (State.STOPPED, State.STARTING): [State.STARTING],
            (State.STOPPED, State.READY): [State.STARTING, State.READY],
            (State.STARTING, State.READY): [State.READY],
            (State.STARTING, State.STOPPED): [State.STOPPING, State.STOPPED],
            (State.READY, State.STOPPED): [State.STOPPING, State.STOPPED],
            (State.READY, State.STARTING): [State.STOPPING, State.STOPPED, State.STARTING],
            (State.STOPPING, State.STOPPED): [State.STOPPED],
            (State.STOPPING, State.STARTING): [State.STOPPED, State.STARTING],
            (State.STOPPING, State.READY): [State.STOPPED, State.STARTING, State.READY],
        }.get((lc.state, want), [])
        for s in path:
            lc.to(s)
        return lc

    def workers_status(self, *, probe_rpc: bool = True) -> list[WorkerStatus]:
        """Each worker GPU's container and RPC port (``probe_rpc`` False: the container's
        state only, which leaves busy RPC servers' listen queues alone)."""
        out = []
        containers: dict[str, dict[str, ContainerState] | str] = {}
        for worker in self.config.workers:
            address = self.config.address_of(worker.host)
            managed = worker.host in self.config.hosts
            if managed and worker.host not in containers:
                try:
                    found = self.host(worker.host).list(
                        {ct.LABEL_CLUSTER: self.cluster, ct.LABEL_ROLE: ct.ROLE_WORKER})
                    containers[worker.host] = {c.name: c for c in found}
                except HostUnreachable as exc:
                    containers[worker.host] = exc.message
            for gpu in worker.gpus:
                assert gpu.rpc_port is not None
                shown = f"[{address}]" if ":" in address else address
                ws = WorkerStatus(worker.host, gpu, f"{shown}:{gpu.rpc_port}", managed)
                found_here = containers.get(worker.host)
                if isinstance(found_here, str):
                    ws.host_error = found_here
                elif found_here is not None:
                    ws.container = found_here.get(ct.worker_name(self.cluster, worker.host, gpu))
                if probe_rpc and ws.host_error is None and (
                        not managed or (ws.container and ws.container.running)):
                    ws.rpc = rpc_probe(address, gpu.rpc_port)
                    ws.reachable = ws.rpc != "closed"
                out.append(ws)
        return out

    def coordinators_status(self, *, observe: bool = False) -> list[CoordinatorStatus]:
        """The coordinator containers; ``observe`` (only with the operation lock held) also
        brings their lifecycles in line with what the daemon shows."""
        out = []
        for c in self._coordinator_containers():
            model = c.labels.get(ct.LABEL_MODEL, "?")
            url = self.coordinator_url(c)
            healthy = bool(c.running and url and http_healthy(url))
            lc = self._observe(model, c.running, healthy) if observe else self.lifecycle(model)
            out.append(CoordinatorStatus(model, c.labels.get(ct.LABEL_KIND, "llama-server"), c, url,
                                         healthy, lc.state, _placement_label(c)))
        return out

    def status(self, *, probe_vram: bool = True, probe_rpc: bool = True) -> ClusterStatus:
        """Everything, host by host; an unreachable daemon is a row, not an exception."""
        observe = self._op_lock.acquire(blocking=False)
        try:
            return self._status(probe_vram=probe_vram, probe_rpc=probe_rpc, observe=observe)
        finally:
            if observe:
                self._op_lock.release()

    def watch(self) -> ClusterStatus | None:
        """One pass of the service's watch loop: metrics, lifecycles and the switch's route
        follow what the daemons show (a coordinator started, swapped or stopped by a CLI
        elsewhere included). Skipped (None) while an operation runs."""
        if not self._op_lock.acquire(blocking=False):
            return None
        try:
            st = self._status(probe_vram=True, probe_rpc=False, observe=True)
            running = [c for c in st.coordinators if c.container.running]
            healthy = [c for c in running if c.healthy]
            if healthy:
                self.switch.route(healthy[0].url)
            elif not running:
                self.switch.route(None)
            return st
        finally:
            self._op_lock.release()

    def _status(self, *, probe_vram: bool, probe_rpc: bool, observe: bool) -> ClusterStatus:
        hosts = []
        for name in self.managed_hosts():
            entry = self.config.hosts[name]
            try:
                self.host(name)
                hosts.append(HostStatus(name, entry.docker, entry.cluster_address, True))
            except HostUnreachable as exc:
                hosts.append(HostStatus(name, entry.docker, entry.cluster_address, False, exc.message))
        up = {h.name for h in hosts if h.up}
        warnings: list[str] = [h.error or f"host {h.name} is unreachable" for h in hosts if not h.up]
        for name in self.managed_hosts():
            entry = self.config.hosts[name]
            address = entry.docker.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
            if entry.insecure and not _is_loopback(address):
                warnings.append(f"SECURITY: host {name}'s Docker daemon is reached over "
                                f"{entry.docker} without TLS (insecure: true): anyone who can "
                                "reach that port controls the machine")
        workers = self.workers_status(probe_rpc=probe_rpc)
        coordinators: list[CoordinatorStatus] = []
        coordinator = self.config.coordinator
        if coordinator is not None and coordinator.host in up:
            coordinators = self.coordinators_status(observe=observe)
        notes: list[str] = []
        devices = self.devices(offline=not probe_vram, notes=notes)
        running = next((c for c in coordinators if c.container.running), None)
        estimate = {k: int(v) for k, v in (running.placement.get("use", {}) if running else {}).items()}
        device_rows = []
        for d in devices:
            if d.source != "configured":
                used: int | None = d.total_bytes - d.free_bytes
            else:
                used = estimate.get(d.id, 0) if running else 0
            device_rows.append(DeviceStatus(d, used, None if d.source != "configured" else "configured"))
        warnings += notes
        warnings += self._exposure_warnings(workers)
        for w in workers:
            if w.state in ("down", "absent") and (running or w.container is not None):
                what = w.container.describe() if w.container else "not created"
                warnings.append(f"worker {w.id} ({w.endpoint}) is down: {what}"
                                + ("" if w.reachable is None else ", its RPC port is closed"))
        if self.metrics is not None:
            self._export(hosts, workers, device_rows)
        return ClusterStatus(hosts, device_rows, workers, coordinators, warnings)

    def _exposure_warnings(self, workers: Sequence[WorkerStatus]) -> list[str]:
        """RPC servers have no authentication: say so when one listens on a public address."""
        out = []
        for w in workers:
            addresses = []
            if w.container is not None:
                addresses = [ip for ip, _ in w.container.ports.get(f"{ct.RPC_PORT_IN_CONTAINER}/tcp", ())]
            else:
                addresses = [w.endpoint.rsplit(":", 1)[0].strip("[]")]
            for ip in addresses:
                if ip in ("", "0.0.0.0", "::"):
                    out.append(f"SECURITY: worker {w.id}'s RPC server (no authentication) is "
                               f"published on every interface of host {w.host} ({ip or '*'}:"
                               f"{w.gpu.rpc_port}); it should bind its cluster_address only")
                elif _is_public(ip) and w.reachable:
                    out.append(f"SECURITY: worker {w.id}'s RPC server (no authentication) is "
                               f"reachable on the public address {ip}:{w.gpu.rpc_port}; use a "
                               "private cluster_address or a firewall")
        return out

    def _export(self, hosts: Sequence[HostStatus], workers: Sequence[WorkerStatus],
                devices: Sequence[DeviceStatus]) -> None:
        m = self.metrics
        for h in hosts:
            m.hosts_up.labels(host=h.name).set(1 if h.up else 0)
        for w in workers:
            m.workers_up.labels(host=w.host, worker=w.id).set(1 if w.state == "up" else 0)
        for d in devices:
            m.gpu_vram_total.labels(host=d.device.host, gpu=d.device.name,
                                    vendor=d.device.vendor).set(d.device.total_bytes)
            m.gpu_vram_used.labels(host=d.device.host, gpu=d.device.name,
                                   vendor=d.device.vendor).set(d.used_bytes or 0)

    # -- starting ----------------------------------------------------------------------

    def _check_hosts(self, progress: Progress) -> None:
        names = self.managed_hosts()
        progress("→ checking Docker daemons: " + ", ".join(
            f"{n} ({self.config.hosts[n].docker})" for n in names))
        for n in names:
            self.host(n)
        progress(f"  ✓ {len(names)} host{'s' if len(names) != 1 else ''} answered")

    def _check_images(self, progress: Progress) -> None:
        needed: dict[str, set[str]] = {}
        coordinator = self.config.require_cluster()
        if coordinator.host in self.config.hosts:
            needed.setdefault(coordinator.host, set()).add(
                self.config.images.for_backend(coordinator.backend))
        for w in self.config.workers:
            if w.host in self.config.hosts:
                for gpu in w.gpus:
                    needed.setdefault(w.host, set()).add(
                        self.config.images.for_backend(ct.worker_backend(w, gpu)))
        for h, images in needed.items():
            host = self.host(h)
            for image in sorted(images):
                if not host.has_image(image):
                    progress(f"→ pulling {image} on {h}")
                    host.pull(image)  # ImageMissing, before anything was started

    def _check_workers(self, progress: Progress, *, allow_absent: bool) -> list[WorkerStatus]:
        progress("→ checking workers")
        workers = self.workers_status()
        down = []
        for w in workers:
            if w.host_error:
                raise HostUnreachable(w.host, self.config.hosts[w.host].docker, w.host_error)
            if w.state == "absent" and allow_absent:
                continue
            if w.state != "up":
                down.append(w)
        if down:
            lines = []
            for w in down:
                if w.container is not None:
                    logs = self._tail(w.host, w.container.name, 5)
                    lines.append(f"worker {w.id} ({w.gpu.name}, container {w.container.name}) is "
                                 f"{w.container.describe()}"
                                 + (f", but its RPC port {w.endpoint} is closed"
                                    if w.container.running else "")
                                 + (f"; last log lines:\n{logs}" if logs else ""))
                elif not w.managed:
                    lines.append(f"worker {w.id} at {w.endpoint} (not run by Tightwad) is unreachable")
                else:
                    lines.append(f"worker {w.id} ({w.gpu.name}) has no container")
            raise WorkerDown(
                "refusing to go on: " + "; ".join(lines) + "\n(`tightwad stop` removes the "
                "workers, then `tightwad start` creates them afresh)",
                workers=[w.id for w in down])
        progress(f"  ✓ {sum(1 for w in workers if w.state == 'up')} of {len(workers)} worker(s) up")
        return workers

    def _tail(self, host: str, container: str, n: int = 20) -> str:
        try:
            text = self.host(host).logs(container, tail=n).rstrip()
        except OrchestratorError:
            return ""
        return "\n".join("    " + line for line in text.splitlines())

    def _place(self, model: ModelConfig, progress: Progress, *,
               reclaim: Mapping[str, int] | None = None) -> tuple[Placement, list[Device]]:
        """The model's placement on the devices' free memory now (plus ``reclaim``: what a
        model about to stop holds), and those devices."""
        progress(f"→ reading the GGUF header of {model.name} ({model.path})")
        fp = self.read_footprint(model)
        progress(f"  ✓ {fp.n_layer} layers, weights {gib(fp.weights_bytes)}, "
                 f"KV cache {gib(fp.kv_bytes)} for {fp.n_ctx} tokens")
        progress("→ measuring free memory and placing layers")
        notes: list[str] = []
        devices = self.devices(reclaim=reclaim, notes=notes)
        for n in notes:
            progress(f"  ! {n}; using the configured figure")
        placement = place(fp, devices, model=model.name, path=model.path)
        progress(f"  ✓ fits: needs {gib(placement.required_bytes)} of "
                 f"{gib(placement.pooled_free_bytes)} free; " + ", ".join(
                     f"{s.device.id} layers {s.layers}" for s in placement.shares))
        return placement, devices

    def _ensure_workers(self, workers: Sequence[WorkerStatus], progress: Progress) -> None:
        todo = [w for w in workers if w.state == "absent"]
        for w in todo:
            worker = self._worker_config(w.host)
            spec = ct.worker_spec(self.config, self.cluster, worker, w.gpu, threads=self.threads)
            progress(f"→ starting worker {w.id} ({w.gpu.name}): {spec.image} on {w.endpoint}")
            host = self.host(w.host)
            self._ensure_network(host)
            host.remove(spec.name)
            state = host.create(spec)
            host.start(state.id)
        deadline = time.monotonic() + 60
        for w in todo:
            address, port = w.endpoint.rsplit(":", 1)
            while not rpc_reachable(address.strip("[]"), int(port)):
                c = self.host(w.host).find(ct.worker_name(self.cluster, w.host, w.gpu))
                if c is None or not c.running or time.monotonic() > deadline:
                    logs = self._tail(w.host, ct.worker_name(self.cluster, w.host, w.gpu))
                    raise StartFailed(f"worker {w.id} did not open its RPC port {w.endpoint} ("
                                      f"{c.describe() if c else 'container gone'})"
                                      + (f"; last log lines:\n{logs}" if logs else ""))
                time.sleep(0.2)
            progress(f"  ✓ worker {w.id} listening on {w.endpoint}")

    def _ensure_network(self, host: Host) -> None:
        host.ensure_network(ct.network_name(self.cluster),
                            ct.base_labels(self.cluster, "network"))

    def _worker_config(self, host: str) -> WorkerConfig:
        return next(w for w in self.config.workers if w.host == host)

    def _run_coordinator(self, model: ModelConfig, placement: Placement, progress: Progress, *,
                         host_port: int | None) -> tuple[ContainerState, str]:
        """Create, start and health-check a coordinator (STOPPED -> STARTING -> READY); on
        failure it is removed again (-> STOPPING -> STOPPED) and StartFailed carries its logs."""
        coordinator = self.config.require_cluster()
        host = self.host(coordinator.host)
        spec = ct.coordinator_spec(self.config, self.cluster, model, placement, kind=self.kind,
                                   host_port=host_port, threads=self.threads)
        lc = self.lifecycle(model.name)
        if lc.state is not State.STOPPED:
            self._observe(model.name, False, False)
        lc.transition(State.STOPPED, State.STARTING)
        progress(f"→ starting coordinator {model.name} ({self.kind}, {spec.image}): "
                 + " ".join(spec.command[1:]))
        state: ContainerState | None = None
        try:
            self._ensure_network(host)
            host.remove(spec.name)
            state = host.create(spec)
            state = host.start(state.id)
            url = self.coordinator_url(state)
            if url is None:
                raise StartFailed(f"coordinator {spec.name} has no published port")
            started = time.monotonic()
            self._wait_healthy(host, state, url, progress)
            progress(f"  ✓ {model.name} is ready at {url} ({time.monotonic() - started:.1f} s to "
                     "load and answer /health)")
        except BaseException:
            lc.transition(State.STARTING, State.STOPPING)
            if state is not None:
                with contextlib.suppress(OrchestratorError):
                    host.remove(state.id)
            lc.transition(State.STOPPING, State.STOPPED)
            raise
        lc.transition(State.STARTING, State.READY)
        return state, url

    def _wait_healthy(self, host: Host, state: ContainerState, url: str, progress: Progress) -> None:
        """Poll /health until 200, the container exits or restarts, or the deadline passes."""
        deadline = time.monotonic() + self.health_timeout_s
        shown = time.monotonic()
        next_check = 0.0
        while True:
            if http_healthy(url, timeout_s=2.0):
                return
            now = time.monotonic()
            if now >= next_check:
                c = host.find(state.id)
                if c is None or not c.running or c.restart_count > 0:
                    logs = self._tail(host.name, state.id, 25)
                    what = "is gone" if c is None else (
                        f"restarted {c.restart_count} time(s)" if c.running else c.describe())
                    raise StartFailed(f"coordinator {state.name} {what} before it was healthy"
                                      + (f"; last log lines:\n{logs}" if logs else ""))
                next_check = now + 1.0
            if now >= deadline:
                logs = self._tail(host.name, state.id, 25)
                raise StartFailed(f"coordinator {state.name} not healthy after "
                                  f"{self.health_timeout_s:.0f} s at {url}/health"
                                  + (f"; last log lines:\n{logs}" if logs else ""))
            if now - shown >= 10:
                progress(f"  … waiting for {url}/health ({now - deadline + self.health_timeout_s:.0f} s)")
                shown = now
            time.sleep(0.25)

    def start(self, model_name: str | None = None, *, progress: Progress = _quiet) -> StartResult:
        with self._operation("start"):
            return self._start(model_name, progress)

    def _start(self, model_name: str | None, progress: Progress) -> StartResult:
        started = time.monotonic()
        model = self.model(model_name)
        coordinator = self.config.require_cluster()
        self._check_hosts(progress)
        workers = self._check_workers(progress, allow_absent=True)
        for c in self._coordinator_containers():
            if not c.running:
                continue
            running = c.labels.get(ct.LABEL_MODEL, "?")
            if running != model.name:
                raise OrchestratorError(f"{running} is running; use `tightwad swap {model.name}` "
                                        "to replace it, or `tightwad stop` first")
            url = self.coordinator_url(c)
            if url and http_healthy(url):
                self._observe(model.name, True, True)
                self.switch.route(url)
                progress(f"  ✓ {model.name} is already running at {url}")
                return StartResult(model.name, url, self.plan(model.name), 0.0, already_running=True)
            raise OrchestratorError(f"{model.name}'s coordinator {c.name} is running but not healthy; "
                                    "`tightwad stop` and start again")
        self._check_images(progress)
        placement, _ = self._place(model, progress)
        self._ensure_workers(workers, progress)
        _, url = self._run_coordinator(model, placement, progress, host_port=coordinator.port)
        self.switch.route(url)
        self.switch.release()
        return StartResult(model.name, url, placement, time.monotonic() - started)

    # -- stopping ------------------------------------------------------------------------

    def stop(self, *, progress: Progress = _quiet) -> list[str]:
        with self._operation("stop"):
            return self._stop(progress)

    def _stop(self, progress: Progress) -> list[str]:
        """Stop and remove the coordinator(s), then every worker of this cluster."""
        removed = []
        coordinator = self.config.require_cluster()
        self.switch.route(None)
        if coordinator.host in self.config.hosts:
            host = self.host(coordinator.host)
            for c in self._coordinator_containers():
                model = c.labels.get(ct.LABEL_MODEL, "?")
                lc = self.lifecycle(model)
                progress(f"→ stopping coordinator {model} ({c.name})")
                if lc.state in (State.READY, State.STARTING):
                    lc.to(State.STOPPING)
                host.stop(c.id, timeout_s=self.stop_timeout_s)
                host.remove(c.id)
                if lc.state is State.STOPPING:
                    lc.to(State.STOPPED)
                removed.append(c.name)
        for name in self.managed_hosts():
            host = self.host(name)
            for c in host.list({ct.LABEL_CLUSTER: self.cluster, ct.LABEL_ROLE: ct.ROLE_WORKER}):
                progress(f"→ stopping worker {c.labels.get(ct.LABEL_HOST, name)}/"
                         f"{c.labels.get(ct.LABEL_GPU, '?')} ({c.name})")
                host.stop(c.id, timeout_s=self.stop_timeout_s)
                host.remove(c.id)
                removed.append(c.name)
            with contextlib.suppress(OrchestratorError):  # still in use by a stray container
                host.remove_network(ct.network_name(self.cluster))
        progress(f"  ✓ stopped {len(removed)} container(s)" if removed else "  ✓ nothing was running")
        return removed

    # -- swapping ------------------------------------------------------------------------

    def swap(self, model_name: str, *, progress: Progress = _quiet) -> SwapResult:
        model = self.model(model_name)  # unknown names are refused before anything else
        with self._operation(f"swap to {model.name}"):
            started = time.monotonic()
            try:
                result = self._swap(model, progress, started)
            except Exception:
                if self.metrics is not None:
                    self.metrics.observe_swap(model.name, time.monotonic() - started, ok=False)
                raise
            if self.metrics is not None:
                self.metrics.observe_swap(model.name, result.seconds, ok=True)
            return result

    def _worker_ids(self) -> dict[str, str]:
        return {w.id: w.container.id for w in self.workers_status() if w.container is not None}

    def _swap(self, model: ModelConfig, progress: Progress, started: float) -> SwapResult:
        coordinator = self.config.require_cluster()
        self._check_hosts(progress)
        current = [c for c in self._coordinator_containers() if c.running]
        if not current:
            raise OrchestratorError(f"nothing is running to swap from; `tightwad start -m {model.name}`")
        old = current[0]
        old_model = old.labels.get(ct.LABEL_MODEL, "?")
        old_url = self.coordinator_url(old)
        if old_model == model.name:
            raise OrchestratorError(f"{model.name} is already running")
        if old_url is None or not http_healthy(old_url):
            raise OrchestratorError(f"the running coordinator {old.name} is not healthy; "
                                    "`tightwad stop` and start again")
        self._observe(old_model, True, True)
        self._check_workers(progress, allow_absent=False)
        workers_before = self._worker_ids()
        use = {k: int(v) for k, v in _placement_label(old).get("use", {}).items()}
        placement, devices = self._place(model, progress, reclaim=use)
        overlap = (self._overlap_placement(model, placement.footprint, devices, use)
                   if self.switch.supports_overlap else None)
        old_lc = self.lifecycle(old_model)
        if overlap is not None:
            progress(f"→ overlap swap: {model.name} fits next to {old_model} on the coordinator's "
                     "own devices, so it starts before the old one stops (no RPC workers)")
            try:
                _, url = self._run_coordinator(model, overlap, progress, host_port=None)
            except OrchestratorError as exc:
                raise SwapFailed(f"swap to {model.name} failed; {old_model} kept serving "
                                 f"throughout: {exc.message}") from exc
            self.switch.route(url)
            progress(f"  ✓ new requests go to {url}; draining {old_model}")
            old_lc.transition(State.READY, State.STOPPING)
            drained = self.switch.inflight(old_url)
            left = self.switch.wait_idle(old_url, self.drain_timeout_s)
            self._retire(old, progress, left)
            old_lc.transition(State.STOPPING, State.STOPPED)
            return SwapResult(old_model, model.name, "overlap", url, time.monotonic() - started,
                              0.0, 0.0, drained, workers_before, self._worker_ids())
        progress(f"→ stop-then-start swap: {old_model} → {model.name} (the workers are shared, "
                 "so the old coordinator must release them first)")
        held_at = time.monotonic()
        self.switch.hold()
        try:
            old_lc.transition(State.READY, State.STOPPING)
            drained = self.switch.inflight(old_url)
            if drained:
                progress(f"→ new requests get 503 + Retry-After; waiting for {drained} running "
                         f"request(s) to finish (at most {self.drain_timeout_s:.0f} s)")
            busy = self.switch.wait_idle(old_url, self.drain_timeout_s)
            if busy:
                progress(f"  ! {busy} request(s) still running after {self.drain_timeout_s:.0f} s; "
                         "stopping anyway")
            else:
                progress(f"  ✓ no requests in flight on the old coordinator (waited "
                         f"{time.monotonic() - held_at:.1f} s)")
            host = self.host(coordinator.host)
            host.stop(old.id, timeout_s=self.stop_timeout_s)
            down_at = time.monotonic()
            old_lc.transition(State.STOPPING, State.STOPPED)
            progress(f"  ✓ stopped {old_model} ({old.name})")
            try:
                _, url = self._run_coordinator(model, placement, progress, host_port=coordinator.port)
            except Exception as exc:
                reason = exc.message if isinstance(exc, OrchestratorError) else repr(exc)
                progress(f"  ✗ {model.name} failed: {reason.splitlines()[0]}")
                self._roll_back(old, old_model, progress)
                raise SwapFailed(f"swap to {model.name} failed, rolled back to {old_model}: "
                                 f"{reason}") from exc
            up_at = time.monotonic()
            self.switch.route(url)
        finally:
            self.switch.release()
        released_at = time.monotonic()
        host.remove(old.id)
        downtime = up_at - down_at
        held = released_at - held_at if self.switch.supports_overlap else 0.0
        progress(f"  ✓ swapped {old_model} → {model.name}: downtime {downtime:.1f} s (from the old "
                 f"coordinator stopping to the new one answering /health)")
        return SwapResult(old_model, model.name, "stop-then-start", url, time.monotonic() - started,
                          downtime, held, drained, workers_before, self._worker_ids())

    def _overlap_placement(self, model: ModelConfig, fp: Footprint, devices: Sequence[Device],
                           old_use: Mapping[str, int]) -> Placement | None:
        """A placement on the coordinator's own devices only, beside the old model (the RPC
        workers serve one client at a time, so the old coordinator holds them all)."""
        local = [dataclasses.replace(d, free_bytes=max(0, d.free_bytes - old_use.get(d.id, 0)))
                 for d in devices if d.kind != "rpc"]
        if not local:
            return None
        try:
            return place(fp, local, model=model.name, path=model.path)
        except OrchestratorError:
            return None

    def _retire(self, old: ContainerState, progress: Progress, busy: int) -> None:
        if busy:
            progress(f"  ! {busy} request(s) still running on the old coordinator; stopping anyway")
        host = self.host(self.config.require_cluster().host)
        host.stop(old.id, timeout_s=self.stop_timeout_s)
        host.remove(old.id)
        progress(f"  ✓ stopped and removed {old.name}")

    def _roll_back(self, old: ContainerState, old_model: str, progress: Progress) -> None:
        progress(f"→ rolling back: restarting {old_model} ({old.name})")
        host = self.host(self.config.require_cluster().host)
        lc = self.lifecycle(old_model)
        lc.transition(State.STOPPED, State.STARTING)
        try:
            state = host.start(old.id)
            url = self.coordinator_url(state) or ""
            self._wait_healthy(host, state, url, progress)
        except BaseException as exc:
            lc.transition(State.STARTING, State.STOPPING)
            lc.transition(State.STOPPING, State.STOPPED)
            msg = exc.message if isinstance(exc, OrchestratorError) else str(exc)
            raise SwapFailed(f"the swap failed and so did the rollback to {old_model}: {msg}") from exc
        lc.transition(State.STARTING, State.READY)
        self.switch.route(url)
        progress(f"  ✓ {old_model} is serving again at {url}")

    # -- benchmark -------------------------------------------------------------------------

    def benchmark(self, *, max_tokens: int = 64, prompts: Sequence[str] | None = None,
                  progress: Progress = _quiet) -> list[dict[str, Any]]:
        """Prompt and generation tok/s of the running coordinator, one row per prompt."""
        running = [c for c in self._coordinator_containers() if c.running]
        if not running:
            raise OrchestratorError("no coordinator is running; `tightwad start` first")
        c = running[0]
        url = self.coordinator_url(c)
        if url is None or not http_healthy(url):
            raise OrchestratorError(f"the coordinator {c.name} is not healthy")
        kind = c.labels.get(ct.LABEL_KIND, "llama-server")
        rows = []
        with httpx.Client(base_url=url, timeout=600) as client:
            for i, prompt in enumerate(prompts or BENCH_PROMPTS):
                progress(f"→ prompt {i + 1}: {prompt[:50]!r}")
                rows.append(_bench_one(client, kind, prompt, max_tokens, c.labels.get(ct.LABEL_MODEL, "?")))
        return rows


BENCH_PROMPTS = (
    "Write a Python function that checks whether a number is prime.",
    "Explain in three sentences why the sky is blue.",
    "List five uses of a hash map, one line each, with a short example for every one of them, "
    "and say which operation each use relies on most.",
)


def _bench_one(client: httpx.Client, kind: str, prompt: str, max_tokens: int,
               model: str) -> dict[str, Any]:
    if kind == "llama-server":
        started = time.monotonic()
        r = client.post("/completion", json={"prompt": prompt, "n_predict": max_tokens,
                                             "temperature": 0, "cache_prompt": False})
        r.raise_for_status()
        t = r.json().get("timings", {})
        return {"model": model, "prompt_tokens": int(t.get("prompt_n", 0)),
                "prompt_tps": float(t.get("prompt_per_second", 0.0)),
                "generated_tokens": int(t.get("predicted_n", 0)),
                "generation_tps": float(t.get("predicted_per_second", 0.0)),
                "seconds": time.monotonic() - started}
    started = time.monotonic()
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                             "temperature": 0})
    r.raise_for_status()
    elapsed = time.monotonic() - started
    usage = r.json().get("usage", {})
    generated = int(usage.get("completion_tokens", 0))
    return {"model": model, "prompt_tokens": int(usage.get("prompt_tokens", 0)), "prompt_tps": None,
            "generated_tokens": generated, "generation_tps": generated / elapsed if elapsed else 0.0,
            "seconds": elapsed}


# --- probes -------------------------------------------------------------------------------


def rpc_probe(address: str, port: int, *, timeout_s: float = 1.5) -> str:
    """``open``, ``busy`` or ``closed``: what an RPC server's port says to a connection.

    * open: the connection was accepted and stays open (the server never speaks
      first). Docker's userland proxy accepts for a published port even when
      nothing listens behind it, but then closes at once, which reads as closed.
    * busy: the connection attempt timed out. The RPC server serves one client
      at a time with a listen backlog of 1, so while a coordinator holds it a
      couple of queued connections fill the queue and later ones go unanswered.
      (Or a firewall drops them; it cannot be told apart from here.)
    * closed: refused, reset or closed: nothing is listening.

    The server later accepts our closed connection and drops it, which is harmless
    because the image runs it with SIGPIPE ignored."""
    try:
        with socket.create_connection((address, port), timeout=timeout_s) as s:
            s.settimeout(0.3)
            try:
                return "open" if s.recv(1) != b"" else "closed"
            except TimeoutError:
                return "open"
    except TimeoutError:
        return "busy"
    except OSError:
        return "closed"


def rpc_reachable(address: str, port: int, *, timeout_s: float = 1.5) -> bool:
    return rpc_probe(address, port, timeout_s=timeout_s) != "closed"


def http_healthy(url: str, *, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def _placement_label(c: ContainerState) -> dict[str, Any]:
    try:
        return json.loads(c.labels.get(ct.LABEL_PLACEMENT, "{}"))
    except ValueError:
        return {}


def _is_loopback(address: str) -> bool:
    try:
        return address == "localhost" or ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _is_public(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.is_global
