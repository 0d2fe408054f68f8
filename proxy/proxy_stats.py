"""Running totals for ``GET /v1/tightwad/status`` (kept apart from Prometheus).

Mutated only from the event loop, between awaits, so concurrent requests
never interleave inside an update.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import time

from tightwad.generation import GenerationStats, RoundRecord
from tightwad.speculation import SpecDecodingStats

WINDOW = 4096  # latency samples kept for percentiles


def _percentiles(samples: collections.deque[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50": None, "p95": None}
    if len(samples) == 1:
        v = samples[0] * 1000
        return {"p50": round(v, 3), "p95": round(v, 3)}
    q = statistics.quantiles(samples, n=20, method="inclusive")
    return {"p50": round(q[9] * 1000, 3), "p95": round(q[18] * 1000, 3)}


@dataclasses.dataclass
class ProxyStats:
    spec: SpecDecodingStats = dataclasses.field(default_factory=SpecDecodingStats)
    requests: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0
    fallbacks: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    drafter_wins: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    draft_s: collections.deque[float] = dataclasses.field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    verify_s: collections.deque[float] = dataclasses.field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    cpu_s: collections.deque[float] = dataclasses.field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    overhead_s: collections.deque[float] = dataclasses.field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    rounds_won: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    pipeline_hits: int = 0
    # Sums over all rounds, for efficiency = (draft + verify) / wall.
    draft_total_s: float = 0.0
    draft_wait_total_s: float = 0.0
    verify_total_s: float = 0.0
    round_total_s: float = 0.0
    started: float = dataclasses.field(default_factory=time.time)

    def observe_round(self, record: RoundRecord) -> None:
        self.spec.observe(record.result, n_emitted=record.n_emitted)
        if record.draft_s is not None:
            self.draft_s.append(record.draft_s)
        self.verify_s.append(record.verify_s)
        self.cpu_s.append(record.cpu_s)
        self.overhead_s.append(record.overhead_s)
        self.draft_total_s += record.draft_s or 0.0
        self.draft_wait_total_s += record.draft_wait_s
        self.verify_total_s += record.verify_s
        self.round_total_s += record.round_s
        self.pipeline_hits += record.prefetched
        if record.drafter is not None and record.result.n_accepted:
            self.drafter_wins[record.drafter] += record.result.n_accepted
        if record.drafter is not None and record.candidates > 1:
            self.rounds_won[record.drafter] += 1

    def observe_request(self, stats: GenerationStats) -> None:
        self.requests += 1
        self.completion_tokens += stats.completion_tokens
        end = stats.token_times[-1] if stats.token_times else time.perf_counter()
        self.generation_seconds += max(0.0, end - stats.started)
        self.fallbacks.update(stats.fallbacks)

    def to_json(self) -> dict:
        spec = self.spec
        return {
            "requests": self.requests,
            "rounds": spec.rounds,
            "drafted_tokens": spec.num_draft_tokens,
            "accepted_tokens": spec.num_accepted_tokens,
            "acceptance_rate": spec.acceptance_rate,
            "mean_acceptance_length": spec.mean_acceptance_length,
            "mean_tokens_per_round": spec.tokens_per_round,
            # Target forward passes avoided: tokens emitted minus rounds run.
            "tokens_saved": spec.num_emitted_tokens - spec.rounds,
            "accepted_per_position": list(spec.accepted_per_position),
            "completion_tokens": self.completion_tokens,
            "output_tokens_per_s": (
                round(self.completion_tokens / self.generation_seconds, 3) if self.generation_seconds else None
            ),
            "draft_latency_ms": _percentiles(self.draft_s),
            "verify_latency_ms": _percentiles(self.verify_s),
            "fallbacks": dict(self.fallbacks),
            "drafter_wins": dict(self.drafter_wins),
            "drafter_rounds_won": dict(self.rounds_won),
            "pipeline_hits": self.pipeline_hits,
            # The proxy's own cost: CPU of its event loop per round (exact for one stream,
            # an upper bound under concurrency) and wall time outside draft and verify.
            "proxy_cpu_ms_per_round": _percentiles(self.cpu_s),
            "proxy_overhead_ms_per_round": _percentiles(self.overhead_s),
            "draft_seconds_total": round(self.draft_total_s, 6),
            # What rounds waited for drafts: less than the above when drafts are pipelined.
            "draft_wait_seconds_total": round(self.draft_wait_total_s, 6),
            "verify_seconds_total": round(self.verify_total_s, 6),
            "round_seconds_total": round(self.round_total_s, 6),
            "efficiency": (round((self.draft_wait_total_s + self.verify_total_s) / self.round_total_s, 4)
                           if self.round_total_s else None),
        }
