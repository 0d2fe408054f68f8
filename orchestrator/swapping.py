"""swap(): replace the running model while the workers stay.

Overlap when the new model fits beside the old one on the coordinator's own
devices (the front routes to the new one, then the old one drains); otherwise
stop-then-start, with the front holding new requests (503 + Retry-After) and
a rollback to the old coordinator if the new one fails.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tightwad.config import ModelConfig
from tightwad.orchestrator import containers as ct
from tightwad.orchestrator.base import Progress, quiet
from tightwad.orchestrator.errors import OrchestratorError, SwapFailed
from tightwad.orchestrator.health import http_healthy
from tightwad.orchestrator.hosts import ContainerState
from tightwad.orchestrator.lifecycle import State
from tightwad.orchestrator.placement import Device, Footprint, Placement, place
from tightwad.orchestrator.starting import Starting


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


class Swapping(Starting):
    """swap(): overlap when it fits, else stop-then-start with rollback."""

    def swap(self, model_name: str, *, progress: Progress = quiet) -> SwapResult:
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
        use = {k: int(v) for k, v in ct.placement_label(old).get("use", {}).items()}
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
