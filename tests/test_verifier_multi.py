"""Several candidate drafts scored in one verify call (``drafts``), against real servers.

Strict mode must give each candidate bitwise what a verify of it alone gives (and
so what the target generating alone gives), and leave the cache so that the next
round is still exact. Fast mode evaluates the candidates' prefix tree in one
batch and may differ from single verifies only at near-ties (the rule of
test_verifier_numerics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
import pytest
from servers import QuietHandler, handler_server

from tightwad.backends.base import Sampling
from tightwad.backends.verifier import VerifierTarget
from tightwad.errors import BackendProtocolError
from tightwad.speculation.types import DraftToken

NOISE_CEILING = 1.0  # logprob units, as in test_verifier_numerics.py


def post(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/tightwad/verify", json=body, timeout=300)


def verify(url: str, tokens: list[int], draft: list[int], **extra: Any) -> dict:
    r = post(url, {"tokens": tokens, "draft": draft, **extra})
    r.raise_for_status()
    return r.json()


def verify_many(url: str, tokens: list[int], drafts: list[list[int]], **extra: Any) -> dict:
    r = post(url, {"tokens": tokens, "drafts": drafts, **extra})
    r.raise_for_status()
    return r.json()


def chat_tokens(url: str, prompt: str) -> list[int]:
    text = httpx.post(f"{url}/apply-template",
                      json={"messages": [{"role": "user", "content": prompt}]}).json()["prompt"]
    return httpx.post(f"{url}/tokenize", json={"content": text, "add_special": True}).json()["tokens"]


def generate(url: str, tokens: list[int], n: int, top: int = 0) -> dict:
    r = httpx.post(f"{url}/v1/tightwad/generate", timeout=300, json={
        "tokens": tokens, "max_tokens": n, "top_logprobs": top, "stop_at_eog": False})
    r.raise_for_status()
    return r.json()


def assert_within_noise(got: list[dict], ref: list[dict]) -> float:
    """``got`` agrees with ``ref`` but for near-ties; returns the noise measured."""
    assert len(got) == len(ref)
    noise, flips = 0.0, []
    for a, b in zip(got, ref, strict=True):
        top_a, top_b = dict(map(tuple, a["top_logprobs"])), dict(map(tuple, b["top_logprobs"]))
        shared = top_a.keys() & top_b.keys()
        noise = max([noise] + [abs(top_a[t] - top_b[t]) for t in shared])
        if a["token"] != b["token"]:
            assert a["token"] in top_b, "a flip to a token outside the top logprobs"
            flips.append(top_b[b["token"]] - top_b[a["token"]])
    assert noise < NOISE_CEILING, f"candidate vs single verify logprobs differ by {noise}"
    for gap in flips:
        assert gap <= 2 * noise, f"a flip at a real gap: {gap:.3f} > 2 x noise {noise:.3f}"
    return noise


# -- strict mode: Qwen 1.5B, bitwise ----------------------------------------------------


@pytest.fixture(scope="module")
def qwen_strict(servers, qwen_target) -> str:
    # The same arguments as test_verifier_numerics.py: one server for both modules.
    return servers("verifier", qwen_target, "--strict", "--parallel", "2").url


@pytest.fixture(scope="module")
def strict_round(qwen_strict) -> tuple[list[int], dict, list[list[int]], dict]:
    """A prompt, the target's own 10 tokens, and one verify_many of 3 candidates:
    lengths 4 and 8 sharing 2 tokens (the 8 wrong at its 3rd), and 1 wrong at once."""
    tokens = chat_tokens(qwen_strict, "Write a Python function that checks whether a number is prime.")
    gen = generate(qwen_strict, tokens, 10, top=20)
    p = gen["tokens"]
    drafts = [p[:4], p[:2] + [p[2] + 1] + p[3:8], [p[0] + 1]]
    many = verify_many(qwen_strict, tokens, drafts, session="many", n_prompt=len(tokens),
                       top_logprobs=20)
    return tokens, gen, drafts, many


def test_strict_candidates_are_bitwise_single_verifies(qwen_strict, strict_round):
    tokens, gen, drafts, many = strict_round
    assert many["mode"] == "strict" and len(many["candidates"]) == 3
    for d, cand in zip(drafts, many["candidates"], strict=True):
        alone = verify(qwen_strict, tokens, d, session="single", n_prompt=len(tokens), top_logprobs=20)
        assert cand["positions"] == alone["positions"]  # JSON floats round-trip: bitwise
    # ... and so the target's own generation: the first candidate is all confirmed.
    first = many["candidates"][0]["positions"]
    assert [p["token"] for p in first] == gen["tokens"][:5]
    for pos, g in zip(first, gen["positions"][:5], strict=True):
        assert pos["logprob"] == g["logprob"] and pos["top_logprobs"] == g["top_logprobs"]
    # Shared work: the prompt once, then each node of the prefix tree once, one token per
    # decode (4 + 6 after the 2 shared + 1), never the shared 2 again.
    assert many["n_cached"] == 0
    assert many["n_evaluated"] == len(tokens) + 11
    assert many["n_decode_calls"] == 1 + 11


def test_strict_next_round_after_candidates_is_exact_and_cheap(qwen_strict, strict_round):
    tokens, gen, drafts, many = strict_round
    p = gen["tokens"]
    context = tokens + p[:5]  # the first candidate's 4 accepted + the target's own token
    warm = verify(qwen_strict, context, p[5:9], session="many", n_prompt=len(tokens), top_logprobs=20)
    # The walk ended on the winner: all but the context's last token is reused.
    assert warm["n_cached"] == len(context) - 1 and warm["n_evaluated"] == 5
    cold = verify(qwen_strict, context, p[5:9], session="cold", n_prompt=len(tokens), top_logprobs=20)
    assert warm["positions"] == cold["positions"]
    for pos, g in zip(warm["positions"], gen["positions"][5:10], strict=True):
        assert pos["token"] == g["token"] and pos["logprob"] == g["logprob"]


# -- fast mode: SmolLM2 ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(servers, smollm) -> str:
    # The same arguments as test_verifier_api.py and test_backends.py: one server.
    return servers("verifier", smollm, "--parallel", "2", "--ctx-size", "256").url


def smol_context(url: str, text: str) -> list[int]:
    return httpx.post(f"{url}/tokenize", json={"content": text}).json()["tokens"]


def test_fast_candidates_agree_with_single_verifies_within_noise(smol):
    tokens = smol_context(smol, "def is_prime(n):\n    if n < 2:\n        return False\n")
    p = generate(smol, tokens, 10)["tokens"]
    drafts = [p[:8], p[:3] + [p[3] + 1] + p[4:8], [p[0] + 1, 11, 12], p[:1], []]
    many = verify_many(smol, tokens, drafts, session="fast-noise", top_logprobs=10)
    assert many["mode"] == "fast" and len(many["candidates"]) == len(drafts)
    for d, cand in zip(drafts, many["candidates"], strict=True):
        assert len(cand["positions"]) == len(d) + 1
        alone = verify(smol, tokens, d, session="fast-single", top_logprobs=10)
        assert_within_noise(cand["positions"], alone["positions"])
        for i, pos in enumerate(cand["positions"]):
            assert ("draft_logprob" in pos) == (i < len(d))


def test_fast_candidates_share_one_decode_and_leave_the_winner_cached(smol):
    tokens = smol_context(smol, "Once upon a time, in a small village by the sea, there lived")
    p = generate(smol, tokens, 12)["tokens"]
    # The winner (all 8 confirmed) shares 3 tokens with a loser; the third loser sorts
    # first (a larger first token), so keeping the winner in the cache needs a swap.
    drafts = [p[:8], p[:3] + [p[3] + 1, 5, 6, 7, 8], [p[0] + 1] + p[1:8]]
    many = verify_many(smol, tokens, drafts, session="share")
    new_context = len(tokens) - many["n_cached"]
    assert new_context >= 1  # the context's last token is always evaluated again
    # One llama_decode: the context's new tokens once and the prefix tree's 8 + 5 + 8
    # nodes once (three single verifies: the context's last token 3 times, 24 drafted).
    assert many["n_decode_calls"] == 1
    assert many["n_evaluated"] == new_context + 8 + 5 + 8
    assert [q["token"] for q in many["candidates"][0]["positions"]] == p[:9]
    # The next round extends the winner: everything but the context's last token is reused.
    context = tokens + p[:9]
    warm = verify(smol, context, p[9:12], session="share", top_logprobs=10)
    assert warm["n_cached"] == len(context) - 1 and warm["n_evaluated"] == 4
    cold = verify(smol, context, p[9:12], session="share-cold", top_logprobs=10)
    assert_within_noise(warm["positions"], cold["positions"])


# -- HTTP validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tokens": [1, 2], "draft": [3], "drafts": [[3]]}, "drafts"),
        ({"tokens": [1, 2], "drafts": []}, "drafts"),
        ({"tokens": [1, 2], "drafts": [[3]] * 9}, "drafts"),
        ({"tokens": [1, 2], "drafts": [3, 4]}, "drafts"),
        ({"tokens": [1, 2], "drafts": [[3], ["x"]]}, "drafts"),
        ({"tokens": [1, 2], "drafts": [[3], [49152]]}, "drafts"),
        ({"tokens": [1, 2], "drafts": "[[3]]"}, "drafts"),
        ({"tokens": [1, 2], "drafts": [[3]], "sampling": {"temperature": 0.7}}, "sampling"),
        ({"tokens": [1] * 250, "drafts": [[1] * 3, [1] * 10]}, "tokens"),
        ({"tokens": [1, 2], "drafts": [[3]], "n_prompt": 3}, "n_prompt"),
        ({"drafts": [[3]]}, "tokens"),
    ],
)
def test_bad_candidates_are_a_400_naming_the_field(smol, body, param):
    r = post(smol, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["message"]


def test_greedy_sampling_object_and_eight_candidates_are_accepted(smol):
    drafts = [[3 + i] for i in range(8)]
    r = post(smol, {"tokens": [1, 2], "drafts": drafts, "sampling": {"temperature": 0}})
    assert r.status_code == 200, r.text
    assert [len(c["positions"]) for c in r.json()["candidates"]] == [2] * 8


# -- the proxy's client ---------------------------------------------------------------------


def greedy(tokens: list[int]) -> list[DraftToken]:
    return [DraftToken(t, {t: 1.0}) for t in tokens]


def test_verifier_target_verify_many_end_to_end(smol):
    async def go() -> None:
        async with contextlib.aclosing(VerifierTarget(smol)) as target:
            ctx = await target.tokenize("The capital of France is", add_special=True)
            p = [g.token for g in await target.generate(
                ctx, n_prompt=len(ctx), max_tokens=6, sampling=Sampling(), session="t-gen")]
            drafts = [greedy(p[:5]), greedy(p[:2] + [p[2] + 1]), greedy([])]
            got = await target.verify_many(ctx, drafts, n_prompt=len(ctx), session="t-many",
                                           top_logprobs=3)
            assert [len(c) for c in got] == [6, 4, 1]
            assert [q.token for q in got[0]] == p[:6]
            raw = verify_many(smol, ctx, [[d.token for d in c] for c in drafts],
                              session="t-raw", n_prompt=len(ctx), top_logprobs=3)
            for ours, theirs in zip(got, raw["candidates"], strict=True):
                as_json = [{"token": q.token, "top_logprobs": [list(x) for x in q.top_logprobs]}
                           for q in ours]
                assert_within_noise(as_json, theirs["positions"])
                assert all(q.draft_logprob is not None for q in ours[:-1])
                assert ours[-1].draft_logprob is None and len(ours[-1].top_logprobs) == 3

    asyncio.run(go())


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        ({"positions": []}, "candidates"),
        ({"candidates": [{"positions": [{"token": 1}, {"token": 2}]}]}, "expected 2 candidates"),
        ({"candidates": [{"positions": [{"token": 1}, {"token": 2}]}, {"positions": []}]},
         "expected 1 positions"),
        ({"candidates": [{"positions": [{"token": 1}, {"token": 2}]}, "nope"]}, "JSON object"),
        ({"candidates": [{"positions": [{"token": "a"}, {"token": 2}]}, {"positions": [{"token": 3}]}]},
         "'token' should be int"),
    ],
)
def test_verifier_target_verify_many_refuses_garbage(reply, match):
    seen: list[dict] = []

    class Answer(QuietHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.answer_json(json.dumps(reply).encode())

    async def go(url: str) -> None:
        async with contextlib.aclosing(VerifierTarget(url)) as target:
            await target.verify_many([1, 2], [greedy([5]), greedy([])], n_prompt=2, session="g")

    with handler_server(Answer) as url, pytest.raises(BackendProtocolError, match=match):
        asyncio.run(go(url))
    assert seen[0]["drafts"] == [[5], []] and "draft" not in seen[0] and "sampling" not in seen[0]
