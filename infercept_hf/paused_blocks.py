"""The blocks paused requests hold, kept at their changes so that a step never walks the paused set.

Preserve waste is each paused request's device memory times the time it stays paused. Summing
it over every paused request at every step made a step's cost grow with the requests standing
still; here the sum changes only when a request pauses, resumes or has blocks moved, and each
request's share is settled when its blocks change or it leaves the paused set. Only the blocks a
request holds alone count: a block shared with another request costs nothing to keep. Other
requests taking or dropping shares change that count too; the paused requests listing each
device block are kept, so only those reading a block whose reference count changed are recounted. For the same
reason the paused requests that still hold device blocks (the ones min-waste places each step)
and the host blocks the paused requests hold (host room a longer pause may give up, found
through `LongerPauses`) are kept here as the cache reports its changes, not found by a scan.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from .longer_pauses import LongerPauses
from .request import Request
from .stats import add_telemetry


class PausedBlocks:
    """Whole-model blocks of the paused requests: device blocks held alone `total` now, `holders`
    (those with any device blocks), `host_total` and `host_holders`, and per request the
    byte-seconds since it paused (`telemetry["waste_preserve"]`), over the steps `advance` records.
    `alone(rid)` says how many of a request's device blocks no other request reads, `blocks_of(rid)`
    which blocks its table lists."""

    def __init__(self, bytes_per_block: int, alone: Callable[[str], int],
                 blocks_of: Callable[[str], Sequence[int]]) -> None:
        self.bytes_per_block = bytes_per_block
        self.alone = alone
        self.blocks_of = blocks_of
        self._tables: dict[str, tuple[int, ...]] = {}  # paused rid -> its device blocks
        self._readers: dict[int, set[str]] = {}  # device block -> the paused requests listing it
        self.total = 0
        self.host_total = 0
        self.elapsed = 0.0  # the recorded steps' seconds so far
        self._held: dict[str, tuple[Request, int, float]] = {}  # rid -> (request, blocks, elapsed when last settled)
        self._host: dict[str, int] = {}  # rid -> host blocks, paused requests with some
        self.holders: dict[str, Request] = {}  # paused requests holding device blocks, by rid
        self.host_holders: dict[str, Request] = {}  # paused requests holding host blocks, by rid
        self.host_by_pause = LongerPauses()  # the same, by tool and pause start

    def pause(self, req: Request, device_blocks: int, host_blocks: int) -> None:
        blocks = self.alone(req.rid) if device_blocks else 0
        self._held[req.rid] = (req, blocks, self.elapsed)
        self.total += blocks
        self._list_blocks(req.rid)
        if device_blocks:
            self.holders[req.rid] = req
        self._set_host(req, host_blocks)

    def leave(self, req: Request) -> None:
        """`req` is no longer paused: settle its waste."""
        if req.rid in self._held:
            self._settle(req.rid)
            self.total -= self._held.pop(req.rid)[1]
            self.holders.pop(req.rid, None)
            self._unlist_blocks(req.rid)
            self._set_host(req, 0)

    def changed(self, rid: str, device_blocks: int) -> None:
        """A request's device blocks changed (the cache tells every request's; only paused ones count)."""
        if rid in self._held:
            req = self._recount(rid, self.alone(rid) if device_blocks else 0)
            self._unlist_blocks(rid)
            self._list_blocks(rid)
            if device_blocks:
                self.holders[rid] = req
            else:
                self.holders.pop(rid, None)

    def shares_changed(self, blocks: Iterable[int]) -> None:
        """Other requests took or dropped references to these blocks: what the paused requests
        listing them hold alone may differ."""
        for rid in {rid for b in blocks for rid in self._readers.get(b, ())}:
            self._recount(rid, self.alone(rid))

    def _list_blocks(self, rid: str) -> None:
        self._tables[rid] = table = tuple(self.blocks_of(rid))
        for b in table:
            self._readers.setdefault(b, set()).add(rid)

    def _unlist_blocks(self, rid: str) -> None:
        for b in self._tables.pop(rid, ()):
            readers = self._readers[b]
            readers.discard(rid)
            if not readers:
                del self._readers[b]

    def _recount(self, rid: str, blocks: int) -> Request:
        req, old, _ = self._settle(rid)
        self._held[rid] = (req, blocks, self.elapsed)
        self.total += blocks - old
        return req

    def host_changed(self, rid: str, blocks: int) -> None:
        """A request's host blocks changed (as `changed`, for the host pool)."""
        if rid in self._held:
            self._set_host(self._held[rid][0], blocks)

    def request(self, rid: str) -> Request:
        """The paused request `rid`."""
        return self._held[rid][0]

    def advance(self, seconds: float) -> None:
        """A step of `seconds` ended with the blocks as they are now."""
        self.elapsed += seconds

    def _set_host(self, req: Request, blocks: int) -> None:
        self.host_total += blocks - self._host.pop(req.rid, 0)
        if blocks:
            self._host[req.rid] = blocks
            self.host_holders[req.rid] = req
            self.host_by_pause.add(req)
        else:
            self.host_holders.pop(req.rid, None)
            self.host_by_pause.remove(req)

    def _settle(self, rid: str) -> tuple[Request, int, float]:
        req, blocks, since = entry = self._held[rid]
        if blocks and self.elapsed > since:
            add_telemetry(req, "waste_preserve", (self.elapsed - since) * blocks * self.bytes_per_block)
        return entry
