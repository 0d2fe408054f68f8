"""The typed-getter layer the config section parsers are written with.

``Reader`` wraps one YAML mapping at a dotted path; every getter checks one
key's type and range, so every error names its full key (e.g.
``workers[1].gpus[0].vram_gb``), and ``done()`` rejects keys nobody read, with
a "did you mean" suggestion.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit

from tightwad.errors import ConfigError

REQUIRED: Any = object()  # default= for keys that must be given


def show(value: Any) -> str:
    """A value as the error message quotes it, in YAML's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return repr(value) if isinstance(value, str) else str(value)


class Reader:
    """One YAML mapping at a dotted path. Each getter records the key it read, checks
    its type and returns ``default`` when the key is absent or null; ``done()``
    then rejects the keys nobody read."""

    def __init__(self, data: Any, path: str, *, expected: str = "a mapping"):
        if not isinstance(data, Mapping):
            raise ConfigError(path, f"expected {expected}, got {show(data)}")
        self.data = data
        self.path = path
        self._read: dict[str, None] = {}  # ordered set

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        self._read[name] = None
        return self.data.get(name) is not None

    def raw(self, name: str, default: Any = REQUIRED) -> Any:
        self._read[name] = None
        value = self.data.get(name)
        if value is None:
            if default is REQUIRED:
                self.missing(name)
            return default
        return value

    def missing(self, name: str, hint: str = "") -> NoReturn:
        """Raise that ``name`` is required, or that a key next to it is its misspelling."""
        for other in self.data:  # a misspelt key is likelier than a forgotten one
            if other in self._read or not isinstance(other, str):
                continue
            if difflib.get_close_matches(name, [other], cutoff=0.6):
                raise ConfigError(self.key(other), f"unknown key; did you mean {name!r}?")
        raise ConfigError(self.key(name), "is required" + hint)

    def _fail(self, name: str, expected: str, value: Any) -> NoReturn:
        raise ConfigError(self.key(name), f"expected {expected}, got {show(value)}")

    def str(
        self,
        name: str,
        default: Any = REQUIRED,
        *,
        pattern: re.Pattern[str] | None = None,
        expected: str = "a non-empty string",
        empty: bool = False,
    ) -> Any:
        value = self.raw(name, default)
        if value is default or (empty and value == ""):
            return value
        if (
            not isinstance(value, str)
            or not value.strip()
            or (pattern and not pattern.match(value))
        ):
            self._fail(name, expected, value)
        return value

    def int(
        self,
        name: str,
        default: Any = REQUIRED,
        *,
        min: int | None = None,
        max: int | None = None,
        extra: str = "",
    ) -> Any:
        value = self.raw(name, default)
        if value is default:
            return value
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or (min is not None and value < min)
            or (max is not None and value > max)
        ):
            if min is not None and max is not None:
                expected = f"an integer between {min} and {max}"
            else:
                expected = "an integer" + (f" >= {min}" if min is not None else "")
            self._fail(name, expected + extra, value)
        return value

    def number(
        self, name: str, default: Any = REQUIRED, *, gt: float = 0, max: float | None = None
    ) -> Any:
        value = self.raw(name, default)
        if value is default:
            return value
        # gt just below 0 admits 0 ("a number >= 0" in the message).
        expected = f"a number > {gt}" if gt >= 0 else "a number >= 0"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            self._fail(name, expected, value)
        if value <= gt:
            self._fail(name, expected, value)
        if max is not None and value > max:
            self._fail(name, f"a number <= {max}", value)
        return float(value)

    def bool(self, name: str, default: Any = REQUIRED) -> Any:
        value = self.raw(name, default)
        if value is not default and not isinstance(value, bool):
            self._fail(name, "true or false", value)
        return value

    def enum(
        self,
        name: str,
        choices: Sequence[str],
        default: Any = REQUIRED,
        *,
        aliases: Mapping[str, str] | None = None,
    ) -> Any:
        value = self.raw(name, default)
        if value is default:
            return value
        canonical = value.strip().lower() if isinstance(value, str) else value
        canonical = (aliases or {}).get(canonical, canonical)
        if canonical not in choices:
            self._fail(name, "one of " + ", ".join(choices), value)
        return canonical

    def url(self, name: str, default: Any = REQUIRED) -> Any:
        value = self.raw(name, default)
        if value is default:
            return value
        ok = False
        if isinstance(value, str):
            try:
                parts = urlsplit(value)
                parts.port  # noqa: B018 -- raises ValueError on a bad port
                ok = parts.scheme in ("http", "https") and bool(parts.hostname)
                ok = ok and not parts.query and not parts.fragment
            except ValueError:
                ok = False
        if not ok:
            self._fail(name, "a URL like http://host:port", value)
        return value.rstrip("/")

    def sub(self, name: str) -> Reader | None:
        value = self.raw(name, None)
        return None if value is None else Reader(value, self.key(name))

    def items(self, name: str) -> list[Reader]:
        value = self.raw(name, [])
        if not isinstance(value, list):
            self._fail(name, "a list", value)
        return [Reader(item, f"{self.key(name)}[{i}]") for i, item in enumerate(value)]

    def entries(
        self, name: str, pattern: re.Pattern[str], expected: str
    ) -> list[tuple[str, Reader]]:
        value = self.raw(name, {})
        if not isinstance(value, Mapping):
            self._fail(name, "a mapping of names to settings", value)
        out = []
        for entry, item in value.items():
            key = f"{self.key(name)}.{entry}"
            if not isinstance(entry, str) or not pattern.match(entry):
                raise ConfigError(key, f"expected {expected} as the name, got {show(entry)}")
            out.append((entry, Reader({} if item is None else item, key)))  # null: defaults
        return out

    def done(self) -> None:
        for name in self.data:
            if name in self._read:
                continue
            close = difflib.get_close_matches(str(name), list(self._read), n=1, cutoff=0.6)
            hint = (
                f"did you mean {close[0]!r}?" if close else "valid keys: " + ", ".join(self._read)
            )
            raise ConfigError(self.key(str(name)), f"unknown key; {hint}")
