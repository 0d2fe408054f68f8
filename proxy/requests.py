"""Parsing OpenAI completion and chat requests, refusing what we cannot honour exactly.

Every field that would change the output in ways the target alone would not
(penalties, logit bias, best_of, n > 1, echo) is refused with a 400 that names
it, rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from tightwad.backends.base import Sampling
from tightwad.errors import InvalidRequest
from tightwad.validation import RequestBody
from tightwad.verifier.chat import validate_messages

TOP_LOGPROBS_MAX = 20


@dataclasses.dataclass
class ParsedRequest:
    chat: bool
    model: str | None
    max_tokens: int | None  # None: until the end of generation or the context
    sampling: Sampling
    stops: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None  # top alternatives per token; None: no logprobs at all
    return_tokens: bool  # llama-server's extension: the output token ids too
    prompt: str | list[int] | None = None  # completions
    messages: list[dict[str, Any]] | None = None  # chat


def _refuse_unsupported(body: RequestBody) -> None:
    n = body.int("n", 1)
    if n != 1:
        raise InvalidRequest(f"'n' must be 1 (got {n}): Tightwad returns one choice per request", param="n")
    if body.int("best_of", 1) != 1:
        raise InvalidRequest("'best_of' is not supported", param="best_of")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.float(key, 0.0) != 0.0:
            raise InvalidRequest(f"'{key}' is not supported: it would change the target's output", param=key)
    if body.raw("logit_bias"):
        raise InvalidRequest("'logit_bias' is not supported: it would change the target's output",
                             param="logit_bias")
    if body.raw("tools"):
        raise InvalidRequest("'tools' is not supported", param="tools")


def _common(body: RequestBody, *, chat: bool, max_tokens_limit: int) -> dict[str, Any]:
    _refuse_unsupported(body)
    model = body.str("model", None)
    key = "max_tokens"
    if chat and body.raw("max_completion_tokens") is not None:
        key = "max_completion_tokens"
    max_tokens = body.int(key, None)
    if max_tokens is not None and not 1 <= max_tokens <= max_tokens_limit:
        raise InvalidRequest(
            f"'{key}' must be between 1 and {max_tokens_limit}, got {max_tokens}", param=key
        )
    if max_tokens is None and not chat:
        max_tokens = min(16, max_tokens_limit)  # the OpenAI default for completions
    temperature = body.float("temperature", 1.0, min=0.0, max=2.0)
    top_p = body.float("top_p", 1.0, min=0.0, max=1.0)
    if top_p == 0.0:
        raise InvalidRequest("'top_p' must be greater than 0", param="top_p")
    seed = body.int("seed", None)
    sampling = Sampling(
        temperature=temperature, top_p=top_p, top_k=body.int("top_k", 0, min=0),
        seed=seed if seed is not None else secrets.randbits(63),
    )
    stop = body.raw("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = list(stop)
    else:
        raise InvalidRequest("'stop' must be a string or a list of at most 4 strings", param="stop")
    if any(s == "" for s in stops):
        raise InvalidRequest("'stop' strings must not be empty", param="stop")
    stream = body.bool("stream", False)
    options = body.object("stream_options")
    include_usage = bool(options and options.bool("include_usage", False))
    if options is not None and not stream:
        raise InvalidRequest("'stream_options' is only allowed with stream: true", param="stream_options")
    return {
        "chat": chat, "model": model, "max_tokens": max_tokens, "sampling": sampling,
        "stops": stops, "stream": stream, "include_usage": include_usage,
        "return_tokens": body.bool("return_tokens", False),
    }


def parse_completion(body: RequestBody, *, max_tokens_limit: int) -> ParsedRequest:
    common = _common(body, chat=False, max_tokens_limit=max_tokens_limit)
    if body.bool("echo", False):
        raise InvalidRequest("'echo' is not supported by the proxy", param="echo")
    if body.raw("suffix"):
        raise InvalidRequest("'suffix' is not supported", param="suffix")
    prompt = body.raw("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise InvalidRequest("'prompt' must be a string or a non-empty list of token ids", param="prompt")
    elif not isinstance(prompt, str) or not prompt:
        raise InvalidRequest("'prompt' must be a non-empty string or a list of token ids", param="prompt")
    logprobs = body.int("logprobs", None, min=0, max=TOP_LOGPROBS_MAX)
    return ParsedRequest(**common, logprobs=logprobs, prompt=prompt)


def parse_chat(body: RequestBody, *, max_tokens_limit: int) -> ParsedRequest:
    common = _common(body, chat=True, max_tokens_limit=max_tokens_limit)
    messages = body.raw("messages")
    validate_messages(messages)
    logprobs = None
    if body.bool("logprobs", False):
        logprobs = body.int("top_logprobs", 0, min=0, max=TOP_LOGPROBS_MAX)
    elif body.raw("top_logprobs") is not None:
        raise InvalidRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return ParsedRequest(**common, logprobs=logprobs, messages=messages)
