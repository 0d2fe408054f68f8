"""Hand-built cases for greedy verification (the longest agreeing prefix, then the target)."""

from __future__ import annotations

import random

import pytest

from tightwad.speculation import TargetPosition, accept_greedy


def _target(*tokens: int) -> list[TargetPosition]:
    """Target positions whose argmax tokens are ``tokens`` (the last one is the bonus)."""
    return [TargetPosition(t) for t in tokens]


def test_perfect_match() -> None:
    result = accept_greedy([1, 2, 3], _target(1, 2, 3, 4))
    assert result.tokens == [1, 2, 3, 4]  # the bonus token 4 is appended
    assert (result.n_drafted, result.n_accepted, result.n_emitted) == (3, 3, 4)
    assert result.accepted_mask == [True, True, True]
    assert result.all_accepted


def test_early_mismatch() -> None:
    # Position 2 agrees again, but nothing after the first mismatch can count.
    result = accept_greedy([1, 2, 3], _target(1, 5, 3, 4))
    assert result.tokens == [1, 5]  # 5 is the recovered token
    assert (result.n_drafted, result.n_accepted, result.n_emitted) == (3, 1, 2)
    assert result.accepted_mask == [True, False, False]
    assert not result.all_accepted


def test_mismatch_at_first_position() -> None:
    result = accept_greedy([1, 2], _target(7, 2, 9))
    assert result.tokens == [7]
    assert result.n_accepted == 0
    assert result.accepted_mask == [False, False]


def test_mismatch_at_last_position() -> None:
    result = accept_greedy([1, 2, 3], _target(1, 2, 8, 4))
    assert result.tokens == [1, 2, 8]
    assert result.accepted_mask == [True, True, False]


def test_empty_sequence() -> None:
    result = accept_greedy([], _target(9))
    assert result.tokens == [9]
    assert (result.n_drafted, result.n_accepted, result.accepted_mask) == (0, 0, [])
    assert result.all_accepted  # the single token is a bonus token


def test_ignores_sampling_fields() -> None:
    target = [TargetPosition(1, logprob=-0.1, probs={2: 0.9}, tail_sample=3), TargetPosition(4)]
    assert accept_greedy([1], target).tokens == [1, 4]


@pytest.mark.parametrize("n_target", [0, 1, 2, 4])
def test_wrong_number_of_target_positions(n_target: int) -> None:
    with pytest.raises(AssertionError):
        accept_greedy([1, 2], _target(*range(n_target)))


def test_random_rounds_keep_only_the_agreeing_prefix() -> None:
    rng = random.Random(0)
    for _ in range(2_000):
        k = rng.randint(0, 8)
        draft = [rng.randrange(3) for _ in range(k)]
        target = [rng.randrange(3) for _ in range(k + 1)]
        result = accept_greedy(draft, _target(*target))
        n = result.n_accepted
        assert draft[:n] == target[:n]
        assert n == k or draft[n] != target[n]
        assert result.tokens == draft[:n] + [target[n]]
        assert result.accepted_mask == [i < n for i in range(k)]
