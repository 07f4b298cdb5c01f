"""Argument checks at the public boundary: bad input raises where the caller passed it,
with a message naming the argument, never later inside a step."""
from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable, Sequence
from typing import Any


def as_token_ids(values: Any, what: str) -> list[int]:
    """`values` as a list of ints. Floats, strings and bools are refused: a float where an id
    belongs is a bug upstream, and silently truncating it would hide that bug."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of int token ids, got {type(values).__name__}")
    try:
        ids = []
        for t in values:
            if isinstance(t, bool):
                raise TypeError
            ids.append(operator.index(t))
    except TypeError:
        raise TypeError(f"{what} must be a sequence of int token ids, got {values!r:.80}") from None
    return ids


def positive_int(value: Any, what: str) -> int:
    """`value` as an int >= 1; `2.5`, `True` and `"3"` are refused rather than coerced."""
    try:
        n = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        n = None
    if n is None or n < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return n


def finite_time(value: Any, what: str) -> float:
    """A point on a clock: a finite real number (a NaN or an infinity would poison every
    duration computed from it)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return float(value)


def token_id_set(value: int | Sequence[int], what: str) -> frozenset[int]:
    """One id or a sequence of ids, none negative. An id past the vocabulary is allowed: it can
    never be generated, which is harmless (configs carry such ids, e.g. GPT-2's eos on a
    smaller vocabulary)."""
    ids = as_token_ids(value if isinstance(value, Iterable) and not isinstance(value, (str, bytes)) else [value], what)
    bad = [t for t in ids if t < 0]
    if bad:
        raise ValueError(f"{what} must hold token ids >= 0, got {bad[:5]}")
    return frozenset(ids)
