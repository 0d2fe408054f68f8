"""The speculation loop: draft, verify, accept, repeat; free of I/O.

The loop only sequences rounds. Talking to the draft and target servers is done by
injected async callables, so the loop runs the same against real backends and
against the fakes in the tests, and it never swallows their errors.

Two ways to hide or share drafting work, both exact:

- *pipelining* (one drafter): while the target verifies round i, the draft goes on
  as if round i were accepted in full, guessing the target's bonus token too. When
  the guess was right the next round's draft is already there; otherwise that work
  is cancelled and thrown away. Only tokens the target verified are ever emitted.
- *candidates* (several drafters, greedy requests): every drafter proposes a
  continuation, the target scores them all, and the round keeps the one with the
  longest accepted prefix. Each accepted token is still the target's own argmax.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from tightwad.speculation.acceptance import accept_greedy, accept_sampled
from tightwad.speculation.types import DraftToken, RoundResult, TargetPosition

FinishReason = Literal["stop", "length"]

# (context, k) -> at most k draft tokens; [] when there is nothing to propose.
DraftFn = Callable[[tuple[int, ...], int], Awaitable[Sequence[DraftToken]]]
# (context, draft) -> len(draft) + 1 target positions (the last is the bonus position).
VerifyFn = Callable[[tuple[int, ...], Sequence[DraftToken]], Awaitable[Sequence[TargetPosition]]]
# Several drafters: (context, k) -> one proposal per drafter (each at most k tokens).
DraftManyFn = Callable[[tuple[int, ...], int], Awaitable[Sequence[Sequence[DraftToken]]]]
# (context, proposals) -> for each proposal, len(proposal) + 1 target positions.
VerifyManyFn = Callable[
    [tuple[int, ...], Sequence[Sequence[DraftToken]]], Awaitable[Sequence[Sequence[TargetPosition]]]
]


@dataclass(frozen=True, slots=True)
class RoundOutcome:
    """What one round emitted, and the acceptance verdict behind it."""

    tokens: list[int]  # emitted this round, in order; may end with an end-of-generation token
    result: RoundResult  # the rule's verdict, before any truncation
    k: int  # draft tokens requested (0: the draft was not called)
    truncated: int  # tokens of result.tokens not emitted (after an eog token, or past max_tokens)
    finished: FinishReason | None  # set on the last round only
    winner: int = 0  # index of the proposal the round kept (several drafters), else 0
    prefetched: bool = False  # the draft came from the pipeline, drafted during the last verify
    draft_wait_s: float = 0.0  # time this round waited for its draft(s)


@dataclass(slots=True)
class _Prefetch:
    """A draft started during verification, assuming ``base`` plus its own first token."""

    base: tuple[int, ...]
    k: int
    task: asyncio.Task[Sequence[DraftToken]]

    def matches(self, ctx: tuple[int, ...]) -> bool:
        return len(ctx) == len(self.base) + 1 and ctx[: len(self.base)] == self.base

    async def cancel(self) -> None:
        self.task.cancel()
        # A prefetch nobody will use: its result and its errors are of no interest.
        with contextlib.suppress(BaseException):
            await self.task


async def speculate(
    *,
    draft: DraftFn | None = None,
    verify: VerifyFn | None = None,
    draft_many: DraftManyFn | None = None,
    verify_many: VerifyManyFn | None = None,
    context: Sequence[int],
    max_tokens: int,
    eog_tokens: frozenset[int] = frozenset(),
    choose_k: Callable[[], int] | int,
    greedy: bool,
    rng: random.Random | None = None,
    pipeline: bool = False,
) -> AsyncIterator[RoundOutcome]:
    """Generate up to ``max_tokens`` tokens after ``context``, yielding one outcome per round.

    Give either ``draft`` and ``verify`` (one drafter) or ``draft_many`` and
    ``verify_many`` (several; greedy only). Each round asks for up to ``k`` draft
    tokens after ``ctx``, the target's ``len(proposal) + 1`` positions, and applies
    ``accept_greedy`` (when ``greedy``) or ``accept_sampled`` with ``rng``. ``ctx`` is
    an immutable tuple of the prompt plus every token emitted so far.

    - ``k`` is ``choose_k()`` (or the int), capped at ``max_tokens - emitted - 1``
      because the target always adds one token; at 0 the draft is not called.
    - A draft that returns ``[]`` (failure, nothing to propose) still gets a round:
      the target's own token is emitted, so the loop degrades to target-alone
      generation and stays exact. Extra tokens beyond ``k`` are ignored, and so is
      anything after a proposed eog token.
    - The round that emits a token of ``eog_tokens`` ends with it (it is included;
      the caller decides whether to show it) and has ``finished="stop"``. The round
      that reaches ``max_tokens`` has ``finished="length"``. No more than
      ``max_tokens`` tokens are ever emitted; cut tokens are counted in ``truncated``.
    - ``pipeline`` (one drafter only): while ``verify`` runs, ``draft(ctx + proposal,
      k' + 1)`` runs too; when the round emits exactly the proposal plus that draft's
      first token, its remaining tokens are the next round's proposal.
    - Exceptions raised by the callables propagate unchanged (a prefetch's only when
      its draft is used): the caller owns fallback. Closing the generator early
      (stop strings, client disconnect) is safe and cancels any prefetch.

    For sampled requests, the callables must supply what ``accept_sampled``
    documents (draft distributions, target probabilities on the draft support and
    tail samples); for greedy ones only the tokens are read.
    """
    assert max_tokens >= 1, f"max_tokens must be at least 1, got {max_tokens}"
    assert greedy or rng is not None, "sampled speculation needs an rng"
    several = draft_many is not None
    assert several == (verify_many is not None) and several != (draft is not None or verify is not None), \
        "give draft and verify, or draft_many and verify_many"
    assert not (several and pipeline), "pipelining drafts is for one drafter"
    ctx = tuple(context)
    emitted = 0
    prefetch: _Prefetch | None = None
    try:
        while True:
            remaining = max_tokens - emitted
            waited = time.perf_counter()
            prefetched = False
            if prefetch is not None and prefetch.matches(ctx):
                ahead = list(await prefetch.task)
                prefetched = bool(ahead) and ahead[0].token == ctx[-1]
            if prefetch is not None and not prefetched:
                await prefetch.cancel()
            if prefetched:
                assert prefetch is not None
                k = prefetch.k
                proposals = [ahead[1 : k + 1]]
            else:
                k = min(_wanted(choose_k), remaining - 1)
                if k <= 0:
                    proposals = [[]]
                elif several:
                    assert draft_many is not None
                    proposals = [list(p)[:k] for p in await draft_many(ctx, k)] or [[]]
                else:
                    assert draft is not None
                    proposals = [list(await draft(ctx, k))[:k]]
            prefetch = None
            draft_wait_s = time.perf_counter() - waited
            if eog_tokens:
                proposals = [_cut_after_eog(p, eog_tokens) for p in proposals]
            if not greedy:
                proposals = proposals[:1]  # several proposals are verified for greedy requests only
            if pipeline and draft is not None:
                prefetch = _start_prefetch(draft, ctx, proposals[0], remaining, choose_k, eog_tokens)
            if several:
                assert verify_many is not None
                scored = list(await verify_many(ctx, proposals))
                assert len(scored) == len(proposals), "verify_many must score every proposal"
            else:
                assert verify is not None
                scored = [await verify(ctx, proposals[0])]
            winner, result = _best(proposals, scored, greedy, rng)
            tokens, finished = _emit(result.tokens, remaining, eog_tokens)
            emitted += len(tokens)
            ctx += tuple(tokens)
            yield RoundOutcome(tokens, result, k, len(result.tokens) - len(tokens), finished,
                               winner, prefetched, draft_wait_s)
            if finished is not None:
                return
    finally:
        if prefetch is not None:
            await prefetch.cancel()


def _wanted(choose_k: Callable[[], int] | int) -> int:
    wanted = choose_k() if callable(choose_k) else choose_k
    assert wanted >= 0, f"choose_k gave a negative k: {wanted}"
    return wanted


def _start_prefetch(
    draft: DraftFn,
    ctx: tuple[int, ...],
    proposal: list[DraftToken],
    remaining: int,
    choose_k: Callable[[], int] | int,
    eog_tokens: frozenset[int],
) -> _Prefetch | None:
    """Draft the round after this one as if this one were accepted in full."""
    if any(d.token in eog_tokens for d in proposal):
        return None  # accepted in full, the round ends the generation
    # Accepted in full, this round emits len(proposal) + 1 tokens: the prefetch
    # guesses the last of them and drafts the next round's k after it.
    k_next = min(_wanted(choose_k), remaining - len(proposal) - 2)
    if k_next <= 0:
        return None
    base = ctx + tuple(d.token for d in proposal)
    return _Prefetch(base, k_next, asyncio.ensure_future(draft(base, k_next + 1)))


def _best(
    proposals: list[list[DraftToken]],
    scored: list[Sequence[TargetPosition]],
    greedy: bool,
    rng: random.Random | None,
) -> tuple[int, RoundResult]:
    """The proposal that emits the most tokens (the first on ties), and its verdict."""
    if not greedy:
        return 0, accept_sampled(proposals[0], scored[0], rng)  # type: ignore[arg-type]
    results = [accept_greedy([d.token for d in p], s) for p, s in zip(proposals, scored, strict=True)]
    winner = max(range(len(results)), key=lambda i: (results[i].n_accepted, -i))
    return winner, results[winner]


def _cut_after_eog(proposal: list[DraftToken], eog_tokens: frozenset[int]) -> list[DraftToken]:
    """Drop proposed tokens after the first eog: if it is accepted the round stops
    there, and if it is not, nothing after it could have been accepted either."""
    for i, d in enumerate(proposal):
        if d.token in eog_tokens:
            return proposal[: i + 1]
    return proposal


def _emit(
    round_tokens: list[int], remaining: int, eog_tokens: frozenset[int]
) -> tuple[list[int], FinishReason | None]:
    """The tokens to emit from one round, and why generation ends (None to go on)."""
    tokens = round_tokens[:remaining]
    for i, token in enumerate(tokens):
        if token in eog_tokens:
            return tokens[: i + 1], "stop"
    if len(tokens) == remaining:
        return tokens, "length"
    return tokens, None
