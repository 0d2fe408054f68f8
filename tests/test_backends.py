"""Draft and target backends against real servers (SmolLM2 on llama-server and the verifier).

Draft and target share one model, so a greedy draft is the target's own greedy
continuation and must be accepted in full. Error mapping is checked against a
dead port and a small local server that answers garbage, errors or nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import sys
import time
import types
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from servers import QuietHandler, ServerProcess, free_port, handler_server

from tightwad.backends.base import DraftRequest, Sampling, positions_from_generation
from tightwad.backends.factory import make_drafter, make_target
from tightwad.backends.llamacpp_draft import LlamaCppDraft
from tightwad.backends.llamacpp_target import LlamaCppTarget
from tightwad.backends.ollama import OllamaDraft
from tightwad.backends.openai_draft import OpenAIDraft
from tightwad.backends.openai_echo import OpenAIEchoTarget
from tightwad.backends.verifier import VerifierTarget
from tightwad.errors import (
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
)
from tightwad.speculation.acceptance import accept_greedy, accept_sampled
from tightwad.speculation.types import DraftToken

T = TypeVar("T")
PROMPT = "The capital of France is"
K = 5
GREEDY = Sampling()
SAMPLED = Sampling(temperature=0.9, top_k=8, top_p=0.95, seed=1234)


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(fn())  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def verifier_url(servers, smollm) -> str:
    return servers("verifier", smollm, "--parallel", "2", "--ctx-size", "256").url


@pytest.fixture(scope="module")
def llama_url(servers, smollm) -> str:
    return servers("llama-server", smollm, "--parallel", "2").url


@pytest.fixture(scope="module")
def ollama_url(llama_url) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, str(Path(__file__).with_name("ollama_standin.py")), "--port", str(port),
            "--upstream", llama_url, "--model", "smollm2:135m"]
    server = ServerProcess("ollama-standin", argv, port=port, health="/api/version").start(60)
    yield server.url
    server.stop()


async def context_of(target: VerifierTarget) -> list[int]:
    return await target.tokenize(PROMPT, add_special=True)


async def alone(target: VerifierTarget, ctx: list[int], n: int, sampling: Sampling = GREEDY) -> list[int]:
    out = await target.generate(ctx, n_prompt=len(ctx), max_tokens=n, sampling=sampling,
                                session=f"alone-{random.random()}")
    return [g.token for g in out]


# -- draft backends ------------------------------------------------------------------


def test_llamacpp_greedy_draft_is_the_target_alone_and_fully_accepted(verifier_url, llama_url):
    async def go() -> None:
        async with contextlib.aclosing(VerifierTarget(verifier_url)) as target, \
                contextlib.aclosing(LlamaCppDraft(llama_url, name="smol")) as drafter:
            assert await drafter.health()
            info = await target.info()
            assert await drafter.vocab_size() == info.n_vocab
            assert await drafter.tokenize(PROMPT) == await target.tokenize(PROMPT, add_special=False)
            ctx = await context_of(target)
            draft = await drafter.draft(DraftRequest(ctx, K, GREEDY, "greedy-session"))
            expected = await alone(target, ctx, K + 1)
            assert [d.token for d in draft] == expected[:K]
            assert all(d.dist == {d.token: 1.0} for d in draft)
            # verify() equals generate(): every draft accepted, the bonus is the next token
            positions = await target.verify(ctx, draft, n_prompt=len(ctx), sampling=GREEDY,
                                            session="greedy-session")
            assert [p.token for p in positions] == expected
            result = accept_greedy([d.token for d in draft], positions)
            assert result.n_accepted == K and result.tokens == expected
            await target.release("greedy-session")

    run(go)


def test_llamacpp_sampled_draft_reports_its_exact_distribution(verifier_url, llama_url):
    async def go() -> None:
        async with contextlib.aclosing(VerifierTarget(verifier_url)) as target, \
                contextlib.aclosing(LlamaCppDraft(llama_url)) as drafter:
            ctx = await context_of(target)
            first = await drafter.draft(DraftRequest(ctx, 4, SAMPLED, "s-a"))
            again = await drafter.draft(DraftRequest(ctx, 4, SAMPLED, "s-b"))
            assert first == again and len(first) == 4  # the seed repeats exactly
            for d in first:
                assert d.token in d.dist and 0 < len(d.dist) <= SAMPLED.top_k
                assert math.isclose(sum(d.dist.values()), 1.0, abs_tol=1e-4)
                assert all(p > 0 for p in d.dist.values())
            unbounded = Sampling(temperature=1.5, top_k=0, top_p=1.0, seed=5)
            wide = await drafter.draft(DraftRequest(ctx, 2, unbounded, "s-c"))
            assert all(len(d.dist) <= 20 for d in wide) and max(len(d.dist) for d in wide) > 1
            # the verifier scores every support token and draws its tail outside them
            positions = await target.verify(ctx, first, n_prompt=len(ctx), sampling=SAMPLED,
                                            session="s-a")
            for d, p in zip(first, positions, strict=False):
                assert set(d.dist) <= set(p.probs) and sum(p.probs.values()) <= 1 + 1e-6
                assert p.tail_sample is None or p.tail_sample not in d.dist
            assert positions[-1].tail_sample is not None
            result = accept_sampled(first, positions, random.Random(0))
            assert 1 <= len(result.tokens) <= 5

    run(go)


def test_ollama_draft_against_the_standin_returns_target_ids(verifier_url, ollama_url):
    async def go() -> None:
        async with contextlib.aclosing(VerifierTarget(verifier_url)) as target, \
                contextlib.aclosing(OllamaDraft(ollama_url)) as drafter:
            assert await drafter.health()
            assert await drafter.model() == "smollm2:135m"  # from /api/tags
            assert await drafter.tokenize("x") is None and await drafter.vocab_size() is None
            await _text_drafter_checks(target, drafter)

    run(go)


def test_openai_draft_against_llama_server_returns_target_ids(verifier_url, llama_url):
    async def go() -> None:
        async with contextlib.aclosing(VerifierTarget(verifier_url)) as target, \
                contextlib.aclosing(OpenAIDraft(llama_url)) as drafter:
            assert await drafter.health()
            await _text_drafter_checks(target, drafter)

    run(go)


async def _text_drafter_checks(target: VerifierTarget, drafter: Any) -> None:
    ctx = await context_of(target)

    async def context_text() -> str:
        return await target.detokenize(ctx)

    async def retokenize(text: str) -> list[int]:
        return await target.tokenize(text, add_special=False)

    request = DraftRequest(ctx, K, SAMPLED, "text", context_text=context_text, retokenize=retokenize)
    draft = await drafter.draft(request)
    assert 0 < len(draft) <= K
    assert all(d.dist == {d.token: 1.0} for d in draft)  # deterministic even for sampled requests
    expected = await alone(target, ctx, K)
    assert [d.token for d in draft] == expected[: len(draft)]
    with pytest.raises(ValueError, match="context_text"):
        await drafter.draft(DraftRequest(ctx, K, GREEDY, "text"))


# -- target backends ------------------------------------------------------------------


def test_openai_echo_target_agrees_with_the_native_verify(verifier_url):
    async def go() -> None:
        async with contextlib.aclosing(VerifierTarget(verifier_url)) as native, \
                contextlib.aclosing(OpenAIEchoTarget(verifier_url)) as echo:
            assert await echo.health()
            info, native_info = await echo.info(), await native.info()
            assert info.verify_mode == "one-pass" and info.sampled_verify_mode == "generate"
            assert info.eog_token_ids == native_info.eog_token_ids
            text = "def add(a, b): return a + b"
            ids = await echo.tokenize(text, add_special=False)
            assert ids == await native.tokenize(text, add_special=False)
            assert await echo.detokenize(ids) == text
            ctx = await context_of(native)
            greedy = await alone(native, ctx, K)
            wrong = (greedy[2] + 1) % native_info.n_vocab
            draft = [DraftToken(t, {t: 1.0}) for t in [*greedy[:2], wrong, *greedy[3:]]]
            mine = await echo.verify(ctx, draft, n_prompt=len(ctx), sampling=GREEDY, session="e")
            theirs = await native.verify(ctx, draft, n_prompt=len(ctx), sampling=GREEDY, session="e")
            assert [p.token for p in mine] == [p.token for p in theirs]
            assert accept_greedy([d.token for d in draft], mine).tokens == greedy[:3]
            generated = await echo.generate(ctx, n_prompt=len(ctx), max_tokens=3, sampling=GREEDY,
                                            session="e", top_logprobs=2)
            assert [g.token for g in generated] == greedy[:3]
            assert all(len(g.top_logprobs) == 2 for g in generated)
            # sampled requests: the target generates; acceptance emits exactly its tokens
            sampled = await echo.verify(ctx, draft, n_prompt=len(ctx), sampling=SAMPLED, session="e")
            own = [p.token for p in sampled]
            result = accept_sampled(draft, sampled, random.Random(1))
            assert result.tokens == own[: len(result.tokens)]

    run(go)


def test_llamacpp_target_verifies_by_generating(verifier_url, llama_url):
    async def go() -> None:
        async with contextlib.aclosing(VerifierTarget(verifier_url)) as native, \
                contextlib.aclosing(LlamaCppTarget(llama_url)) as target:
            info, native_info = await target.info(), await native.info()
            assert info.verify_mode == "generate"
            assert info.n_vocab == native_info.n_vocab
            assert info.eog_token_ids == native_info.eog_token_ids
            assert info.n_ctx > 0
            ctx = await context_of(native)
            assert await target.tokenize(PROMPT, add_special=True) == ctx
            expected = await alone(native, ctx, K + 1)
            draft = [DraftToken(t, {t: 1.0}) for t in expected[:K]]
            positions = await target.verify(ctx, draft, n_prompt=len(ctx), sampling=GREEDY,
                                            session="lt", top_logprobs=1)
            assert [p.token for p in positions] == expected
            assert all(p.logprob is not None and p.logprob <= 0 for p in positions)
            generated = await target.generate(ctx, n_prompt=len(ctx), max_tokens=3, sampling=GREEDY,
                                              session="lt")
            assert [g.token for g in generated] == expected[:3]
            a = await target.verify(ctx, draft, n_prompt=len(ctx), sampling=SAMPLED, session="lt")
            b = await target.verify(ctx, draft, n_prompt=len(ctx), sampling=SAMPLED, session="lt")
            assert [p.token for p in a] == [p.token for p in b]  # seeded
            result = accept_sampled(draft, a, random.Random(2))
            assert result.tokens == [p.token for p in a][: len(result.tokens)]
            chat = await target.render_chat([{"role": "user", "content": "hi there"}])
            assert "hi there" in chat

    run(go)


def test_positions_from_generation_make_acceptance_emit_the_generated_tokens():
    draft = [DraftToken(1, {1: 0.5, 2: 0.5}), DraftToken(3, {3: 0.7, 4: 0.3}), DraftToken(5, {5: 1.0})]
    for generated in ([1, 4, 9, 9], [1, 3, 5, 8], [7, 7, 7, 7], [2, 0, 0, 0], [1, 3, 6]):
        positions = positions_from_generation(generated, draft, SAMPLED)
        assert len(positions) == 4
        for seed in range(20):
            result = accept_sampled(draft, positions, random.Random(seed))
            assert result.tokens == generated[: len(result.tokens)]
        assert accept_greedy([d.token for d in draft], positions_from_generation(
            generated, draft, GREEDY)).tokens == result.tokens


# -- factory --------------------------------------------------------------------------


def test_factory_builds_each_kind():
    def spec(backend: str) -> Any:
        return types.SimpleNamespace(name="d1", url="http://127.0.0.1:1/", backend=backend,
                                     model_name=None, timeout_s=5.0, api_key="k")

    kinds = {"llamacpp": LlamaCppDraft, "ollama": OllamaDraft, "openai": OpenAIDraft}
    for name, cls in kinds.items():
        drafter = make_drafter(spec(name))
        assert isinstance(drafter, cls) and drafter.name == "d1" and drafter.url == "http://127.0.0.1:1"
        run(drafter.aclose)
    targets = {"verifier": VerifierTarget, "openai-echo": OpenAIEchoTarget, "llamacpp": LlamaCppTarget}
    for name, tcls in targets.items():
        target = make_target(spec(name))
        assert isinstance(target, tcls) and target.kind == name
        run(target.aclose)
    with pytest.raises(ConfigError):
        make_drafter(spec("vllm"))
    with pytest.raises(ConfigError):
        make_target(spec("ollama"))


# -- error mapping --------------------------------------------------------------------


class _Misbehaving(QuietHandler):
    """The first path segment picks the misbehaviour."""

    def _answer(self) -> None:
        scenario = self.path.strip("/").split("/")[0]
        if self.command == "POST":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, body = 200, b""
        if scenario == "hang":
            time.sleep(3)
            body = b"{}"
        elif scenario == "not-json":
            body = b"<html>surprise</html>"
        elif scenario == "wrong-shape":
            body = json.dumps({"positions": "nope", "model": 3, "tokens": ["a"]}).encode()
        elif scenario == "status-500":
            status, body = 500, b'{"error": "kaboom in the server"}'
        elif scenario == "status-503":
            status, body = 503, b'{"error": "Loading model"}'
        elif scenario == "bad-draft":
            if self.path.endswith("/props"):
                body = json.dumps({"total_slots": 2}).encode()
            else:  # the drawn token is missing from its distribution
                body = json.dumps({"tokens": [5], "completion_probabilities": [
                    {"id": 5, "prob": 0.1, "top_probs": [{"id": 6, "prob": 0.6}, {"id": 7, "prob": 0.4}]}
                ]}).encode()
        self.answer_json(body, status)

    do_GET = do_POST = _answer


@pytest.fixture(scope="module")
def misbehaving() -> Iterator[str]:
    with handler_server(_Misbehaving) as url:
        yield url


def _verify(url: str, timeout_s: float = 5.0) -> Callable[[], Awaitable[object]]:
    async def go() -> object:
        async with contextlib.aclosing(VerifierTarget(url, timeout_s=timeout_s)) as target:
            return await target.verify([1, 2], [], n_prompt=2, sampling=GREEDY, session="x")

    return go


def test_a_dead_port_is_unavailable():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BackendUnavailable, match=url):
        run(_verify(url))

    async def health() -> bool:
        async with contextlib.aclosing(LlamaCppDraft(url)) as drafter:
            return await drafter.health()

    assert run(health) is False


def test_garbage_answers_are_protocol_errors(misbehaving):
    with pytest.raises(BackendProtocolError, match="invalid JSON"):
        run(_verify(misbehaving + "/not-json"))
    with pytest.raises(BackendProtocolError, match="positions"):
        run(_verify(misbehaving + "/wrong-shape"))
    with pytest.raises(BackendProtocolError, match=r"/status-500/v1/tightwad/verify answered HTTP 500: .*kaboom"):
        run(_verify(misbehaving + "/status-500"))
    with pytest.raises(BackendUnavailable, match="HTTP 503"):
        run(_verify(misbehaving + "/status-503"))

    async def info() -> object:
        async with contextlib.aclosing(VerifierTarget(misbehaving + "/wrong-shape")) as target:
            return await target.info()

    with pytest.raises(BackendProtocolError, match="n_vocab"):
        run(info)

    async def bad_draft() -> object:
        async with contextlib.aclosing(LlamaCppDraft(misbehaving + "/bad-draft")) as drafter:
            return await drafter.draft(DraftRequest([1, 2], 1, SAMPLED, "x"))

    with pytest.raises(BackendProtocolError, match="draft returned garbage"):
        run(bad_draft)


def test_a_hanging_server_times_out(misbehaving):
    started = time.monotonic()
    with pytest.raises(BackendTimeout, match="0.3s"):
        run(_verify(misbehaving + "/hang", timeout_s=0.3))
    assert time.monotonic() - started < 2.5
