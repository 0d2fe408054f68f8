"""The proxy's Starlette app: OpenAI-compatible endpoints wired to the runtime.

    POST /v1/completions        POST /v1/chat/completions     GET /v1/models
    GET  /v1/tightwad/status    GET  /metrics                 GET /health

The app only wires things together: parsing is in ``requests``, generation in
``generation`` (over the pure ``speculation`` core), bodies in ``openai_format``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tightwad.backends._http import HttpStatusError
from tightwad.backends.base import DraftBackend, TargetBackend
from tightwad.config import ProxyConfig
from tightwad.errors import InvalidRequest, ModelNotFound, TightwadError
from tightwad.generation import Generation, GenerationRequest, GenerationStats, TokenLogprob
from tightwad.http import EXCEPTION_HANDLERS, error_body
from tightwad.openai_format import Formatter, sse
from tightwad.requests import ParsedRequest, parse_chat, parse_completion
from tightwad.runtime import ProxyRuntime
from tightwad.validation import RequestBody, parse_json_body

OPEN_PATHS = ("/health", "/metrics")


def create_app(
    config: ProxyConfig,
    *,
    target: TargetBackend | None = None,
    drafters: Sequence[DraftBackend] | None = None,
) -> Starlette:
    if target is None or drafters is None:
        from tightwad.backends.factory import make_drafter, make_target

        target = target or make_target(config.target)
        drafters = drafters if drafters is not None else [make_drafter(d) for d in config.drafters]
    runtime = ProxyRuntime(config, target, drafters)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        with contextlib.suppress(TightwadError):
            await runtime.ensure_ready()
        await runtime.refresh_health()
        try:
            yield
        finally:
            await runtime.aclose()

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models),
        Route("/v1/tightwad/status", status),
        Route("/metrics", metrics),
        Route("/health", health),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
        middleware=[Middleware(RequestAccounting, runtime=runtime)],
    )
    app.state.runtime = runtime
    return app


def _runtime(request: Request) -> ProxyRuntime:
    return request.app.state.runtime


class RequestAccounting:
    """API-key check and per-endpoint request counters, as pure ASGI middleware."""

    def __init__(self, app: ASGIApp, runtime: ProxyRuntime):
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        key = self.runtime.config.api_key
        if key and path not in OPEN_PATHS:
            headers = dict(scope["headers"])
            if not _key_matches(headers.get(b"authorization", b""), key):
                body = error_body("missing or wrong API key (Authorization: Bearer ...)",
                                  type_="invalid_request_error", code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                self._count(path, 401)
                return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self._count(path, status)

    def _count(self, path: str, status: int) -> None:
        if path.startswith("/v1/"):
            self.runtime.metrics.observe_request(path, status)


def _key_matches(header: bytes, key: str) -> bool:
    """``Authorization: Bearer <key>`` (the scheme in any case), compared in constant time."""
    scheme, _, given = header.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), key.encode())


async def _read(request: Request) -> RequestBody:
    """The JSON body, refused with 413 as soon as it is known to be over the limit
    (by its Content-Length, else while it arrives), never read whole first."""
    limit = _runtime(request).config.max_request_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(f"{declared} bytes", limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(f"over {limit} bytes", limit)
    return RequestBody(parse_json_body(bytes(body), max_bytes=limit))


def _too_large(size: str, limit: int) -> InvalidRequest:
    return InvalidRequest(f"request body is {size}; the limit is {limit} (proxy.max_request_bytes)",
                          param="body", code="request_too_large", status_code=413)


def _check_model(rt: ProxyRuntime, requested: str | None) -> None:
    served = {rt.model_name, "tightwad"}
    if rt.target_info is not None:
        served.add(rt.target_info.model)
    if requested not in (None, "") and requested not in served:
        raise ModelNotFound(f"model '{requested}' is not served here; use '{rt.model_name}' "
                            "(or 'tightwad', or leave 'model' out)")


async def completions(request: Request) -> Response:
    rt = _runtime(request)
    parsed = parse_completion(await _read(request), max_tokens_limit=rt.config.max_tokens_limit)
    return await _serve(request, parsed)


async def chat_completions(request: Request) -> Response:
    rt = _runtime(request)
    parsed = parse_chat(await _read(request), max_tokens_limit=rt.config.max_tokens_limit)
    return await _serve(request, parsed)


async def _prompt_tokens(rt: ProxyRuntime, parsed: ParsedRequest) -> list[int]:
    info = rt.target_info
    assert info is not None
    if parsed.chat:
        assert parsed.messages is not None
        try:
            text = await rt.target.render_chat(parsed.messages)
        except HttpStatusError as exc:
            if not 400 <= exc.status < 500:
                raise
            # The target's template refused these messages: the client's mistake, not a 502.
            raise InvalidRequest(f"the target's chat template refused the messages: {exc.message}",
                                 param="messages") from exc
        # The template writes the special tokens itself, as HF's apply_chat_template does.
        return await rt.target.tokenize(text, add_special=False)
    if isinstance(parsed.prompt, list):
        bad = next((i for i, t in enumerate(parsed.prompt) if t >= info.n_vocab), None)
        if bad is not None:
            raise InvalidRequest(f"prompt[{bad}] is not a token id of the target model", param="prompt")
        return list(parsed.prompt)
    assert isinstance(parsed.prompt, str)
    return await rt.target.tokenize(parsed.prompt, add_special=True)


async def _serve(request: Request, parsed: ParsedRequest) -> Response:
    rt = _runtime(request)
    _check_model(rt, parsed.model)
    info = await rt.ensure_ready()
    prompt = await _prompt_tokens(rt, parsed)
    room = info.n_ctx - len(prompt)
    param = "messages" if parsed.chat else "prompt"
    if room < 1:
        raise InvalidRequest(f"the prompt is {len(prompt)} tokens; the target's context is {info.n_ctx}",
                             param=param, code="context_length_exceeded")
    max_tokens = min(parsed.max_tokens or rt.config.max_tokens_limit, room)
    if parsed.max_tokens is not None and parsed.max_tokens > room:
        raise InvalidRequest(
            f"prompt ({len(prompt)} tokens) + max_tokens ({parsed.max_tokens}) exceeds the target's "
            f"context of {info.n_ctx}", param="max_tokens", code="context_length_exceeded")
    gen = await rt.new_generation(GenerationRequest(
        prompt=prompt, max_tokens=max_tokens, sampling=parsed.sampling,
        session=f"tw-{uuid.uuid4().hex}", stops=parsed.stops, top_logprobs=parsed.logprobs,
    ))
    assert rt.pieces is not None
    fmt = Formatter(chat=parsed.chat, model=rt.model_name, piece=rt.pieces,
                    logprobs=parsed.logprobs is not None, return_tokens=parsed.return_tokens,
                    include_usage=parsed.include_usage)
    if parsed.stream:
        return StreamingResponse(_stream(request, rt, gen, fmt, parsed, len(prompt)),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text: list[str] = []
    items: list[TokenLogprob] = []
    finish: str | None = None

    async def collect() -> None:
        nonlocal finish
        async for event in gen.events():
            text.append(event.text)
            items.extend(event.logprobs)
            finish = event.finish_reason or finish

    await _until_disconnect(request, _accounted(rt, gen, collect()))
    return JSONResponse(fmt.response("".join(text), items, finish, len(prompt), gen.stats))


async def _accounted(rt: ProxyRuntime, gen: Generation, work: Any) -> None:
    gauge = rt.metrics.in_flight.labels(model=rt.model_name)
    gauge.inc()
    try:
        await work
    finally:
        gauge.dec()
        _finish(rt, gen.stats)


def _finish(rt: ProxyRuntime, stats: GenerationStats) -> None:
    rt.stats.observe_request(stats)
    model = rt.model_name
    if stats.first_token_at is not None:
        rt.metrics.ttft.labels(model=model).observe(stats.first_token_at - stats.started)
    for a, b in zip(stats.token_times, stats.token_times[1:], strict=False):
        rt.metrics.itl.labels(model=model).observe(b - a)
    end = stats.token_times[-1] if stats.token_times else time.perf_counter()
    rt.metrics.e2e.labels(model=model).observe(end - stats.started)


async def _until_disconnect(request: Request, work: Any) -> None:
    """Run ``work``, cancelling it (and so the upstream calls) if the client goes away."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        await task
    finally:
        watcher.cancel()


async def _stream(request: Request, rt: ProxyRuntime, gen: Generation, fmt: Formatter,
                  parsed: ParsedRequest, n_prompt: int) -> AsyncIterator[bytes]:
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def produce() -> None:
        try:
            role = fmt.role_chunk()
            if role is not None:
                await queue.put(sse(role))
            async for event in gen.events():
                for chunk in fmt.delta_chunks(event.text, event.logprobs, event.finish_reason):
                    await queue.put(sse(chunk))
            if parsed.include_usage:
                await queue.put(sse(fmt.usage_chunk(n_prompt, gen.stats)))
        except TightwadError as exc:
            # The headers are gone: one error event, then the stream ends.
            await queue.put(sse(exc.to_dict()))
        await queue.put(sse("[DONE]"))
        await queue.put(None)

    producer = asyncio.ensure_future(_until_disconnect(request, _accounted(rt, gen, produce())))
    try:
        while (chunk := await queue.get()) is not None:
            yield chunk
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await producer


async def list_models(request: Request) -> JSONResponse:
    rt = _runtime(request)
    return JSONResponse({"object": "list", "data": [
        {"id": rt.model_name, "object": "model", "created": int(rt.stats.started), "owned_by": "tightwad"}
    ]})


async def status(request: Request) -> JSONResponse:
    rt = _runtime(request)
    with contextlib.suppress(TightwadError):
        await rt.ensure_ready()
    await rt.refresh_health()
    info = rt.target_info
    target = {
        "url": rt.target.url, "backend": rt.target.kind, "healthy": rt.target_healthy,
        "verify_mode": info.verify_mode if info else None, "mode": info.mode if info else None,
    }
    if info is not None and info.verify_mode == "generate":
        target["note"] = ("this target can only confirm drafts by generating them: output is exact "
                          "but there is no speed-up")
    drafters = [
        {"name": d.backend.name, "url": d.backend.url, "backend": d.backend.kind,
         "healthy": d.healthy, "tokenizer": d.tokenizer,
         "wins": rt.stats.drafter_wins.get(d.backend.name, 0)}
        for d in rt.drafters
    ]
    return JSONResponse({
        "models": {rt.model_name: {**rt.stats.to_json(), "target": target, "drafters": drafters}},
        "max_draft_tokens": rt.config.max_draft_tokens or "auto",
        "fallback_on_draft_failure": rt.config.fallback_on_draft_failure,
    })


async def metrics(request: Request) -> Response:
    rt = _runtime(request)
    await rt.refresh_health()
    return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def health(request: Request) -> JSONResponse:
    rt = _runtime(request)
    try:
        await rt.ensure_ready()
    except TightwadError as exc:
        return JSONResponse(error_body(exc.message, type_="unavailable_error", code=503), status_code=503)
    return JSONResponse({"status": "ok", "model": rt.model_name})
