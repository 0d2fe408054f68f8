"""What the text drafters (Ollama, OpenAI-compatible) share.

They take no token ids: each round sends the target's text of the context
(``request.context_text()``), and the continuation's text is turned back into
target ids with ``request.retokenize`` and cut to k. Every proposal is greedy and
deterministic, so each token's distribution is the point mass ``{token: 1.0}``,
which keeps rejection sampling exact for sampled requests too (a deterministic
proposal is a valid draft distribution).

A subclass names its ``kind`` and ``health_path`` and says how to find its
default model (``_find_model``) and how to ask for a continuation (``_complete``).
"""

from __future__ import annotations

import asyncio

from tightwad.backends._http import HttpClient
from tightwad.backends.base import DraftRequest
from tightwad.speculation.types import DraftToken


class TextDrafter:
    kind: str
    health_path: str

    def __init__(
        self, url: str, *, name: str = "draft", model_name: str | None = None,
        timeout_s: float = 30.0, api_key: str | None = None,
    ):
        self.name = name
        self.http = HttpClient(url, timeout_s=timeout_s, api_key=api_key)
        self.url = self.http.url
        self._model = model_name
        self._lock = asyncio.Lock()  # concurrent first requests share one model lookup

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, url={self.url!r}, model={self._model!r})"

    async def health(self) -> bool:
        return await self.http.ok(self.health_path)

    async def tokenize(self, text: str) -> list[int] | None:
        return None  # no token ids here: the target retokenizes the drafts

    async def vocab_size(self) -> int | None:
        return None

    async def model(self) -> str:
        async with self._lock:
            if self._model is None:
                self._model = await self._find_model()
            return self._model

    async def draft(self, request: DraftRequest) -> list[DraftToken]:
        if request.context_text is None or request.retokenize is None:
            raise ValueError(
                f"the {self.kind} drafter speaks text: DraftRequest needs context_text and retokenize"
            )
        if request.k < 1:
            return []
        text = await self._complete(request, await self.model(), await request.context_text())
        if not text:
            return []
        ids = await request.retokenize(text)
        return [DraftToken(t, {t: 1.0}) for t in ids[: request.k]]

    async def _find_model(self) -> str:
        raise NotImplementedError

    async def _complete(self, request: DraftRequest, model: str, prompt: str) -> str:
        """The server's greedy continuation of ``prompt``, at most ``request.k`` tokens."""
        raise NotImplementedError

    async def aclose(self) -> None:
        await self.http.aclose()
