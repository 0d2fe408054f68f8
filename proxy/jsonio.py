"""JSON in and out of the proxy's hot path: orjson where it can, the standard library where it must.

Every round encodes two requests (the whole context, as token ids) and decodes
two answers; with the standard ``json`` module that was about a sixth of the
proxy's CPU per round. orjson does the same several times faster. It is
stricter in two places, and for those the standard library still answers, so
nothing that parsed before fails now:

* ``NaN`` / ``Infinity`` literals (Python's ``json`` writes and reads them);
* integers beyond 64 bits and other values orjson will not encode.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def loads(data: bytes | str) -> Any:
    """Parse JSON; raises ``json.JSONDecodeError`` (or UnicodeDecodeError) on bad input."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # Python's own reader also takes NaN and Infinity; its error is the one raised.
        return json.loads(data)
