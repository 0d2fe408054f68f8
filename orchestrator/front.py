"""Switching clients from one coordinator to the next during a swap.

    Switch             the protocol a swap drives: hold, route, release, wait_idle
    DirectSwitch       no front: clients address the coordinator's stable port directly;
                       draining is best effort (llama-server's /slots)
    CoordinatorFront   an ASGI reverse proxy at a stable address in front of the coordinator,
                       run by ``python -m tightwad.orchestrator serve --front HOST:PORT``

The front is what makes a swap clean for any HTTP client (the speculation proxy
included, with its target URL pointed at the front):

* While held (stop-then-start swaps), new requests get ``503`` with
  ``Retry-After`` at once: nothing waits on a coordinator that is gone.
* Requests already forwarded finish on the coordinator they started on; the
  swap waits for them (``wait_idle``) before it stops that coordinator.
* ``route(url)`` switches new requests to another coordinator atomically, so
  a make-before-break swap has no gap at all.
* A coordinator that cannot be reached also gives 503 + Retry-After; a
  timeout gives 504. A response that breaks after its headers went out is
  cut at the connection (the client sees an incomplete response), never
  ended as if complete.

The orchestrator calls the Switch methods from its worker thread; the ASGI
side runs in the event loop. They share plain attributes and a counter.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from typing import Protocol

import httpx
from starlette.types import Receive, Scope, Send

log = logging.getLogger("tightwad.orchestrator.front")

RETRY_AFTER_S = 2
_HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"host",
}


class Switch(Protocol):
    supports_overlap: bool

    def hold(self) -> None:
        """New requests are refused with 503 + Retry-After until release()."""

    def release(self) -> None: ...

    def route(self, url: str | None) -> None:
        """Send new requests to ``url`` (the coordinator's base URL)."""

    def wait_idle(self, url: str, timeout_s: float) -> int:
        """Wait until no request is running on ``url``; returns how many still are."""

    def inflight(self, url: str | None = None) -> int:
        """Requests running now (on ``url``; all of them when None)."""


class DirectSwitch:
    """No front: the coordinator keeps a stable address (its configured port) and clients
    reach it directly, so holding and routing are no-ops and a swap must stop the old
    coordinator before the new one can take the port."""

    supports_overlap = False

    def __init__(self, poll_s: float = 0.2):
        self._poll_s = poll_s

    def hold(self) -> None:
        pass

    def release(self) -> None:
        pass

    def route(self, url: str | None) -> None:
        pass

    def inflight(self, url: str | None = None) -> int:
        """Busy slots of llama-server at ``url`` (0 when it cannot say: the verifier has no
        /slots)."""
        if url is None:
            return 0
        try:
            r = httpx.get(f"{url}/slots", timeout=2.0)
            if r.status_code != 200:
                return 0
            return sum(1 for s in r.json() if s.get("is_processing"))
        except (httpx.HTTPError, ValueError, AttributeError):
            return 0

    def wait_idle(self, url: str, timeout_s: float) -> int:
        """Poll /slots until no slot is processing (best effort: requests can still
        arrive directly until the coordinator stops)."""
        deadline = time.monotonic() + timeout_s
        while (busy := self.inflight(url)) and time.monotonic() < deadline:
            time.sleep(self._poll_s)
        return busy


class CoordinatorFront:
    """ASGI app: forwards every request to the current coordinator (see the module docstring)."""

    supports_overlap = True

    def __init__(self, url: str | None = None, *, connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 600.0):
        self._url = url.rstrip("/") if url else None
        self._held = False
        self._inflight: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self._client: httpx.AsyncClient | None = None
        self.refused = 0  # requests answered 503 while held or without a coordinator

    # -- the Switch side (any thread) ------------------------------------------------

    @property
    def url(self) -> str | None:
        return self._url

    @property
    def held(self) -> bool:
        return self._held

    def hold(self) -> None:
        with self._lock:
            self._held = True

    def release(self) -> None:
        self._held = False

    def route(self, url: str | None) -> None:
        new = url.rstrip("/") if url else None
        if new != self._url:
            log.info("front: new requests go to %s", new or "(nothing: 503)")
        with self._lock:  # after this, every request bound for the old URL is counted
            self._url = new

    def inflight(self, url: str | None = None) -> int:
        with self._lock:
            if url is None:
                return sum(self._inflight.values())
            return self._inflight[url.rstrip("/")]

    def wait_idle(self, url: str, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while (n := self.inflight(url)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return n

    # -- the ASGI side -----------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        with self._lock:  # choosing the coordinator and counting the request are one step
            url, held = self._url, self._held
            if not held and url is not None:
                self._inflight[url] += 1
        if held or url is None:
            self.refused += 1
            reason = "the model is being swapped" if held else "no model is running"
            await _error(send, 503, f"{reason}; retry shortly", "unavailable_error",
                         retry_after=True)
            return
        try:
            await self._forward(url, scope, receive, send)
        finally:
            with self._lock:
                self._inflight[url] -= 1

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _forward(self, url: str, scope: Scope, receive: Receive, send: Send) -> None:
        if self._client is None:
            # A fresh connection per request: llama-server closes kept-alive connections
            # (after a stream, or on its idle timeout) without warning, and a request sent
            # on such a connection fails before it reaches the server. A connect on the
            # LAN costs nothing next to inference.
            self._client = httpx.AsyncClient(
                timeout=self._timeout, limits=httpx.Limits(max_keepalive_connections=0))
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        target = url + scope["path"] + (("?" + scope["query_string"].decode("latin-1"))
                                        if scope.get("query_string") else "")
        request = self._client.build_request(scope["method"], target, headers=headers,
                                             content=bytes(body))
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException:
            await _error(send, 504, f"the coordinator at {url} did not answer in time",
                         "timeout_error")
            return
        except httpx.TransportError as exc:
            await _error(send, 503, f"the coordinator at {url} is unreachable "
                         f"({type(exc).__name__}); retry shortly", "unavailable_error",
                         retry_after=True)
            return
        try:
            out = [(k.encode("latin-1"), v.encode("latin-1"))
                   for k, v in response.headers.multi_items()
                   if k.lower().encode("latin-1") not in _HOP_BY_HOP]
            if response.status_code == 503 and "retry-after" not in response.headers:
                out.append((b"retry-after", str(RETRY_AFTER_S).encode()))
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": out})
            # Errors from here on propagate: the server then drops the connection, so
            # the client sees a broken response rather than a silently short one.
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


async def _error(send: Send, status: int, message: str, type_: str, *,
                 retry_after: bool = False) -> None:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None,
                                 "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after:
        headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
