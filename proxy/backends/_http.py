"""httpx plumbing shared by the backends: one client each, errors mapped at the boundary.

    httpx.TimeoutException                       -> BackendTimeout
    httpx.TransportError (connect, read, ...)    -> BackendUnavailable
    HTTP 503                                     -> BackendUnavailable
    any other non-2xx                            -> HttpStatusError (a BackendProtocolError)
    a body that is not JSON, or the wrong shape  -> BackendProtocolError
    a stream that is not text/event-stream,
    or an event whose data is not JSON           -> BackendProtocolError

Every message names the backend's URL and the path, so a 502 from the proxy
says which server failed and how. The ``expect_*`` helpers check the shape of
a decoded body and raise ``BackendProtocolError`` naming the field.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from tightwad import jsonio
from tightwad.backends._wire import JsonWire, WireProtocolError, WireResponse
from tightwad.errors import BackendProtocolError, BackendTimeout, BackendUnavailable

_EXCERPT = 200  # characters of an error body quoted in messages
_CONNECT_TIMEOUT_S = 10.0


class HttpStatusError(BackendProtocolError):
    """The server answered with a non-2xx status other than 503."""

    def __init__(self, message: str, *, status: int):
        super().__init__(message)
        self.status = status


class HttpClient:
    """One ``httpx.AsyncClient`` for one backend server."""

    def __init__(self, url: str, *, timeout_s: float, api_key: str | None = None):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.timeout_s = timeout_s
        self._client = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, _CONNECT_TIMEOUT_S)),
        )
        # JSON calls over plain http take the lean path (most of the proxy's CPU per
        # round was httpx's own); TLS, streams and health checks stay on httpx.
        self._wire = JsonWire(self.url, headers=headers) if self.url.startswith("http://") else None

    def __repr__(self) -> str:
        return f"HttpClient({self.url!r})"

    async def request_json(
        self, method: str, path: str, *, json_body: Any = None, timeout_s: float | None = None
    ) -> Any:
        """Send one request and return its decoded JSON body."""
        assert path.startswith("/"), f"path must start with '/': {path!r}"
        where = f"{self.url}{path}"
        limit = timeout_s if timeout_s is not None else self.timeout_s
        if self._wire is not None:
            return _decode(where, await self._wire_request(where, method, path, json_body, limit))
        try:
            response = await self._client.request(
                method, path, json=json_body,
                timeout=httpx.Timeout(limit, connect=min(limit, _CONNECT_TIMEOUT_S)),
            )
        except httpx.TimeoutException as exc:
            raise _timed_out(where, limit) from exc
        except httpx.TransportError as exc:
            raise _unreachable(where, exc) from exc
        return _decode(where, WireResponse(response.status_code, response.content))

    async def _wire_request(self, where: str, method: str, path: str, body: Any, limit: float) -> WireResponse:
        assert self._wire is not None
        try:
            async with asyncio.timeout(limit):
                return await self._wire.request(method, path, body)
        except TimeoutError as exc:
            raise _timed_out(where, limit) from exc
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise _unreachable(where, exc) from exc
        except WireProtocolError as exc:
            raise BackendProtocolError(f"{where} answered with invalid HTTP: {exc}") from exc

    async def get(self, path: str, **kw: Any) -> Any:
        return await self.request_json("GET", path, **kw)

    async def post(self, path: str, body: Any, **kw: Any) -> Any:
        return await self.request_json("POST", path, json_body=body, **kw)

    async def stream_events(self, path: str, body: Any) -> AsyncIterator[Any]:
        """POST ``body`` and yield the ``data`` of each server-sent event, decoded as JSON.

        An async generator: close it (``contextlib.aclosing``) to stop reading early; that
        closes the connection, which is how a client tells a server to stop generating.
        A ``[DONE]`` event ends the stream. The timeout applies to each read, as in
        ``request_json``; a caller that wants a total limit wraps the whole read.
        """
        assert path.startswith("/"), f"path must start with '/': {path!r}"
        where = f"{self.url}{path}"
        try:
            async with self._client.stream("POST", path, json=body) as response:
                if not response.is_success:
                    await response.aread()
                    _raise_for_status(where, response)
                kind = response.headers.get("content-type", "")
                if not kind.startswith("text/event-stream"):
                    await response.aread()
                    excerpt = response.text[:_EXCERPT].strip()
                    raise BackendProtocolError(
                        f"{where} answered {kind or 'no content type'}, not an event stream: {excerpt!r}"
                    )
                data: list[str] = []
                async for line in response.aiter_lines():
                    if line:  # "field: value"; comments (":ping") and other fields are skipped
                        field, _, value = line.partition(":")
                        if field == "data":
                            data.append(value[1:] if value.startswith(" ") else value)
                        continue
                    if not data:
                        continue
                    text, data = "\n".join(data), []
                    if text == "[DONE]":
                        return
                    yield _decode_event(where, text)
                if data and data != ["[DONE]"]:
                    yield _decode_event(where, "\n".join(data))
        except httpx.TimeoutException as exc:
            raise _timed_out(where, self.timeout_s) from exc
        except httpx.TransportError as exc:
            raise _unreachable(where, exc) from exc

    async def ok(self, path: str) -> bool:
        """True when GET ``path`` answers 2xx in time; never raises a BackendError."""
        try:
            response = await self._client.get(path)
        except httpx.HTTPError:
            return False
        return response.is_success

    async def aclose(self) -> None:
        if self._wire is not None:
            await self._wire.aclose()
        await self._client.aclose()


def _timed_out(where: str, limit: float) -> BackendTimeout:
    return BackendTimeout(f"{where} did not answer within {limit:g}s")


def _unreachable(where: str, exc: BaseException) -> BackendUnavailable:
    return BackendUnavailable(f"{where} is unreachable: {type(exc).__name__}: {exc or 'no detail'}")


def _raise_for_status(where: str, response: httpx.Response | WireResponse) -> None:
    status = response.status_code if isinstance(response, httpx.Response) else response.status
    if 200 <= status < 300:
        return
    excerpt = response.text[:_EXCERPT].strip()
    message = f"{where} answered HTTP {status}: {excerpt or '(empty body)'}"
    if status == 503:
        raise BackendUnavailable(message)
    raise HttpStatusError(message, status=status)


def _decode(where: str, response: WireResponse) -> Any:
    """The JSON body of a successful answer."""
    _raise_for_status(where, response)
    try:
        return jsonio.loads(response.body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        excerpt = response.text[:_EXCERPT].strip()
        raise BackendProtocolError(f"{where} answered with invalid JSON: {excerpt!r}") from exc


def _decode_event(where: str, text: str) -> Any:
    try:
        return jsonio.loads(text)
    except json.JSONDecodeError as exc:
        raise BackendProtocolError(
            f"{where} streamed an event that is not JSON: {text[:_EXCERPT]!r}"
        ) from exc


# -- checking shapes ------------------------------------------------------------------


def garbage(where: str, what: str, value: Any) -> BackendProtocolError:
    shown = json.dumps(value, default=str)[:_EXCERPT]
    return BackendProtocolError(f"{where}: {what}, got {shown}")


def expect_dict(value: Any, where: str, what: str = "expected a JSON object") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise garbage(where, what, value)
    return value


def expect_field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise garbage(where, f"'{key}' should be {name}", value)
    return value


def expect_token_ids(value: Any, where: str, what: str = "token ids") -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
    ):
        raise garbage(where, f"expected a list of {what}", value)
    return value


def expect_number(value: Any, where: str, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise garbage(where, f"expected a number for {what}", value)
    return float(value)


# -- small shared helpers ---------------------------------------------------------------


def stable_slot(session: str, n_slots: int | None) -> int:
    """The same server slot for every round of one session (-1: let the server choose)."""
    if not n_slots or n_slots < 1:
        return -1
    return zlib.crc32(session.encode("utf-8")) % n_slots


def round_seed(seed: int, position: int) -> int:
    """A per-position seed for llama.cpp's 32-bit RNG.

    Sending the request's seed unchanged every round would restart the same random
    stream each round; mixing in the context length gives each position its own
    draw, and the same (seed, context) still repeats exactly.
    """
    data = (seed & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") + position.to_bytes(8, "little")
    return zlib.crc32(data) & 0x7FFFFFFF
