r"""The prefix index: full KV blocks named by their tokens and everything before them.

A full block's name is a hash chained over token ids (transformers' `compute_block_hash`):
block `i` of a request is named by `hash(name of block i-1, tokens[i*B:(i+1)*B])`. The name
says nothing of who wrote the tokens, so a tool answer inside a shared prefix is as
shareable as the system prompt around it::

    request 1: [sys 0..15 | sys 16..31 | answer 32..47 | gen ...]
    request 2: [sys 0..15 | sys 16..31 | other ...]   -> blocks 0 and 1 are read by both

transformers' `BlockLedger` (one per allocator) owns the reference counts, the names and
the unreferenced blocks kept for reuse; this class decides when to name a block, when to
reuse one, when to evict, and what a request holds alone. A block is referenced by every
block table that lists it (and a copy to host in flight); it goes back to the pool only when
the last reference is dropped and it holds no name, or when it is evicted from the cache of
named unreferenced blocks, least recently released first. Those cached blocks count as free.

Only full blocks are named, and a request writes only past its cached length, so a shared
block is never written; `own_tail` copies one first if a request ever must (copy-on-write).

Sliding-window layers are excluded: their blocks form a ring that is overwritten in place
once the window wraps, so a block's content is not a function of the tokens before it.
"""
from __future__ import annotations

from typing import Any

from .patches import paged_pool as pp

SLIDING_REASON = (
    "the model has sliding-window layers: their blocks are a ring overwritten in place once the window wraps, "
    "so a block's content is not named by its tokens; prefix sharing is off for it"
)


class PrefixIndex:
    """Sharing of full KV blocks between the requests of one paged cache (full-attention models)."""

    def __init__(self, cache: Any, enabled: bool) -> None:
        self.cache = cache
        self.block_size = cache.block_size
        allocs = list(pp.allocators(cache).values())
        self.off_reason: str | None = None
        if not enabled:
            self.off_reason = "prefix_sharing=False"
        elif len(allocs) != 1 or not pp.shares_blocks(allocs[0]):
            self.off_reason = SLIDING_REASON
        self.enabled = self.off_reason is None
        self.alloc = allocs[0]
        self.hit_tokens = 0  # tokens served from the index instead of computed, over all requests
        self.host_hit_tokens = 0  # of those, tokens copied in from another request's host copy
        self._host_names: dict[int, int] = {}  # host block -> the name of the content it holds
        self._host_by_name: dict[int, int] = {}  # name -> a host block holding it
        self._indexed: dict[str, int] = {}  # rid -> leading blocks of its table known to be named
        self._touched: set[int] = set()  # device blocks whose reference count changed since `take_touched`

    # ------------------------------------------------------------------ naming and reuse
    def index(self, rid: str, tokens: list[int], computed: int) -> None:
        """Name the request's blocks that `computed` tokens fill (a block is named once it is full)."""
        table = pp.block_tables(self.alloc).get(rid)
        if not table:
            return
        bs = self.block_size
        full = min(computed // bs, len(table))
        i = min(self._indexed.get(rid, 0), len(table))
        while i and pp.block_hash(self.alloc, table[i - 1]) is None:  # the table lost blocks since
            i -= 1
        parent = pp.block_hash(self.alloc, table[i - 1]) if i else None
        for i in range(i, full):
            h = pp.block_hash(self.alloc, table[i])
            if h is None:
                h, _ = pp.hashed_block(self.alloc, parent, tokens[i * bs:(i + 1) * bs])
                own = table[i]
                pp.index_block(self.cache, self.alloc, rid, i, h)
                if table[i] != own:  # it now reads another block of the same content
                    self._touched.update((own, table[i]))
            parent = h
        self._indexed[rid] = max(full, 0)

    def attach(self, rid: str, tokens: list[int], computed: int) -> int:
        """Extend the request's device blocks with the longest run of named blocks that continues
        them (at least one token is left to compute, for the logits). Returns the tokens gained.

        The request's cached tokens must end on a block boundary, with no tail on host."""
        bs = self.block_size
        table = pp.block_tables(self.alloc).setdefault(rid, [])
        if computed != len(table) * bs:
            if not table:
                del pp.block_tables(self.alloc)[rid]
            return 0
        parent = pp.block_hash(self.alloc, table[-1]) if table else None
        start = len(table)
        if start and parent is None:
            return 0
        for i in range(start, (len(tokens) - 1) // bs):
            parent, block = pp.hashed_block(self.alloc, parent, tokens[i * bs:(i + 1) * bs])
            if block is not None:
                pp.acquire(self.alloc, block)
                self._touched.add(block)
            elif (block := self._from_host(parent)) is None:
                break
            table.append(block)
        if not table:
            del pp.block_tables(self.alloc)[rid]
        gained = (len(table) - start) * bs
        self.hit_tokens += gained
        self._indexed[rid] = len(table)
        return gained

    def release(self, alloc: Any, ids: list[int]) -> None:
        """Drop one reference to each block (see `paged_pool.release_refs`), noting the change."""
        pp.release_refs(self.cache, alloc, ids)
        if self.enabled:
            self._touched.update(ids)

    def releasing(self, rid: str) -> None:
        """Every device block of the request is about to lose its reference (transformers frees them)."""
        if self.enabled:
            self._touched.update(self.device_table(rid))

    def take_touched(self) -> set[int]:
        """The device blocks whose reference count changed since the last call."""
        touched, self._touched = self._touched, set()
        return touched

    def device_table(self, rid: str) -> list[int]:
        """The request's device blocks, in order."""
        return pp.block_tables(self.alloc).get(rid, [])

    def forget(self, rid: str) -> None:
        self._indexed.pop(rid, None)

    # ------------------------------------------------------------------ host copies
    def note_host_copies(self, host_ids: list[int], names: list[int | None]) -> None:
        """Host blocks now hold these named contents (a swap-out's copies have landed)."""
        for h, name in zip(host_ids, names):
            if name is not None:
                self._host_names[h] = name
                self._host_by_name.setdefault(name, h)

    def named_host_blocks(self) -> set[int]:
        return set(self._host_names)

    def forget_host_copies(self, host_ids: list[int]) -> None:
        """These host blocks go back to the host pool: their contents are gone."""
        for h in host_ids:
            name = self._host_names.pop(h, None)
            if name is not None and self._host_by_name.get(name) == h:
                del self._host_by_name[name]

    def device_copy(self, host_id: int) -> int | None:
        """The device block that still holds this host block's named content, now referenced once
        more (a swap-in takes it instead of copying), or None."""
        name = self._host_names.get(host_id) if self.enabled else None
        block = pp.named_block(self.alloc, name) if name is not None else None
        if block is not None:
            pp.acquire(self.alloc, block)
            self._touched.add(block)
        return block

    def _from_host(self, name: int) -> int | None:
        """A fresh device block holding the named content, copied from a host block (its owner keeps
        that one), or None when no host block holds it or no device block is free."""
        host_id = self._host_by_name.get(name)
        if host_id is None:
            return None
        self.make_room(1)
        if self.cache.free_device_blocks() < 1:
            return None
        block = pp.take_blocks(self.cache, self.alloc, 1)[0]
        self.cache.load_host_block(host_id, block)
        pp.name_block(self.alloc, block, name)
        self.host_hit_tokens += self.block_size
        return block

    # ------------------------------------------------------------------ what a request holds alone
    def shared_blocks(self, rid: str) -> int:
        """Leading device blocks of the request that another table (or copy) also references:
        keeping them costs nothing and dropping them frees nothing. Shared blocks are a prefix,
        since a block's name chains over every block before it."""
        if not self.enabled:
            return 0
        n = 0
        for b in pp.block_tables(self.alloc).get(rid, ()):
            if pp.ref_count(self.alloc, b) < 2:
                break
            n += 1
        return n

    def own_tail(self, rid: str, past_len: int) -> bool:
        """Copy-on-write: before tokens are written at `past_len`, give the request its own copy of
        the block they land in if that block is shared or named. False when no block is free."""
        table = pp.block_tables(self.alloc).get(rid, ())
        i = past_len // self.block_size
        if not self.enabled or i >= len(table):
            return True
        old = table[i]
        if pp.block_hash(self.alloc, old) is None and pp.ref_count(self.alloc, old) < 2:
            return True
        self.make_room(1)
        if self.cache.free_device_blocks() < 1:
            return False
        new = pp.take_blocks(self.cache, self.alloc, 1)[0]
        pp.copy_block(self.alloc, old, new)
        table[i] = new
        self.release(self.alloc, [old])
        self._indexed[rid] = min(self._indexed.get(rid, 0), i)
        return True

    # ------------------------------------------------------------------ the cache of unreferenced blocks
    def cached_blocks(self) -> int:
        """Named blocks no request references, kept for reuse: free for anyone who needs room."""
        return pp.count_cached(self.alloc) if self.enabled else 0

    def extra_references(self) -> int:
        """References to device blocks beyond the first: what per-request counts overstate."""
        return pp.extra_references(self.alloc) if self.enabled else 0

    def shared_in_use(self) -> int:
        """Device blocks referenced by more than one table."""
        return pp.count_shared(self.alloc) if self.enabled else 0

    def make_room(self, blocks: int) -> None:
        """Evict cached blocks, least recently released first, until `blocks` sit free in the pool."""
        if not self.enabled:
            return
        pool_free = pp.count_free_blocks(self.cache, self.alloc) + pp.num_free_sectors(self.cache) * pp.blocks_per_sector(self.alloc)
        short = blocks - pool_free
        if short > 0:
            pp.evict_cached(self.cache, self.alloc, short)
