"""Round statistics: arithmetic over real RoundResults."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tightwad.speculation import RoundResult, SpecDecodingStats, TargetPosition, accept_greedy


def _round(draft: list[int], target: list[int]) -> RoundResult:
    """A RoundResult made by the real greedy rule, never written by hand."""
    return accept_greedy(draft, [TargetPosition(t) for t in target])


PERFECT = ([1, 2, 3], [1, 2, 3, 4])  # 3 drafted, 3 accepted, 4 emitted
EARLY_MISMATCH = ([1, 2, 3], [1, 5, 3, 4])  # 3 drafted, 1 accepted, 2 emitted
EMPTY_DRAFT = ([], [9])  # nothing drafted, 1 emitted


def _observed(*rounds: tuple[list[int], list[int]]) -> SpecDecodingStats:
    stats = SpecDecodingStats()
    for draft, target in rounds:
        stats.observe(_round(draft, target))
    return stats


def test_empty_stats() -> None:
    stats = SpecDecodingStats()
    assert stats.acceptance_rate is None
    assert stats.mean_acceptance_length is None
    assert stats.tokens_per_round is None
    assert stats.accepted_per_position == []


def test_observe_counts() -> None:
    stats = _observed(PERFECT, EARLY_MISMATCH, EMPTY_DRAFT)
    assert stats.rounds == 3
    assert stats.num_drafts == 2
    assert stats.num_draft_tokens == 6
    assert stats.num_accepted_tokens == 4
    assert stats.num_emitted_tokens == 7
    assert stats.accepted_per_position == [2, 1, 1]
    assert stats.acceptance_rate == pytest.approx(4 / 6)
    assert stats.mean_acceptance_length == pytest.approx(1 + 4 / 2)
    assert stats.tokens_per_round == pytest.approx(7 / 3)


def test_nothing_drafted() -> None:
    stats = _observed(EMPTY_DRAFT, EMPTY_DRAFT)
    assert (stats.rounds, stats.num_drafts, stats.num_emitted_tokens) == (2, 0, 2)
    assert stats.acceptance_rate is None
    assert stats.mean_acceptance_length is None
    assert stats.tokens_per_round == 1.0


def test_all_rejected() -> None:
    stats = _observed(([1, 2], [7, 2, 9]))
    assert stats.acceptance_rate == 0.0
    assert stats.mean_acceptance_length == 1.0
    assert stats.accepted_per_position == []


def test_emitted_override_for_truncated_rounds() -> None:
    stats = SpecDecodingStats()
    stats.observe(_round(*PERFECT), n_emitted=2)
    assert stats.num_emitted_tokens == 2
    assert stats.num_accepted_tokens == 3  # acceptance is the rule's verdict regardless


def test_per_position_grows_with_longer_drafts() -> None:
    stats = _observed(([1], [1, 2]), ([1, 2, 3, 4], [1, 2, 3, 4, 5]), ([1, 2], [1, 2, 3]))
    assert stats.accepted_per_position == [3, 2, 1, 1]


def test_merge_equals_observing_everything() -> None:
    long_match = ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6])
    first = _observed(PERFECT, EMPTY_DRAFT)
    second = _observed(EARLY_MISMATCH, long_match)
    second_before = replace(second, accepted_per_position=list(second.accepted_per_position))
    first.merge(second)
    assert first == _observed(PERFECT, EMPTY_DRAFT, EARLY_MISMATCH, long_match)
    assert second == second_before  # the merged-in stats are left alone


def test_merge_into_longer_per_position() -> None:
    longer = _observed(([1, 2, 3], [1, 2, 3, 4]))
    shorter = _observed(([1], [1, 2]))
    longer.merge(shorter)
    assert longer.accepted_per_position == [2, 1, 1]
