"""How much memory a model needs, how much the devices have free, and where it fits.

The footprint comes from the model's GGUF header (read on the coordinator's
host when the file is not here); free memory is measured by the vendor's tool
(tightwad.orchestrator.vram), cached for PROBE_CACHE_S; the placement itself
is the pure tightwad.orchestrator.placement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Mapping, Sequence

from tightwad.config import GpuConfig, ModelConfig
from tightwad.orchestrator import containers as ct
from tightwad.orchestrator.base import OrchestratorBase, Progress
from tightwad.orchestrator.errors import HostUnreachable, OrchestratorError
from tightwad.orchestrator.gguf import NeedMoreBytes, parse_header, read_header
from tightwad.orchestrator.hosts import ContainerSpec
from tightwad.orchestrator.placement import Device, Footprint, Placement, footprint, gib, place
from tightwad.orchestrator.vram import Measurement, probe

HEADER_READ_START = 8 * 1024**2
HEADER_READ_MAX = 512 * 1024**2
PROBE_CACHE_S = 30.0


class Sizing(OrchestratorBase):
    """A model's footprint, the devices' free memory now, and plan()."""

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
                        for device, used in ct.placement_label(c).get("use", {}).items():
                            reclaim[device] = reclaim.get(device, 0) + int(used)
        return place(fp, self.devices(offline=offline, reclaim=reclaim, notes=notes),
                     model=model.name, path=model.path)

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
