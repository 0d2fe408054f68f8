#!/usr/bin/env python3
"""Docker HEALTHCHECK for Tightwad's images: exit 0 when the service answers.

Checks the URL given as the first argument, else $TIGHTWAD_HEALTH_URL:
``http://...`` must answer 200 (llama-server, the verifier and the proxy all
answer 503 while loading); ``tcp://host:port`` must accept a connection
(llama.cpp's rpc-server speaks no HTTP). Standard library only.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

TIMEOUT_S = 4.0


def check(url: str) -> str | None:
    """None when healthy, else why not."""
    parts = urlsplit(url)
    if parts.scheme == "tcp":
        if not parts.hostname or not parts.port:
            return f"{url}: expected tcp://host:port"
        try:
            with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT_S):
                return None
        except OSError as exc:
            return f"{url}: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"{url}: expected an http://, https:// or tcp:// URL"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return None if response.status == 200 else f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {getattr(exc, 'reason', exc)}"


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else os.environ.get("TIGHTWAD_HEALTH_URL", "")
    if not url:
        print("no health URL: pass one or set TIGHTWAD_HEALTH_URL", file=sys.stderr)
        return 1
    problem = check(url)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
