"""From output tokens to the text a client sees: UTF-8 and stop strings.

Tokens arrive a round at a time, and neither a multi-byte character nor a stop
string respects round or chunk boundaries. ``TextStream`` therefore releases
text only when it is certain: never half a character, and never characters
that could still turn out to be the start of a stop string. A stop string is
never emitted, wherever it falls.
"""

from __future__ import annotations

import bisect
import codecs
import dataclasses
from collections.abc import Callable, Sequence


@dataclasses.dataclass(slots=True)
class TextUpdate:
    text: str  # newly released text
    n_tokens: int  # tokens released so far (their text has been fully emitted or cut by a stop)
    stopped: bool = False  # a stop string was found; nothing after it will be released


class TextStream:
    def __init__(self, piece: Callable[[int], bytes], stops: Sequence[str] = ()):
        self._piece = piece
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""  # everything decoded so far
        self._emitted = 0  # characters of _text already released
        self._token_end_chars: list[int] = []  # per token: chars decoded once its bytes were in
        self._n_released = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """All text released so far."""
        return self._text[: self._emitted]

    def push(self, tokens: Sequence[int]) -> TextUpdate:
        if self.stopped:
            return TextUpdate("", self._n_released, True)
        for t in tokens:
            self._text += self._decoder.decode(self._piece(t))
            # A token ending mid-character is done only once that character is.
            pending = 1 if self._decoder.getstate()[0] else 0
            self._token_end_chars.append(len(self._text) + pending)
        hit = self._find_stop()
        if hit is not None:
            start, end = hit
            out = self._text[self._emitted : start]
            self._emitted = start
            # Count the tokens up to the one that completed the stop string.
            self._n_released = next(
                (i + 1 for i, e in enumerate(self._token_end_chars) if e >= end),
                len(self._token_end_chars),
            )
            self.stopped = True
            return TextUpdate(out, self._n_released, True)
        safe = len(self._text) - self._held_back()
        out = self._text[self._emitted : safe] if safe > self._emitted else ""
        self._emitted = max(self._emitted, safe)
        # _token_end_chars never decreases, so the released tokens are a prefix of it.
        self._n_released = bisect.bisect_right(self._token_end_chars, self._emitted)
        return TextUpdate(out, self._n_released)

    def finish(self) -> TextUpdate:
        """Release everything held back (the generation ended without a stop string)."""
        if self.stopped:
            return TextUpdate("", self._n_released, True)
        self._text += self._decoder.decode(b"", final=True)
        out = self._text[self._emitted :]
        self._emitted = len(self._text)
        self._n_released = len(self._token_end_chars)
        return TextUpdate(out, self._n_released)

    def _find_stop(self) -> tuple[int, int] | None:
        if not self._stops:
            return None
        begin = max(0, self._emitted - self._longest + 1)
        best: tuple[int, int] | None = None
        for s in self._stops:
            i = self._text.find(s, begin)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, i + len(s))
        return best

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        tail_max = min(self._longest - 1, len(self._text) - self._emitted)
        for n in range(tail_max, 0, -1):
            tail = self._text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
