"""llama-server's text endpoints, shared by every target that speaks its shapes.

Both the verifier and stock llama-server answer ``/tokenize``, ``/detokenize``
and ``/apply-template`` the same way, so their target backends inherit these
calls rather than each writing them out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tightwad.backends._http import HttpClient, expect_dict, expect_field, expect_token_ids


class LlamaServerText:
    http: HttpClient
    url: str

    async def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        where = self.url + "/tokenize"
        body = {"content": text, "add_special": add_special, "parse_special": True}
        return expect_token_ids(expect_dict(await self.http.post("/tokenize", body), where).get("tokens"), where)

    async def detokenize(self, tokens: Sequence[int]) -> str:
        where = self.url + "/detokenize"
        reply = expect_dict(await self.http.post("/detokenize", {"tokens": list(tokens)}), where)
        return expect_field(reply, "content", str, where)

    async def render_chat(self, messages: list[dict[str, Any]]) -> str:
        where = self.url + "/apply-template"
        reply = expect_dict(await self.http.post("/apply-template", {"messages": messages}), where)
        return expect_field(reply, "prompt", str, where)
