"""Target backend: a vLLM-style OpenAI server that scores prompts (``echo`` + ``logprobs``).

Greedy verify is one request, one forward pass: ``POST /v1/completions`` with
``prompt`` = context + draft ids, ``echo: true``, ``logprobs`` >= 1,
``max_tokens: 1``, ``temperature: 0`` and vLLM's ``return_tokens_as_token_ids``.
The echoed ``top_logprobs[len(context) + i]`` is the target's distribution at
draft position i (its argmax is the target's choice); the one generated token is
the bonus. Tightwad's verifier answers the same request the same way.

Sampled (temperature > 0) requests cannot be verified from top logprobs (the
target's probability of every draft-support token and a tail draw are needed),
so ``verify()`` then has the target generate ``len(draft) + 1`` tokens with the
request's parameters and reports them as point masses: exact, no speedup
(``TargetInfo.sampled_verify_mode = "generate"``); ``generate()`` is the same call.

Text: ``/tokenize`` and ``/detokenize`` in vLLM's shapes (``prompt`` in / out),
falling back to llama-server's (``content``), which the verifier speaks; chat via
the verifier's ``/apply-template``. Model facts come from ``/v1/tightwad/info``
when the server is a verifier, else from ``/v1/models`` (``max_model_len``) with
eog ids found by tokenizing llama.cpp's eog texts (``base.EOG_TEXTS``); n_vocab
is 0 (unknown) there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tightwad.backends._http import (
    HttpStatusError,
    expect_dict,
    expect_field,
    expect_number,
    expect_token_ids,
    garbage,
    round_seed,
)
from tightwad.backends._target_http import HttpTarget
from tightwad.backends.base import (
    EOG_TEXTS,
    GeneratedToken,
    Sampling,
    TargetInfo,
    positions_from_generation,
)
from tightwad.backends.openai_draft import first_model_id
from tightwad.backends.verifier import VerifierTarget
from tightwad.speculation.types import DraftToken, TargetPosition

_TOKEN_ID = "token_id:"


class OpenAIEchoTarget(HttpTarget):
    kind = "openai-echo"
    health_path = "/v1/models"

    def __init__(
        self, url: str, *, model_name: str | None = None, timeout_s: float = 120.0,
        api_key: str | None = None,
    ):
        super().__init__(url, timeout_s=timeout_s, api_key=api_key)
        self._api_key = api_key
        self._model = model_name
        self._llama_shapes: bool | None = None  # None until /tokenize has answered once

    def __repr__(self) -> str:
        return f"OpenAIEchoTarget(url={self.url!r}, model={self._model!r})"

    async def model(self) -> str:
        if self._model is None:
            self._model = await first_model_id(self.http)
        return self._model

    async def _fetch_info(self) -> TargetInfo:
        try:
            native = VerifierTarget(self.url, timeout_s=self.http.timeout_s, api_key=self._api_key)
            try:
                info = await native.info()
            finally:
                await native.aclose()
            return TargetInfo(
                model=self._model or info.model, n_vocab=info.n_vocab, n_ctx=info.n_ctx,
                eog_token_ids=info.eog_token_ids, verify_mode="one-pass", mode=info.mode,
                pieces=info.pieces, sampled_verify_mode="generate",
            )
        except HttpStatusError as exc:
            if exc.status not in (404, 405):
                raise
        where = self.url + "/v1/models"
        listing = expect_dict(await self.http.get("/v1/models"), where)
        data = expect_field(listing, "data", list, where)
        entry = expect_dict(data[0] if data else None, where, "no model listed")
        meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
        n_ctx = entry.get("max_model_len") or meta.get("n_ctx")
        if not isinstance(n_ctx, int):
            raise garbage(where, "no max_model_len (or meta.n_ctx)", entry)
        eog = set()
        for text in EOG_TEXTS:
            ids = await self.tokenize(text, add_special=False)
            if len(ids) == 1:
                eog.add(ids[0])
        n_vocab = meta.get("n_vocab")
        return TargetInfo(
            model=self._model or expect_field(entry, "id", str, where),
            n_vocab=n_vocab if isinstance(n_vocab, int) else 0,
            n_ctx=n_ctx, eog_token_ids=frozenset(eog), verify_mode="one-pass",
            sampled_verify_mode="generate",
        )

    async def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        where = self.url + "/tokenize"
        if self._llama_shapes is not True:
            try:
                reply = await self.http.post(
                    "/tokenize", {"prompt": text, "add_special_tokens": add_special}
                )
            except HttpStatusError as exc:
                if self._llama_shapes is False or not 400 <= exc.status < 500:
                    raise
                self._llama_shapes = True  # the verifier refuses a body without 'content'
            else:
                ids = expect_token_ids(expect_dict(reply, where).get("tokens"), where)
                if ids or self._llama_shapes is False:
                    self._llama_shapes = False
                    return ids
                if not text:
                    return ids
                self._llama_shapes = True  # llama-server ignores 'prompt' and answers []
        body = {"content": text, "add_special": add_special, "parse_special": True}
        reply = await self.http.post("/tokenize", body)
        return expect_token_ids(expect_dict(reply, where).get("tokens"), where)

    async def detokenize(self, tokens: Sequence[int]) -> str:
        where = self.url + "/detokenize"
        reply = expect_dict(await self.http.post("/detokenize", {"tokens": list(tokens)}), where)
        text = reply.get("prompt", reply.get("content"))
        if not isinstance(text, str):
            raise garbage(where, "expected 'prompt' (vLLM) or 'content' (llama-server)", reply)
        return text

    async def render_chat(self, messages: list[dict[str, Any]]) -> str:
        where = self.url + "/apply-template"
        try:
            reply = expect_dict(await self.http.post("/apply-template", {"messages": messages}), where)
        except HttpStatusError as exc:
            if exc.status != 404:
                raise
            raise garbage(where, "this server cannot render chat templates (no /apply-template); "
                          "send /v1/completions requests", exc.status) from exc
        return expect_field(reply, "prompt", str, where)

    async def verify(
        self, context: Sequence[int], draft: Sequence[DraftToken], *, n_prompt: int,
        sampling: Sampling, session: str, top_logprobs: int = 0,
    ) -> list[TargetPosition]:
        if not sampling.greedy:
            generated = await self.generate(
                context, n_prompt=n_prompt, max_tokens=len(draft) + 1, sampling=sampling,
                session=session,
            )
            return positions_from_generation([g.token for g in generated], draft, sampling)
        prompt = [*context, *(d.token for d in draft)]
        logprobs = await self._completion(
            {"prompt": prompt, "echo": True, "max_tokens": 1, "temperature": 0.0,
             "logprobs": max(1, top_logprobs)}
        )
        where = self.url + "/v1/completions"
        tokens, token_lps, tops = logprobs
        if len(tokens) != len(prompt) + 1 or tokens[: len(prompt)] != prompt:
            raise garbage(where, f"echo should return the {len(prompt)} prompt ids and 1 more",
                          tokens[:8])
        out = []
        for i in range(len(draft)):
            top = tops[len(context) + i]
            if not top:
                raise garbage(where, f"no top_logprobs for prompt position {len(context) + i}", top)
            best = min(top, key=lambda t: (-top[t], t))
            out.append(TargetPosition(token=best, logprob=top[best]))
        out.append(TargetPosition(token=tokens[-1], logprob=token_lps[-1]))
        return out

    async def generate(
        self, context: Sequence[int], *, n_prompt: int, max_tokens: int, sampling: Sampling,
        session: str, top_logprobs: int = 0,
    ) -> list[GeneratedToken]:
        body: dict[str, Any] = {
            "prompt": list(context), "max_tokens": max_tokens, "logprobs": max(1, top_logprobs),
            "temperature": 0.0 if sampling.greedy else sampling.temperature,
        }
        if not sampling.greedy:
            body.update(top_p=sampling.top_p, seed=round_seed(sampling.seed, len(context)))
            if sampling.top_k > 0:
                body["top_k"] = sampling.top_k
        tokens, token_lps, tops = await self._completion(body)
        if not 0 < len(tokens) <= max_tokens:
            raise garbage(self.url + "/v1/completions", f"expected 1..{max_tokens} tokens", tokens)
        return [
            GeneratedToken(t, lp, tuple(sorted(top.items(), key=lambda kv: (-kv[1], kv[0]))[:top_logprobs]))
            for t, lp, top in zip(tokens, token_lps, tops, strict=True)
        ]

    async def _completion(
        self, body: dict[str, Any]
    ) -> tuple[list[int], list[float | None], list[dict[int, float]]]:
        """One ``/v1/completions`` call; its legacy logprobs as ids, logprobs and top maps."""
        where = self.url + "/v1/completions"
        body = {**body, "model": await self.model(), "stream": False, "n": 1,
                "return_tokens_as_token_ids": True}
        reply = expect_dict(await self.http.post("/v1/completions", body), where)
        choices = expect_field(reply, "choices", list, where)
        choice = expect_dict(choices[0] if choices else None, where, "no choices")
        lp = expect_dict(choice.get("logprobs"), where, "no legacy 'logprobs' object")
        tokens = [_token_id(s, where) for s in expect_field(lp, "tokens", list, where)]
        token_lps = expect_field(lp, "token_logprobs", list, where)
        raw_tops = expect_field(lp, "top_logprobs", list, where)
        if not len(tokens) == len(token_lps) == len(raw_tops):
            raise garbage(where, "tokens, token_logprobs and top_logprobs differ in length",
                          [len(tokens), len(token_lps), len(raw_tops)])
        tops = [
            {} if top is None else {
                _token_id(k, where): expect_number(v, where, "a top logprob")
                for k, v in expect_dict(top, where).items()
            }
            for top in raw_tops
        ]
        return tokens, token_lps, tops

    async def release(self, session: str) -> None:
        return None  # the server caches prefixes itself; there is no session to free


def _token_id(s: Any, where: str) -> int:
    if isinstance(s, str) and s.startswith(_TOKEN_ID) and s[len(_TOKEN_ID):].isdigit():
        return int(s[len(_TOKEN_ID):])
    raise garbage(where, "expected 'token_id:N' (is return_tokens_as_token_ids supported?)", s)
