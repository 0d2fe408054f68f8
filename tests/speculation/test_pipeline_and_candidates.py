"""Pipelined drafting and several drafters, in the pure loop, against toy models.

Both only change who drafts and when; every emitted token is still the target's,
so greedy output must equal target-alone generation token for token, and sampled
output must follow the target's distribution.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import pytest
from test_speculate_loop import (
    PROMPT,
    _emitted,
    _GreedyFakes,
    _sampled_p_value,
    _SampledFakes,
    _target_alone,
)

import tightwad.speculation.loop as loop_module
from tightwad.speculation import DraftToken, RoundOutcome, RoundResult, TargetPosition, speculate


def _run(**kwargs: object) -> list[RoundOutcome]:
    async def collect() -> list[RoundOutcome]:
        params: dict[str, object] = {"greedy": True, "choose_k": 4, "max_tokens": 40, "context": PROMPT}
        params.update(kwargs)
        return [o async for o in speculate(**params)]  # type: ignore[arg-type]

    return asyncio.run(collect())


# -- pipelining -------------------------------------------------------------------------


@pytest.mark.parametrize("accuracy", [1.0, 0.9, 0.5, 0.0])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("max_tokens", [1, 2, 7, 40])
def test_pipelined_greedy_equals_target_alone(accuracy: float, k: int, max_tokens: int) -> None:
    fakes = _GreedyFakes(accuracy=accuracy, short=False, seed=k * 100 + max_tokens)
    outcomes = _run(draft=fakes.draft, verify=fakes.verify, choose_k=k, max_tokens=max_tokens,
                    pipeline=True)
    assert _emitted(outcomes) == _target_alone(PROMPT, max_tokens)
    assert sum(len(o.tokens) for o in outcomes) == max_tokens


def test_pipelined_eog_stops_exactly() -> None:
    expected = _target_alone(PROMPT, 60)
    eog = frozenset({expected[17]})
    fakes = _GreedyFakes(accuracy=0.95, short=False, seed=3)
    outcomes = _run(draft=fakes.draft, verify=fakes.verify, max_tokens=60, eog_tokens=eog,
                    pipeline=True)
    assert _emitted(outcomes) == _target_alone(PROMPT, 60, eog)
    assert outcomes[-1].finished == "stop"


def test_a_perfect_draft_is_prefetched_every_round_after_the_first() -> None:
    fakes = _GreedyFakes(accuracy=1.0, short=False)
    outcomes = _run(draft=fakes.draft, verify=fakes.verify, choose_k=4, max_tokens=40, pipeline=True)
    assert [o.prefetched for o in outcomes] == [False] + [True] * (len(outcomes) - 1)
    # Each round after the first was drafted from the previous context plus its proposal.
    assert all(len(ctx) == len(PROMPT) + 5 * i + 4 for i, (ctx, _) in enumerate(fakes.draft_calls[1:]))
    # Without pipelining the same rounds each ask the draft after verification.
    plain = _run(draft=_GreedyFakes(accuracy=1.0, short=False).draft, verify=fakes.verify,
                 choose_k=4, max_tokens=40)
    assert not any(o.prefetched for o in plain)


def test_a_wrong_draft_is_never_prefetched_and_its_work_is_thrown_away() -> None:
    fakes = _GreedyFakes(accuracy=0.0, short=False)
    outcomes = _run(draft=fakes.draft, verify=fakes.verify, choose_k=4, max_tokens=20, pipeline=True)
    assert not any(o.prefetched for o in outcomes)
    assert _emitted(outcomes) == _target_alone(PROMPT, 20)


def test_the_next_draft_runs_while_the_target_verifies() -> None:
    """Verification waits until the next round's draft has started: without overlap
    the loop would deadlock here (and the wait would time out)."""
    fakes = _GreedyFakes(accuracy=1.0, short=False)
    started: dict[int, asyncio.Event] = {}
    waited = []

    async def draft(ctx: tuple[int, ...], k: int) -> list[DraftToken]:
        started.setdefault(len(ctx), asyncio.Event()).set()
        return await fakes.draft(ctx, k)

    async def verify(ctx: tuple[int, ...], proposal: Sequence[DraftToken]) -> list[TargetPosition]:
        if len(ctx) + len(proposal) + 2 <= len(PROMPT) + 16:  # a prefetch is due
            event = started.setdefault(len(ctx) + len(proposal), asyncio.Event())
            await asyncio.wait_for(event.wait(), timeout=5)
            waited.append(len(ctx))
        return await fakes.verify(ctx, proposal)

    outcomes = _run(draft=draft, verify=verify, choose_k=3, max_tokens=16, pipeline=True)
    assert _emitted(outcomes) == _target_alone(PROMPT, 16)
    assert len(waited) >= 3


def test_closing_early_cancels_the_prefetch() -> None:
    cancelled = []
    fakes = _GreedyFakes(accuracy=1.0, short=False)

    async def slow_draft(ctx: tuple[int, ...], k: int) -> list[DraftToken]:
        if len(ctx) > len(PROMPT):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(len(ctx))
                raise
        return await fakes.draft(ctx, k)

    async def verify(ctx: tuple[int, ...], proposal: Sequence[DraftToken]) -> list[TargetPosition]:
        await asyncio.sleep(0.01)  # the prefetch starts meanwhile
        return await fakes.verify(ctx, proposal)

    async def first_round_only() -> list[asyncio.Task]:
        gen = speculate(draft=slow_draft, verify=verify, context=PROMPT, max_tokens=40,
                        choose_k=4, greedy=True, pipeline=True)
        await gen.__anext__()
        await gen.aclose()
        return [t for t in asyncio.all_tasks()
                if t.get_coro().__name__ == "slow_draft" and not t.done()]  # type: ignore[union-attr]

    assert asyncio.run(asyncio.wait_for(first_round_only(), 5)) == []
    assert cancelled == [len(PROMPT) + 4]


def test_a_failing_prefetch_only_matters_if_it_is_used() -> None:
    fakes = _GreedyFakes(accuracy=0.0, short=False)

    async def draft(ctx: tuple[int, ...], k: int) -> list[DraftToken]:
        if k == 5:  # prefetches ask for k + 1
            raise RuntimeError("prefetch failed")
        return await fakes.draft(ctx, k)

    # Every round rejects at position 0, so no prefetch is used and none may raise.
    assert _emitted(_run(draft=draft, verify=fakes.verify, choose_k=4, max_tokens=12,
                         pipeline=True)) == _target_alone(PROMPT, 12)
    perfect = _GreedyFakes(accuracy=1.0, short=False)

    async def draft_used(ctx: tuple[int, ...], k: int) -> list[DraftToken]:
        if k == 5:
            raise RuntimeError("prefetch failed")
        return await perfect.draft(ctx, k)

    with pytest.raises(RuntimeError, match="prefetch failed"):
        _run(draft=draft_used, verify=perfect.verify, choose_k=4, max_tokens=12, pipeline=True)


def _pipelined_sampled_runs(trials: int) -> list[tuple[int, ...]]:
    fakes, rng = _SampledFakes(random.Random(5)), random.Random(6)

    async def collect() -> list[tuple[int, ...]]:
        runs = []
        for _ in range(trials):
            gen = speculate(draft=fakes.draft, verify=fakes.verify, context=[0], max_tokens=3,
                            choose_k=1, greedy=False, rng=rng, pipeline=True)
            runs.append(tuple(_emitted([o async for o in gen])))
        return runs

    return asyncio.run(collect())


def test_pipelined_sampling_follows_the_target_distribution() -> None:
    # k = 1 over 3 tokens: round 2's draft is prefetched whenever round 1's bonus
    # matched the prefetch's guess, so both paths are exercised.
    assert _sampled_p_value(_pipelined_sampled_runs(6_000), 3) > 1e-3


def test_pipelined_sampling_with_a_broken_rule_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def accept_everything(draft, target, rng) -> RoundResult:  # noqa: ANN001
        k = len(draft)
        return RoundResult([d.token for d in draft] + [target[k].tail_sample], k, k, [True] * k)

    monkeypatch.setattr(loop_module, "accept_sampled", accept_everything)
    assert _sampled_p_value(_pipelined_sampled_runs(3_000), 3) < 1e-6


# -- several drafters --------------------------------------------------------------------


class _Drafters:
    """Toy drafters of given accuracies, asked together; the target scores each proposal."""

    def __init__(self, accuracies: Sequence[float], seed: int = 0):
        self.fakes = [_GreedyFakes(accuracy=a, short=False, seed=seed + i) for i, a in enumerate(accuracies)]
        self.scored: list[int] = []

    async def draft_many(self, ctx: tuple[int, ...], k: int) -> list[list[DraftToken]]:
        return [await f.draft(ctx, k) for f in self.fakes]

    async def verify_many(self, ctx: tuple[int, ...], proposals: Sequence[Sequence[DraftToken]]) -> list:
        self.scored.append(len(proposals))
        return [await self.fakes[0].verify(ctx, p) for p in proposals]


@pytest.mark.parametrize("accuracies", [(0.9, 0.2), (0.2, 0.9), (0.0, 0.0, 1.0), (0.6, 0.6, 0.6)])
@pytest.mark.parametrize("max_tokens", [1, 9, 40])
def test_several_drafters_equal_target_alone(accuracies: tuple[float, ...], max_tokens: int) -> None:
    drafters = _Drafters(accuracies, seed=max_tokens)
    outcomes = _run(draft_many=drafters.draft_many, verify_many=drafters.verify_many,
                    max_tokens=max_tokens, choose_k=6)
    assert _emitted(outcomes) == _target_alone(PROMPT, max_tokens)


def test_the_round_keeps_the_proposal_with_the_longest_accepted_prefix() -> None:
    drafters = _Drafters((0.0, 1.0, 1.0))
    outcomes = _run(draft_many=drafters.draft_many, verify_many=drafters.verify_many,
                    max_tokens=40, choose_k=4)
    # The perfect drafters tie; the first of them is credited.
    assert {o.winner for o in outcomes} == {1}
    assert all(o.result.n_accepted == o.k for o in outcomes[:-1])
    assert set(drafters.scored) == {3}


def test_a_good_drafter_beats_a_bad_one_in_tokens_per_round() -> None:
    alone = _run(draft=_GreedyFakes(accuracy=0.3, short=False).draft,
                 verify=_GreedyFakes().verify, max_tokens=60, choose_k=6)
    together = _run(**dict(zip(("draft_many", "verify_many"), _pair((0.3, 0.95)), strict=True)),
                    max_tokens=60, choose_k=6)
    assert len(together) < len(alone)


def _pair(accuracies: tuple[float, ...]) -> tuple:
    d = _Drafters(accuracies)
    return d.draft_many, d.verify_many


def test_sampled_requests_use_the_first_proposal_only() -> None:
    fakes = _SampledFakes(random.Random(1))
    seen = []

    async def draft_many(ctx: tuple[int, ...], k: int) -> list[list[DraftToken]]:
        return [await fakes.draft(ctx, k), [DraftToken(7, {7: 1.0})]]

    async def verify_many(ctx: tuple[int, ...], proposals: Sequence[Sequence[DraftToken]]) -> list:
        seen.append(len(proposals))
        return [await fakes.verify(ctx, p) for p in proposals]

    outcomes = _run(draft_many=draft_many, verify_many=verify_many, greedy=False,
                    rng=random.Random(2), context=[0], max_tokens=10)
    assert set(seen) == {1} and {o.winner for o in outcomes} == {0}


def test_draft_and_draft_many_are_exclusive() -> None:
    fakes = _GreedyFakes()
    drafters = _Drafters((0.5,))
    with pytest.raises(AssertionError):
        _run(draft=fakes.draft, verify=fakes.verify, draft_many=drafters.draft_many,
             verify_many=drafters.verify_many)
    with pytest.raises(AssertionError):
        _run(draft_many=drafters.draft_many, verify_many=drafters.verify_many, pipeline=True)
