"""Round statistics, kept apart from any exporter (as vLLM's ``SpecDecodingStats``).

Every number here comes from a ``RoundResult``, that is from real comparisons of
draft against target; nothing is estimated. An exporter turns these into counters
(drafts, draft tokens, accepted tokens, accepted tokens per position) and the
ratios are computed in PromQL, where the denominators survive aggregation:

- acceptance rate:
  ``rate(accepted_tokens_total[5m]) / rate(draft_tokens_total[5m])``
- mean acceptance length (tokens emitted per drafting round):
  ``1 + rate(accepted_tokens_total[5m]) / rate(drafts_total[5m])``
- acceptance rate at position ``i``:
  ``rate(accepted_tokens_per_position_total{position="i"}[5m]) / rate(drafts_total[5m])``
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tightwad.speculation.types import RoundResult


@dataclass(slots=True)
class SpecDecodingStats:
    """Running totals over speculation rounds; ``observe`` one ``RoundResult`` per round."""

    rounds: int = 0  # every round, including those with nothing drafted
    num_drafts: int = 0  # rounds with at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0
    # accepted_per_position[i]: rounds whose draft token at position i was accepted.
    accepted_per_position: list[int] = field(default_factory=list)

    def observe(self, result: RoundResult, *, n_emitted: int | None = None) -> None:
        """Add one round. ``n_emitted`` overrides ``result.n_emitted`` when the caller
        emitted fewer tokens than the rule produced (stopped at max_tokens or at an
        end-of-generation token); acceptance counts are the rule's verdict either way."""
        self.rounds += 1
        if result.n_drafted > 0:
            self.num_drafts += 1
        self.num_draft_tokens += result.n_drafted
        self.num_accepted_tokens += result.n_accepted
        self.num_emitted_tokens += result.n_emitted if n_emitted is None else n_emitted
        per_position = self.accepted_per_position
        missing = result.n_accepted - len(per_position)
        if missing > 0:
            per_position.extend([0] * missing)
        for i in range(result.n_accepted):
            per_position[i] += 1

    def merge(self, other: SpecDecodingStats) -> None:
        """Add ``other``'s totals into this one (``other`` is left unchanged)."""
        self.rounds += other.rounds
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        self.num_emitted_tokens += other.num_emitted_tokens
        per_position = self.accepted_per_position
        missing = len(other.accepted_per_position) - len(per_position)
        if missing > 0:
            per_position.extend([0] * missing)
        for i, count in enumerate(other.accepted_per_position):
            per_position[i] += count

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens; None when nothing was drafted."""
        if self.num_draft_tokens == 0:
            return None
        return self.num_accepted_tokens / self.num_draft_tokens

    @property
    def mean_acceptance_length(self) -> float | None:
        """1 + accepted tokens per drafting round (vLLM's definition); None without drafts."""
        if self.num_drafts == 0:
            return None
        return 1.0 + self.num_accepted_tokens / self.num_drafts

    @property
    def tokens_per_round(self) -> float | None:
        """Emitted tokens per round, counting rounds with nothing drafted; None before any."""
        if self.rounds == 0:
            return None
        return self.num_emitted_tokens / self.rounds
