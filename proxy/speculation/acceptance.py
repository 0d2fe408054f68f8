"""Acceptance rules: which draft tokens to keep, and what the target adds after them.

Both rules make the output identical to running the target alone: greedy requests
give the same tokens, sampled requests the same distribution (speculative sampling,
Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318).
See ``tightwad.speculation.types`` for the accepted / recovered / bonus vocabulary.

These functions run once per round on the proxy's event loop, so they use plain
loops over lists and dicts: no per-token objects beyond the result.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from itertools import accumulate

from tightwad.speculation.types import DraftToken, RoundResult, TargetPosition

# Below this total residual mass the draft and target distributions agree up to
# float rounding; a rejection there is a rounding artefact (it happens with
# probability equal to that mass), so any target-shaped choice is as exact as
# the inputs are.
_RESIDUAL_EPSILON = 1e-9


def accept_greedy(draft_tokens: Sequence[int], target: Sequence[TargetPosition]) -> RoundResult:
    """Greedy verification: keep the longest prefix where the draft equals the target's argmax.

    ``target[i].token`` is the target's argmax at the position of ``draft_tokens[i]``;
    ``target[k]`` is the bonus position after all ``k`` drafts. The emitted tokens are
    ``draft_tokens[:n] + [target[n].token]``: the recovered token on a mismatch, the
    bonus token when all ``k`` were accepted. Only ``TargetPosition.token`` is read.
    """
    k = len(draft_tokens)
    assert len(target) == k + 1, f"need {k + 1} target positions for {k} drafts, got {len(target)}"
    n = 0
    while n < k and draft_tokens[n] == target[n].token:
        n += 1
    tokens = list(draft_tokens[:n])
    tokens.append(target[n].token)
    return RoundResult(tokens, k, n, [True] * n + [False] * (k - n))


def accept_sampled(
    draft: Sequence[DraftToken], target: Sequence[TargetPosition], rng: random.Random
) -> RoundResult:
    """Speculative sampling: the output has exactly the target's sampling distribution.

    What each side must supply (nothing is approximated; the rule is exact as long
    as these hold):

    - **Draft**, per position ``i``: the proposed ``token`` and ``dist``, the exact
      sparse distribution ``q`` it was drawn from, containing ``token``. A draft
      sampled with top_k=K that reports its K post-sampling probabilities (e.g.
      llama-server with ``top_k=K, n_probs=K, post_sampling_probs``) qualifies, and
      so does a greedy draft, ``{token: 1.0}``. Call ``S_i`` the keys of ``dist``.
    - **Target**, per draft position ``i``: ``probs``, its sampling distribution
      ``p`` (after the request's temperature / top_k / top_p) on every token of
      ``S_i``; and ``tail_sample``, one draw from ``p`` conditioned on the token NOT
      being in ``S_i`` (None when ``p`` has no mass outside ``S_i``). The target can
      draw it because it holds the full distribution.
    - **Target**, bonus position ``k``: ``tail_sample`` drawn from the full ``p``.

    Rule: position ``i`` with ``x = draft[i].token`` is accepted when
    ``u < min(1, p(x) / q(x))`` for a fresh ``u = rng.random()``. At the first
    rejection the recovered token is drawn from the residual
    ``norm(max(0, p - q))``: on ``S_i`` its weights are ``max(0, p(v) - q(v))``;
    outside ``S_i``, ``q`` is zero, so the residual there is ``p`` itself, with
    total mass ``1 - sum(p(v) for v in S_i)``, and ``tail_sample`` is already a draw
    from it. One more ``u`` picks among ``S_i`` (in sorted token order) and the tail
    by those weights. When every draft is accepted, the bonus ``tail_sample`` is
    appended. ``rng`` is consumed deterministically, so a seeded ``rng`` repeats.
    """
    k = len(draft)
    assert len(target) == k + 1, f"need {k + 1} target positions for {k} drafts, got {len(target)}"
    for i in range(k):
        proposal = draft[i]
        x = proposal.token
        q = proposal.dist.get(x, 0.0)
        assert q > 0.0, f"draft token {x} has no mass in its own distribution at position {i}"
        p = target[i].probs.get(x, 0.0)
        # random() < 1, so a ratio >= 1 always accepts: this is u < min(1, p/q).
        if rng.random() < p / q:
            continue
        tokens = [d.token for d in draft[:i]]
        tokens.append(_sample_recovered(proposal.dist, target[i], rng))
        return RoundResult(tokens, k, i, [True] * i + [False] * (k - i))
    bonus = target[k].tail_sample
    assert bonus is not None, "the bonus position needs a sample of the full target distribution"
    tokens = [d.token for d in draft]
    tokens.append(bonus)
    return RoundResult(tokens, k, k, [True] * k)


def _sample_recovered(
    dist: Mapping[int, float], position: TargetPosition, rng: random.Random
) -> int:
    """Draw from norm(max(0, p - q)) given ``p`` on the draft support plus a tail sample."""
    support = sorted(dist)  # fixed order, so a seeded rng repeats across dict orderings
    tail_token = position.tail_sample
    assert tail_token is None or tail_token not in dist, (
        f"tail sample {tail_token} lies inside the draft support"
    )
    get_p = position.probs.get
    p_support = [get_p(v, 0.0) for v in support]
    weights = [p - q if p > q else 0.0 for p, q in zip(p_support, map(dist.__getitem__, support), strict=False)]
    # No tail sample means the target reported no mass outside the support.
    tail = max(0.0, 1.0 - sum(p_support)) if tail_token is not None else 0.0
    total = sum(weights) + tail
    if total <= _RESIDUAL_EPSILON:
        # p == q up to rounding, so the residual is empty; sample p itself instead.
        weights = p_support
        total = sum(weights) + tail
        if total <= 0.0:
            # The target gave no mass anywhere (a broken backend); its argmax is the
            # only token it vouched for.
            return position.token
    return _pick(support, weights, tail_token, tail, rng.random() * total)


def _pick(
    support: list[int], weights: list[float], tail_token: int | None, tail: float, u: float
) -> int:
    """The token whose cumulative weight interval contains ``u`` (support first, then tail)."""
    cumulative = list(accumulate(weights))
    # The first index whose cumulative weight exceeds u; its own weight is positive.
    i = bisect_right(cumulative, u)
    if i < len(support):
        return support[i]
    if tail > 0.0 and tail_token is not None:
        return tail_token
    # u ran past the support by float rounding and there is no tail: take the last
    # interval that has any width.
    for v, w in zip(reversed(support), reversed(weights), strict=False):
        if w > 0.0:
            return v
    raise AssertionError("no token carries weight")
