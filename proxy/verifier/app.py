"""The verifier's HTTP API (Starlette).

Native endpoints, token ids in and out:
    POST /v1/tightwad/verify     score a draft in one forward pass, or several
                                 candidate drafts (``drafts``) in one call
    POST /v1/tightwad/generate   the target alone, one token at a time
    POST /v1/tightwad/release    forget a finished generation's slot binding
    GET  /v1/tightwad/info       model facts the proxy needs (vocab, EOG ids, mode)
    GET  /v1/tightwad/vocab      every token's bytes, for local detokenising
llama-server compatible: /health, /props, /tokenize, /detokenize, /apply-template.
OpenAI compatible: /v1/models, and /v1/completions with echo + logprobs in the
legacy layout vLLM returns (see completions.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tightwad.errors import InvalidRequest
from tightwad.http import EXCEPTION_HANDLERS, error_body
from tightwad.validation import RequestBody, parse_json_body
from tightwad.verifier import completions
from tightwad.verifier.engine import MAX_CANDIDATES, EvalStats, PositionScore
from tightwad.verifier.sampling import TOP_LOGPROBS_MAX, SamplingParams
from tightwad.verifier.service import UNCOUNTED_PATHS, VerifierMetrics, VerifierService

log = logging.getLogger("tightwad.verifier")


async def read_body(request: Request) -> RequestBody:
    return RequestBody(parse_json_body(await request.body()))


def read_sampling(body: RequestBody) -> SamplingParams | None:
    s = body.object("sampling")
    if s is None:
        return None
    return SamplingParams(
        temperature=s.float("temperature", 0.0, min=0.0, max=100.0),
        top_k=s.int("top_k", 0, min=0),
        top_p=s.float("top_p", 1.0, min=1e-9, max=1.0),
        seed=s.int("seed", 0),
    )


def score_json(score: PositionScore) -> dict[str, Any]:
    out: dict[str, Any] = {"token": score.token, "logprob": score.logprob}
    if score.draft_logprob is not None:
        out["draft_logprob"] = score.draft_logprob
    if score.top_logprobs:
        out["top_logprobs"] = [[t, lp] for t, lp in score.top_logprobs]
    if score.probs is not None:
        out["probs"] = [[t, p] for t, p in sorted(score.probs.items())]
        out["tail_sample"] = score.tail_sample
        out["tail_logprob"] = score.tail_logprob
    return out


def stats_json(stats: EvalStats, started: float) -> dict[str, Any]:
    return {
        "n_cached": stats.n_cached,
        "n_evaluated": stats.n_evaluated,
        "n_decode_calls": stats.n_decode_calls,
        "eval_ms": round(stats.eval_s * 1000, 3),
        "total_ms": round((time.perf_counter() - started) * 1000, 3),
    }


def create_app(service: VerifierService, *, load_in_background: bool = True) -> Starlette:
    async def health(request: Request) -> JSONResponse:
        if service.load_error:
            return JSONResponse(
                error_body(f"model failed to load: {service.load_error}", type_="server_error", code=500),
                status_code=500,
            )
        if not service.ready:
            return JSONResponse(
                error_body("Loading model", type_="unavailable_error", code=503), status_code=503
            )
        return JSONResponse({"status": "ok"})

    async def verify(request: Request) -> JSONResponse:
        started = time.perf_counter()
        body = await read_body(request)
        _, engine = service.require_ready()
        tokens = body.token_ids("tokens")
        if body.raw("drafts") is not None:
            return await verify_many(body, tokens, started)
        draft = body.token_ids("draft", [])
        sampling = read_sampling(body)
        support = None
        sbody = body.object("sampling")
        if sbody is not None and sbody.raw("support") is not None:
            support = sbody.token_id_lists("support")
        scores, stats = await service.run(
            engine.verify,
            tokens,
            draft,
            n_prompt=body.int("n_prompt", None, min=1),
            session=body.str("session", None),
            top_k=body.int("top_logprobs", 0, min=0, max=TOP_LOGPROBS_MAX),
            sampling=sampling,
            support=support,
        )
        service.metrics.verify_seconds.observe(time.perf_counter() - started)
        service.metrics.draft_tokens.inc(len(draft))
        service.metrics.tokens_evaluated.inc(stats.n_evaluated)
        return JSONResponse(
            {"positions": [score_json(s) for s in scores], "mode": mode(), **stats_json(stats, started)}
        )

    async def verify_many(body: RequestBody, tokens: list[int], started: float) -> JSONResponse:
        """``drafts``: several greedy candidates of the same context, scored in one call."""
        _, engine = service.require_ready()
        if body.raw("draft") is not None:
            raise InvalidRequest("give either draft or drafts, not both", param="drafts")
        drafts = body.token_id_lists("drafts")
        if not drafts:
            raise InvalidRequest("drafts must hold at least one candidate draft", param="drafts")
        if len(drafts) > MAX_CANDIDATES:
            raise InvalidRequest(f"drafts holds {len(drafts)} candidates; at most {MAX_CANDIDATES} "
                                 "are scored in one call", param="drafts")
        sampling = read_sampling(body)
        if sampling is not None and not sampling.greedy:
            raise InvalidRequest("several candidate drafts are scored for greedy requests only "
                                 "(sampling.temperature must be 0)", param="sampling")
        candidates, stats = await service.run(
            engine.verify_many,
            tokens,
            drafts,
            n_prompt=body.int("n_prompt", None, min=1),
            session=body.str("session", None),
            top_k=body.int("top_logprobs", 0, min=0, max=TOP_LOGPROBS_MAX),
        )
        service.metrics.verify_seconds.observe(time.perf_counter() - started)
        service.metrics.draft_tokens.inc(sum(map(len, drafts)))
        service.metrics.tokens_evaluated.inc(stats.n_evaluated)
        return JSONResponse({
            "candidates": [{"positions": [score_json(s) for s in scores]} for scores in candidates],
            "mode": mode(),
            **stats_json(stats, started),
        })

    async def generate(request: Request) -> JSONResponse:
        started = time.perf_counter()
        body = await read_body(request)
        _, engine = service.require_ready()
        scores, finish, stats = await service.run(
            engine.generate,
            body.token_ids("tokens"),
            max_tokens=body.int("max_tokens", min=1),
            n_prompt=body.int("n_prompt", None, min=1),
            session=body.str("session", None),
            top_k=body.int("top_logprobs", 0, min=0, max=TOP_LOGPROBS_MAX),
            sampling=read_sampling(body),
            stop_at_eog=body.bool("stop_at_eog", True),
        )
        service.metrics.tokens_generated.inc(len(scores))
        service.metrics.tokens_evaluated.inc(stats.n_evaluated)
        return JSONResponse(
            {
                "tokens": [s.token for s in scores],
                "positions": [score_json(s) for s in scores],
                "finish_reason": finish,
                **stats_json(stats, started),
            }
        )

    async def release(request: Request) -> JSONResponse:
        body = await read_body(request)
        _, engine = service.require_ready()
        await service.run(engine.release, body.str("session"))
        return JSONResponse({"released": True})

    def mode() -> str:
        return "strict" if service.options.strict else "fast"

    async def info(request: Request) -> JSONResponse:
        model, engine = service.require_ready()
        return JSONResponse(
            {
                "model": service.options.name,
                "model_path": model.path,
                "n_vocab": model.n_vocab,
                "n_ctx": engine.n_ctx,
                "n_ctx_train": model.n_ctx_train,
                "parallel": engine.parallel,
                "mode": mode(),
                "verify_mode": "one-pass",
                "add_bos": model.add_bos,
                "bos_token_id": model.bos_token_id,
                "eos_token_id": model.eos_token_id,
                "eog_token_ids": sorted(model.eog_tokens),
                "vocab_sha256": service.vocab_hash,
                "has_chat_template": service.template is not None,
                "rpc_servers": list(service.options.rpc_servers),
            }
        )

    async def vocab(request: Request) -> JSONResponse:
        service.require_ready()
        return JSONResponse(service.vocab_blob())

    async def props(request: Request) -> JSONResponse:
        model, engine = service.require_ready()
        return JSONResponse(
            {
                "model_path": model.path,
                "chat_template": service.template.source if service.template else "",
                "total_slots": engine.parallel,
                "default_generation_settings": {"n_ctx": engine.n_ctx},
                "build_info": "tightwad-verifier",
            }
        )

    async def tokenize(request: Request) -> JSONResponse:
        body = await read_body(request)
        model, _ = service.require_ready()
        content = body.str("content")
        add_special = body.bool("add_special", False)
        parse_special = body.bool("parse_special", True)
        tokens = await service.run(
            model.tokenize, content, add_special=add_special, parse_special=parse_special
        )
        if body.bool("with_pieces", False):
            pieces = [
                {"id": t, "piece": service.piece(t).decode("utf-8", "replace")} for t in tokens
            ]
            return JSONResponse({"tokens": pieces})
        return JSONResponse({"tokens": tokens})

    async def detokenize(request: Request) -> JSONResponse:
        body = await read_body(request)
        model, _ = service.require_ready()
        tokens = body.token_ids("tokens")
        bad = next((i for i, t in enumerate(tokens) if not 0 <= t < model.n_vocab), None)
        if bad is not None:
            raise InvalidRequest(
                f"tokens[{bad}] = {tokens[bad]} is not a token id of this model", param="tokens"
            )
        text = await service.run(model.detokenize, tokens)
        return JSONResponse({"content": text})

    async def apply_template(request: Request) -> JSONResponse:
        body = await read_body(request)
        service.require_ready()
        if service.template is None:
            raise InvalidRequest("this model's GGUF carries no chat template", param="messages")
        prompt = service.template.render(
            body.raw("messages"),
            add_generation_prompt=body.bool("add_generation_prompt", True),
            tools=body.raw("tools"),
        )
        return JSONResponse({"prompt": prompt})

    async def models(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": service.options.name,
                        "object": "model",
                        "created": int(service.loaded_at or 0),
                        "owned_by": "tightwad",
                    }
                ],
            }
        )

    async def completions_endpoint(request: Request) -> JSONResponse:
        body = await read_body(request)
        return JSONResponse(await completions.handle(service, body))

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        import asyncio

        task = None
        if load_in_background:
            task = asyncio.create_task(_load_logged(service))
        else:
            await service.load()
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            await service.aclose()

    routes = [
        Route("/health", health),
        Route("/v1/tightwad/verify", verify, methods=["POST"]),
        Route("/v1/tightwad/generate", generate, methods=["POST"]),
        Route("/v1/tightwad/release", release, methods=["POST"]),
        Route("/v1/tightwad/info", info),
        Route("/v1/tightwad/vocab", vocab),
        Route("/props", props),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/apply-template", apply_template, methods=["POST"]),
        Route("/v1/models", models),
        Route("/v1/completions", completions_endpoint, methods=["POST"]),
        Route("/metrics", metrics),
    ]
    app = Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan,
                    middleware=[Middleware(RequestMetrics, metrics=service.metrics)])
    app.state.service = service
    return app


class RequestMetrics:
    """Counts requests by endpoint and status and gauges those in flight (pure ASGI)."""

    def __init__(self, app: ASGIApp, metrics: VerifierMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNCOUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.observe_request(scope["path"], status)


async def _load_logged(service: VerifierService) -> None:
    started = time.perf_counter()
    try:
        await service.load()
    except Exception:
        log.exception("could not load %s", service.options.model_path)
        return
    log.info("model %s ready in %.1fs", service.options.name, time.perf_counter() - started)
