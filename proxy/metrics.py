"""The proxy's Prometheus metrics (one registry per app; no globals).

Spec-decode counters follow vLLM's shape, so vLLM's PromQL carries over with
the ``tightwad_`` prefix:

    acceptance rate          rate(tightwad_spec_decode_num_accepted_tokens_total[5m])
                             / rate(tightwad_spec_decode_num_draft_tokens_total[5m])
    mean acceptance length   1 + rate(tightwad_spec_decode_num_accepted_tokens_total[5m])
                             / rate(tightwad_spec_decode_num_drafts_total[5m])
    per-position acceptance  rate(tightwad_spec_decode_num_accepted_tokens_per_pos_total[5m])
                             / ignoring(position) group_left
                               rate(tightwad_spec_decode_num_drafts_total[5m])
    tokens saved per second  rate(tightwad_spec_decode_num_emitted_tokens_total[5m])
                             - rate(tightwad_rounds_total[5m])
    TTFT p95                 histogram_quantile(0.95, sum by (le)
                               (rate(tightwad_time_to_first_token_seconds_bucket[5m])))

The same queries, aggregated by ``model`` and ``drafter``, are recorded by
``images/prometheus/rules/tightwad.rules.yml`` (``tightwad:acceptance_rate:rate5m``
and friends) and drawn by ``grafana/dashboards/speculation.json``.

Ratios are computed in PromQL, never exported as gauges. Labels stay few:
``model`` (the target's name), ``drafter`` (a configured drafter's name, or
``none``), ``target``/``backend`` (a backend kind), ``role``, ``position``
(below ``MAX_POSITIONS``), ``reason`` (``FALLBACK_REASONS``), ``endpoint``
(``ENDPOINTS`` or ``other``) and ``status`` (an HTTP status code).

The proxy runs as ONE uvicorn worker by design (its work is waiting on
backends), so a plain registry is exact; more workers would need
prometheus-client's multiprocess mode. Its counters and histograms are
``tightwad.loop_metrics``'s lock-free ones: only the event loop's thread updates
them.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from tightwad.generation import RoundRecord
from tightwad.loop_metrics import LoopCounter, LoopHistogram

CPU_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05)
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
TOKENS_PER_ROUND_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)
MAX_POSITIONS = 64  # per-position series beyond this would only add cardinality
# Why a request went on with the target alone (tightwad.generation._reason).
FALLBACK_REASONS = ("timeout", "unavailable", "bad_response", "error")
# Request counters name these endpoints; any other path is counted as "other",
# so that probing clients cannot create series at will.
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/tightwad/status")


class ProxyMetrics:
    def __init__(self, *, model: str, target_backend: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.model = model
        self.target = target_backend
        r = self.registry
        md = ["model", "drafter"]
        self.num_drafts = LoopCounter("tightwad_spec_decode_num_drafts", "Rounds with at least one drafted token", md, r)
        self.num_draft_tokens = LoopCounter("tightwad_spec_decode_num_draft_tokens", "Drafted tokens sent to the target", md, r)
        self.num_accepted_tokens = LoopCounter("tightwad_spec_decode_num_accepted_tokens", "Drafted tokens the target agreed with", md, r)
        self.num_accepted_per_pos = LoopCounter(
            "tightwad_spec_decode_num_accepted_tokens_per_pos", "Accepted drafted tokens by draft position",
            [*md, "position"], r)
        self.num_emitted_tokens = LoopCounter("tightwad_spec_decode_num_emitted_tokens", "Tokens emitted by rounds (accepted plus the target's own)", md, r)
        self.rounds = LoopCounter("tightwad_rounds", "Speculation rounds, including those with no draft", md, r)
        self.tokens_per_round = LoopHistogram("tightwad_tokens_per_round", "Tokens emitted per round", md, r, buckets=TOKENS_PER_ROUND_BUCKETS)
        self.draft_latency = LoopHistogram("tightwad_draft_latency_seconds", "Time to get one draft", md, r, buckets=LATENCY_BUCKETS)
        self.verify_latency = LoopHistogram("tightwad_verify_latency_seconds", "Time of one verify call", ["model", "target"], r, buckets=LATENCY_BUCKETS)
        self.round_latency = LoopHistogram("tightwad_round_latency_seconds", "Wall time of one round", md, r, buckets=LATENCY_BUCKETS)
        self.ttft = LoopHistogram("tightwad_time_to_first_token_seconds", "Request start to first token", ["model"], r, buckets=LATENCY_BUCKETS)
        self.itl = LoopHistogram("tightwad_inter_token_latency_seconds", "Time between released tokens", ["model"], r, buckets=LATENCY_BUCKETS)
        self.e2e = LoopHistogram("tightwad_e2e_request_latency_seconds", "Request start to last token", ["model"], r, buckets=E2E_BUCKETS)
        self.requests = LoopCounter("tightwad_requests", "Requests by endpoint and HTTP status", ["model", "endpoint", "status"], r)
        self.fallbacks = LoopCounter("tightwad_fallbacks", "Requests that went on with the target alone, by reason", [*md, "reason"], r)
        self.drafter_wins = LoopCounter("tightwad_drafter_accepted_tokens", "Accepted tokens credited to each drafter", md, r)
        self.drafter_rounds_won = LoopCounter("tightwad_drafter_rounds_won", "Rounds whose kept proposal was this drafter's (several drafters)", md, r)
        self.drafter_errors = LoopCounter("tightwad_drafter_errors", "Drafts that failed mid-request; the request went on without that drafter", [*md, "reason"], r)
        self.pipeline_hits = LoopCounter("tightwad_pipeline_hits", "Rounds whose draft was made during the previous round's verification", md, r)
        self.round_cpu = LoopHistogram("tightwad_proxy_round_cpu_seconds", "CPU time of the proxy's event loop per round", ["model"], r, buckets=CPU_BUCKETS)
        self.round_overhead = LoopHistogram("tightwad_proxy_round_overhead_seconds", "Round wall time spent neither drafting nor verifying", ["model"], r, buckets=LATENCY_BUCKETS)
        self.backend_up = Gauge("tightwad_backend_up", "1 when the backend answered its last health check", ["model", "role", "name", "backend"], registry=r)
        self.in_flight = Gauge("tightwad_requests_in_flight", "Requests being generated now", ["model"], registry=r)
        self.target_generate_only = Gauge(
            "tightwad_target_generate_only", "1 when the target can only confirm drafts by generating them (no speed-up)",
            ["model", "target"], registry=r)
        self._drafters: list[str] = []
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._init_requests()

    def _init_requests(self) -> None:
        # A series born at 1 hides its first request from rate(); start the usual ones at 0.
        for endpoint in ENDPOINTS:
            self.requests.labels(model=self.model, endpoint=endpoint, status="200")

    def init_drafter(self, name: str) -> None:
        """Create the labelled series up front, so that dashboards see zeros, not gaps."""
        if name not in self._drafters:
            self._drafters.append(name)
        labels = {"model": self.model, "drafter": name}
        for c in (self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                  self.num_emitted_tokens, self.rounds, self.drafter_wins, self.drafter_rounds_won,
                  self.pipeline_hits):
            c.labels(**labels)
        self.num_accepted_per_pos.labels(**labels, position="0")
        for reason in FALLBACK_REASONS:
            self.fallbacks.labels(**labels, reason=reason)
            self.drafter_errors.labels(**labels, reason=reason)

    def bind_model(self, model: str) -> None:
        """Label everything with ``model`` from now on (the target's name, once known).

        Until the target first answers, the runtime only knows the configured
        name, or "target". Series made under the old name are dropped when they
        hold nothing (gauges, and counters still at zero), so that no stale
        ``tightwad_backend_up{model="target"} 0`` keeps an alert firing and the
        dashboards' ``model`` variable offers one name.
        """
        old, self.model = self.model, model
        if old == model:
            return
        self._children.clear()
        for collector in vars(self).values():
            if isinstance(collector, LoopCounter | LoopHistogram | Gauge):
                for values in _series_of_model(collector, old):
                    collector.remove(*values)
        self._init_requests()
        for name in self._drafters:
            self.init_drafter(name)

    def observe_request(self, path: str, status: int) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        self.requests.labels(model=self.model, endpoint=endpoint, status=str(status)).inc()

    def _child(self, collector: LoopCounter | LoopHistogram, *values: str) -> Any:
        # labels() checks and converts its values each call; a round touches about fifteen series.
        key = (id(collector), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = collector.labels(*values)
        return child

    def observe_round(self, record: RoundRecord) -> None:
        md = (self.model, record.drafter or "none")
        res = record.result
        child = self._child
        child(self.rounds, *md).inc()
        if res.n_drafted:
            child(self.num_drafts, *md).inc()
            child(self.num_draft_tokens, *md).inc(res.n_drafted)
            child(self.num_accepted_tokens, *md).inc(res.n_accepted)
            child(self.drafter_wins, *md).inc(res.n_accepted)
            for pos, ok in enumerate(res.accepted_mask[:MAX_POSITIONS]):
                if not ok:
                    break  # only a prefix is ever accepted
                child(self.num_accepted_per_pos, *md, str(pos)).inc()
        child(self.num_emitted_tokens, *md).inc(record.n_emitted)
        child(self.tokens_per_round, *md).observe(record.n_emitted)
        if record.draft_s is not None:
            child(self.draft_latency, *md).observe(record.draft_s)
        child(self.verify_latency, self.model, self.target).observe(record.verify_s)
        child(self.round_latency, *md).observe(record.round_s)
        child(self.round_cpu, self.model).observe(record.cpu_s)
        child(self.round_overhead, self.model).observe(record.overhead_s)
        if record.prefetched:
            child(self.pipeline_hits, *md).inc()
        if record.candidates > 1 and record.drafter is not None:
            child(self.drafter_rounds_won, *md).inc()

    def observe_drafter_error(self, drafter: str, reason: str) -> None:
        reason = reason if reason in FALLBACK_REASONS else "error"
        self.drafter_errors.labels(model=self.model, drafter=drafter, reason=reason).inc()

    def observe_fallback(self, drafter: str, reason: str) -> None:
        reason = reason if reason in FALLBACK_REASONS else "error"
        self.fallbacks.labels(model=self.model, drafter=drafter, reason=reason).inc()


def _series_of_model(collector: LoopCounter | LoopHistogram | Gauge, model: str) -> list[tuple[str, ...]]:
    """Label values of ``collector``'s series with this ``model`` that may be dropped:
    all of a gauge's, and those of counters and histograms that are still zero."""
    values: dict[tuple[str, ...], bool] = {}  # label values -> every sample is zero
    for family in collector.collect():
        for sample in family.samples:
            if sample.labels.get("model") != model or sample.name.endswith("_created"):
                continue
            key = tuple(v for k, v in sample.labels.items() if k != "le")
            values[key] = values.get(key, True) and sample.value == 0
    if isinstance(collector, Gauge):
        return list(values)
    return [k for k, zero in values.items() if zero]
