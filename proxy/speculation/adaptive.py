"""Choosing the draft length k from measured costs and acceptance (pure).

A round that drafts k tokens costs ``draft(k) + verify(k + 1)`` seconds, each a
straight line ``base + per_token * x`` fitted online (exponentially weighted
least squares) to what rounds actually took, so round trips, per-token costs
and the verifier's batch behaviour are all measured rather than configured.
It emits on average

    E(k) = 1 + sum_{i=1..k} prod_{j<i} a_j

tokens, where ``a_j`` is the running probability that draft position ``j`` is
accepted given that every earlier one was. The policy picks the k that
maximises E(k) / cost(k). Until a few rounds are measured it drafts
``initial_k``, and it tries a neighbouring k now and then so that the cost
lines see more than one point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Line:
    """Exponentially weighted least-squares fit of y = base + slope * x."""

    decay: float = 0.9
    sw: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.sw, self.sx, self.sy = d * self.sw + 1, d * self.sx + x, d * self.sy + y
        self.sxx, self.sxy = d * self.sxx + x * x, d * self.sxy + x * y

    def at(self, x: float) -> float:
        if self.sw == 0:
            return 0.0
        mx, my = self.sx / self.sw, self.sy / self.sw
        var = self.sxx / self.sw - mx * mx
        slope = max(0.0, (self.sxy / self.sw - mx * my) / var) if var > 1e-12 else 0.0
        if var <= 1e-12 and mx > 0:
            slope = my / mx  # one x seen so far: treat the cost as proportional
            return slope * x
        return max(0.0, my + slope * (x - mx))


@dataclass(slots=True)
class AdaptiveK:
    k_min: int = 1
    k_max: int = 32
    initial_k: int = 8
    alpha: float = 0.15  # weight of the newest round in the acceptance averages
    min_rounds: int = 3
    explore_every: int = 8  # rounds between tries of a neighbouring k
    prior_acceptance: float = 0.7
    _accept: list[float] = field(default_factory=list)
    _draft: _Line = field(default_factory=_Line)
    _verify: _Line = field(default_factory=_Line)
    _rounds: int = 0

    def choose(self) -> int:
        if self._rounds < self.min_rounds:
            return self.initial_k
        best_k, best_rate = self.k_min, -1.0
        survive, expected = 1.0, 1.0
        for k in range(1, self.k_max + 1):
            survive *= self._acceptance(k - 1)
            expected += survive
            if k < self.k_min:
                continue
            cost = self._draft.at(k) + self._verify.at(k + 1)
            rate = expected / cost if cost > 0 else expected
            if rate > best_rate:
                best_k, best_rate = k, rate
        if self._rounds % self.explore_every == 0:
            best_k = min(self.k_max, best_k + 1) if (self._rounds // self.explore_every) % 2 else max(
                self.k_min, best_k - 1)
        return best_k

    def observe(
        self, *, accepted_mask: Sequence[bool], draft_s: float | None, verify_s: float
    ) -> None:
        """Feed one round: which drafted positions were accepted, and its timings."""
        self._rounds += 1
        n = len(accepted_mask)
        for i, ok in enumerate(accepted_mask):
            if i == len(self._accept):
                self._accept.append(self.prior_acceptance)
            self._accept[i] += self.alpha * ((1.0 if ok else 0.0) - self._accept[i])
            if not ok:
                break  # later positions were never really put to the test
        if draft_s is not None and n > 0:
            self._draft.add(n, draft_s)
        self._verify.add(n + 1, verify_s)

    def _acceptance(self, position: int) -> float:
        return self._accept[position] if position < len(self._accept) else self.prior_acceptance
