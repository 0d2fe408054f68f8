"""What every part of the Orchestrator shares: its state, and the reads they all build on.

The parts (tightwad.orchestrator.sizing, reporting, starting, swapping,
stopping, benchmarking) are mixins over ``OrchestratorBase``, and
tightwad.orchestrator.cluster puts them together as ``Orchestrator``. Here:
the connected hosts, the one-operation-at-a-time lock, the models and
devices as configured, each coordinator's Lifecycle, and the worker and
coordinator containers as the daemons show them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from tightwad.config import Config, ModelConfig
from tightwad.config_schema import BACKEND_VENDOR
from tightwad.orchestrator import containers as ct
from tightwad.orchestrator.cluster_status import WorkerStatus
from tightwad.orchestrator.errors import Busy, HostUnreachable, OrchestratorError, UnknownModel
from tightwad.orchestrator.front import DirectSwitch, Switch
from tightwad.orchestrator.health import rpc_probe
from tightwad.orchestrator.hosts import ContainerState, Host, connect
from tightwad.orchestrator.lifecycle import Lifecycle, State
from tightwad.orchestrator.placement import GIB, Device
from tightwad.orchestrator.vram import Measurement

Progress = Callable[[str], None]
PING_EVERY_S = 2.0  # host() pings a daemon at most this often (every call would be chatty)


def quiet(_: str) -> None:
    pass


class OrchestratorBase:
    """The state and reads every Orchestrator part uses (not used on its own)."""

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

    # -- models and devices, as configured -------------------------------------------

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
