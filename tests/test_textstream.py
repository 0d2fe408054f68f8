"""TextStream: stop strings and UTF-8 across token and round boundaries."""

from __future__ import annotations

import itertools

import pytest

from tightwad.textstream import TextStream

# A toy vocabulary: token i is these bytes.
VOCAB = [b"Hel", b"lo", b" wor", b"ld", b"\n\n", b"END", b"\xe6\x97", b"\xa5", b"!", b"E", b"ND", b" "]
piece = VOCAB.__getitem__


def run(tokens: list[int], rounds: list[int], stops: list[str]) -> tuple[str, int, bool]:
    stream = TextStream(piece, stops)
    out, it = [], iter(tokens)
    for size in rounds:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            break
        update = stream.push(chunk)
        out.append(update.text)
        if update.stopped:
            return "".join(out), update.n_tokens, True
    final = stream.finish()
    out.append(final.text)
    return "".join(out), final.n_tokens, final.stopped


@pytest.mark.parametrize("rounds", [[1] * 20, [2] * 10, [3] * 7, [20]])
def test_stop_string_straddling_rounds_is_never_emitted(rounds):
    # "END" arrives as "E" + "ND": split across tokens and, with 1-token rounds, across rounds.
    text, n, stopped = run([0, 1, 2, 3, 9, 10, 8], rounds, ["END"])
    assert stopped and text == "Hello world" and "E" not in text
    assert n == 6  # up to and including the token that completed the stop string


def test_text_that_only_looks_like_a_stop_prefix_is_released_in_the_end():
    text, n, stopped = run([0, 1, 9], [1, 1, 1], ["END"])
    assert not stopped and text == "HelloE" and n == 3


def test_held_back_prefix_is_released_once_it_diverges():
    stream = TextStream(piece, ["END"])
    assert stream.push([0, 9]).text == "Hel"  # "E" held back: it may start "END"
    assert stream.push([8]).text == "E!"


def test_multibyte_character_split_across_tokens_is_not_broken():
    stream = TextStream(piece, [])
    first = stream.push([6])  # the first two bytes of 日
    assert first.text == "" and first.n_tokens == 0
    second = stream.push([7, 8])
    assert second.text == "日!" and second.n_tokens == 3


def test_earliest_of_several_stops_wins():
    text, _, stopped = run([0, 1, 4, 2, 3, 5], [6], ["END", "\n\n"])
    assert stopped and text == "Hello"


def test_no_stops_releases_everything():
    text, n, stopped = run([0, 1, 2, 3], [1, 3], [])
    assert (text, n, stopped) == ("Hello world", 4, False)
