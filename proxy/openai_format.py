"""OpenAI response bodies and stream chunks, built from generation events (pure).

Shapes follow the OpenAI API exactly, so the official client parses them:
completions stream ``text_completion`` chunks; chat streams
``chat.completion.chunk`` with the role first, content deltas, an empty delta
with ``finish_reason`` last, and (with ``stream_options.include_usage``) a
final chunk with empty ``choices`` and the usage, every other chunk then
carrying ``"usage": null``. Each body also carries a
``tightwad`` object with the request's own speculation figures.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from tightwad import jsonio
from tightwad.generation import GenerationStats, TokenLogprob

Piece = Callable[[int], bytes]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def speculation_figures(stats: GenerationStats) -> dict[str, Any]:
    spec = stats.spec
    return {
        "rounds": spec.rounds,
        "drafted": spec.num_draft_tokens,
        "accepted": spec.num_accepted_tokens,
        "acceptance_rate": spec.acceptance_rate,
        "fallbacks": list(stats.fallbacks),
        # llama-server's names for the same two numbers
        "draft_n": spec.num_draft_tokens,
        "draft_n_accepted": spec.num_accepted_tokens,
    }


def _text(piece: Piece, token: int) -> str:
    return piece(token).decode("utf-8", errors="replace")


def completion_logprobs(
    items: Sequence[TokenLogprob], piece: Piece, text_start: int
) -> dict[str, Any]:
    offsets, pos = [], text_start
    for item in items:
        offsets.append(pos)
        pos += len(_text(piece, item.token))
    return {
        "tokens": [_text(piece, i.token) for i in items],
        "token_logprobs": [i.logprob for i in items],
        "top_logprobs": [{_text(piece, t): lp for t, lp in i.top} for i in items],
        "text_offset": offsets,
    }


def chat_logprobs(items: Sequence[TokenLogprob], piece: Piece) -> dict[str, Any]:
    def entry(token: int, logprob: float | None) -> dict[str, Any]:
        raw = piece(token)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    return {
        "content": [
            {**entry(i.token, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]}
            for i in items
        ],
        "refusal": None,
    }


class Formatter:
    """Builds the bodies and chunks of one response (one id, one creation time)."""

    def __init__(self, *, chat: bool, model: str, piece: Piece, logprobs: bool, return_tokens: bool = False,
                 include_usage: bool = False):
        self.chat = chat
        self.return_tokens = return_tokens
        self.include_usage = include_usage
        self.model = model
        self.piece = piece
        self.logprobs = logprobs
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self._text_offset = 0

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, items: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if self.chat:
            return chat_logprobs(items, self.piece)
        out = completion_logprobs(items, self.piece, self._text_offset)
        return out

    # -- whole responses --------------------------------------------------------------

    def response(
        self, text: str, items: Sequence[TokenLogprob], finish: str | None, prompt_tokens: int,
        stats: GenerationStats,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(items), "finish_reason": finish}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
            body = self._envelope("chat.completion")
        else:
            choice["text"] = text
            body = self._envelope("text_completion")
        body["choices"] = [choice]
        body["usage"] = usage(prompt_tokens, stats.completion_tokens)
        body["tightwad"] = speculation_figures(stats)
        if self.return_tokens:
            body["tightwad"]["tokens"] = [i.token for i in items]
        return body

    # -- stream chunks ------------------------------------------------------------------

    def role_chunk(self) -> dict[str, Any] | None:
        if not self.chat:
            return None
        return self._chunk({"role": "assistant", "content": ""}, None, None)

    def delta_chunks(
        self, text: str, items: Sequence[TokenLogprob], finish: str | None
    ) -> list[dict[str, Any]]:
        """The chunks for one generation event. A chat stream ends, as OpenAI's does,
        with a chunk of its own: an empty delta carrying ``finish_reason``."""
        if self.chat and finish is not None and (text or items):
            return [self.delta_chunk(text, items, None), self.delta_chunk("", (), finish)]
        return [self.delta_chunk(text, items, finish)]

    def delta_chunk(self, text: str, items: Sequence[TokenLogprob], finish: str | None) -> dict[str, Any]:
        logprobs = self._logprobs(items)
        if not self.chat:
            body = self._envelope("text_completion")
            body["choices"] = [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]
            self._text_offset += len(text)
            if self.include_usage:
                body["usage"] = None
        else:
            body = self._chunk({"content": text} if text else {}, logprobs, finish)
        if self.return_tokens:
            body["tightwad"] = {"tokens": [i.token for i in items]}
        return body

    def _chunk(self, delta: dict[str, Any], logprobs: Any, finish: str | None) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk")
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
        if self.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, prompt_tokens: int, stats: GenerationStats) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = []
        body["usage"] = usage(prompt_tokens, stats.completion_tokens)
        body["tightwad"] = speculation_figures(stats)
        return body


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data.encode() if isinstance(data, str) else jsonio.dumps(data)
    return b"data: " + payload + b"\n\n"
