"""Target backend: Tightwad's own verifier (``tightwad.verifier.app``), in token ids.

    verify    POST /v1/tightwad/verify    one forward pass over context + draft
              (verify_many: ``drafts``, several greedy candidates in one call)
    generate  POST /v1/tightwad/generate  the target alone
    release   POST /v1/tightwad/release
    info      GET  /v1/tightwad/info and /v1/tightwad/vocab, fetched once and cached
    text      POST /tokenize, /detokenize, /apply-template (llama-server's shapes)

Greedy requests send no ``sampling`` object; sampled ones send the request's
parameters plus ``support``: the sorted keys of each draft token's ``dist``, for
which the verifier returns target probabilities and a tail sample.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from typing import Any

from tightwad.backends._http import (
    expect_dict,
    expect_field,
    expect_number,
    expect_token_ids,
    garbage,
)
from tightwad.backends._llama_text import LlamaServerText
from tightwad.backends._target_http import HttpTarget
from tightwad.backends.base import GeneratedToken, Sampling, TargetInfo
from tightwad.speculation.types import DraftToken, TargetPosition


class VerifierTarget(HttpTarget, LlamaServerText):
    kind = "verifier"

    async def _fetch_info(self) -> TargetInfo:
        where = self.url + "/v1/tightwad/info"
        raw = expect_dict(await self.http.get("/v1/tightwad/info"), where)
        n_vocab = expect_field(raw, "n_vocab", int, where)
        pieces = await self._fetch_vocab(n_vocab, raw.get("vocab_sha256"))
        mode = raw.get("mode")
        return TargetInfo(
            model=expect_field(raw, "model", str, where),
            n_vocab=n_vocab,
            n_ctx=expect_field(raw, "n_ctx", int, where),
            eog_token_ids=frozenset(expect_token_ids(raw.get("eog_token_ids"), where, "eog ids")),
            verify_mode="one-pass",
            mode=mode if isinstance(mode, str) else None,
            pieces=pieces,
        )

    async def _fetch_vocab(self, n_vocab: int, sha256: Any) -> list[bytes]:
        where = self.url + "/v1/tightwad/vocab"
        raw = expect_dict(await self.http.get("/v1/tightwad/vocab"), where)
        lengths = expect_token_ids(raw.get("lengths"), where, "piece lengths")
        try:
            blob = base64.b64decode(expect_field(raw, "pieces_b64", str, where), validate=True)
        except binascii.Error as exc:
            raise garbage(where, f"pieces_b64 is not base64 ({exc})", raw.get("pieces_b64")) from exc
        if len(lengths) != n_vocab or sum(lengths) != len(blob):
            raise garbage(where, f"{len(lengths)} lengths summing to {sum(lengths)} for "
                          f"n_vocab {n_vocab} and {len(blob)} bytes", raw.get("n_vocab"))
        pieces, at, digest = [], 0, hashlib.sha256()
        for n in lengths:
            piece = blob[at : at + n]
            pieces.append(piece)
            digest.update(n.to_bytes(2, "little") + piece)
            at += n
        expected = raw.get("sha256") or sha256
        if expected and digest.hexdigest() != expected:
            raise garbage(where, "vocabulary does not match its sha256", expected)
        return pieces

    async def verify(
        self, context: Sequence[int], draft: Sequence[DraftToken], *, n_prompt: int,
        sampling: Sampling, session: str, top_logprobs: int = 0,
    ) -> list[TargetPosition]:
        body: dict[str, Any] = {
            "tokens": list(context),
            "draft": [d.token for d in draft],
            "n_prompt": n_prompt,
            "session": session,
            "top_logprobs": top_logprobs,
        }
        if not sampling.greedy:
            body["sampling"] = {**sampling.to_json(), "support": [sorted(d.dist) for d in draft]}
        where = self.url + "/v1/tightwad/verify"
        reply = expect_dict(await self.http.post("/v1/tightwad/verify", body), where)
        positions = expect_field(reply, "positions", list, where)
        if len(positions) != len(draft) + 1:
            raise garbage(where, f"expected {len(draft) + 1} positions", len(positions))
        return [_position(p, where, sampled=not sampling.greedy) for p in positions]

    async def verify_many(
        self, context: Sequence[int], drafts: Sequence[Sequence[DraftToken]], *, n_prompt: int,
        session: str, top_logprobs: int = 0,
    ) -> list[list[TargetPosition]]:
        """Greedy candidates of one context in one call: ``len(d) + 1`` positions each."""
        body: dict[str, Any] = {
            "tokens": list(context),
            "drafts": [[d.token for d in draft] for draft in drafts],
            "n_prompt": n_prompt,
            "session": session,
            "top_logprobs": top_logprobs,
        }
        where = self.url + "/v1/tightwad/verify"
        reply = expect_dict(await self.http.post("/v1/tightwad/verify", body), where)
        candidates = expect_field(reply, "candidates", list, where)
        if len(candidates) != len(drafts):
            raise garbage(where, f"expected {len(drafts)} candidates", len(candidates))
        out = []
        for draft, raw in zip(drafts, candidates, strict=True):
            positions = expect_field(expect_dict(raw, where), "positions", list, where)
            if len(positions) != len(draft) + 1:
                raise garbage(where, f"expected {len(draft) + 1} positions", len(positions))
            out.append([_position(p, where, sampled=False) for p in positions])
        return out

    async def generate(
        self, context: Sequence[int], *, n_prompt: int, max_tokens: int, sampling: Sampling,
        session: str, top_logprobs: int = 0,
    ) -> list[GeneratedToken]:
        body: dict[str, Any] = {
            "tokens": list(context),
            "max_tokens": max_tokens,
            "n_prompt": n_prompt,
            "session": session,
            "top_logprobs": top_logprobs,
            "stop_at_eog": True,
        }
        if not sampling.greedy:
            body["sampling"] = sampling.to_json()
        where = self.url + "/v1/tightwad/generate"
        reply = expect_dict(await self.http.post("/v1/tightwad/generate", body), where)
        positions = expect_field(reply, "positions", list, where)
        if not 0 < len(positions) <= max_tokens:
            raise garbage(where, f"expected 1..{max_tokens} positions", len(positions))
        out = []
        for p in positions:
            p = expect_dict(p, where)
            out.append(GeneratedToken(
                token=expect_field(p, "token", int, where),
                logprob=_optional_number(p.get("logprob"), where),
                top_logprobs=_pairs(p.get("top_logprobs"), where),
            ))
        return out

    async def release(self, session: str) -> None:
        await self.http.post("/v1/tightwad/release", {"session": session})


def _position(raw: Any, where: str, *, sampled: bool) -> TargetPosition:
    raw = expect_dict(raw, where)
    token = expect_field(raw, "token", int, where)
    logprob = _optional_number(raw.get("logprob"), where)
    draft_logprob = _optional_number(raw.get("draft_logprob"), where)
    top = _pairs(raw.get("top_logprobs"), where)
    if not sampled:
        return TargetPosition(token, logprob, draft_logprob=draft_logprob, top_logprobs=top)
    if "probs" not in raw:
        raise garbage(where, "a sampled verify position has no 'probs'", raw)
    probs = dict(_pairs(raw.get("probs"), where))
    tail = raw.get("tail_sample")
    if tail is not None and (not isinstance(tail, int) or isinstance(tail, bool) or tail in probs):
        raise garbage(where, "tail_sample must be a token outside the support", raw)
    return TargetPosition(token=token, logprob=logprob, probs=probs, tail_sample=tail,
                          tail_logprob=_optional_number(raw.get("tail_logprob"), where),
                          draft_logprob=draft_logprob, top_logprobs=top)


def _pairs(raw: Any, where: str) -> tuple[tuple[int, float], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise garbage(where, "expected [[id, value], ...]", raw)
    out = []
    for pair in raw:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int)):
            raise garbage(where, "expected [id, value] pairs", pair)
        out.append((pair[0], expect_number(pair[1], where, "a probability")))
    return tuple(out)


def _optional_number(raw: Any, where: str) -> float | None:
    if raw is None or type(raw) is float:  # the usual cases, without the general checks
        return raw
    return expect_number(raw, where, "a logprob")
