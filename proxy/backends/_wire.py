"""A lean HTTP/1.1 client for the per-round JSON calls (draft and verify).

Measured on the proxy, httpx cost about 2 ms of CPU per request (URL merging,
header models, cookie extraction, anyio wrappers), most of the proxy's own cost
per round. These calls need none of that: plain ``http://``, a JSON body, a JSON
answer with ``Content-Length`` or chunked encoding, kept-alive connections. This
client writes each request in one ``write`` and parses the answer as it arrives,
in an asyncio protocol (asyncio's streams cost half as much CPU again per call:
a reader, a writer, drain and a future per read). TLS URLs, streaming and
everything else stay on httpx.

A connection is reused only after a complete answer; one interrupted in any way
(timeout, cancellation, a malformed answer) is closed. A kept-alive connection
that the server has closed meanwhile is detected on first use and the request
is sent again once, on a new connection (the calls are pure: scoring or drafting).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, cast
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


_MAX_HEAD = 64 * 1024  # asyncio streams' own limit for one line, used here for the whole head


@dataclass(slots=True)
class _Head:
    status: int
    size: int  # bytes of the head, blank line included
    length: int | None  # Content-Length, when the body is framed by it
    chunked: bool
    keep_alive: bool


class _Connection(asyncio.Protocol):
    """One kept-alive connection, with at most one request in flight."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._answer: asyncio.Future[WireResponse] | None = None
        self._reused = False
        self._head: _Head | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._answer is None:
            self.closed = True  # bytes nobody asked for: this connection cannot be trusted again
            self.close()
        elif not self._answer.done():
            self._advance(eof=False)
        else:
            self.closed = True  # more than the answer, before its reader ran: not reused either

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._answer is not None and not self._answer.done():
            self._advance(eof=True)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, payload: bytes, *, reused: bool) -> WireResponse:
        """Send ``payload`` and wait for the answer; ``closed`` then says whether the
        connection may carry another request."""
        assert self.transport is not None and self._answer is None
        self._reused = reused
        self._answer = self._loop.create_future()
        self.transport.write(payload)
        try:
            return await self._answer
        except BaseException:
            # Interrupted (a timeout, a cancellation) or refused: a late answer must
            # never be read as the next request's.
            self.close()
            raise
        finally:
            self._answer, self._head = None, None
            self._buffer.clear()

    def _advance(self, *, eof: bool) -> None:
        assert self._answer is not None
        try:
            done = self._parse(eof=eof)
        except (WireProtocolError, OSError, _Stale) as exc:
            self._answer.set_exception(exc)
            return
        if done is not None:
            response, end = done
            assert self._head is not None
            if not self._head.keep_alive or len(self._buffer) > end:
                self.closed = True  # the server will close it, or sent more than the answer
            self._answer.set_result(response)

    def _parse(self, *, eof: bool) -> tuple[WireResponse, int] | None:
        """The answer and where it ends in the buffer, or None while more is to come."""
        buffer = self._buffer
        if self._head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    raise WireProtocolError("the answer's headers are too long")
                if not eof:
                    return None
                if buffer:
                    raise WireProtocolError("the answer's headers were cut short")
                if self._reused:
                    raise _Stale()
                raise ConnectionResetError("the server closed the connection without answering")
            self._head = _parse_head(bytes(buffer[: end + 4]))
        head = self._head
        if head.chunked:
            chunked = _chunked_body(buffer, head.size)
            if chunked is None:
                if eof:
                    raise ConnectionResetError("the answer's chunked body was cut short")
                return None
            body, end = chunked
            return WireResponse(head.status, body), end
        if head.length is not None:
            if len(buffer) - head.size < head.length:
                if eof:
                    raise ConnectionResetError("the answer's body was cut short")
                return None
            end = head.size + head.length
            return WireResponse(head.status, bytes(buffer[head.size : end])), end
        if not eof:  # the body runs to the end of the connection
            return None
        return WireResponse(head.status, bytes(buffer[head.size :])), len(buffer)


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
        self._idle: list[_Connection] = []

    async def request(self, method: str, path: str, body: Any = None) -> WireResponse:
        """Send one request; raises OSError (connection), WireProtocolError, or whatever
        cancels the caller (a timeout around this call, typically)."""
        data = b"" if body is None else jsonio.dumps(body)
        payload = (f"{method} {self.prefix}{path} HTTP/1.1\r\n{self._head}"
                   f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data
        while self._idle:
            conn = self._idle.pop()
            if conn.closed:
                continue  # the server closed it while it was idle
            try:
                return await self._exchange(conn, payload, reused=True)
            except _Stale:
                continue
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Connection(loop), self.host, self.port)
        return await self._exchange(conn, payload, reused=False)

    async def _exchange(self, conn: _Connection, payload: bytes, *, reused: bool) -> WireResponse:
        response = await conn.exchange(payload, reused=reused)  # closes it unless it completes
        if conn.closed or len(self._idle) >= _MAX_IDLE:
            conn.close()
        else:
            self._idle.append(conn)
        return response

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _parse_head(head: bytes) -> _Head:
    """The answer's status and body framing; ``head`` ends with the blank line."""
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
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    length = None
    if not chunked and "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError as exc:
            raise WireProtocolError(f"bad Content-Length {headers['content-length']!r}") from exc
        if length < 0:
            raise WireProtocolError(f"bad Content-Length {headers['content-length']!r}")
    keep_alive = ((chunked or length is not None) and version.strip() == "HTTP/1.1"
                  and headers.get("connection", "").lower() != "close")
    return _Head(status, len(head), length, chunked, keep_alive)


def _chunked_body(buffer: bytearray, start: int) -> tuple[bytes, int] | None:
    """The whole chunked body from ``buffer[start:]`` and where it ends, or None while
    more is to come."""
    parts: list[bytes] = []
    at = start
    while True:
        eol = buffer.find(b"\r\n", at)
        if eol < 0:
            return None
        try:
            size = int(bytes(buffer[at:eol]).split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise WireProtocolError(f"bad chunk size {bytes(buffer[at:eol])[:40]!r}") from exc
        at = eol + 2
        if size == 0:
            while True:  # trailers, up to the blank line
                eol = buffer.find(b"\r\n", at)
                if eol < 0:
                    return None
                if eol == at:
                    return b"".join(parts), eol + 2
                at = eol + 2
        if len(buffer) < at + size + 2:
            return None
        parts.append(bytes(buffer[at : at + size]))
        at += size + 2
