"""Draft backend: an Ollama server, spoken to in text (see ``_text_draft``).

Each round posts the context's text to ``POST /api/generate`` with ``raw: true``
(no template: the text is already rendered), ``stream: false`` and
``options: {num_predict: k, temperature: 0, seed}``; the ``response`` text is the
continuation.

The model is ``model_name`` from the config, or else the first of ``/api/tags``.
Health is ``GET /api/version``.
"""

from __future__ import annotations

from tightwad.backends._http import expect_dict, expect_field, garbage
from tightwad.backends._text_draft import TextDrafter
from tightwad.backends.base import DraftRequest


class OllamaDraft(TextDrafter):
    kind = "ollama"
    health_path = "/api/version"

    async def _find_model(self) -> str:
        where = self.url + "/api/tags"
        tags = expect_dict(await self.http.get("/api/tags"), where)
        models = expect_field(tags, "models", list, where)
        if not models:
            raise garbage(where, "Ollama has no model pulled; set model_name", tags)
        return expect_field(expect_dict(models[0], where), "name", str, where)

    async def _complete(self, request: DraftRequest, model: str, prompt: str) -> str:
        body = {
            "model": model,
            "prompt": prompt,
            "raw": True,
            "stream": False,
            "options": {"num_predict": request.k, "temperature": 0.0, "seed": request.sampling.seed},
        }
        where = self.url + "/api/generate"
        reply = expect_dict(await self.http.post("/api/generate", body), where)
        return expect_field(reply, "response", str, where)
