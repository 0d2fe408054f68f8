"""Reading JSON request bodies field by field, with errors that name the field.

Both HTTP apps (the proxy and the verifier) read their bodies through
``RequestBody`` so that every bad field becomes one ``InvalidRequest`` with
``param`` set, and the single error handler turns it into an OpenAI-style body.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tightwad.errors import InvalidRequest

_MISSING: Any = object()


def parse_json_body(raw: bytes, *, max_bytes: int | None = None) -> dict[str, Any]:
    if max_bytes is not None and len(raw) > max_bytes:
        raise InvalidRequest(
            f"request body is {len(raw)} bytes; the limit is {max_bytes}",
            param="body",
            code="request_too_large",
            status_code=413,
        )
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", param="body") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object", param="body")
    return data


class RequestBody:
    def __init__(self, data: dict[str, Any], prefix: str = ""):
        self.data = data
        self.prefix = prefix

    def _name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def _get(self, key: str, default: Any) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING or value is None:
            if default is _MISSING:
                raise InvalidRequest(f"'{self._name(key)}' is required", param=self._name(key))
            return default
        return value

    def _fail(self, key: str, expected: str, value: Any) -> InvalidRequest:
        shown = json.dumps(value)[:80]
        return InvalidRequest(
            f"'{self._name(key)}' must be {expected}, got {shown}", param=self._name(key)
        )

    def int(
        self, key: str, default: Any = _MISSING, *, min: int | None = None, max: int | None = None
    ) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, "an integer", value)
        if (min is not None and value < min) or (max is not None and value > max):
            raise self._fail(key, f"an integer in [{min}, {max}]", value)
        return value

    def float(
        self, key: str, default: Any = _MISSING, *, min: float | None = None, max: float | None = None
    ) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._fail(key, "a number", value)
        if (min is not None and value < min) or (max is not None and value > max):
            raise self._fail(key, f"a number in [{min}, {max}]", value)
        return float(value)

    def bool(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def str(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            raise self._fail(key, "a string", value)
        return value

    def token_ids(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in value
        ):
            raise self._fail(key, "a list of token ids (integers)", value)
        return value

    def token_id_lists(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list):
            raise self._fail(key, "a list of lists of token ids", value)
        for i, _ in enumerate(value):
            self.sub_list(key, i)
        return value

    def sub_list(self, key: str, index: int) -> list[int]:
        item = self.data[key][index]
        if not isinstance(item, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in item
        ):
            raise InvalidRequest(
                f"'{self._name(key)}[{index}]' must be a list of token ids", param=self._name(key)
            )
        return item

    def object(self, key: str) -> RequestBody | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._fail(key, "an object", value)
        return RequestBody(value, prefix=f"{self._name(key)}.")

    def raw(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)
