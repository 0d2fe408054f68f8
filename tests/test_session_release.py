"""The target's session release is sent after the answer, not before it.

Releasing a session is one more round trip to the target (51 ms on the WAN
profile) that the client has no reason to wait for. ``Generation`` hands it to
the runtime's ``release`` callable, which sends it in the background; the
runtime keeps the task alive and lets it finish on shutdown. The target here is
an in-memory stand-in whose ``release`` blocks until the test lets it go, which
is the only way to hold a release in flight on purpose.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from tightwad.backends.base import Sampling
from tightwad.config import parse_config
from tightwad.generation import Generation, GenerationRequest
from tightwad.runtime import ProxyRuntime
from tightwad.speculation.types import DraftToken, TargetPosition

N_TOKENS = 5


class HeldReleaseTarget:
    """Counts up from the last context token; ``release`` waits for ``let_go``."""

    kind = "verifier"
    url = "memory://target"

    def __init__(self) -> None:
        self.let_go = asyncio.Event()
        self.released: list[str] = []
        self.release_started = asyncio.Event()

    async def verify(self, context: Sequence[int], draft: Sequence[DraftToken], *, n_prompt: int,
                     sampling: Sampling, session: str, top_logprobs: int = 0) -> list[TargetPosition]:
        seq = [*context, *(d.token for d in draft)]
        return [TargetPosition(token=(seq[len(context) - 1 + i] + 1) % 100) for i in range(len(draft) + 1)]

    async def release(self, session: str) -> None:
        self.release_started.set()
        await self.let_go.wait()
        self.released.append(session)

    async def aclose(self) -> None:
        pass


def _generation(target: HeldReleaseTarget, release=None) -> Generation:
    request = GenerationRequest(prompt=[1, 2, 3], max_tokens=N_TOKENS, sampling=Sampling(), session="s-1")
    return Generation(request, drafters=[], target=target, eog_tokens=frozenset(), piece=lambda t: b"x",
                      choose_k=4, draft_timeout_s=5, fallback_on_draft_failure=True, release=release)


def _runtime(target: HeldReleaseTarget) -> ProxyRuntime:
    config = parse_config({"proxy": {"draft": {"url": "http://127.0.0.1:9"},
                                     "target": {"url": "http://127.0.0.1:9"}}}).require_proxy("test")
    return ProxyRuntime(config, target, [])  # type: ignore[arg-type]


async def _collect(generation: Generation) -> list[int]:
    return [t for event in [e async for e in generation.events()] for t in event.tokens]


def test_the_answer_does_not_wait_for_the_release_and_shutdown_finishes_it():
    async def go() -> None:
        target = HeldReleaseTarget()
        runtime = _runtime(target)
        # The release is still blocked: a generation that awaited it would hang here.
        tokens = await asyncio.wait_for(_collect(_generation(target, runtime._release_later)), 5)
        assert tokens == [4, 5, 6, 7, 8]
        await asyncio.wait_for(target.release_started.wait(), 5)
        assert target.released == []
        target.let_go.set()
        await runtime.aclose()
        assert target.released == ["s-1"]

    asyncio.run(go())


def test_shutdown_does_not_hang_on_a_release_that_never_ends():
    async def go() -> None:
        target = HeldReleaseTarget()
        runtime = _runtime(target)
        await _collect(_generation(target, runtime._release_later))
        await asyncio.wait_for(runtime.aclose(), 10)
        assert target.released == []

    asyncio.run(go())


def test_without_a_release_callable_the_generation_awaits_the_release():
    async def go() -> None:
        target = HeldReleaseTarget()
        task = asyncio.ensure_future(_collect(_generation(target)))
        await asyncio.wait_for(target.release_started.wait(), 5)
        await asyncio.sleep(0.05)
        assert not task.done()
        target.let_go.set()
        assert await asyncio.wait_for(task, 5) == [4, 5, 6, 7, 8]
        assert target.released == ["s-1"]

    asyncio.run(go())
