"""A stand-in Ollama server for tests: no Ollama binary exists here.

Built from Ollama's published API description, it serves only what Tightwad's
ollama drafter uses, with Ollama's field names:

    POST /api/generate   raw mode, non-streaming: {model, prompt, raw: true,
                         stream: false, options: {num_predict, temperature,
                         seed, top_k, top_p}} -> {model, created_at, response,
                         done, done_reason, *_count, *_duration}
    GET  /api/tags       {models: [{name, model, modified_at, size, digest, details}]}
    GET  /api/version    {version}

The text is real model output: each generate request is forwarded to a real
llama-server's ``/completion``. Templated (non-raw) and streaming requests are
refused with 400, and an unknown model with 404, as Ollama answers them.

    python tests/ollama_standin.py --port P --upstream http://127.0.0.1:Q --model NAME
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

VERSION = "0.0.0-standin"
DEFAULT_NUM_PREDICT = 128


def create_app(upstream: str, model: str) -> Starlette:
    client: dict[str, httpx.AsyncClient] = {}

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def generate(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "invalid JSON body")
        if not isinstance(body, dict):
            return error(400, "body must be a JSON object")
        if body.get("model") != model:
            return error(404, f"model '{body.get('model')}' not found")
        if body.get("stream", True) is not False:
            return error(400, "stand-in: only stream=false is implemented")
        if body.get("raw") is not True:
            return error(400, "stand-in: only raw=true is implemented (no templates)")
        options = body.get("options") or {}
        num_predict = options.get("num_predict", DEFAULT_NUM_PREDICT)
        upstream_body = {
            "prompt": body.get("prompt", ""),
            "n_predict": DEFAULT_NUM_PREDICT if num_predict < 0 else num_predict,
            "temperature": options.get("temperature", 0.8),
            "top_k": options.get("top_k", 40),
            "top_p": options.get("top_p", 0.9),
            "seed": options.get("seed", -1),
            "cache_prompt": True,
        }
        started = time.perf_counter_ns()
        reply = await client["http"].post("/completion", json=upstream_body)
        if reply.status_code != 200:
            return error(502, f"upstream llama-server answered {reply.status_code}")
        out = reply.json()
        timings = out.get("timings", {})
        return JSONResponse(
            {
                "model": model,
                "created_at": datetime.now(UTC).isoformat(),
                "response": out["content"],
                "done": True,
                "done_reason": "length" if out.get("stop_type") == "limit" else "stop",
                "total_duration": time.perf_counter_ns() - started,
                "load_duration": 0,
                "prompt_eval_count": out.get("tokens_evaluated", 0),
                "prompt_eval_duration": int(timings.get("prompt_ms", 0) * 1e6),
                "eval_count": out.get("tokens_predicted", 0),
                "eval_duration": int(timings.get("predicted_ms", 0) * 1e6),
            }
        )

    async def tags(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "models": [
                    {
                        "name": model,
                        "model": model,
                        "modified_at": datetime.now(UTC).isoformat(),
                        "size": 0,
                        "digest": "",
                        "details": {"format": "gguf", "family": "", "families": []},
                    }
                ]
            }
        )

    async def version(request: Request) -> JSONResponse:
        return JSONResponse({"version": VERSION})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client["http"] = httpx.AsyncClient(base_url=upstream, timeout=120.0)
        try:
            yield
        finally:
            await client["http"].aclose()

    routes = [
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/tags", tags),
        Route("/api/version", version),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="a llama-server base URL")
    parser.add_argument("--model", default="smollm2:135m")
    args = parser.parse_args()
    uvicorn.run(create_app(args.upstream, args.model), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
