"""Draft backend: an Ollama server, spoken to in text.

Ollama takes no token ids, so each round sends the context as the *target's*
text (``request.context_text()``) to ``POST /api/generate`` with ``raw: true``
(no template: the text is already rendered), ``stream: false`` and
``options: {num_predict: k, temperature: 0, seed}``. The ``response`` text is
turned back into target ids with ``request.retokenize`` and cut to k.

Every proposal is greedy and deterministic, so each token's distribution is the
point mass ``{token: 1.0}``; that keeps rejection sampling exact for sampled
requests too (a deterministic proposal is a valid draft distribution).

The model is ``model_name`` from the config, or else the first of ``/api/tags``.
Health is ``GET /api/version``.
"""

from __future__ import annotations

import asyncio

from tightwad.backends._http import HttpClient, expect_dict, expect_field, garbage
from tightwad.backends.base import DraftRequest
from tightwad.speculation.types import DraftToken


async def text_draft_tokens(request: DraftRequest, text: str) -> list[DraftToken]:
    """A text continuation as point-mass drafts in the target's ids, at most k."""
    assert request.retokenize is not None
    if not text:
        return []
    ids = await request.retokenize(text)
    return [DraftToken(t, {t: 1.0}) for t in ids[: request.k]]


def require_text_hooks(request: DraftRequest, kind: str) -> None:
    if request.context_text is None or request.retokenize is None:
        raise ValueError(
            f"the {kind} drafter speaks text: DraftRequest needs context_text and retokenize"
        )


class OllamaDraft:
    kind = "ollama"

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
        return f"OllamaDraft(name={self.name!r}, url={self.url!r}, model={self._model!r})"

    async def health(self) -> bool:
        return await self.http.ok("/api/version")

    async def tokenize(self, text: str) -> list[int] | None:
        return None  # Ollama exposes no tokenizer; its drafts are retokenized by the target

    async def vocab_size(self) -> int | None:
        return None

    async def model(self) -> str:
        async with self._lock:
            if self._model is None:
                where = self.url + "/api/tags"
                tags = expect_dict(await self.http.get("/api/tags"), where)
                models = expect_field(tags, "models", list, where)
                if not models:
                    raise garbage(where, "Ollama has no model pulled; set model_name", tags)
                first = expect_dict(models[0], where)
                self._model = expect_field(first, "name", str, where)
            return self._model

    async def draft(self, request: DraftRequest) -> list[DraftToken]:
        require_text_hooks(request, self.kind)
        assert request.context_text is not None
        if request.k < 1:
            return []
        body = {
            "model": await self.model(),
            "prompt": await request.context_text(),
            "raw": True,
            "stream": False,
            "options": {"num_predict": request.k, "temperature": 0.0, "seed": request.sampling.seed},
        }
        where = self.url + "/api/generate"
        reply = expect_dict(await self.http.post("/api/generate", body), where)
        text = expect_field(reply, "response", str, where)
        return await text_draft_tokens(request, text)

    async def aclose(self) -> None:
        await self.http.aclose()
