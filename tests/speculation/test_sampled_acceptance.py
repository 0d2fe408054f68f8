"""Hand-built cases for speculative sampling; the statistics live in test_sampling_distribution."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

import pytest

from tightwad.speculation import DraftToken, TargetPosition, accept_sampled
from tightwad.speculation.acceptance import _pick


class _ScriptedRandom(random.Random):
    """A Random whose ``random()`` returns the given values in order, to hit exact branches."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def _draft(token: int, dist: Mapping[int, float] | None = None) -> DraftToken:
    """A draft token; greedy ({token: 1.0}) unless ``dist`` is given."""
    return DraftToken(token, {token: 1.0} if dist is None else dist)


def _position(
    probs: Mapping[int, float], tail: int | None = None, token: int = 0
) -> TargetPosition:
    return TargetPosition(token, probs=probs, tail_sample=tail)


def _bonus(sample: int) -> TargetPosition:
    return TargetPosition(sample, tail_sample=sample)


def test_perfect_match() -> None:
    # p >= q everywhere, so each ratio is >= 1 and every token is accepted.
    draft = [_draft(1, {1: 0.5, 2: 0.5}), _draft(3)]
    target = [_position({1: 0.6, 2: 0.4}, tail=None), _position({3: 1.0}), _bonus(8)]
    result = accept_sampled(draft, target, random.Random(0))
    assert result.tokens == [1, 3, 8]  # the bonus token is the bonus position's sample
    assert (result.n_drafted, result.n_accepted, result.accepted_mask) == (2, 2, [True, True])


def test_empty_sequence() -> None:
    result = accept_sampled([], [_bonus(5)], random.Random(0))
    assert result.tokens == [5]
    assert (result.n_drafted, result.n_accepted, result.accepted_mask) == (0, 0, [])


def test_threshold_is_p_over_q() -> None:
    draft = [_draft(1, {1: 0.8, 2: 0.2})]
    target = [_position({1: 0.2, 2: 0.8}), _bonus(9)]  # p/q = 0.25
    assert accept_sampled(draft, target, _ScriptedRandom(0.2499)).tokens == [1, 9]
    # u = 0.25 rejects; the residual has weight only on 2 (0.8 - 0.2).
    assert accept_sampled(draft, target, _ScriptedRandom(0.25, 0.99)).tokens == [2]


def test_early_mismatch() -> None:
    draft = [_draft(1), _draft(2), _draft(3)]
    target = [_position({1: 0.5}, 7), _position({2: 0.5}, 7), _position({3: 0.5}, 7), _bonus(9)]
    rng = _ScriptedRandom(0.1, 0.9, 0.3, 0.77)
    result = accept_sampled(draft, target, rng)
    assert result.tokens == [1, 7]  # greedy draft: the residual is all tail
    assert (result.n_accepted, result.accepted_mask) == (1, [True, False, False])
    assert rng.values == [0.77]  # one u per tested position plus one for the recovery


def test_zero_target_probability_always_rejects() -> None:
    draft = [_draft(4, {4: 0.7, 5: 0.3})]
    target = [_position({4: 0.0, 5: 0.5}, tail=6), _bonus(9)]
    for seed in range(50):
        result = accept_sampled(draft, target, random.Random(seed))
        assert result.n_accepted == 0
        assert result.tokens[0] in (5, 6)


def test_recovered_from_support_residual() -> None:
    # Residual: 1 -> max(0, 0 - 0.5) = 0, 2 -> 1 - 0.5 = 0.5, no tail: must be 2.
    draft = [_draft(1, {1: 0.5, 2: 0.5})]
    target = [_position({1: 0.0, 2: 1.0}, tail=None), _bonus(9)]
    for seed in range(50):
        assert accept_sampled(draft, target, random.Random(seed)).tokens == [2]


def test_recovered_from_tail() -> None:
    draft = [_draft(4)]
    target = [_position({4: 0.0}, tail=11), _bonus(9)]
    assert accept_sampled(draft, target, random.Random(0)).tokens == [11]


def test_residual_intervals_in_token_order() -> None:
    # x=1 has p/q = 1/3. Residual: 1 -> 0, 2 -> 0.3, 3 -> 0, tail 1 - 0.8 = 0.2.
    # So u2 < 0.6 picks 2 and u2 >= 0.6 picks the tail sample 8.
    dist = {3: 0.2, 1: 0.6, 2: 0.2}
    target = [_position({1: 0.2, 2: 0.5, 3: 0.1}, tail=8), _bonus(9)]
    assert accept_sampled([_draft(1, dist)], target, _ScriptedRandom(0.9, 0.59)).tokens == [2]
    assert accept_sampled([_draft(1, dist)], target, _ScriptedRandom(0.9, 0.61)).tokens == [8]


def test_support_order_does_not_change_seeded_results() -> None:
    forward = {v: 0.1 for v in range(10)}
    backward = {v: 0.1 for v in reversed(range(10))}
    probs = {v: 0.02 * v for v in range(10)}
    target = [_position(probs, tail=42), _bonus(9)]
    for seed in range(200):
        a = accept_sampled([_draft(0, forward)], target, random.Random(seed))
        b = accept_sampled([_draft(0, backward)], target, random.Random(seed))
        assert a.tokens == b.tokens


def test_residual_falls_back_to_target_when_p_equals_q() -> None:
    # p equals q up to rounding, so the residual is ~0. A rejection there (u just
    # under 1) must still return a token shaped by p: u2 = 0.25 lands on token 1,
    # which the (empty) residual would never give.
    draft = [_draft(1, {1: 0.5, 2: 0.5})]
    target = [_position({1: 0.5 - 1e-12, 2: 0.5 + 1e-12}, tail=None), _bonus(9)]
    assert accept_sampled(draft, target, _ScriptedRandom(1 - 1e-13, 0.25)).tokens == [1]
    assert accept_sampled(draft, target, _ScriptedRandom(1 - 1e-13, 0.75)).tokens == [2]


def test_seeded_runs_repeat() -> None:
    def play(seed: int) -> list[list[int]]:
        world, rng = random.Random(99), random.Random(seed)
        out = []
        for _ in range(300):
            k = world.randint(0, 4)
            dist = {1: 0.4, 2: 0.35, 3: 0.25}
            draft = [_draft(world.choice([1, 2, 3]), dist) for _ in range(k)]
            target = [_position({1: 0.2, 2: 0.3, 3: 0.1}, tail=4) for _ in range(k)]
            out.append(accept_sampled(draft, target + [_bonus(5)], rng).tokens)
        return out

    assert play(1) == play(1)
    assert play(1) != play(2)


@pytest.mark.parametrize(("p", "q"), [(0.3, 0.6), (0.6, 0.3), (0.1, 1.0), (0.0, 0.4), (0.45, 0.5)])
def test_acceptance_probability_is_min_one_p_over_q(p: float, q: float) -> None:
    trials = 20_000
    draft = [_draft(1, {1: q, 2: 1.0 - q})]
    target = [_position({1: p, 2: 0.0}, tail=3), _bonus(9)]
    rng = random.Random(2024)
    accepted = sum(accept_sampled(draft, target, rng).n_accepted for _ in range(trials))
    expected = min(1.0, p / q)
    sigma = math.sqrt(expected * (1.0 - expected) / trials)
    assert abs(accepted / trials - expected) <= 5 * sigma + 1e-12


@pytest.mark.parametrize("n_target", [1, 3])
def test_wrong_number_of_target_positions(n_target: int) -> None:
    target = [_position({1: 0.5}, tail=2)] * n_target
    with pytest.raises(AssertionError):
        accept_sampled([_draft(1)], target, random.Random(0))


def test_draft_token_outside_its_distribution() -> None:
    with pytest.raises(AssertionError):
        accept_sampled(
            [DraftToken(1, {2: 1.0})], [_position({2: 0.5}), _bonus(9)], random.Random(0)
        )


def test_tail_sample_inside_the_draft_support() -> None:
    target = [_position({1: 0.0}, tail=1), _bonus(9)]
    with pytest.raises(AssertionError):
        accept_sampled([_draft(1)], target, random.Random(0))


def test_missing_bonus_sample() -> None:
    with pytest.raises(AssertionError):
        accept_sampled([_draft(1)], [_position({1: 1.0}), TargetPosition(3)], random.Random(0))


def test_pick_past_the_end_by_rounding_takes_the_last_weighted_token() -> None:
    # sum() and the running total can disagree in the last bit; u may then reach the
    # end of the support with no tail to absorb it.
    assert _pick([1, 2, 3], [0.2, 0.3, 0.0], None, 0.0, 0.5) == 2
    assert _pick([1, 2, 3], [0.2, 0.3, 0.0], 7, 0.1, 0.5) == 7
    assert _pick([1, 2, 3], [0.0, 0.3, 0.0], None, 0.0, 0.0) == 2  # zero widths are skipped
