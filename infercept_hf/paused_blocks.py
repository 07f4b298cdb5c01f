"""The device blocks paused requests hold, summed and integrated over time at their changes.

Preserve waste is each paused request's device memory times the time it stays paused. Summing
it over every paused request at every step made a step's cost grow with the requests standing
still; here the sum changes only when a request pauses, resumes or has blocks moved, and each
request's share is settled when its blocks change or it leaves the paused set.
"""
from __future__ import annotations

from .request import Request
from .stats import add_telemetry


class PausedBlocks:
    """Whole-model device blocks of the paused requests: `total` now, and per request the
    byte-seconds since it paused (`telemetry["waste_preserve"]`), over the steps `advance` records."""

    def __init__(self, bytes_per_block: int) -> None:
        self.bytes_per_block = bytes_per_block
        self.total = 0
        self.elapsed = 0.0  # the recorded steps' seconds so far
        self._held: dict[str, tuple[Request, int, float]] = {}  # rid -> (request, blocks, elapsed when last settled)

    def pause(self, req: Request, blocks: int) -> None:
        self._held[req.rid] = (req, blocks, self.elapsed)
        self.total += blocks

    def leave(self, req: Request) -> None:
        """`req` is no longer paused: settle its waste."""
        if req.rid in self._held:
            self._settle(req.rid)
            self.total -= self._held.pop(req.rid)[1]

    def changed(self, rid: str, blocks: int) -> None:
        """A request's device blocks changed (the cache tells every request's; only paused ones count)."""
        if rid in self._held:
            req, old, _ = self._settle(rid)
            self._held[rid] = (req, blocks, self.elapsed)
            self.total += blocks - old

    def advance(self, seconds: float) -> None:
        """A step of `seconds` ended with the blocks as they are now."""
        self.elapsed += seconds

    def _settle(self, rid: str) -> tuple[Request, int, float]:
        req, blocks, since = entry = self._held[rid]
        if blocks and self.elapsed > since:
            add_telemetry(req, "waste_preserve", (self.elapsed - since) * blocks * self.bytes_per_block)
        return entry
