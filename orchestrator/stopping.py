"""stop(): the coordinator(s) first, then every worker and network of this cluster."""

from __future__ import annotations

import contextlib

from tightwad.orchestrator import containers as ct
from tightwad.orchestrator.base import OrchestratorBase, Progress, quiet
from tightwad.orchestrator.errors import OrchestratorError
from tightwad.orchestrator.lifecycle import State


class Stopping(OrchestratorBase):
    """stop(): every container and network of this cluster."""

    def stop(self, *, progress: Progress = quiet) -> list[str]:
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
