"""The lean JSON client (``tightwad.backends._wire``) against small real servers.

A raw asyncio TCP server lets each test answer exactly as a server may: kept
alive or not, with Content-Length or chunked, closing an idle connection, never
answering, or answering garbage. The mapping to backend errors is checked
through ``HttpClient``, which the backends use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from tightwad.backends._http import HttpClient
from tightwad.backends._wire import JsonWire
from tightwad.errors import BackendProtocolError, BackendTimeout, BackendUnavailable

LOOPS = ["asyncio", "uvloop"]  # the proxy runs on uvloop; its transports differ from asyncio's

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    line = (await reader.readline()).decode()
    headers = {}
    while (h := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = h.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return line, headers, body


def _json_answer(body: object, *, extra: str = "", chunked: bool = False) -> bytes:
    data = json.dumps(body).encode()
    if chunked:
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + 5]), data[i:i + 5]) for i in range(0, len(data), 5))
        return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + extra.encode() + b"\r\n"
                + chunks + b"0\r\n\r\n")
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(data), extra.encode(), data)


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[list[int]]], list[int]]:
    """``asyncio.run`` on the default event loop, then on uvloop's."""
    if request.param == "uvloop":
        return uvloop.run  # type: ignore[return-value]
    return asyncio.run  # type: ignore[return-value]


async def _serve(handler: Handler, test: Callable[[str], Awaitable[None]]) -> list[int]:
    """Run ``test(url)`` against a server; returns the number of connections accepted."""
    connections: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await handler(reader, writer, len(connections))
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        await test(f"http://127.0.0.1:{port}")
    return connections


def test_kept_alive_connections_are_reused_and_bodies_decoded(run):
    seen = []

    async def echo(reader, writer, _):
        while True:
            line, headers, body = await _read_request(reader)
            if not line:
                return  # the client closed its kept-alive connection
            seen.append((line.split()[:2], headers.get("authorization"), json.loads(body or b"null")))
            writer.write(_json_answer({"got": json.loads(body or b"null")}, chunked=len(seen) % 2 == 0))
            await writer.drain()

    async def test(url):
        client = HttpClient(url + "/base", timeout_s=5, api_key="k")
        for i in range(4):
            assert await client.post("/x", {"n": i}) == {"got": {"n": i}}
        assert await client.get("/y") == {"got": None}
        await client.aclose()

    assert len(run(_serve(echo, test))) == 1
    assert seen[0] == (["POST", "/base/x"], "Bearer k", {"n": 0})
    assert seen[-1][0] == ["GET", "/base/y"]


def test_a_connection_the_server_closed_is_replaced_once(run):
    async def one_answer_each(reader, writer, _):
        await _read_request(reader)
        writer.write(_json_answer({"ok": True}))  # kept alive by the headers, then closed
        await writer.drain()

    async def test(url):
        wire = JsonWire(url)
        for _ in range(3):
            assert (await wire.request("POST", "/x", {})).body == b'{"ok": true}'
            await asyncio.sleep(0.05)  # the server's close arrives
        await wire.aclose()

    assert len(run(_serve(one_answer_each, test))) == 3


def test_connection_close_and_bodies_to_the_end_are_not_reused(run):
    async def close_after(reader, writer, n):
        await _read_request(reader)
        if n == 1:
            writer.write(_json_answer({"n": n}, extra="Connection: close\r\n"))
        else:
            writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + json.dumps({"n": n}).encode())
        await writer.drain()

    async def test(url):
        client = HttpClient(url, timeout_s=5)
        assert [await client.post("/x", {}) for _ in range(2)] == [{"n": 1}, {"n": 2}]
        await client.aclose()

    assert len(run(_serve(close_after, test))) == 2


def test_errors_map_to_backend_errors(run):
    async def misbehave(reader, writer, _):
        line, _, _ = await _read_request(reader)
        path = line.split()[1]
        if path == "/hang":
            await asyncio.sleep(5)
        elif path == "/503":
            writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 7\r\n\r\nloading")
        elif path == "/garbage":
            writer.write(b"SPDY/9 what\r\n\r\n")
        elif path == "/cut":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"half")
        elif path == "/not-json":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()

    async def test(url):
        client = HttpClient(url, timeout_s=0.3)
        with pytest.raises(BackendTimeout, match="within 0.3s"):
            await client.post("/hang", {})
        with pytest.raises(BackendUnavailable, match="HTTP 503: loading"):
            await client.post("/503", {})
        with pytest.raises(BackendProtocolError, match="invalid HTTP"):
            await client.post("/garbage", {})
        with pytest.raises(BackendUnavailable, match="unreachable"):
            await client.post("/cut", {})
        with pytest.raises(BackendProtocolError, match="invalid JSON: 'hello'"):
            await client.post("/not-json", {})
        await client.aclose()
        closed = HttpClient("http://127.0.0.1:9", timeout_s=2)
        with pytest.raises(BackendUnavailable, match="unreachable"):
            await closed.post("/x", {})

    run(_serve(misbehave, test))


def test_a_cancelled_request_does_not_leave_its_connection_for_reuse(run):
    async def slow_then_fast(reader, writer, n):
        while True:
            line, _, _ = await _read_request(reader)
            if not line:
                return
            if "/slow" in line:
                await asyncio.sleep(1)
            writer.write(_json_answer({"n": n}))
            await writer.drain()

    async def test(url):
        wire = JsonWire(url)
        task = asyncio.ensure_future(wire.request("POST", "/slow", {}))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # A late answer to the cancelled request must never be read as this one's.
        assert json.loads((await wire.request("POST", "/fast", {})).body) == {"n": 2}
        await wire.aclose()

    run(_serve(slow_then_fast, test))


def test_answers_split_anywhere_are_put_back_together(run):
    """The answer is parsed as it arrives; TCP may cut it at any byte."""
    answers = [_json_answer({"n": 1}), _json_answer({"n": 2, "pad": "x" * 40}, chunked=True),
               _json_answer({"n": 3}, chunked=True).replace(b"0\r\n\r\n", b"0\r\nX-Trailer: t\r\n\r\n")]

    async def dribble(reader, writer, _):
        for answer in answers:
            await _read_request(reader)
            for i in range(0, len(answer), 3):  # three bytes at a time, each sent on its own
                writer.write(answer[i:i + 3])
                await writer.drain()
                await asyncio.sleep(0.001)
        await _read_request(reader)

    async def test(url):
        client = HttpClient(url, timeout_s=10)
        assert [(await client.post("/x", {}))["n"] for _ in answers] == [1, 2, 3]
        await client.aclose()

    assert len(run(_serve(dribble, test))) == 1


def test_a_connection_with_bytes_nobody_asked_for_is_not_reused(run):
    async def chatty(reader, writer, _):
        while True:
            line, _, _ = await _read_request(reader)
            if not line:
                return
            # One answer, then stray bytes: the next request must not read them as its answer.
            writer.write(_json_answer({"n": 1}))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(_json_answer({"stray": True}))
            await writer.drain()

    async def test(url):
        wire = JsonWire(url)
        first = await wire.request("POST", "/x", {})
        await asyncio.sleep(0.2)  # the stray answer arrives while the connection is idle
        second = await wire.request("POST", "/x", {})
        assert json.loads(first.body) == json.loads(second.body) == {"n": 1}
        await wire.aclose()

    assert len(run(_serve(chatty, test))) == 2
