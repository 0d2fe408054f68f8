"""start(): check the hosts, images and workers, place the model, then run the workers
(one rpc-server per GPU) and the coordinator, and wait for its /health.

The checks and steps here are shared with tightwad.orchestrator.swapping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence

from tightwad.config import ModelConfig, WorkerConfig
from tightwad.orchestrator import containers as ct
from tightwad.orchestrator.base import Progress, quiet
from tightwad.orchestrator.cluster_status import WorkerStatus
from tightwad.orchestrator.errors import HostUnreachable, OrchestratorError, StartFailed, WorkerDown
from tightwad.orchestrator.health import http_healthy, rpc_reachable
from tightwad.orchestrator.hosts import ContainerState, Host
from tightwad.orchestrator.lifecycle import State
from tightwad.orchestrator.placement import Placement
from tightwad.orchestrator.sizing import Sizing


@dataclasses.dataclass
class StartResult:
    model: str
    url: str
    placement: Placement
    seconds: float
    already_running: bool = False


class Starting(Sizing):
    """start(), and the checks and steps that swap() reuses."""

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

    def start(self, model_name: str | None = None, *, progress: Progress = quiet) -> StartResult:
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
