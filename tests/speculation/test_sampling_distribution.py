"""Seeded statistical checks: speculative sampling emits exactly the target's distribution.

A toy Markov "language model" over six tokens gives the target p(.|last token) and
the draft q(.|last token). The simulation plays both servers the way the contract in
``accept_sampled`` asks: the draft samples x ~ q and reports q's sparse support, the
target reports p on that support plus one draw from p outside it. The rule under test
then decides. A chi-square test compares what was emitted with p; two deliberately
wrong rules must fail the very same test, so the test is shown to be able to fail.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from scipy.stats import chisquare

from tightwad.speculation import DraftToken, RoundResult, TargetPosition, accept_sampled

VOCAB = 6
START = -1  # the state before any token
TRIALS = 20_000
WRONG_RULE_TRIALS = 5_000  # the wrong rules are far off; fewer trials keep the suite fast

# p(v | s) = P_BASE[(v - shift(s)) % VOCAB]: a different distribution after each token,
# so later draft positions are scored under a prefix that the draft itself chose.
P_BASE = (0.30, 0.25, 0.20, 0.15, 0.10, 0.00)
Q_CASES = {
    "q_smaller_support": (0.50, 0.00, 0.50, 0.00, 0.00, 0.00),
    "q_mass_where_p_has_none": (0.10, 0.10, 0.10, 0.10, 0.10, 0.50),
    "q_equals_p": P_BASE,
    "greedy_q": (0.00, 0.00, 0.00, 1.00, 0.00, 0.00),
    "q_disjoint_from_p": (0.00, 0.00, 0.00, 0.00, 0.00, 1.00),
}

Rule = Callable[[Sequence[DraftToken], Sequence[TargetPosition], random.Random], RoundResult]


def _shift(state: int) -> int:
    return 0 if state == START else (2 * state + 1) % VOCAB


def _rotate(base: Sequence[float], state: int) -> list[float]:
    return [base[(v - _shift(state)) % VOCAB] for v in range(VOCAB)]


class _Sampler:
    """Draws from fixed weights over token ids with one ``random()`` and a bisect."""

    def __init__(self, weights: dict[int, float]) -> None:
        self.tokens = [v for v, w in weights.items() if w > 0.0]
        self.cumulative: list[float] = []
        total = 0.0
        for v in self.tokens:
            total += weights[v]
            self.cumulative.append(total)
        self.total = total

    def draw(self, rng: random.Random) -> int | None:
        if not self.tokens:
            return None
        i = bisect.bisect_right(self.cumulative, rng.random() * self.total)
        return self.tokens[min(i, len(self.tokens) - 1)]


@dataclass
class _State:
    """Everything both fake servers need after one given last token."""

    p: list[float]
    argmax: int
    q_dist: dict[int, float]  # the draft's sparse distribution (its support only)
    q_sampler: _Sampler
    p_on_support: dict[int, float]
    p_tail: _Sampler  # p conditioned on lying outside the draft support
    p_full: _Sampler


class _ToyModel:
    def __init__(self, q_base: Sequence[float]) -> None:
        self.states: dict[int, _State] = {}
        for s in [START, *range(VOCAB)]:
            p = _rotate(P_BASE, s)
            q = _rotate(q_base, s)
            q_dist = {v: q[v] for v in range(VOCAB) if q[v] > 0.0}
            self.states[s] = _State(
                p=p,
                argmax=max(range(VOCAB), key=p.__getitem__),
                q_dist=q_dist,
                q_sampler=_Sampler(q_dist),
                p_on_support={v: p[v] for v in q_dist},
                p_tail=_Sampler({v: p[v] for v in range(VOCAB) if v not in q_dist}),
                p_full=_Sampler(dict(enumerate(p))),
            )

    def play_round(
        self, rule: Rule, state: int, k: int, world: random.Random, rng: random.Random
    ) -> list[int]:
        """One round after ``state``: the draft proposes k tokens, the target scores them."""
        draft: list[DraftToken] = []
        target: list[TargetPosition] = []
        for _ in range(k):
            here = self.states[state]
            x = here.q_sampler.draw(world)
            assert x is not None
            draft.append(DraftToken(x, here.q_dist))
            target.append(
                TargetPosition(
                    here.argmax, probs=here.p_on_support, tail_sample=here.p_tail.draw(world)
                )
            )
            state = x
        bonus = self.states[state]
        target.append(TargetPosition(bonus.argmax, tail_sample=bonus.p_full.draw(world)))
        return rule(draft, target, rng).tokens

    def generate(
        self, rule: Rule, k: int, n: int, world: random.Random, rng: random.Random
    ) -> tuple[int, ...]:
        """The first ``n`` tokens of a generation made of whole rounds."""
        out: list[int] = []
        while len(out) < n:
            out.extend(self.play_round(rule, out[-1] if out else START, k, world, rng))
        return tuple(out[:n])

    def expected(self, n: int) -> dict[tuple[int, ...], float]:
        """Target-alone probability of every n-token sequence."""
        seqs: dict[tuple[int, ...], float] = {(): 1.0}
        for _ in range(n):
            seqs = {
                seq + (v,): prob * self.states[seq[-1] if seq else START].p[v]
                for seq, prob in seqs.items()
                for v in range(VOCAB)
            }
        return seqs


def _accept_everything(
    draft: Sequence[DraftToken], target: Sequence[TargetPosition], rng: random.Random
) -> RoundResult:
    """WRONG: keeps every draft token, so the output follows q instead of p."""
    k = len(draft)
    bonus = target[k].tail_sample
    assert bonus is not None
    return RoundResult([d.token for d in draft] + [bonus], k, k, [True] * k)


def _resample_from_target(
    draft: Sequence[DraftToken], target: Sequence[TargetPosition], rng: random.Random
) -> RoundResult:
    """WRONG: the right acceptance test, but a rejection resamples p instead of the
    residual max(0, p - q), which counts the accepted mass twice."""
    k = len(draft)
    for i, d in enumerate(draft):
        p = target[i].probs.get(d.token, 0.0)
        if rng.random() < p / d.dist[d.token]:
            continue
        support = sorted(d.dist)
        weights = [target[i].probs.get(v, 0.0) for v in support]
        tail = max(0.0, 1.0 - sum(weights)) if target[i].tail_sample is not None else 0.0
        u = rng.random() * (sum(weights) + tail)
        recovered = target[i].tail_sample
        for v, w in zip(support, weights, strict=False):
            if u < w:
                recovered = v
                break
            u -= w
        assert recovered is not None
        tokens = [x.token for x in draft[:i]] + [recovered]
        return RoundResult(tokens, k, i, [True] * i + [False] * (k - i))
    bonus = target[k].tail_sample
    assert bonus is not None
    return RoundResult([d.token for d in draft] + [bonus], k, k, [True] * k)


def _p_value(model: _ToyModel, rule: Rule, k: int, n: int, trials: int, seed: int) -> float:
    """Chi-square p-value of the first ``n`` emitted tokens against the target alone."""
    world, rng = random.Random(seed), random.Random(seed + 1)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(trials):
        seq = model.generate(rule, k, n, world, rng)
        counts[seq] = counts.get(seq, 0) + 1
    expected = model.expected(n)
    if any(expected[seq] == 0.0 for seq in counts):
        return 0.0  # emitted a sequence the target alone can never produce
    cells = [seq for seq, prob in expected.items() if prob > 0.0]
    observed = [counts.get(seq, 0) for seq in cells]
    return float(chisquare(observed, [expected[seq] * trials for seq in cells]).pvalue)


# k=1 checks the first emitted token; k=3 the joint law of the first two, which needs
# the draft's second position to be scored under the prefix the draft chose.
ROUND_SHAPES = [pytest.param(1, 1, id="k1-first-token"), pytest.param(3, 2, id="k3-first-two")]


@pytest.mark.parametrize(("k", "n"), ROUND_SHAPES)
@pytest.mark.parametrize("case", list(Q_CASES))
def test_accept_sampled_matches_target_distribution(case: str, k: int, n: int) -> None:
    p_value = _p_value(_ToyModel(Q_CASES[case]), accept_sampled, k, n, TRIALS, seed=1234)
    assert p_value > 1e-3, f"{case}: emitted tokens do not follow p (p-value {p_value:.2e})"


# When q and p share no support the residual is p itself, so resampling p is right there.
WRONG_RULES = [
    pytest.param(_accept_everything, case, id=f"accept_everything-{case}")
    for case in Q_CASES
    if case != "q_equals_p"
] + [
    pytest.param(_resample_from_target, case, id=f"resample_from_target-{case}")
    for case in Q_CASES
    if case not in ("q_equals_p", "q_disjoint_from_p")
]


@pytest.mark.parametrize(("k", "n"), ROUND_SHAPES)
@pytest.mark.parametrize(("rule", "case"), WRONG_RULES)
def test_wrong_rules_fail_the_same_check(rule: Rule, case: str, k: int, n: int) -> None:
    p_value = _p_value(_ToyModel(Q_CASES[case]), rule, k, n, WRONG_RULE_TRIALS, seed=1234)
    assert p_value < 1e-6, f"{rule.__name__} on {case} went undetected (p-value {p_value:.2e})"


def test_q_equals_p_accepts_everything() -> None:
    """With q == p every ratio is 1, so no draft token may ever be rejected."""
    model = _ToyModel(P_BASE)
    world, rng = random.Random(7), random.Random(8)
    for _ in range(2_000):
        assert len(model.play_round(accept_sampled, START, 3, world, rng)) == 4
