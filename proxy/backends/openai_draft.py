"""Draft backend: any OpenAI-compatible ``/v1/completions`` server, spoken to in text
(see ``_text_draft``).

Each round sends the context's text as ``prompt`` with ``max_tokens`` = k and
``temperature`` 0; ``choices[0].text`` is the continuation.

The model is ``model_name`` from the config, or else the first id of
``/v1/models``. Health is ``GET /v1/models`` (answered by vLLM, llama-server,
Ollama's OpenAI layer and the verifier alike).
"""

from __future__ import annotations

from tightwad.backends._http import HttpClient, expect_dict, expect_field, garbage
from tightwad.backends._text_draft import TextDrafter
from tightwad.backends.base import DraftRequest


class OpenAIDraft(TextDrafter):
    kind = "openai"
    health_path = "/v1/models"

    async def _find_model(self) -> str:
        return await first_model_id(self.http)

    async def _complete(self, request: DraftRequest, model: str, prompt: str) -> str:
        body = {
            "model": model,
            "prompt": prompt,
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
        return expect_field(expect_dict(choices[0], where), "text", str, where)


async def first_model_id(http: HttpClient) -> str:
    where = http.url + "/v1/models"
    listing = expect_dict(await http.get("/v1/models"), where)
    data = expect_field(listing, "data", list, where)
    if not data:
        raise garbage(where, "no model listed; set model_name", listing)
    return expect_field(expect_dict(data[0], where), "id", str, where)
