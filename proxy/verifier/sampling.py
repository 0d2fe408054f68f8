"""The target's token distributions, computed from one row of logits.

One definition serves both target-alone generation and verification, so that
"sampling from the target alone" and "what the verifier reports about the
target" can never drift apart. The order follows vLLM and the OpenAI API:
temperature first, then top-k, then top-p (nucleus: the smallest set whose
mass reaches top_p, the crossing token included).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import numpy as np

TOP_LOGPROBS_MAX = 20


@dataclasses.dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0  # <= 0 means greedy (argmax)
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def log_softmax(row: np.ndarray) -> np.ndarray:
    z = row.astype(np.float64)
    z -= z.max()
    return z - np.log(np.exp(z).sum())


def top_logprobs(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens, most likely first (ties: lower id first)."""
    if k <= 0:
        return []
    k = min(k, logprobs.shape[0])
    idx = np.argpartition(-logprobs, k - 1)[:k]
    idx = idx[np.lexsort((idx, -logprobs[idx]))]
    return [(int(i), float(logprobs[i])) for i in idx]


@dataclasses.dataclass(frozen=True, slots=True)
class Distribution:
    """Probabilities over ``ids`` (all other tokens have probability 0)."""

    ids: np.ndarray  # int64
    probs: np.ndarray  # float64, sums to 1

    def prob_of(self, tokens: Collection[int]) -> dict[int, float]:
        lookup = dict(zip(self.ids.tolist(), self.probs.tolist(), strict=True))
        return {int(t): lookup.get(int(t), 0.0) for t in tokens}

    def sample(self, rng: np.random.Generator, exclude: Collection[int] = ()) -> int | None:
        """One draw, conditioned on not landing in ``exclude``; None if nothing is left."""
        probs = self.probs
        if exclude:
            probs = probs.copy()
            probs[np.isin(self.ids, np.fromiter(exclude, dtype=np.int64))] = 0.0
        cdf = np.cumsum(probs)
        total = cdf[-1]
        if total <= 0.0:
            return None
        i = int(np.searchsorted(cdf, rng.random() * total, side="right"))
        i = min(i, len(cdf) - 1)
        while probs[i] == 0.0:  # u landed exactly on a boundary of an excluded token
            i -= 1
        return int(self.ids[i])


def target_distribution(row: np.ndarray, params: SamplingParams) -> Distribution:
    assert not params.greedy, "greedy decoding has no distribution to sample"
    z = row.astype(np.float64) / params.temperature
    n = z.shape[0]
    if 0 < params.top_k < n:
        ids = np.argpartition(-z, params.top_k - 1)[: params.top_k]
    else:
        ids = np.arange(n)
    z = z[ids]
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1.0:
        ids, p = _nucleus(ids, p, params.top_p)
    return Distribution(ids=ids.astype(np.int64), probs=p)


def _nucleus(ids: np.ndarray, p: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    # Sorting 150k probabilities per position is the slow part; the nucleus is
    # almost always tiny, so sort growing top-m candidate sets until one holds it.
    m = 64
    while True:
        m = min(m, p.shape[0])
        cand = np.argpartition(-p, m - 1)[:m] if m < p.shape[0] else np.arange(p.shape[0])
        cand = cand[np.lexsort((ids[cand], -p[cand]))]
        cum = np.cumsum(p[cand])
        if cum[-1] >= top_p or m == p.shape[0]:
            keep = int(np.searchsorted(cum, top_p, side="left")) + 1
            keep = min(keep, m)
            sel = cand[:keep]
            q = p[sel] / p[sel].sum()
            return ids[sel], q
        m *= 8


def rng_for(seed: int, *stream: int) -> np.random.Generator:
    """An independent generator per (seed, stream...), e.g. per token position."""
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, *(abs(s) for s in stream)])
