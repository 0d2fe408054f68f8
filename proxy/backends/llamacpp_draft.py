"""Draft backend: a stock llama-server, spoken to in token ids.

One ``POST /completion`` per round: ``prompt`` is the context's token ids,
``n_predict`` = k, ``cache_prompt`` keeps the shared prefix in the server's KV
cache, and ``id_slot`` pins every round of a session to the same slot (crc32 of
the session modulo ``/props`` ``total_slots``) so that cache is found again.

An explicit ``samplers`` chain makes the server's command-line sampling defaults
(repeat penalty, min_p, ...) irrelevant:

- greedy: ``top_k`` 1; each token is proposed with ``{token: 1.0}``.
- sampling: temperature, then top_k (at most ``MAX_SUPPORT``), then top_p, the
  order the verifier uses, with ``n_probs`` = top_k and ``post_sampling_probs``:
  the server then reports the exact distribution each token was drawn from
  (after top_k there are at most ``n_probs`` candidates, so nothing is cut off).
  That distribution becomes ``DraftToken.dist``; a token missing from it, or a
  distribution that does not sum to 1, is a protocol error.

Early cut (``DraftRequest.min_confidence`` > 0), as llama.cpp's own drafting does
it (``common_speculative_gen_draft``: stop before the first token whose top
probability is below ``p_min``): the same request with ``stream`` on, read event by
event; at the first token whose confidence is below the threshold the response is
closed, which makes llama-server cancel the task and free the slot. Confidence is
the largest probability the server reports for the position: for greedy requests
``n_probs`` 1 without ``post_sampling_probs`` (the model's softmax before top_k),
for sampled ones the post-sampling distribution above. The tokens and dists kept
are exactly a prefix of what the unstreamed request returns. Each event carries one
token, and ``tokens_predicted`` counts all of them; llama-server never streams a
token that leaves the text inside a UTF-8 character (its id and probabilities are
lost), so a jump in that count also ends the draft, as does a token without
probabilities (a final end-of-generation token may lack them).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any

from tightwad.backends._http import (
    HttpClient,
    expect_dict,
    expect_field,
    expect_number,
    expect_token_ids,
    garbage,
    round_seed,
    stable_slot,
)
from tightwad.backends.base import DraftRequest, Sampling
from tightwad.errors import BackendError, BackendProtocolError
from tightwad.speculation.types import DraftToken

MAX_SUPPORT = 20  # largest draft support per position (llama-server's n_probs is per request)
SUM_TOLERANCE = 1e-4
SAMPLERS = ["temperature", "top_k", "top_p"]


def completion_body(
    tokens: list[int], n_predict: int, sampling: Sampling, *, id_slot: int, n_probs: int = 0,
    post_sampling_probs: bool = False, top_k: int | None = None,
) -> dict[str, Any]:
    """A ``/completion`` request that samples exactly as asked, whatever the server defaults."""
    body: dict[str, Any] = {
        "prompt": tokens,
        "n_predict": n_predict,
        "cache_prompt": True,
        "return_tokens": True,
        "id_slot": id_slot,
        "stream": False,
        "samplers": SAMPLERS,
        "min_p": 0.0,
        "typical_p": 1.0,
        "repeat_penalty": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "dry_multiplier": 0.0,
        "xtc_probability": 0.0,
        "top_n_sigma": -1.0,
        "mirostat": 0,
        "n_probs": n_probs,
        "post_sampling_probs": post_sampling_probs,
        # Drafts end where the target says; never stop early on a text match.
        "stop": [],
    }
    if sampling.greedy:
        body.update(temperature=0.0, top_k=1, top_p=1.0)
    else:
        body.update(
            temperature=sampling.temperature,
            top_k=sampling.top_k if top_k is None else top_k,
            top_p=sampling.top_p,
            seed=round_seed(sampling.seed, len(tokens)),
        )
    return body


class LlamaCppProps:
    """``/props`` and ``/v1/models`` of one llama-server, fetched once."""

    def __init__(self, http: HttpClient):
        self._http = http
        self._props: dict[str, Any] | None = None
        self._meta: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    async def props(self) -> dict[str, Any]:
        async with self._lock:
            if self._props is None:
                self._props = expect_dict(await self._http.get("/props"), self._http.url + "/props")
            return self._props

    async def meta(self) -> dict[str, Any]:
        async with self._lock:
            if self._meta is None:
                where = self._http.url + "/v1/models"
                body = expect_dict(await self._http.get("/v1/models"), where)
                data = expect_field(body, "data", list, where)
                if not data:
                    raise garbage(where, "no model listed", body)
                self._meta = expect_dict(expect_dict(data[0], where).get("meta"), where, "no 'meta'")
            return self._meta

    async def total_slots(self) -> int | None:
        try:
            slots = (await self.props()).get("total_slots")
        except BackendError:
            return None
        return slots if isinstance(slots, int) and slots > 0 else None


class LlamaCppDraft:
    kind = "llamacpp"

    def __init__(
        self, url: str, *, name: str = "draft", timeout_s: float = 30.0, api_key: str | None = None
    ):
        self.name = name
        self.http = HttpClient(url, timeout_s=timeout_s, api_key=api_key)
        self.url = self.http.url
        self.props = LlamaCppProps(self.http)

    def __repr__(self) -> str:
        return f"LlamaCppDraft(name={self.name!r}, url={self.url!r})"

    async def health(self) -> bool:
        return await self.http.ok("/health")

    async def tokenize(self, text: str) -> list[int] | None:
        body = await self.http.post(
            "/tokenize", {"content": text, "add_special": False, "parse_special": True}
        )
        where = self.url + "/tokenize"
        return expect_token_ids(expect_dict(body, where).get("tokens"), where)

    async def vocab_size(self) -> int | None:
        n = (await self.props.meta()).get("n_vocab")
        return n if isinstance(n, int) and n > 0 else None

    async def draft(self, request: DraftRequest) -> list[DraftToken]:
        if request.k < 1:
            return []
        tokens = list(request.context)
        sampling = request.sampling
        slot = stable_slot(request.session, await self.props.total_slots())
        top_k = 0
        cut = request.min_confidence > 0
        if sampling.greedy:
            body = completion_body(tokens, request.k, sampling, id_slot=slot, n_probs=int(cut))
        else:
            top_k = min(sampling.top_k or MAX_SUPPORT, MAX_SUPPORT)
            body = completion_body(
                tokens, request.k, sampling, id_slot=slot, n_probs=top_k,
                post_sampling_probs=True, top_k=top_k,
            )
        where = self.url + "/completion"
        if cut:
            body["stream"] = True
            return await self._draft_streamed(body, request, top_k, where)
        reply = expect_dict(await self.http.post("/completion", body), where)
        ids = expect_token_ids(reply.get("tokens"), where, "generated token ids")
        if len(ids) > request.k:
            raise garbage(where, f"asked for {request.k} tokens, got {len(ids)}", ids)
        if sampling.greedy:
            return [DraftToken(t, {t: 1.0}) for t in ids]
        probs = reply.get("completion_probabilities")
        if not isinstance(probs, list) or len(probs) > len(ids):
            raise garbage(where, f"expected at most {len(ids)} completion_probabilities", probs)
        # llama-server leaves out the probabilities of a final end-of-generation
        # token; a shorter draft is still a valid draft, so keep what is covered.
        drafted = []
        for t, entry in zip(ids, probs, strict=False):
            if isinstance(entry, dict) and entry.get("id") != t:
                # llama-server also leaves out a token that ends inside a UTF-8 character
                # (its probabilities are lost): the draft ends before it.
                break
            drafted.append(_sampled_token(t, entry, top_k, where))
        return drafted

    async def _draft_streamed(
        self, body: dict[str, Any], request: DraftRequest, top_k: int, where: str
    ) -> list[DraftToken]:
        """The draft read token by token, up to the first token below ``min_confidence``."""
        out: list[DraftToken] = []
        seen = 0  # tokens the server has streamed
        async with contextlib.aclosing(self.http.stream_events("/completion", body)) as events:
            async for event in events:
                event = expect_dict(event, where)
                if "error" in event:
                    raise garbage(where, "draft stream reported an error", event["error"])
                ids = expect_token_ids(event.get("tokens"), where, "generated token ids")
                if event.get("stop") is True:
                    return out  # the final event: the draft ended (n_predict or eog)
                if not ids:
                    continue
                counted = event.get("tokens_predicted")
                if len(ids) != 1 or not isinstance(counted, int) or counted <= seen:
                    raise garbage(where, "expected one token per event, counted by "
                                  "'tokens_predicted'", event)
                seen += 1
                if seen > request.k:
                    raise garbage(where, f"asked for {request.k} tokens, got more", event)
                if counted > seen:
                    return out  # tokens inside a UTF-8 character were never streamed
                token = _confident_token(ids[0], event.get("completion_probabilities"),
                                         top_k, request.min_confidence, where)
                if token is None:
                    return out
                out.append(token)  # at k, read on to the final event: the connection is reused
        raise garbage(where, "draft stream ended before its final event", [t.token for t in out])

    async def aclose(self) -> None:
        await self.http.aclose()


def _confident_token(
    token: int, probs: Any, top_k: int, min_confidence: float, where: str
) -> DraftToken | None:
    """One streamed token as a DraftToken, or None where the draft stops before it:
    its confidence is below ``min_confidence``, or the server sent no probabilities."""
    if probs is None or probs == []:
        return None  # a final end-of-generation token may come without them
    if not isinstance(probs, list) or len(probs) != 1:
        raise garbage(where, "expected one completion_probabilities entry per event", probs)
    if top_k:  # sampled: the post-sampling distribution, checked as unstreamed
        drafted = _sampled_token(token, probs[0], top_k, where)
        return drafted if max(drafted.dist.values()) >= min_confidence else None
    entry = expect_dict(probs[0], where)
    if entry.get("id") != token:
        raise garbage(where, f"draft returned garbage: probabilities are for {entry.get('id')}, "
                      f"not the generated token {token}", entry)
    top = entry.get("top_logprobs")
    if not isinstance(top, list) or not top:
        raise garbage(where, "draft returned garbage: expected top_logprobs", top)
    logprob = max(expect_number(expect_dict(t, where).get("logprob"), where,
                                "top_logprobs[].logprob") for t in top)
    if logprob > SUM_TOLERANCE:
        raise garbage(where, "draft returned garbage: a logprob above 0", top)
    return DraftToken(token, {token: 1.0}) if math.exp(logprob) >= min_confidence else None


def _sampled_token(token: int, entry: Any, top_k: int, where: str) -> DraftToken:
    """One post-sampling entry ``{id, prob, top_probs: [{id, prob}]}`` as an exact dist."""
    entry = expect_dict(entry, where)
    if entry.get("id") != token:
        raise garbage(where, f"draft returned garbage: probabilities are for {entry.get('id')}, "
                      f"not the generated token {token}", entry)
    top = entry.get("top_probs")
    if not isinstance(top, list) or not 0 < len(top) <= top_k:
        raise garbage(where, f"draft returned garbage: expected 1..{top_k} top_probs", top)
    dist: dict[int, float] = {}
    for item in top:
        item = expect_dict(item, where)
        t = item.get("id")
        p = expect_number(item.get("prob"), where, "top_probs[].prob")
        if not isinstance(t, int) or t in dist or not 0.0 < p <= 1.0 + SUM_TOLERANCE:
            raise garbage(where, "draft returned garbage: bad top_probs entry", item)
        dist[t] = p
    total = math.fsum(dist.values())
    if token not in dist or abs(total - 1.0) > SUM_TOLERANCE:
        raise BackendProtocolError(
            f"{where}: draft returned garbage: token {token} drawn from a distribution over "
            f"{sorted(dist)[:8]}... summing to {total:.6f} (want it inside, summing to 1)"
        )
    return DraftToken(token, dist)
