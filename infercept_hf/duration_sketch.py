"""A tool's recent call durations, in bounded memory: what `predictive` reads quantiles from.

A mean hides the shape that decides a pause: a tool that answers in 1 s nine times out of ten
and in 60 s the tenth has a mean of 7 s, yet a pause of it is either short or very long.
The sketch keeps the last `capacity` durations in a ring (O(capacity) memory for ever, and
it follows a tool whose latency drifts with load, as the running mean does) and a sorted copy,
rebuilt only when a sample arrives after a read, so the many reads of one step cost one sort.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

DEFAULT_CAPACITY = 64


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The `q` quantile of ascending `sorted_values`, linearly interpolated between order
    statistics (position `q * (n - 1)`, numpy's default), so the figures can be checked by hand."""
    if not sorted_values:
        raise ValueError("quantile of no values")
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


class DurationSketch:
    """The most recent `capacity` durations of one tool (seconds)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity!r}")
        self.capacity = capacity
        self._ring: list[float] = []
        self._next = 0  # where the next sample overwrites the oldest, once the ring is full
        self._sorted: list[float] | None = []

    def __len__(self) -> int:
        return len(self._ring)

    def add(self, seconds: float) -> None:
        if len(self._ring) < self.capacity:
            self._ring.append(seconds)
        else:
            self._ring[self._next] = seconds
        self._next = (self._next + 1) % self.capacity
        self._sorted = None

    def sorted(self) -> list[float]:
        """The kept durations, ascending (shared: do not modify)."""
        if self._sorted is None:
            self._sorted = sorted(self._ring)
        return self._sorted

    def quantile(self, q: float) -> float:
        return quantile(self.sorted(), q)

    def outliving(self, elapsed_s: float) -> list[float]:
        """The kept durations longer than `elapsed_s`, ascending: the calls this pause may still
        resemble, since it has already outlived the others."""
        values = self.sorted()
        return values[bisect.bisect_right(values, elapsed_s):]
