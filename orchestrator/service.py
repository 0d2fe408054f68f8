"""The orchestrator as a long-running service: an HTTP API, metrics, a watch loop and the front.

    python -m tightwad.orchestrator serve [--host H] [--port 8095] [--front HOST:PORT]

API (JSON; errors are ``{"error": {...}}`` with the status the error carries):

    GET  /health                   200 while the service runs: {"status", "operation"}
    GET  /metrics                  Prometheus text (tightwad.orchestrator.metrics)
    GET  /v1/status                hosts, devices, workers, coordinator, warnings
    GET  /v1/plan?model=M[&offline=1]   a placement (dry run)
    POST /v1/start  {"model"?}     \
    POST /v1/swap   {"model"}       } NDJSON, one line per step as it happens:
    POST /v1/stop                  /  {"event":"progress","message"}..., then
                                      {"event":"done","result"} or {"event":"error","error","status"}
    POST /v1/benchmark {"max_tokens"?}  rows of prompt and generation tok/s

One operation runs at a time: a second gets 409 before anything starts. An
unknown model gets 404 with the known ones listed. The watch loop refreshes
the metrics every ``watch_interval_s`` and keeps the front routed to the
healthy coordinator, even one started or swapped by a CLI outside this
process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tightwad.errors import TightwadError
from tightwad.http import EXCEPTION_HANDLERS
from tightwad.orchestrator.base import Progress
from tightwad.orchestrator.cluster import Orchestrator
from tightwad.orchestrator.errors import Busy
from tightwad.orchestrator.front import CoordinatorFront
from tightwad.orchestrator.placement import placement_dict

log = logging.getLogger("tightwad.orchestrator.service")


def create_app(orchestrator: Orchestrator, *, front: CoordinatorFront | None = None,
               watch_interval_s: float = 10.0) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(_watch(orchestrator, watch_interval_s))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.to_thread(orchestrator.close)

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/v1/status", status),
            Route("/v1/plan", plan),
            Route("/v1/start", start, methods=["POST"]),
            Route("/v1/swap", swap, methods=["POST"]),
            Route("/v1/stop", stop, methods=["POST"]),
            Route("/v1/benchmark", benchmark, methods=["POST"]),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.orchestrator = orchestrator
    app.state.front = front
    return app


def _orchestrator(request: Request) -> Orchestrator:
    return request.app.state.orchestrator


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "operation": _orchestrator(request).operation})


async def metrics(request: Request) -> Response:
    registry = _orchestrator(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def status(request: Request) -> JSONResponse:
    o = _orchestrator(request)
    result = await asyncio.to_thread(o.status)
    body = result.to_dict()
    body["operation"] = o.operation
    front: CoordinatorFront | None = request.app.state.front
    if front is not None:
        body["front"] = {"url": front.url, "held": front.held, "inflight": front.inflight(),
                         "refused": front.refused}
    return JSONResponse(body)


async def plan(request: Request) -> JSONResponse:
    o = _orchestrator(request)
    model = request.query_params.get("model") or None
    offline = request.query_params.get("offline", "") in ("1", "true", "yes")
    notes: list[str] = []
    placement = await asyncio.to_thread(o.plan, model, offline=offline, notes=notes)
    return JSONResponse({**placement_dict(placement), "notes": notes})


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        from tightwad.errors import InvalidRequest

        raise InvalidRequest("expected a JSON object body")
    return data


async def start(request: Request) -> Response:
    o = _orchestrator(request)
    model = (await _body(request)).get("model")
    o.model(model)  # 404 before anything starts
    return _operation(o, lambda progress: _result(o.start(model, progress=progress)))


async def swap(request: Request) -> Response:
    o = _orchestrator(request)
    model = (await _body(request)).get("model")
    if not model:
        from tightwad.errors import InvalidRequest

        raise InvalidRequest("give the model to swap to: {\"model\": NAME}", param="model")
    o.model(model)
    return _operation(o, lambda progress: o.swap(model, progress=progress).to_dict())


async def stop(request: Request) -> Response:
    o = _orchestrator(request)
    return _operation(o, lambda progress: {"removed": o.stop(progress=progress)})


async def benchmark(request: Request) -> JSONResponse:
    o = _orchestrator(request)
    max_tokens = int((await _body(request)).get("max_tokens") or 64)
    rows = await asyncio.to_thread(o.benchmark, max_tokens=max_tokens)
    return JSONResponse({"rows": rows})


def _result(r: Any) -> dict[str, Any]:
    return {"model": r.model, "url": r.url, "seconds": r.seconds,
            "already_running": r.already_running, "placement": placement_dict(r.placement)}


def _operation(o: Orchestrator, run: Callable[[Progress], Any]) -> Response:
    """Run ``run`` in a worker thread and stream its progress as NDJSON."""
    if o.busy:
        raise Busy(f"{o.operation or 'another operation'} is in progress")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def put(item: dict[str, Any] | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        try:
            result = run(lambda message: put({"event": "progress", "message": message}))
            put({"event": "done", "result": result})
        except TightwadError as exc:
            put({"event": "error", "status": exc.status_code, **exc.to_dict()})
        except Exception as exc:  # reported to the client, and logged with its traceback
            log.exception("operation failed")
            put({"event": "error", "status": 500,
                 "error": {"message": f"internal error: {type(exc).__name__}: {exc}",
                           "type": "server_error", "param": None, "code": None}})
        finally:
            put(None)

    async def lines() -> AsyncIterator[bytes]:
        task = asyncio.create_task(asyncio.to_thread(work))
        try:
            while (item := await queue.get()) is not None:
                yield (json.dumps(item) + "\n").encode()
        finally:
            # A client that hangs up does not cancel the operation: it runs to its end
            # (a half-done swap would be worse); the task is awaited so errors are logged.
            await asyncio.shield(task)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def _watch(o: Orchestrator, interval_s: float) -> None:
    shown: set[str] = set()  # log each warning when it appears, not on every pass
    while True:
        try:
            st = await asyncio.to_thread(o.watch)
            if st is not None:
                for w in set(st.warnings) - shown:
                    log.warning("%s", w)
                shown = set(st.warnings)
        except TightwadError as exc:
            log.warning("watch: %s", exc.message)
        except Exception:
            log.exception("watch failed")
        await asyncio.sleep(interval_s)


def serve(config: Any, *, host: str = "127.0.0.1", port: int = 8095, front: str | None = None,
          watch_interval_s: float = 10.0, **orchestrator_options: Any) -> int:
    """Run the API (and the front, if ``front`` is HOST:PORT) until SIGINT/SIGTERM."""
    import uvicorn

    from tightwad.orchestrator.front import DirectSwitch
    from tightwad.orchestrator.metrics import OrchestratorMetrics

    front_app = CoordinatorFront() if front else None
    orchestrator = Orchestrator(config, switch=front_app or DirectSwitch(),
                                metrics=OrchestratorMetrics(), **orchestrator_options)
    app = create_app(orchestrator, front=front_app, watch_interval_s=watch_interval_s)
    servers = [uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))]
    if front_app is not None and front:
        front_host, _, front_port = front.rpartition(":")
        servers.append(uvicorn.Server(uvicorn.Config(
            front_app, host=front_host.strip("[]") or "127.0.0.1", port=int(front_port),
            log_level="warning", server_header=False, date_header=False)))

    async def run_all() -> None:
        tasks = [asyncio.create_task(s.serve()) for s in servers]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for s in servers:
            s.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run_all())
    return 0
