"""One request's drafters: who drafts, how long to wait, and what a failure costs.

A ``DraftPool`` serves the speculation loop's draft callables for one generation.
With one drafter it is a timed call with fallback; with several it asks them all
at once and keeps the proposals that arrive in time. A drafter that fails is
left out for the rest of the request, and one that lags behind the first answer
is cut off for that round: either costs speed, never correctness, because the
target checks whatever is proposed. Only when no drafter is left does the request
go on with the target alone (a fallback, counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

from tightwad.backends.base import DraftBackend, DraftRequest, Sampling, TargetBackend
from tightwad.errors import BackendError
from tightwad.speculation import DraftToken

log = logging.getLogger("tightwad.drafting")

# After the first proposal arrives, the others get as long again as it took
# (at least this), so a drafter on a slower box still contributes when it is close.
MIN_GRACE_S = 0.02


def fallback_reason(exc: BaseException) -> str:
    """The ``reason`` label of a fallback caused by ``exc``."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    name = type(exc).__name__
    return {"BackendTimeout": "timeout", "BackendUnavailable": "unavailable",
            "BackendProtocolError": "bad_response"}.get(name, "error")


@dataclasses.dataclass(slots=True)
class DraftTiming:
    """Wall time of the draft call(s) made at one context length."""

    seconds: float
    names: list[str]  # the drafters whose proposals were used, in proposal order


class DraftPool:
    def __init__(
        self,
        drafters: Sequence[DraftBackend],
        *,
        sampling: Sampling,
        session: str,
        target: TargetBackend,
        timeout_s: float,
        fallback: bool,
        min_confidence: float = 0.0,
        on_drafter_error: Callable[[str, str], None] | None = None,
    ):
        self.alive = list(drafters)
        self.sampling = sampling
        self.session = session
        self.target = target
        self.timeout_s = timeout_s
        self.fallback = fallback
        self.min_confidence = min_confidence
        self.on_drafter_error = on_drafter_error
        self.timings: dict[int, DraftTiming] = {}  # by len(context) of the call
        self.late: dict[str, int] = {}  # rounds each drafter was cut off for lagging
        self.failed: list[tuple[str, BaseException]] = []

    @property
    def exhausted(self) -> bool:
        """True once every drafter has failed: the request goes on with the target alone."""
        return not self.alive

    def _request(self, context: tuple[int, ...], k: int) -> DraftRequest:
        return DraftRequest(
            context=context, k=k, sampling=self.sampling, session=self.session,
            context_text=lambda: self.target.detokenize(context),
            retokenize=lambda text: self.target.tokenize(text, add_special=False),
            min_confidence=self.min_confidence,
        )

    async def _one(self, drafter: DraftBackend, context: tuple[int, ...], k: int) -> list[DraftToken] | None:
        """``drafter``'s proposal, or None once it failed (and was dropped)."""
        try:
            # asyncio.timeout, not wait_for: the draft runs in this task, not a new one per round.
            async with asyncio.timeout(self.timeout_s):
                return list(await drafter.draft(self._request(context, k)))
        except (TimeoutError, BackendError) as exc:
            if not self.fallback:
                raise
            self._drop(drafter, exc)
            return None

    def _drop(self, drafter: DraftBackend, exc: BaseException) -> None:
        if drafter in self.alive:
            self.alive.remove(drafter)
            self.failed.append((drafter.name, exc))
            log.warning("draft %s failed (%s): going on without it", drafter.name, exc)
            if self.on_drafter_error is not None:
                self.on_drafter_error(drafter.name, fallback_reason(exc))

    async def draft(self, context: tuple[int, ...], k: int) -> list[DraftToken]:
        """The first live drafter's proposal ([] when none is left or it failed)."""
        while self.alive:
            drafter = self.alive[0]
            started = time.perf_counter()
            proposal = await self._one(drafter, context, k)
            if proposal is not None:
                self.timings[len(context)] = DraftTiming(time.perf_counter() - started, [drafter.name])
                return proposal
            # That one failed mid-request: the next drafter (if any) takes over.
        return []

    async def draft_many(self, context: tuple[int, ...], k: int) -> list[list[DraftToken]]:
        """Every live drafter's proposal that arrives in time, in configured order."""
        drafters = list(self.alive)
        if len(drafters) <= 1:
            return [await self.draft(context, k)]
        started = time.perf_counter()
        tasks = {asyncio.ensure_future(self._one(d, context, k)): d for d in drafters}
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        first_s = time.perf_counter() - started
        if pending:
            more, pending = await asyncio.wait(pending, timeout=max(MIN_GRACE_S, first_s))
            done |= more
        for task in pending:
            self.late[tasks[task].name] = self.late.get(tasks[task].name, 0) + 1
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        proposals: list[list[DraftToken]] = []
        names: list[str] = []
        for task, drafter in tasks.items():
            if task in done:
                proposal = task.result()  # re-raises when fallback is off
                if proposal is not None:
                    proposals.append(proposal)
                    names.append(drafter.name)
        self.timings[len(context)] = DraftTiming(time.perf_counter() - started, names)
        return proposals
