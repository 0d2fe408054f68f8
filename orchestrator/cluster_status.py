"""What ``Orchestrator.status()`` reports: one row per host, device, worker and coordinator.

Plain dataclasses, gathered by tightwad.orchestrator.reporting; ``to_dict`` is
the JSON that ``tightwad status --json`` prints and the service's /v1/status returns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from tightwad.config import GpuConfig
from tightwad.orchestrator.hosts import ContainerState
from tightwad.orchestrator.lifecycle import State
from tightwad.orchestrator.placement import Device


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
