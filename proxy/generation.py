"""One request's generation: the speculation loop wired to real backends.

This is where I/O meets the pure core (``tightwad.speculation``): the draft
and verify callables given to ``speculate`` call the backends, time them and,
when the draft fails, return an empty draft so that the loop carries on as the
target alone (exact, just slower). Text, stop strings and logprobs are worked
out here from what the target computed; nothing is assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from tightwad.backends.base import DraftBackend, Sampling, TargetBackend, verify_candidates
from tightwad.drafting import DraftPool, fallback_reason
from tightwad.speculation import (
    DraftToken,
    RoundOutcome,
    RoundResult,
    SpecDecodingStats,
    TargetPosition,
    speculate,
)
from tightwad.textstream import TextStream, TextUpdate

log = logging.getLogger("tightwad.generation")


@dataclasses.dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]


@dataclasses.dataclass(slots=True)
class GenerationRequest:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    session: str
    stops: Sequence[str] = ()
    top_logprobs: int | None = None  # None: the client asked for no logprobs


@dataclasses.dataclass(slots=True)
class GenerationEvent:
    text: str
    tokens: list[int]  # tokens whose text is now fully released
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class RoundRecord:
    """One round, as the proxy's totals and metrics see it."""

    drafter: str | None
    result: RoundResult
    n_emitted: int
    draft_s: float | None  # the draft call's own duration (it may overlap verification)
    verify_s: float
    round_s: float
    draft_wait_s: float = 0.0  # what the round waited for its draft (less when pipelined)
    cpu_s: float = 0.0  # CPU time of the proxy's event-loop thread during the round
    prefetched: bool = False
    candidates: int = 0  # proposals scored (several drafters), 0 without a draft

    @property
    def overhead_s(self) -> float:
        """Wall time of the round spent neither waiting for the draft nor verifying."""
        return max(0.0, self.round_s - self.draft_wait_s - self.verify_s)


@dataclasses.dataclass(slots=True)
class GenerationStats:
    """What one request did; merged into the proxy's totals when it ends."""

    spec: SpecDecodingStats = dataclasses.field(default_factory=SpecDecodingStats)
    draft_seconds: list[float] = dataclasses.field(default_factory=list)
    verify_seconds: list[float] = dataclasses.field(default_factory=list)
    round_seconds: list[float] = dataclasses.field(default_factory=list)
    fallbacks: list[str] = dataclasses.field(default_factory=list)
    drafter_wins: dict[str, int] = dataclasses.field(default_factory=dict)
    completion_tokens: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)


class Generation:
    """Drives one request; iterate ``events()`` exactly once."""

    def __init__(
        self,
        request: GenerationRequest,
        *,
        drafters: Sequence[DraftBackend],
        target: TargetBackend,
        eog_tokens: frozenset[int],
        piece: Callable[[int], bytes],
        choose_k: Callable[[], int] | int,
        draft_timeout_s: float,
        fallback_on_draft_failure: bool,
        pipeline: bool = False,
        parallel_drafters: bool = True,
        min_confidence: float = 0.0,
        on_round: Callable[[RoundRecord], None] | None = None,
        on_fallback: Callable[[str], None] | None = None,
        on_drafter_error: Callable[[str, str], None] | None = None,
        ensure_pieces: Callable[[Sequence[int]], Awaitable[None]] | None = None,
        release: Callable[[str], None] | None = None,
    ):
        self.request = request
        self.target = target
        self.eog = eog_tokens
        self.text = TextStream(piece, request.stops)
        self.choose_k = choose_k
        # Several proposals are scored for greedy requests only; a sampled request
        # drafts with the first drafter (and the others only if it fails).
        self.several = parallel_drafters and request.sampling.greedy and len(drafters) > 1
        self.pipeline = pipeline and not self.several
        self.on_round = on_round
        self.on_fallback = on_fallback
        # Fetches the bytes of tokens that ``piece`` does not know yet (a target without a
        # vocabulary table); awaited before any token's text is worked out.
        self.ensure_pieces = ensure_pieces
        # Sends the target's session release in the background (one round trip that the
        # client need not wait for); without it the release is awaited here.
        self.release = release
        self.stats = GenerationStats()
        self.pool = DraftPool(
            drafters, sampling=request.sampling, session=request.session, target=target,
            timeout_s=draft_timeout_s, fallback=fallback_on_draft_failure,
            min_confidence=min_confidence, on_drafter_error=on_drafter_error,
        )
        self._had_drafters = bool(drafters)
        self._last_positions: Sequence[TargetPosition] = ()
        self._last_draft: Sequence[DraftToken] = ()
        self._scored: list[Sequence[TargetPosition]] = []
        self._proposals: list[Sequence[DraftToken]] = []
        self._pending: list[TokenLogprob] = []  # emitted tokens whose text is not released yet
        self._round_started = time.perf_counter()
        self._n_released_total = 0

    def note_fallback(self, reason: str) -> None:
        """Record that this request went on with the target alone, and why."""
        self.stats.fallbacks.append(reason)
        if self.on_fallback is not None:
            self.on_fallback(reason)

    async def _verify(
        self, context: tuple[int, ...], draft: Sequence[DraftToken]
    ) -> Sequence[TargetPosition]:
        return (await self._verify_many(context, [draft]))[0]

    async def _verify_many(
        self, context: tuple[int, ...], proposals: Sequence[Sequence[DraftToken]]
    ) -> list[Sequence[TargetPosition]]:
        # Drafters often agree: identical proposals are scored once.
        keys = [tuple(d.token for d in p) for p in proposals]
        first: dict[tuple[int, ...], int] = {}  # proposal tokens -> index of its first proposal
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        distinct = [proposals[i] for i in first.values()]
        slot = {key: j for j, key in enumerate(first)}
        started = time.perf_counter()
        scored = await verify_candidates(
            self.target, context, distinct, n_prompt=len(self.request.prompt),
            sampling=self.request.sampling, session=self.request.session,
            top_logprobs=self.request.top_logprobs or 0,
        )
        self.stats.verify_seconds.append(time.perf_counter() - started)
        self._proposals = list(proposals)
        self._scored = [scored[slot[key]] for key in keys]
        return self._scored

    async def events(self) -> AsyncIterator[GenerationEvent]:
        req = self.request
        rng = None if req.sampling.greedy else random.Random(req.sampling.seed)
        if self.several:
            callables = {"draft_many": self.pool.draft_many, "verify_many": self._verify_many}
        else:
            callables = {"draft": self.pool.draft, "verify": self._verify}
        rounds = speculate(
            **callables, context=req.prompt, max_tokens=req.max_tokens, eog_tokens=self.eog,
            choose_k=self.choose_k, greedy=req.sampling.greedy, rng=rng, pipeline=self.pipeline,
        )
        finish: str | None = None
        cpu_started = time.thread_time()
        try:
            async with contextlib.aclosing(rounds) as outcomes:
                async for outcome in outcomes:
                    if self._had_drafters and self.pool.exhausted and not self.stats.fallbacks:
                        self.note_fallback(fallback_reason(self.pool.failed[-1][1]))
                    self._last_draft = self._proposals[outcome.winner] if outcome.k else ()
                    self._last_positions = self._scored[outcome.winner]
                    visible = [t for t in outcome.tokens if t not in self.eog]
                    self.stats.spec.observe(outcome.result, n_emitted=len(outcome.tokens))
                    self.stats.completion_tokens += len(visible)
                    drafter, draft_s = self._drafter_of(outcome)
                    if drafter is not None and outcome.result.n_accepted:
                        wins = self.stats.drafter_wins
                        wins[drafter] = wins.get(drafter, 0) + outcome.result.n_accepted
                    logprobs = self._logprobs(outcome.tokens)[: len(visible)]
                    if self.ensure_pieces is not None:
                        await self.ensure_pieces(
                            [*visible, *(t for lp in logprobs for t, _ in lp.top)])
                    self._pending.extend(logprobs)
                    update = self.text.push(visible)
                    finish = outcome.finished
                    if update.stopped:
                        finish = "stop"
                        # Tokens after the one that completed the stop string are not counted.
                        self.stats.completion_tokens = update.n_tokens
                    elif finish is not None:
                        update = _merge(update, self.text.finish())
                    event = self._event(update, finish)
                    now = time.perf_counter()
                    cpu_now = time.thread_time()
                    self.stats.round_seconds.append(now - self._round_started)
                    if event.tokens:
                        self.stats.first_token_at = self.stats.first_token_at or now
                        self.stats.token_times.append(now)
                    if self.on_round is not None:
                        self.on_round(RoundRecord(
                            drafter=drafter, result=outcome.result, n_emitted=len(outcome.tokens),
                            draft_s=draft_s, verify_s=self.stats.verify_seconds[-1],
                            round_s=now - self._round_started, draft_wait_s=outcome.draft_wait_s,
                            cpu_s=cpu_now - cpu_started, prefetched=outcome.prefetched,
                            candidates=len(self._proposals) if outcome.k else 0,
                        ))
                    self._round_started, cpu_started = now, cpu_now
                    if event.text or event.tokens or event.finish_reason:
                        yield event
                    if finish is not None:
                        return
        finally:
            if self.release is not None:
                self.release(req.session)
            else:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.target.release(req.session))

    def _drafter_of(self, outcome: RoundOutcome) -> tuple[str | None, float | None]:
        """The drafter credited with this round's proposal, and how long its draft took."""
        if not outcome.k:
            return None, None
        # A prefetched draft was made at the context before the round's last guessed token.
        n_ctx = len(self.request.prompt) + self.stats.spec.num_emitted_tokens - len(outcome.tokens)
        timing = self.pool.timings.pop(n_ctx - 1 if outcome.prefetched else n_ctx, None)
        if timing is None or outcome.winner >= len(timing.names):
            return None, None
        for stale in [n for n in self.pool.timings if n < n_ctx]:
            del self.pool.timings[stale]
        return timing.names[outcome.winner], timing.seconds

    def _event(self, update: TextUpdate, finish: str | None) -> GenerationEvent:
        n_new = update.n_tokens - self._n_released_total
        released = self._pending[:n_new]
        del self._pending[:n_new]
        self._n_released_total = update.n_tokens
        return GenerationEvent(
            text=update.text, tokens=[r.token for r in released], logprobs=released,
            finish_reason=finish,
        )

    def _logprobs(self, tokens: Sequence[int]) -> list[TokenLogprob]:
        """Each emitted token's logprob, read from the positions the target returned."""
        out: list[TokenLogprob] = []
        for i, tok in enumerate(tokens):
            pos = self._last_positions[i] if i < len(self._last_positions) else None
            if pos is None:
                out.append(TokenLogprob(tok, None, ()))
                continue
            if i < len(self._last_draft) and self._last_draft[i].token == tok:
                lp = pos.draft_logprob
            elif tok == pos.token and self.request.sampling.greedy:
                lp = pos.logprob
            elif tok == pos.tail_sample:
                lp = pos.tail_logprob
            else:
                lp = dict(pos.top_logprobs).get(tok, pos.logprob if tok == pos.token else None)
            out.append(TokenLogprob(tok, lp, pos.top_logprobs))
        return out


def _merge(a: TextUpdate, b: TextUpdate) -> TextUpdate:
    a.text += b.text
    a.n_tokens = b.n_tokens
    a.stopped = a.stopped or b.stopped
    return a
