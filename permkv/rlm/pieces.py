"""Split a context into pieces of at most `limit` tokens at sentence ends, so that no sentence (a needle,
a fact) is ever cut in two. Only a single sentence longer than the limit is cut, by characters."""

from __future__ import annotations

import re
from collections.abc import Callable

from permkv.checks import positive_int

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
SLACK = 8  # tokens: below limit - SLACK a piece's size is the sum of its sentences' counts, above it is recounted


def sentences(text: str) -> list[str]:
    """`text` as consecutive spans that end after a sentence end or a blank line; "".join gives `text` back."""
    spans, last = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append(text[last : m.end()])
        last = m.end()
    if last < len(text):
        spans.append(text[last:])
    return spans


def _cut(span: str, limit: int, count: Callable[[str], int]) -> list[str]:
    """An over-long sentence cut in halves (by characters) until each part is at most `limit` tokens."""
    if len(span) <= 1 or count(span) <= limit:
        return [span]
    mid = len(span) // 2
    return _cut(span[:mid], limit, count) + _cut(span[mid:], limit, count)


def _pack(spans: list[str], limit: int, count: Callable[[str], int]) -> list[str]:
    pieces: list[str] = []
    current, est = "", 0
    for span in spans:
        n = count(span)
        fits = est + n <= limit - SLACK or (est + n <= limit + SLACK and count(current + span) <= limit)
        if current and not fits:
            pieces.append(current)
            current, est = "", 0
        current += span
        est += n
    if current:
        pieces.append(current)
    return pieces


def split_pieces(text: str, limit: int, count: Callable[[str], int]) -> list[str]:
    """Consecutive pieces of `text` with `count(piece) <= limit`, packing whole sentences greedily.

    `count(text) -> tokens`. "".join(pieces) == text. The number of pieces is the number of calls
    needed to read `text` with `limit` tokens per call.
    """
    positive_int("limit", limit)
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    spans = [part for span in sentences(text) for part in _cut(span, limit, count)]
    out: list[str] = []
    for piece in _pack(spans, limit, count):
        if count(piece) <= limit:  # one exact count per piece (joined text may tokenize differently)
            out.append(piece)
            continue
        inner = sentences(piece)
        if len(inner) < 2:  # one sentence that only overflows when joined: cut it
            out += _cut(piece, limit - SLACK, count)
            continue
        half = len(inner) // 2
        out += split_pieces("".join(inner[:half]), limit, count) + split_pieces("".join(inner[half:]), limit, count)
    return out
