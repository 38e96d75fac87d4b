"""Argument checks every layer shares, with one wording: a bad value fails early with its name and value."""

from __future__ import annotations

import math


def positive_int(name: str, value, minimum: int = 1) -> int:
    """`value` if it is an int >= `minimum` (bools are not ints here), else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_ratio(ratio, name: str = "ratio") -> float:
    """A compression ratio: a finite number >= 1, "x times smaller" (8 = 8x smaller KV)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 1:
        raise ValueError(f"{name} must be a finite number >= 1 (8 = 8x smaller KV), got {ratio!r}")
    return float(ratio)
