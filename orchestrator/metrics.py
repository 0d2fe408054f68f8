"""The orchestrator's Prometheus metrics (one registry per instance; no globals).

The orchestrator serves these on ``GET /metrics`` at ``orchestrator:8095`` in
the Compose stack (``images/prometheus/prometheus.yml``, job ``orchestrator``).
The names are fixed here before the orchestrator itself exists, so that the
Grafana cluster dashboard and the alert rules can already refer to them; the
test suite checks every name a dashboard or rule uses against this class.

Labels stay low-cardinality: ``host`` and ``gpu`` come from ``hosts:`` in the
config, ``worker`` from ``workers:``, ``model`` from ``models:``; ``result``
is ``ok`` or ``failed``; ``state`` is one of ``MODEL_STATES``.

Useful PromQL:

    swaps per hour        sum by (model, result) (increase(tightwad_orchestrator_swaps_total[1h]))
    swap time p95         histogram_quantile(0.95, sum by (le) (rate(tightwad_orchestrator_swap_duration_seconds_bucket[1h])))
    VRAM use per GPU      tightwad_orchestrator_gpu_vram_used_bytes / tightwad_orchestrator_gpu_vram_total_bytes
    workers down          tightwad_orchestrator_workers_up == 0

Like the proxy, the orchestrator runs as one process, so a plain registry is exact.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# A swap stops a model's coordinator and workers, places the next model and
# waits for its /health: seconds to minutes, dominated by loading weights.
SWAP_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 900.0)
# The lifecycle of a placed model (see STYLE.md: the orchestrator is a state machine).
MODEL_STATES = ("stopped", "starting", "ready", "stopping", "shutdown")
SWAP_RESULTS = ("ok", "failed")
GIB = 1024**3


class OrchestratorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.swaps = Counter(
            "tightwad_orchestrator_swaps", "Model swaps finished, by the model swapped in and the result",
            ["model", "result"], registry=r)
        self.swap_duration = Histogram(
            "tightwad_orchestrator_swap_duration_seconds",
            "From the swap request until the new model answered /health (or the swap failed)",
            ["model"], buckets=SWAP_BUCKETS, registry=r)
        self.hosts_up = Gauge(
            "tightwad_orchestrator_hosts_up", "1 when the host's Docker daemon answered its last check",
            ["host"], registry=r)
        self.workers_up = Gauge(
            "tightwad_orchestrator_workers_up", "1 when the worker's RPC server is running and reachable",
            ["host", "worker"], registry=r)
        self.gpu_vram_total = Gauge(
            "tightwad_orchestrator_gpu_vram_total_bytes", "Memory the GPU offers to models (vram_gb in the config)",
            ["host", "gpu", "vendor"], registry=r)
        self.gpu_vram_used = Gauge(
            "tightwad_orchestrator_gpu_vram_used_bytes", "Memory of the GPU taken by placed models",
            ["host", "gpu", "vendor"], registry=r)
        self.model_state = Gauge(
            "tightwad_orchestrator_model_state", "1 for the state each model is in, 0 for the others",
            ["model", "state"], registry=r)

    def init_model(self, model: str) -> None:
        """Create the labelled series up front, so that dashboards see zeros, not gaps."""
        for result in SWAP_RESULTS:
            self.swaps.labels(model=model, result=result)
        self.swap_duration.labels(model=model)
        self.set_model_state(model, "stopped")

    def init_gpu(self, host: str, gpu: str, vendor: str, vram_gb: float) -> None:
        self.gpu_vram_total.labels(host=host, gpu=gpu, vendor=vendor).set(vram_gb * GIB)
        self.gpu_vram_used.labels(host=host, gpu=gpu, vendor=vendor).set(0)

    def set_model_state(self, model: str, state: str) -> None:
        if state not in MODEL_STATES:
            raise ValueError(f"state must be one of {', '.join(MODEL_STATES)}, got {state!r}")
        for s in MODEL_STATES:
            self.model_state.labels(model=model, state=s).set(1 if s == state else 0)

    def observe_swap(self, model: str, seconds: float, *, ok: bool) -> None:
        self.swaps.labels(model=model, result="ok" if ok else "failed").inc()
        self.swap_duration.labels(model=model).observe(seconds)
