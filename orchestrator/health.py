"""Is a server answering: the RPC port probe for workers, /health for coordinators."""

from __future__ import annotations

import socket

import httpx


def rpc_probe(address: str, port: int, *, timeout_s: float = 1.5) -> str:
    """``open``, ``busy`` or ``closed``: what an RPC server's port says to a connection.

    * open: the connection was accepted and stays open (the server never speaks
      first). Docker's userland proxy accepts for a published port even when
      nothing listens behind it, but then closes at once, which reads as closed.
    * busy: the connection attempt timed out. The RPC server serves one client
      at a time with a listen backlog of 1, so while a coordinator holds it a
      couple of queued connections fill the queue and later ones go unanswered.
      (Or a firewall drops them; it cannot be told apart from here.)
    * closed: refused, reset or closed: nothing is listening.

    The server later accepts our closed connection and drops it, which is harmless
    because the image runs it with SIGPIPE ignored."""
    try:
        with socket.create_connection((address, port), timeout=timeout_s) as s:
            s.settimeout(0.3)
            try:
                return "open" if s.recv(1) != b"" else "closed"
            except TimeoutError:
                return "open"
    except TimeoutError:
        return "busy"
    except OSError:
        return "closed"


def rpc_reachable(address: str, port: int, *, timeout_s: float = 1.5) -> bool:
    return rpc_probe(address, port, timeout_s=timeout_s) != "closed"


def http_healthy(url: str, *, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False
