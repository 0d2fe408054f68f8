"""The speculation loop: draft, verify, accept, repeat; free of I/O.

The loop only sequences rounds. Talking to the draft and target servers is done by
two injected async callables, so the loop runs the same against real backends and
against the fakes in the tests, and it never swallows their errors.
"""

from __future__ import annotations

import random
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


@dataclass(frozen=True, slots=True)
class RoundOutcome:
    """What one round emitted, and the acceptance verdict behind it."""

    tokens: list[int]  # emitted this round, in order; may end with an end-of-generation token
    result: RoundResult  # the rule's verdict, before any truncation
    k: int  # draft tokens requested (0: the draft was not called)
    truncated: int  # tokens of result.tokens not emitted (after an eog token, or past max_tokens)
    finished: FinishReason | None  # set on the last round only


async def speculate(
    *,
    draft: DraftFn,
    verify: VerifyFn,
    context: Sequence[int],
    max_tokens: int,
    eog_tokens: frozenset[int] = frozenset(),
    choose_k: Callable[[], int] | int,
    greedy: bool,
    rng: random.Random | None = None,
) -> AsyncIterator[RoundOutcome]:
    """Generate up to ``max_tokens`` tokens after ``context``, yielding one outcome per round.

    Each round asks ``draft(ctx, k)`` for up to ``k`` tokens, ``verify(ctx, proposal)``
    for ``len(proposal) + 1`` target positions, and applies ``accept_greedy`` (when
    ``greedy``) or ``accept_sampled`` with ``rng``. ``ctx`` is an immutable tuple of
    the prompt plus every token emitted so far, shared by both calls of the round.

    - ``k`` is ``choose_k()`` (or the int), capped at ``max_tokens - emitted - 1``
      because the target always adds one token; at 0 the draft is not called.
    - A draft that returns ``[]`` (failure, nothing to propose) still gets a round:
      ``verify`` runs on the empty proposal and its own token is emitted, so the
      loop degrades to target-alone generation and stays exact. Extra tokens beyond
      ``k`` are ignored, and so is anything after a proposed eog token.
    - The round that emits a token of ``eog_tokens`` ends with it (it is included;
      the caller decides whether to show it) and has ``finished="stop"``. The round
      that reaches ``max_tokens`` has ``finished="length"``. No more than
      ``max_tokens`` tokens are ever emitted; cut tokens are counted in ``truncated``.
    - Exceptions raised by ``draft`` or ``verify`` propagate unchanged: the caller
      owns fallback (for example, retrying with a draft that returns ``[]``).
      Closing the generator early (stop strings, client disconnect) is safe.

    For sampled requests, ``draft`` and ``verify`` must supply what
    ``accept_sampled`` documents (draft distributions, target probabilities on the
    draft support and tail samples); for greedy ones only the tokens are read.
    """
    assert max_tokens >= 1, f"max_tokens must be at least 1, got {max_tokens}"
    assert greedy or rng is not None, "sampled speculation needs an rng"
    ctx = tuple(context)
    emitted = 0
    while True:
        remaining = max_tokens - emitted
        wanted = choose_k() if callable(choose_k) else choose_k
        assert wanted >= 0, f"choose_k gave a negative k: {wanted}"
        k = min(wanted, remaining - 1)
        proposal = list(await draft(ctx, k))[:k] if k > 0 else []
        if eog_tokens:
            proposal = _cut_after_eog(proposal, eog_tokens)
        positions = await verify(ctx, proposal)
        if greedy:
            result = accept_greedy([d.token for d in proposal], positions)
        else:
            result = accept_sampled(proposal, positions, rng)  # type: ignore[arg-type]
        tokens, finished = _emit(result.tokens, remaining, eog_tokens)
        emitted += len(tokens)
        ctx += tuple(tokens)
        yield RoundOutcome(tokens, result, k, len(result.tokens) - len(tokens), finished)
        if finished is not None:
            return


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
