"""A lean HTTP/1.1 client for the per-round JSON calls (draft and verify).

Measured on the proxy, httpx cost about 2 ms of CPU per request (URL merging,
header models, cookie extraction, anyio wrappers), most of the proxy's own cost
per round. These calls need none of that: plain ``http://``, a JSON body, a JSON
answer with ``Content-Length`` or chunked encoding, kept-alive connections. This
client writes each request in one ``write`` and reads the answer with asyncio
streams. TLS URLs, streaming and everything else stay on httpx.

A connection is reused only after a complete answer; one interrupted in any way
(timeout, cancellation, a malformed answer) is closed. A kept-alive connection
that the server has closed meanwhile is detected on first use and the request
is sent again once, on a new connection (the calls are pure: scoring or drafting).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tightwad import jsonio

_MAX_IDLE = 16  # kept-alive connections per server


class WireProtocolError(Exception):
    """The server's answer is not valid HTTP/1.1."""


@dataclass(slots=True)
class WireResponse:
    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class _Stale(Exception):
    """A kept-alive connection was closed by the server before answering."""


class JsonWire:
    """Kept-alive connections to one ``http://host:port`` server."""

    def __init__(self, url: str, *, headers: dict[str, str] | None = None):
        parts = urlsplit(url)
        assert parts.scheme == "http", f"JsonWire speaks plain http, not {parts.scheme!r}"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._head = f"Host: {parts.netloc}\r\nAccept: application/json\r\n{extra}"
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def request(self, method: str, path: str, body: Any = None) -> WireResponse:
        """Send one request; raises OSError (connection), WireProtocolError, or whatever
        cancels the caller (a timeout around this call, typically)."""
        data = b"" if body is None else jsonio.dumps(body)
        head = (f"{method} {self.prefix}{path} HTTP/1.1\r\n{self._head}"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
        while self._idle:
            conn = self._idle.pop()
            try:
                return await self._exchange(conn, head + data, reused=True)
            except _Stale:
                continue
        conn = await asyncio.open_connection(self.host, self.port)
        return await self._exchange(conn, head + data, reused=False)

    async def _exchange(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], payload: bytes, *, reused: bool
    ) -> WireResponse:
        reader, writer = conn
        keep = False
        try:
            writer.write(payload)
            try:
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")  # the whole head in one read
            except (ConnectionResetError, BrokenPipeError) as exc:
                if reused:
                    raise _Stale from exc
                raise
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise WireProtocolError("the answer's headers were cut short") from exc
                if reused:
                    raise _Stale from exc
                raise ConnectionResetError("the server closed the connection without answering") from exc
            except asyncio.LimitOverrunError as exc:
                raise WireProtocolError("the answer's headers are too long") from exc
            response, keep = await _read_response(head, reader)
            return response
        finally:
            if keep and len(self._idle) < _MAX_IDLE:
                self._idle.append(conn)
            else:
                writer.close()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _read_response(head: bytes, reader: asyncio.StreamReader) -> tuple[WireResponse, bool]:
    """(the answer, whether the connection may be reused); ``head`` ends with the blank line."""
    status_line, _, fields = head.decode("latin-1").partition("\r\n")
    try:
        version, code, *_ = status_line.split(" ", 2)
        status = int(code)
    except ValueError as exc:
        raise WireProtocolError(f"bad status line {status_line[:80]!r}") from exc
    headers: dict[str, str] = {}
    for line in fields.split("\r\n"):
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError as exc:
            raise WireProtocolError(f"bad Content-Length {headers['content-length']!r}") from exc
        body = await reader.readexactly(length)
    else:  # the body runs to the end of the connection
        return WireResponse(status, await reader.read()), False
    keep = version.strip() == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    return WireResponse(status, body), keep


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        line = await reader.readline()
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise WireProtocolError(f"bad chunk size {line[:40]!r}") from exc
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
