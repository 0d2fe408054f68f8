"""Early cut of a llama-server draft (``DraftRequest.min_confidence``), against a real server.

With a threshold the draft is streamed and read until the first token whose
confidence (the largest probability the draft reports for the position) is below
it; that token is not kept, and closing the stream makes llama-server stop. The
cut draft must be a prefix of the unstreamed draft, token for token and dist for
dist; the confidences are checked against an independent unstreamed request that
asks for them. SmolLM2-135M on llama-server with ``--metrics``, whose
``n_decode_total`` counts the server's decode calls and shows it really stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import httpx
import pytest
from servers import QuietHandler, free_port, handler_server

from tightwad.backends._http import stable_slot
from tightwad.backends.base import DraftRequest, Sampling
from tightwad.backends.llamacpp_draft import LlamaCppDraft, completion_body
from tightwad.errors import BackendProtocolError, BackendTimeout, BackendUnavailable
from tightwad.speculation.types import DraftToken

T = TypeVar("T")
PROMPT = "Once upon a time, in a small village,"
K = 12
GREEDY = Sampling()
SAMPLED = Sampling(temperature=0.9, top_k=8, top_p=0.95, seed=1234)
NEAR = 1e-3  # thresholds this close to a confidence are not used (float noise)
TIMEOUT = 300.0  # seconds a real draft may take on a busy 2-core machine


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(fn())  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def draft_url(servers, smollm) -> str:
    return servers("llama-server", smollm, "--parallel", "2", "--metrics").url


async def confidences(url: str, ctx: list[int], k: int) -> tuple[list[int], list[float]]:
    """An independent unstreamed greedy request with ``n_probs`` 1: tokens and each top prob."""
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        body = completion_body(ctx, k, GREEDY, id_slot=-1, n_probs=1)
        reply = (await client.post(url + "/completion", json=body)).json()
    probs = reply["completion_probabilities"]
    assert len(probs) == len(reply["tokens"]) == k, "the prompt should draft k whole tokens"
    return reply["tokens"], [math.exp(max(t["logprob"] for t in p["top_logprobs"])) for p in probs]


def decode_calls(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=TIMEOUT).text.splitlines():
        if line.startswith("llamacpp:n_decode_total "):
            return float(line.split()[1])
    raise AssertionError("no llamacpp:n_decode_total in /metrics")


def cut_index(values: list[float], threshold: float) -> int:
    return next((i for i, v in enumerate(values) if v < threshold), len(values))


# -- against llama-server ---------------------------------------------------------------


def test_zero_keeps_the_unstreamed_request_unchanged(draft_url):
    async def go() -> None:
        async with contextlib.aclosing(LlamaCppDraft(draft_url, timeout_s=TIMEOUT)) as drafter:
            ctx = await drafter.tokenize(PROMPT)
            sent: list[dict[str, Any]] = []
            post = drafter.http.post

            async def spy(path: str, body: Any, **kw: Any) -> Any:
                sent.append(body)
                return await post(path, body, **kw)

            def no_stream(*a: Any, **kw: Any) -> Any:
                raise AssertionError("min_confidence 0 must not stream")

            drafter.http.post = spy  # type: ignore[method-assign]
            drafter.http.stream_events = no_stream  # type: ignore[method-assign]
            slot = stable_slot("z", await drafter.props.total_slots())
            greedy = await drafter.draft(DraftRequest(ctx, K, GREEDY, "z"))
            sampled = await drafter.draft(DraftRequest(ctx, K, SAMPLED, "z", min_confidence=0.0))
            assert sent == [
                completion_body(ctx, K, GREEDY, id_slot=slot),
                completion_body(ctx, K, SAMPLED, id_slot=slot, n_probs=8, post_sampling_probs=True,
                                top_k=8),
            ]
            assert sent[0]["stream"] is False and sent[0]["n_probs"] == 0
            tokens, _ = await confidences(draft_url, ctx, K)
            assert [d.token for d in greedy] == tokens
            assert all(d.dist == {d.token: 1.0} for d in greedy)
            assert len(sampled) == K

    run(go)


def test_greedy_cut_is_a_prefix_ending_before_the_first_unsure_token(draft_url):
    async def go() -> None:
        async with contextlib.aclosing(LlamaCppDraft(draft_url, timeout_s=TIMEOUT)) as drafter:
            ctx = await drafter.tokenize(PROMPT)
            full = await drafter.draft(DraftRequest(ctx, K, GREEDY, "g"))
            tokens, conf = await confidences(draft_url, ctx, K)
            assert [d.token for d in full] == tokens
            # any positive threshold streams; one below every confidence keeps the whole draft
            assert await drafter.draft(DraftRequest(ctx, K, GREEDY, "g", min_confidence=1e-9)) == full
            assert await drafter.draft(DraftRequest(ctx, K, GREEDY, "g", min_confidence=1.01)) == []
            inside = 0
            for threshold in (0.1, 0.3, 0.5, 0.6, 0.75):
                if any(abs(c - threshold) < NEAR for c in conf):
                    continue
                cut = await drafter.draft(DraftRequest(ctx, K, GREEDY, "g", min_confidence=threshold))
                n = cut_index(conf, threshold)
                assert cut == full[:n], (threshold, conf)
                assert all(c >= threshold for c in conf[:n])
                assert n == K or conf[n] < threshold
                inside += 0 < n < K
            assert inside, f"no threshold cut this draft in the middle: {conf}"

    run(go)


def test_sampled_cut_keeps_the_same_tokens_and_dists(draft_url):
    async def go() -> None:
        async with contextlib.aclosing(LlamaCppDraft(draft_url, timeout_s=TIMEOUT)) as drafter:
            ctx = await drafter.tokenize(PROMPT)
            inside = 0
            for seed in (1234, 99):
                sampling = Sampling(temperature=0.9, top_k=8, top_p=0.95, seed=seed)
                full = await drafter.draft(DraftRequest(ctx, K, sampling, "s"))
                assert len(full) == K
                conf = [max(d.dist.values()) for d in full]
                for threshold in (1e-9, 0.3, 0.5, 0.7, 1.01):
                    if any(abs(c - threshold) < NEAR for c in conf):
                        continue
                    cut = await drafter.draft(
                        DraftRequest(ctx, K, sampling, "s", min_confidence=threshold))
                    n = cut_index(conf, threshold)
                    assert cut == full[:n], (seed, threshold, conf)  # tokens and dists alike
                    inside += 0 < n < K
            assert inside, "no threshold cut a sampled draft in the middle"

    run(go)


def test_the_server_stops_generating_at_the_cut(draft_url):
    async def go() -> None:
        async with contextlib.aclosing(LlamaCppDraft(draft_url, timeout_s=TIMEOUT)) as drafter:
            ctx = await drafter.tokenize(PROMPT)
            await drafter.draft(DraftRequest(ctx, 1, GREEDY, "stop"))  # the prompt is cached
            started = time.perf_counter()
            full = await drafter.draft(DraftRequest(ctx, 64, GREEDY, "stop"))
            t_full = time.perf_counter() - started
            assert len(full) == 64
            before = decode_calls(draft_url)
            started = time.perf_counter()
            # the first token is below 1.01: nothing kept, the stream is closed after it
            assert await drafter.draft(DraftRequest(ctx, 64, GREEDY, "stop", min_confidence=1.01)) == []
            # the same session, so the same slot: this waits for it to be free
            assert len(await drafter.draft(DraftRequest(ctx, 1, GREEDY, "stop"))) == 1
            t_cut = time.perf_counter() - started
            decoded = decode_calls(draft_url) - before
            # two prompt decodes, the cut token, the one next token and the few the
            # server makes before it sees the closed connection: far from 64
            assert decoded <= 16, decoded
            assert t_cut < t_full / 2, (t_cut, t_full)
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                slots = (await client.get(draft_url + "/slots")).json()
            assert not any(s["is_processing"] for s in slots)

    run(go)


# -- against a server that misbehaves ----------------------------------------------------


def _event(token: int, n: int, probs: list[dict] | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"index": 0, "tokens": [token], "stop": False, "tokens_predicted": n}
    if probs is not None:
        event["completion_probabilities"] = probs
    return event


def _greedy_probs(token: int, p: float) -> list[dict]:
    return [{"id": token, "logprob": math.log(p), "top_logprobs": [{"id": token, "logprob": math.log(p)}]}]


FINAL = {"index": 0, "tokens": [], "stop": True, "tokens_predicted": 3}
STREAMS: dict[str, list[Any]] = {
    # a token inside a UTF-8 character (n=2) was never streamed: the draft ends before it
    "gap": [_event(5, 1, _greedy_probs(5, 0.9)), _event(7, 3, _greedy_probs(7, 0.9)), FINAL],
    # a final end-of-generation token without probabilities is left out
    "no-probs": [_event(5, 1, _greedy_probs(5, 0.9)), _event(2, 2), FINAL],
    "wrong-token": [_event(5, 1, _greedy_probs(6, 0.9)), FINAL],
    "two-tokens": [{**_event(5, 1, _greedy_probs(5, 0.9)), "tokens": [5, 6]}, FINAL],
    "positive-logprob": [_event(5, 1, [{"id": 5, "top_logprobs": [{"id": 5, "logprob": 0.5}]}]), FINAL],
    "error": [{"error": {"code": 500, "message": "kaboom mid-stream"}}],
    "truncated": [_event(5, 1, _greedy_probs(5, 0.9))],
    "not-json": ["{oops"],
}


class _Streaming(QuietHandler):
    """The first path segment picks the misbehaviour; answers close the connection."""

    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        self._send(200, "application/json", json.dumps({"total_slots": 2}).encode())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        scenario = self.path.strip("/").split("/")[0]
        if scenario == "json":  # ignores "stream": true
            self._send(200, "application/json", b'{"tokens": [5]}')
        elif scenario == "utf8-gap-unstreamed":  # token 9 ended inside a UTF-8 character
            entry = lambda t: {"id": t, "prob": 0.6, "top_probs": [{"id": t, "prob": 0.6}, {"id": 1, "prob": 0.4}]}  # noqa: E731
            body = {"tokens": [5, 9, 7], "completion_probabilities": [entry(5), entry(7)]}
            self._send(200, "application/json", json.dumps(body).encode())
        elif scenario == "status-503":
            self._send(503, "application/json", b'{"error": "Loading model"}')
        elif scenario == "hang":
            self._send(200, "text/event-stream", b": ping\n\n", then_sleep=3)
        else:
            events = STREAMS[scenario]
            body = "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)
            self._send(200, "text/event-stream", body.encode())

    def _send(self, status: int, kind: str, body: bytes, then_sleep: float = 0) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)
            self.wfile.flush()
            time.sleep(then_sleep)


@pytest.fixture(scope="module")
def streaming() -> Iterator[str]:
    with handler_server(_Streaming) as url:
        yield url


def _cut_draft(url: str, timeout_s: float = 5.0) -> Callable[[], Awaitable[list[DraftToken]]]:
    async def go() -> list[DraftToken]:
        async with contextlib.aclosing(LlamaCppDraft(url, timeout_s=timeout_s)) as drafter:
            return await drafter.draft(DraftRequest([1, 2], 4, GREEDY, "x", min_confidence=0.5))

    return go


def test_stream_quirks_end_the_draft_early(streaming):
    assert run(_cut_draft(streaming + "/gap")) == [DraftToken(5, {5: 1.0})]
    assert run(_cut_draft(streaming + "/no-probs")) == [DraftToken(5, {5: 1.0})]


def test_unstreamed_sampled_draft_ends_before_a_token_without_probabilities(streaming):
    async def go() -> list[DraftToken]:
        async with contextlib.aclosing(LlamaCppDraft(streaming + "/utf8-gap-unstreamed")) as drafter:
            return await drafter.draft(DraftRequest([1, 2], 4, Sampling(temperature=0.8, top_k=2), "x"))

    assert run(go) == [DraftToken(5, {5: 0.6, 1: 0.4})]


def test_garbage_streams_are_protocol_errors(streaming):
    cases = {
        "wrong-token": "probabilities are for 6",
        "two-tokens": "one token per event",
        "positive-logprob": "logprob above 0",
        "error": "kaboom mid-stream",
        "truncated": "ended before its final event",
        "not-json": "not JSON",
        "json": "not an event stream",
    }
    for scenario, message in cases.items():
        with pytest.raises(BackendProtocolError, match=message):
            run(_cut_draft(f"{streaming}/{scenario}"))
    with pytest.raises(BackendUnavailable, match="HTTP 503"):
        run(_cut_draft(streaming + "/status-503"))
    with pytest.raises(BackendUnavailable, match="unreachable"):
        run(_cut_draft(f"http://127.0.0.1:{free_port()}"))
    started = time.monotonic()
    with pytest.raises(BackendTimeout, match="0.3s"):
        run(_cut_draft(streaming + "/hang", timeout_s=0.3))
    assert time.monotonic() - started < 2.5
