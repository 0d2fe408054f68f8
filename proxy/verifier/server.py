"""Running the verifier app under uvicorn, exiting non-zero if the model fails to load."""

from __future__ import annotations

import asyncio
import logging
import sys

import uvicorn

from tightwad.verifier.app import create_app
from tightwad.verifier.service import VerifierOptions, VerifierService

log = logging.getLogger("tightwad.verifier")


def serve(options: VerifierOptions, *, host: str, port: int) -> int:
    service = VerifierService(options)
    app = create_app(service)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)

    async def main() -> int:
        async def watch_load() -> None:
            while not service.ready and not service.load_error:
                await asyncio.sleep(0.05)
            if service.load_error:
                print(f"error: {service.load_error}", file=sys.stderr)
                server.should_exit = True

        watcher = asyncio.create_task(watch_load())
        print(f"tightwad verifier: loading {options.model_path} "
              f"({'strict' if options.strict else 'fast'} mode) on http://{host}:{port}",
              file=sys.stderr, flush=True)
        await server.serve()
        watcher.cancel()
        return 1 if service.load_error else 0

    return asyncio.run(main())
