"""The CPU this machine charges a client that does nothing but a round's two HTTP calls.

A proxy round waits twice: for the draft, then for the verify. On a virtual
machine, waking from such a wait is not free: measured here, the proxy's own
JSON client costs about 60 us of CPU per call answered at once, and about
300 us per call answered after 10 ms, for the same code. How much depends on the
host's load at the time, so the proxy's CPU per round moves from run to run
while its work stays the same.

``bare_client_cpu_ms`` measures that floor on the spot: the proxy's own client
(``JsonWire``, on uvloop when installed, as the proxy runs) makes the same two
calls per round to a local server that stays busy for the same times, as a
model server computing does, and does nothing else. The benchmark reports it
beside the proxy's figure; the difference is the proxy's own work.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Coroutine
from typing import Any

from tightwad import jsonio
from tightwad.backends._wire import JsonWire

ROUNDS = 200
_WARM_UP = 10


async def _serve() -> None:
    """Answer each POST after computing (busy, not sleeping) for its ``busy_s``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            busy_s = float(jsonio.loads(await reader.readexactly(length))["busy_s"])
            end = time.perf_counter() + busy_s
            while time.perf_counter() < end:
                pass
            body = b'{"tokens":[1,2,3,4]}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


async def _client(url: str, waits_s: list[float], rounds: int) -> list[float]:
    wire = JsonWire(url)
    per_round: list[float] = []
    try:
        for i in range(rounds + _WARM_UP):
            started = time.thread_time()
            for wait in waits_s:
                await wire.request("POST", "/call", {"busy_s": wait})
            if i >= _WARM_UP:
                per_round.append(time.thread_time() - started)
    finally:
        await wire.aclose()
    return per_round


def _run(coro: Coroutine[Any, Any, list[float]]) -> list[float]:
    try:
        import uvloop
    except ImportError:  # the proxy then runs on asyncio's loop too
        return asyncio.run(coro)
    return uvloop.run(coro)


def bare_client_cpu_ms(waits_s: list[float], rounds: int = ROUNDS) -> dict[str, Any]:
    """p50 and p95 of the CPU, in ms, a bare client is charged per round of ``waits_s`` calls."""
    if not waits_s:
        return {"p50_ms": 0.0, "p95_ms": 0.0, "rounds": 0, "waits_ms": []}
    server = subprocess.Popen([sys.executable, "-m", "tightwad.suite.bare_client", "--serve"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        ready, _, port = server.stdout.readline().partition(" ")
        if ready != "ready":
            raise RuntimeError(f"the bare client's server did not start (exit {server.poll()})")
        per_round = _run(_client(f"http://127.0.0.1:{port.strip()}", waits_s, rounds))
    finally:
        server.kill()
        server.wait()
    cuts = statistics.quantiles(per_round, n=20)
    return {"p50_ms": round(statistics.median(per_round) * 1000, 3), "p95_ms": round(cuts[18] * 1000, 3),
            "rounds": rounds, "waits_ms": [round(w * 1000, 3) for w in waits_s]}


if __name__ == "__main__":
    if sys.argv[1:] != ["--serve"]:
        sys.exit("usage: python -m tightwad.suite.bare_client --serve  (serves on a free port, prints 'ready PORT')")
    asyncio.run(_serve())
