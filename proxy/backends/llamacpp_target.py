"""Target backend: a stock llama-server.

llama-server returns no prompt logprobs (``echo`` is ignored), so it cannot
score a drafted span in one pass. ``verify()`` therefore asks it to *generate*
``len(draft) + 1`` tokens itself (``/completion``, token-id prompt,
``cache_prompt``, a session-stable ``id_slot``) and reports what it generated
(``base.positions_from_generation``): exact for greedy and sampled requests,
but no faster than the target alone, hence ``verify_mode = "generate"``.

Sampling uses the verifier's order (temperature, top_k, top_p) through an
explicit ``samplers`` chain, with a per-position seed derived from the request's.

Model facts: ``n_ctx`` from ``/props`` ``default_generation_settings.n_ctx``,
``n_vocab`` from ``/v1/models`` ``meta``, and the eog ids by tokenizing
``/props`` ``eos_token`` and each of llama.cpp's own eog token texts
(``base.EOG_TEXTS``): a text that comes back as one token with exactly that
piece is that model's token, which llama.cpp marks end-of-generation. No
``pieces``: the proxy detokenizes through ``/detokenize``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tightwad.backends._http import (
    expect_dict,
    expect_field,
    expect_number,
    expect_token_ids,
    garbage,
    stable_slot,
)
from tightwad.backends._llama_text import LlamaServerText
from tightwad.backends._target_http import HttpTarget
from tightwad.backends.base import (
    EOG_TEXTS,
    GeneratedToken,
    Sampling,
    TargetInfo,
    positions_from_generation,
)
from tightwad.backends.llamacpp_draft import LlamaCppProps, completion_body
from tightwad.errors import BackendProtocolError
from tightwad.speculation.types import DraftToken, TargetPosition


class LlamaCppTarget(HttpTarget, LlamaServerText):
    kind = "llamacpp"

    def __init__(
        self, url: str, *, model_name: str | None = None, timeout_s: float = 120.0,
        api_key: str | None = None,
    ):
        super().__init__(url, timeout_s=timeout_s, api_key=api_key)
        self.props = LlamaCppProps(self.http)
        self._model_name = model_name

    async def _fetch_info(self) -> TargetInfo:
        props = await self.props.props()
        meta = await self.props.meta()
        where = self.url + "/props"
        settings = expect_dict(props.get("default_generation_settings"), where)
        eog: set[int] = set()
        eos = props.get("eos_token")
        texts = [eos] if isinstance(eos, str) and eos else []
        for text in [*texts, *EOG_TEXTS]:
            token = await self._single_token(text)
            if token is not None:
                eog.add(token)
        alias = props.get("model_alias")
        return TargetInfo(
            model=self._model_name or (alias if isinstance(alias, str) and alias else "llama-server"),
            n_vocab=expect_field(meta, "n_vocab", int, self.url + "/v1/models"),
            n_ctx=expect_field(settings, "n_ctx", int, where),
            eog_token_ids=frozenset(eog),
            verify_mode="generate",
        )

    async def _single_token(self, text: str) -> int | None:
        where = self.url + "/tokenize"
        body = {"content": text, "add_special": False, "parse_special": True, "with_pieces": True}
        tokens = expect_field(expect_dict(await self.http.post("/tokenize", body), where), "tokens", list, where)
        if len(tokens) != 1 or not isinstance(tokens[0], dict):
            return None
        token, piece = tokens[0].get("id"), tokens[0].get("piece")
        return token if isinstance(token, int) and piece == text else None

    async def verify(
        self, context: Sequence[int], draft: Sequence[DraftToken], *, n_prompt: int,
        sampling: Sampling, session: str, top_logprobs: int = 0,
    ) -> list[TargetPosition]:
        generated = await self._complete(context, len(draft) + 1, sampling, session, top_logprobs)
        positions = positions_from_generation([g.token for g in generated], draft, sampling)
        return [
            dataclasses.replace(p, logprob=generated[i].logprob) if i < len(generated) else p
            for i, p in enumerate(positions)
        ]

    async def generate(
        self, context: Sequence[int], *, n_prompt: int, max_tokens: int, sampling: Sampling,
        session: str, top_logprobs: int = 0,
    ) -> list[GeneratedToken]:
        return await self._complete(context, max_tokens, sampling, session, top_logprobs)

    async def _complete(
        self, context: Sequence[int], n: int, sampling: Sampling, session: str, top_logprobs: int
    ) -> list[GeneratedToken]:
        slot = stable_slot(session, await self.props.total_slots())
        body = completion_body(list(context), n, sampling, id_slot=slot, n_probs=top_logprobs)
        where = self.url + "/completion"
        reply = expect_dict(await self.http.post("/completion", body), where)
        ids = expect_token_ids(reply.get("tokens"), where, "generated token ids")
        if not 0 < len(ids) <= n:
            stop = reply.get("stop_type")
            raise BackendProtocolError(
                f"{where}: asked for {n} tokens, got {len(ids)} (stop_type {stop!r}; "
                "a full context ends generation here)"
            )
        probs = reply.get("completion_probabilities") if top_logprobs > 0 else None
        if probs is None:
            return [GeneratedToken(t) for t in ids]
        if not isinstance(probs, list) or len(probs) != len(ids):
            raise garbage(where, f"expected {len(ids)} completion_probabilities", probs)
        return [_generated(t, entry, where) for t, entry in zip(ids, probs, strict=True)]

    async def release(self, session: str) -> None:
        return None  # slots are bound by id_slot per request; nothing to release


def _generated(token: int, entry: Any, where: str) -> GeneratedToken:
    """``{id, logprob, top_logprobs: [{id, logprob}]}`` (pre-sampling logprobs)."""
    entry = expect_dict(entry, where)
    if entry.get("id") != token:
        raise garbage(where, f"logprobs are for {entry.get('id')}, not token {token}", entry)
    top = entry.get("top_logprobs")
    if not isinstance(top, list):
        raise garbage(where, "expected top_logprobs", top)
    pairs = []
    for item in top:
        item = expect_dict(item, where)
        t = item.get("id")
        if not isinstance(t, int):
            raise garbage(where, "top_logprobs[].id should be a token id", item)
        pairs.append((t, expect_number(item.get("logprob"), where, "top_logprobs[].logprob")))
    return GeneratedToken(token, expect_number(entry.get("logprob"), where, "logprob"), tuple(pairs))
