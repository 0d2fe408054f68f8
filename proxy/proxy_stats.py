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
    started: float = dataclasses.field(default_factory=time.time)

    def observe_round(self, record: RoundRecord) -> None:
        self.spec.observe(record.result, n_emitted=record.n_emitted)
        if record.draft_s is not None:
            self.draft_s.append(record.draft_s)
        self.verify_s.append(record.verify_s)
        if record.drafter is not None and record.result.n_accepted:
            self.drafter_wins[record.drafter] += record.result.n_accepted

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
        }
