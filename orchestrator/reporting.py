"""status() and watch(): the cluster as the daemons show it, with warnings and metrics.

An unreachable daemon is a row, not an exception. The warnings name what is
down and what is exposed (RPC servers have no authentication); with metrics,
every pass also sets the host, worker and VRAM gauges.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from tightwad.orchestrator import containers as ct
from tightwad.orchestrator.cluster_status import (
    ClusterStatus,
    CoordinatorStatus,
    DeviceStatus,
    HostStatus,
    WorkerStatus,
)
from tightwad.orchestrator.errors import HostUnreachable
from tightwad.orchestrator.health import http_healthy
from tightwad.orchestrator.sizing import Sizing


class Reporting(Sizing):
    """status() and watch(), and the warnings and gauges they produce."""

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
                                         healthy, lc.state, ct.placement_label(c)))
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
