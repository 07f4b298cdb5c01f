"""What each request has in the KV cache: the one record of cached tokens and of what moves changed.

The paged cache writes these records from its own moves (a forward's new tokens, a discard,
a dropped host copy, a swap), so how many of a request's tokens are cached, how many of
those still sit on the device, and how many bytes crossed the host link for it are known in
one place; the scheduler and the stats read them and never reconcile block counts themselves.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class KVRecord:
    """One request's cached state; only the cache that holds its blocks changes it."""

    computed: int = 0  # tokens at the front of its token log with KV in the cache (device head + host tail)
    high_water: int = 0  # most tokens ever computed: anything below it computed again is recomputation
    swapped_bytes: int = 0  # KV bytes moved over the host link for it, out and in
    reused: int = 0  # tokens whose KV it took from blocks other requests computed (the prefix index)


class KVLedger:
    """The records of the requests a cache holds, by block-table key."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._records: dict[str, KVRecord] = {}

    def track(self, rid: str, record: KVRecord) -> None:
        self._records[rid] = record

    def drop(self, rid: str) -> None:
        self._records.pop(rid, None)

    def computed(self, rid: str) -> int:
        record = self._records.get(rid)
        return record.computed if record is not None else 0

    def add_computed(self, rid: str, n: int) -> None:
        """A forward wrote the KV of `n` more tokens."""
        record = self._records[rid]
        record.computed += n
        record.high_water = max(record.high_water, record.computed)

    def add_reused(self, rid: str, n: int) -> None:
        """`n` more tokens came from shared blocks instead of a forward."""
        record = self._records[rid]
        record.computed += n
        record.reused += n
        record.high_water = max(record.high_water, record.computed)

    def keep_within(self, rid: str, blocks: int) -> None:
        """Blocks were dropped from the tail: what is cached now fits in the `blocks` left."""
        record = self._records.get(rid)
        if record is not None:
            record.computed = min(record.computed, blocks * self.block_size)

    def truncate(self, rid: str, num_tokens: int) -> None:
        """The token log was cut back to `num_tokens` and goes on differently: KV past it is stale,
        and tokens past it computed later are new ones, not recomputation."""
        record = self._records.get(rid)
        if record is not None:
            record.computed = min(record.computed, num_tokens)
            record.high_water = min(record.high_water, num_tokens)

    def add_swapped(self, rid: str, nbytes: int) -> None:
        record = self._records.get(rid)
        if record is not None:
            record.swapped_bytes += nbytes
