"""OpenAI legacy ``/v1/completions`` on the verifier, with ``echo`` + ``logprobs``.

The response uses the layout vLLM returns (``tokens``, ``token_logprobs``,
``top_logprobs``, ``text_offset``), prompt positions included when ``echo`` is
set, so that the proxy's ``openai-echo`` target backend talks to this verifier
and to a vLLM server the same way. vLLM's ``return_tokens_as_token_ids``
extension is honoured: tokens then read ``token_id:<id>``.
"""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Any

from tightwad.errors import InvalidRequest, ModelNotFound
from tightwad.validation import RequestBody
from tightwad.verifier.engine import PositionScore
from tightwad.verifier.sampling import TOP_LOGPROBS_MAX, SamplingParams
from tightwad.verifier.service import VerifierService

GENERATE_CHUNK = 16  # tokens per engine call, so stop strings end generation early


async def handle(service: VerifierService, body: RequestBody) -> dict[str, Any]:
    model, engine = service.require_ready()
    requested = body.str("model", None)
    if requested not in (None, "", service.options.name, "tightwad"):
        raise ModelNotFound(f"model '{requested}' is not served here; this verifier serves "
                            f"'{service.options.name}'")
    if body.raw("stream"):
        raise InvalidRequest("the verifier does not stream; send streaming requests to the proxy",
                             param="stream")
    if body.int("n", 1) != 1:
        raise InvalidRequest("only n = 1 is supported", param="n")
    prompt = body.raw("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        tokens = await service.run(model.tokenize, prompt, add_special=True, parse_special=True)
    elif isinstance(prompt, list) and prompt and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        tokens = prompt
    else:
        raise InvalidRequest("'prompt' must be a string or a non-empty list of token ids",
                             param="prompt")
    bad = next((i for i, t in enumerate(tokens) if not 0 <= t < model.n_vocab), None)
    if bad is not None:
        raise InvalidRequest(f"prompt[{bad}] = {tokens[bad]} is not a token id of this model",
                             param="prompt")
    echo = body.bool("echo", False)
    max_tokens = body.int("max_tokens", 16, min=0)
    if max_tokens == 0 and not echo:
        raise InvalidRequest("max_tokens must be at least 1 unless echo is set", param="max_tokens")
    logprobs = body.int("logprobs", None, min=0, max=TOP_LOGPROBS_MAX)
    as_ids = body.bool("return_tokens_as_token_ids", False)
    temperature = body.float("temperature", 1.0, min=0.0, max=100.0)
    sampling = SamplingParams(
        temperature=temperature,
        top_p=body.float("top_p", 1.0, min=1e-9, max=1.0),
        top_k=body.int("top_k", 0, min=0),
        seed=body.int("seed", secrets.randbits(63)),
    )
    stops = _stops(body)
    top_k = logprobs or 0

    prompt_scores: list[PositionScore] = []
    if echo and logprobs is not None:
        prompt_scores, _ = await service.run(engine.score_all, tokens, top_k=top_k)

    generated: list[PositionScore] = []
    finish = "length"
    text = ""
    if max_tokens > 0:
        session = f"completion-{uuid.uuid4().hex}"
        try:
            context = list(tokens)
            while len(generated) < max_tokens:
                chunk, finish, _ = await service.run(
                    engine.generate, context, max_tokens=min(GENERATE_CHUNK, max_tokens - len(generated)),
                    n_prompt=len(tokens), session=session, top_k=top_k, sampling=sampling,
                )
                generated.extend(chunk)
                context.extend(s.token for s in chunk)
                text, hit = _apply_stops(service, [s.token for s in generated], model.eog_tokens, stops)
                if hit is not None:
                    generated, finish = generated[:hit], "stop"
                    break
                if finish == "stop":
                    break
                finish = "length"
        finally:
            await service.run(engine.release, session)

    def tok_str(t: int) -> str:
        return f"token_id:{t}" if as_ids else service.piece(t).decode("utf-8", "replace")

    out_tokens: list[int] = (list(tokens) if echo else []) + [s.token for s in generated]
    choice: dict[str, Any] = {
        "index": 0,
        "text": (await service.run(model.detokenize, tokens) if echo else "") + text,
        "logprobs": None,
        "finish_reason": finish,
    }
    if logprobs is not None:
        token_logprobs: list[float | None] = []
        top: list[dict[str, float] | None] = []
        if echo:
            token_logprobs.append(None)
            top.append(None)
            for s in prompt_scores[:-1]:
                token_logprobs.append(s.draft_logprob)
                top.append({tok_str(t): lp for t, lp in s.top_logprobs})
        for s in generated:
            token_logprobs.append(s.logprob)
            top.append({tok_str(t): lp for t, lp in s.top_logprobs})
        strings = [tok_str(t) for t in out_tokens]
        offsets, pos = [], 0
        for t in out_tokens:
            offsets.append(pos)
            pos += len(service.piece(t).decode("utf-8", "replace"))
        choice["logprobs"] = {
            "tokens": strings,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
        }
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": service.options.name,
        "choices": [choice],
        "usage": {
            "prompt_tokens": len(tokens),
            "completion_tokens": len(generated),
            "total_tokens": len(tokens) + len(generated),
        },
    }


def _stops(body: RequestBody) -> list[str]:
    stop = body.raw("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise InvalidRequest("'stop' must be a non-empty string or a list of up to 4", param="stop")
    return stop


def _apply_stops(
    service: VerifierService, tokens: list[int], eog: frozenset[int], stops: list[str]
) -> tuple[str, int | None]:
    """The visible text, and how many tokens to keep if a stop string was hit."""
    text = b""
    for i, t in enumerate(tokens):
        if t in eog:
            return text.decode("utf-8", "replace"), None
        text += service.piece(t)
        decoded = text.decode("utf-8", "ignore")
        for s in stops:
            at = decoded.find(s)
            if at >= 0:
                return decoded[:at], i + 1
    return text.decode("utf-8", "replace"), None
