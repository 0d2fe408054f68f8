"""Draft backend: any OpenAI-compatible ``/v1/completions`` server, spoken to in text.

Each round sends the target's text of the context as ``prompt`` with
``max_tokens`` = k and ``temperature`` 0, and turns ``choices[0].text`` back into
target ids with ``request.retokenize`` (cut to k). Like the Ollama drafter, the
proposal is deterministic, so each token's distribution is ``{token: 1.0}``.

The model is ``model_name`` from the config, or else the first id of
``/v1/models``. Health is ``GET /v1/models`` (answered by vLLM, llama-server,
Ollama's OpenAI layer and the verifier alike).
"""

from __future__ import annotations

import asyncio

from tightwad.backends._http import HttpClient, expect_dict, expect_field, garbage
from tightwad.backends.base import DraftRequest
from tightwad.backends.ollama import require_text_hooks, text_draft_tokens
from tightwad.speculation.types import DraftToken


class OpenAIDraft:
    kind = "openai"

    def __init__(
        self, url: str, *, name: str = "draft", model_name: str | None = None,
        timeout_s: float = 30.0, api_key: str | None = None,
    ):
        self.name = name
        self.http = HttpClient(url, timeout_s=timeout_s, api_key=api_key)
        self.url = self.http.url
        self._model = model_name
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"OpenAIDraft(name={self.name!r}, url={self.url!r}, model={self._model!r})"

    async def health(self) -> bool:
        return await self.http.ok("/v1/models")

    async def tokenize(self, text: str) -> list[int] | None:
        return None  # no portable tokenizer endpoint; drafts are retokenized by the target

    async def vocab_size(self) -> int | None:
        return None

    async def model(self) -> str:
        async with self._lock:
            if self._model is None:
                self._model = await first_model_id(self.http)
            return self._model

    async def draft(self, request: DraftRequest) -> list[DraftToken]:
        require_text_hooks(request, self.kind)
        assert request.context_text is not None
        if request.k < 1:
            return []
        body = {
            "model": await self.model(),
            "prompt": await request.context_text(),
            "max_tokens": request.k,
            "temperature": 0.0,
            "seed": request.sampling.seed,
            "stream": False,
        }
        where = self.url + "/v1/completions"
        reply = expect_dict(await self.http.post("/v1/completions", body), where)
        choices = expect_field(reply, "choices", list, where)
        if not choices:
            raise garbage(where, "no choices", reply)
        text = expect_field(expect_dict(choices[0], where), "text", str, where)
        return await text_draft_tokens(request, text)

    async def aclose(self) -> None:
        await self.http.aclose()


async def first_model_id(http: HttpClient) -> str:
    where = http.url + "/v1/models"
    listing = expect_dict(await http.get("/v1/models"), where)
    data = expect_field(listing, "data", list, where)
    if not data:
        raise garbage(where, "no model listed; set model_name", listing)
    return expect_field(expect_dict(data[0], where), "id", str, where)
