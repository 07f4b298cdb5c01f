r"""InterceptPagedCache: transformers' paged KV cache plus a host pool, swap and discard.

Device memory is transformers' `PagedAttentionCache` (one flat tensor cut into blocks of
`block_size` tokens x every layer). We add a host pool with the same block geometry, so a
block moves between the two with one row copy of the allocator's `_copy_view`
(`[num_blocks, bytes_per_block]`)::

    device  [ blk 7 | blk 2 | blk 9 ]          request 3: tokens 0..47, block_size 16
                \       \       \
    swap out the tail 1 block  ->  host [ hblk 0 ]
    afterwards: device table [7, 2], host table [0]; tokens 0..31 on device, 32..47 on host

A request's KV is always `device head + host tail`, in token order; moves take whole
blocks off the tail, so the layout survives any sequence of swap-out, swap-in and discard.
Models with sliding-window layers keep ring-ordered block tables, so only whole-request
moves are allowed there (`supports_partial` is False).

The cache is also the one writer of each request's `KVRecord` (`kv_ledger.py`): tokens
computed, and what every move changed, so nobody else reconciles block counts with them.

With prefix sharing (`prefix_index.py`) a full device block may be listed by several
requests' tables; moves then drop the request's reference rather than free the block, so no
request frees or moves a block another one reads. Accounting is exact and checked by
`check_integrity()`: every device block is free, cached for reuse, or referenced exactly as
many times as the tables (and copies in flight) list it; every host block is free or owned by
one request. Per-request block counts and their
totals are kept as running figures (`_Tally`), resynced wherever a block table changes,
because the scheduler and the stats read them several times per request per step;
`check_integrity()` recounts them from the tables.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .kv_ledger import KVLedger, KVRecord
from .model_spec import ModelSpec
from .offload import SwapPipeline, Transfer
from .patches import paged_pool as pp
from .patches.paged_cache import PagedCacheBase
from .patches.transformers_cb import FULL_ATTENTION
from .prefix_index import PrefixIndex


class HostPool:
    """Host-memory blocks for one allocator; pinned when CUDA is present (faster, async copies)."""

    def __init__(self, num_blocks: int, bytes_per_block: int, device: torch.device | str) -> None:
        kind = torch.device(device).type
        pin = torch.cuda.is_available() and kind == "cuda"
        host_device = "meta" if kind == "meta" else "cpu"
        self.storage = torch.empty((num_blocks, bytes_per_block), dtype=torch.uint8, device=host_device, pin_memory=pin)
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out the lowest id first
        self.tables: dict[str, list[int]] = {}
        self.on_give_back: Callable[[list[int]], None] | None = None  # told the blocks given back

    def take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise MemoryError(f"host pool has {len(self.free)} free blocks, {n} requested")
        return [self.free.pop() for _ in range(n)]

    def give_back(self, ids: list[int]) -> None:
        if self.on_give_back is not None:
            self.on_give_back(ids)
        self.free.extend(ids)
        self.free.sort(reverse=True)


class _Tally:
    """Blocks held per request and their sum, read in O(1); `set` is the one place either changes."""

    __slots__ = ("held", "total", "on_change")

    def __init__(self) -> None:
        self.held: dict[str, int] = {}  # requests that hold no block are absent
        self.total = 0
        self.on_change: Callable[[str, int], None] | None = None  # told each request's new count

    def set(self, rid: str, n: int) -> None:
        old = self.held.pop(rid, 0)
        self.total += n - old
        if n:
            self.held[rid] = n
        if n != old and self.on_change is not None:
            self.on_change(rid, n)


def _pop_tail(table: list[int], n: int) -> list[int]:
    """Cut the last `n` ids off a block table (in place) and return them in table order; all of
    them when the table is shorter (a sliding-window group holds fewer blocks than a full one,
    and a whole-request move counts the longest table)."""
    cut = max(0, len(table) - n)
    tail = table[cut:]
    del table[cut:]
    return tail


class InterceptPagedCache(PagedCacheBase):
    """The paged KV cache of transformers with interception moves and exact accounting."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        num_blocks: int,
        block_size: int,
        num_host_blocks: int,
        max_batch_tokens: int,
        distributed_helper=None,
        swap_mode: str | None = None,
        prefix_sharing: bool = True,
    ) -> None:
        if num_blocks < 1 or block_size < 1 or num_host_blocks < 0:
            raise ValueError(
                f"need num_blocks >= 1, block_size >= 1, num_host_blocks >= 0; got {num_blocks}, {block_size}, {num_host_blocks}"
            )
        device = spec.device
        super().__init__(spec.config, num_blocks, block_size, max_batch_tokens, device, spec.dtype, distributed_helper,
                         block_sharing=prefix_sharing)
        self.spec = spec
        self.block_size = block_size
        self.allocators = pp.allocators(self)
        self.full_attention_only = list(self.allocators) == [FULL_ATTENTION]
        # most models have one attention type: per-request figures then need no max over allocators
        self._only_allocator = next(iter(self.allocators.values())) if len(self.allocators) == 1 else None
        # The host pool mirrors the device pool's split between allocators (one per attention type).
        self.host = {
            name: HostPool(num_host_blocks, pp.bytes_per_block(alloc), device)
            for name, alloc in self.allocators.items()
        }
        self.swapped_out_bytes = 0
        self.swapped_in_bytes = 0
        self.ledger = KVLedger(block_size)
        # whole-model blocks per request (the max over allocators) and their sums; see _sync_device / _sync_host
        self._device = _Tally()
        self._host = _Tally()
        self.pipeline = SwapPipeline(swap_mode or SwapPipeline.default_mode(torch.device(device)))
        self.prefix = PrefixIndex(self, prefix_sharing)
        if self.prefix.enabled:
            next(iter(self.host.values())).on_give_back = self.prefix.forget_host_copies
        self._tokens: dict[str, list[int]] = {}  # each request's token log, for naming its blocks

    @property
    def supports_partial(self) -> bool:
        """Whether a move may take part of a request's blocks (sliding layers keep ring-ordered tables)."""
        return self.full_attention_only

    # ------------------------------------------------------------------ cached tokens
    def track(self, rid: str, record: KVRecord, tokens: list[int] | None = None) -> None:
        """Keep `record` up to date with every move of the request's blocks, until `free(rid)`.
        `tokens` is the request's token log (appended to in place), which names its full blocks."""
        self.ledger.track(rid, record)
        if tokens is not None:
            self._tokens[rid] = tokens

    def record_computed(self, rid: str, n: int) -> None:
        """A forward wrote the KV of the request's next `n` tokens into the blocks reserved for them."""
        before = self.ledger.computed(rid)
        self.ledger.add_computed(rid, n)
        after = before + n
        if self.prefix.enabled and after // self.block_size > before // self.block_size and rid in self._tokens:
            self.prefix.index(rid, self._tokens[rid], after)

    def attach_prefix(self, rid: str) -> int:
        """Reuse named blocks that continue the request's cached tokens (at admission, or when it
        returns after a discard): returns the tokens it need not compute."""
        if not self.prefix.enabled or self.host_blocks(rid) or rid not in self._tokens:
            return 0
        gained = self.prefix.attach(rid, self._tokens[rid], self.ledger.computed(rid))
        if gained:
            self.ledger.add_reused(rid, gained)
            self._sync_device(rid)
        return gained

    def device_tokens(self, rid: str) -> int:
        """Of the request's cached tokens, those on the device (the head; the rest is on host)."""
        return min(self.ledger.computed(rid), self.device_blocks(rid) * self.block_size)

    # ------------------------------------------------------------------ capacity
    @property
    def capacity_tokens(self) -> int:
        """The most tokens one request can hold on device (full-attention models: the whole pool)."""
        return self.num_blocks * self.block_size

    def fits(self, num_tokens: int) -> bool:
        """Whether one request of `num_tokens` tokens fits an otherwise empty device pool.

        Sliding-window layers keep at most a window of KV per request, so their footprint stops
        growing; full-attention layers need every token. Each layer group takes whole sectors.
        """
        sectors = 0
        for alloc in self.allocators.values():
            sectors += -(-pp.blocks_for_tokens(alloc, num_tokens) // pp.blocks_per_sector(alloc))
        return sectors <= pp.num_sectors(self)

    @property
    def block_bytes(self) -> int:
        """This rank's bytes of KV in one whole-model block."""
        return self.spec.rank_kv_bytes_per_token * self.block_size

    def watch_device_blocks(self, on_change: Callable[[str, int], None]) -> None:
        """Have `on_change(rid, blocks)` told the request's `exclusive_blocks` at every change of its
        `device_blocks` (another request taking or dropping a share of them is not a change of its own)."""
        if self.prefix.enabled:
            self._device.on_change = lambda rid, _n: on_change(rid, self.exclusive_blocks(rid))
        else:
            self._device.on_change = on_change

    def watch_host_blocks(self, on_change: Callable[[str, int], None]) -> None:
        """Have `on_change(rid, blocks)` told every change of a request's `host_blocks`."""
        self._host.on_change = on_change

    def device_blocks(self, rid: str) -> int:
        """Whole-model device blocks the request holds (the most over allocators)."""
        return self._device.held.get(rid, 0)

    def shared_device_tokens(self, rid: str) -> int:
        """Tokens in the request's device blocks that other requests read too (its head)."""
        return self.prefix.shared_blocks(rid) * self.block_size

    def exclusive_blocks(self, rid: str) -> int:
        """Of the request's device blocks, those no other request reads: what keeping them costs
        and what dropping or moving them frees (its tail; the shared ones are its head)."""
        return self.device_blocks(rid) - self.prefix.shared_blocks(rid)

    def host_blocks(self, rid: str) -> int:
        """Whole-model host blocks the request holds (the most over allocators)."""
        return self._host.held.get(rid, 0)

    def free_device_blocks(self) -> int:
        """Free whole-model blocks (the smallest over allocators, counting unclaimed sectors)."""
        free_sectors = pp.num_free_sectors(self)
        if (a := self._only_allocator) is not None:
            return pp.count_free_blocks(self, a) + free_sectors * pp.blocks_per_sector(a) + self.prefix.cached_blocks()
        return min(
            pp.count_free_blocks(self, a) + free_sectors * pp.blocks_per_sector(a) for a in self.allocators.values()
        )

    def free_host_blocks(self) -> int:
        return min(len(h.free) for h in self.host.values())

    # per allocator, in `self.allocators` order: what planning several moves at once must track
    def blocks_per_allocator(self, rid: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The request's device blocks it holds alone (`exclusive_blocks`) and host blocks, per allocator."""
        if self._only_allocator is not None:  # one allocator: its counts are the whole-model tallies
            return (self.exclusive_blocks(rid),), (self.host_blocks(rid),)
        device = tuple(len(pp.block_tables(a).get(rid, ())) for a in self.allocators.values())
        return device, tuple(len(self.host[name].tables.get(rid, ())) for name in self.allocators)

    def free_host_per_allocator(self) -> tuple[int, ...]:
        return tuple(len(self.host[name].free) for name in self.allocators)

    def host_blocks_returning(self) -> tuple[int, ...]:
        """Host blocks that swap-ins in flight give back when the copies finish (any host drop or
        device discard finishes them first)."""
        return tuple(sum(len(t.host_ids) for t in self.pipeline.in_flight() if t.alloc is a and not t.to_host)
                     for a in self.allocators.values())

    @property
    def num_host_blocks(self) -> int:
        return next(iter(self.host.values())).num_blocks

    def used_device_blocks(self) -> int:
        """Device blocks some request references: the sum of `device_blocks` over every request,
        less the repeats of shared blocks."""
        return self._device.total - self.prefix.extra_references()

    def used_host_blocks(self) -> int:
        """Sum of `host_blocks` over every request."""
        return self._host.total

    def request_ids(self) -> set[str]:
        ids: set[str] = set()
        for a in self.allocators.values():
            ids.update(pp.block_tables(a))
        for h in self.host.values():
            ids.update(h.tables)
        return ids

    # ------------------------------------------------------------------ running counts
    def _count_device(self, rid: str) -> int:
        """`device_blocks` recounted from the allocators' block tables."""
        if (a := self._only_allocator) is not None:
            return len(pp.block_tables(a).get(rid, ()))
        return max((len(pp.block_tables(a).get(rid, ())) for a in self.allocators.values()), default=0)

    def _count_host(self, rid: str) -> int:
        """`host_blocks` recounted from the host pools' tables."""
        return max((len(h.tables.get(rid, ())) for h in self.host.values()), default=0)

    def _sync_device(self, rid: str) -> None:
        """Refresh the request's device count and the total after its block tables changed."""
        self._device.set(rid, self._count_device(rid))

    def _sync_host(self, rid: str) -> None:
        """Refresh the request's host count and the total after its host tables changed."""
        self._host.set(rid, self._count_host(rid))

    def device_blocks_changed(self, request_id: str | None) -> None:
        """Keep the running device counts in step with transformers' block tables."""
        for rid in (list(self._device.held) if request_id is None else [request_id]):
            self._sync_device(rid)

    # ------------------------------------------------------------------ allocation
    def allocate(self, rid: str, past_len: int, new_tokens: int) -> bool:
        """Reserve device blocks so `new_tokens` can be written after `past_len`; False if full.
        Most decode steps cross no block boundary: with full-attention layers only, transformers'
        allocation would then change nothing, so it is skipped (sliding layers may rotate blocks)."""
        if not self.prefix.own_tail(rid, past_len):
            return False
        if self.full_attention_only and self.blocks_needed(rid, past_len, new_tokens) == 0:
            return True
        if self.reserve_device(rid, past_len, new_tokens):
            return True
        if not self.prefix.cached_blocks():
            return False
        self.prefix.make_room(self.blocks_needed(rid, past_len, new_tokens))
        return self.reserve_device(rid, past_len, new_tokens)

    def blocks_needed(self, rid: str, past_len: int, new_tokens: int) -> int:
        if (a := self._only_allocator) is not None:
            return pp.blocks_needed(a, rid, past_len, new_tokens)
        return max(pp.blocks_needed(a, rid, past_len, new_tokens) for a in self.allocators.values())

    def free(self, rid: str) -> None:
        """Release every block the request holds, on device and host."""
        self.pipeline.finish()
        self.prefix.releasing(rid)
        self.release_device(rid)
        for h in self.host.values():
            h.give_back(h.tables.pop(rid, []))
        self._sync_host(rid)
        self.ledger.drop(rid)
        self.prefix.forget(rid)
        self._tokens.pop(rid, None)

    # ------------------------------------------------------------------ moves
    def _tail_count(self, rid: str, num_blocks: int | None, have: int) -> int:
        n = have if num_blocks is None else num_blocks
        if not 0 <= n <= have:
            raise ValueError(f"request {rid}: cannot move {n} of its {have} blocks")
        if n != have and not self.supports_partial:
            raise ValueError("partial moves need a model with full-attention layers only")
        return n

    def swap_out(self, rid: str, num_blocks: int | None = None, wait: bool = True) -> int:
        """Move the request's last `num_blocks` device blocks (all by default) to host.

        Returns the blocks moved: 0 when the host pool lacks room. With `wait=False` the copies
        run behind the next forward and the device blocks come free in `finish_transfers()`;
        under memory pressure the caller needs them now and waits.
        """
        n = self._tail_count(rid, num_blocks, self.device_blocks(rid))
        if n == 0 or self.free_host_blocks() < n:
            return 0
        for name, alloc in self.allocators.items():
            host = self.host[name]
            dev_ids = _pop_tail(pp.block_tables(alloc)[rid], n)
            host_ids = host.take(len(dev_ids))
            # the moved blocks precede any host tail already present: device head + host tail
            host.tables[rid] = host_ids + host.tables.get(rid, [])
            nbytes = len(dev_ids) * pp.bytes_per_block(alloc)
            self.swapped_out_bytes += nbytes
            self.ledger.add_swapped(rid, nbytes)
            # once the copies have landed: the host blocks take the device blocks' names, then those are let go
            names = [pp.block_hash(alloc, b) for b in dev_ids] if self.prefix.enabled else []

            def done(a=alloc, ids=dev_ids, hids=host_ids, names=names) -> None:
                self.prefix.note_host_copies(hids, names)
                self.prefix.release(a, ids)

            self.pipeline.submit(Transfer(alloc, dev_ids, host_ids, True, done, host.storage))
        self._sync_device(rid)
        self._sync_host(rid)
        if wait:
            self.pipeline.finish()
        return n

    def swap_in(self, rid: str) -> int | None:
        """Bring the request's whole host tail back to device. Returns the bytes moved (0: there
        was no tail), or None, moving nothing, when the device lacks room."""
        if self.host_blocks(rid) == 0:
            return 0
        self.prefix.make_room(self.host_blocks(rid))
        if not self._room_for_host_tail(rid):
            pp.try_to_free_sectors(self)
            if not self._room_for_host_tail(rid):
                return None
        moved = 0
        for name, alloc in self.allocators.items():
            host = self.host[name]
            host_ids = host.tables.pop(rid)
            # a block whose named content is still on the device (cached or read by others) is reused, not copied
            kept = [self.prefix.device_copy(h) for h in host_ids]
            fresh = iter(pp.take_blocks(self, alloc, kept.count(None)))
            table = [b if b is not None else next(fresh) for b in kept]
            pp.block_tables(alloc).setdefault(rid, []).extend(table)
            copy = [(d, h) for d, h, b in zip(table, host_ids, kept) if b is None]
            if len(copy) < len(host_ids):
                host.give_back([h for h, b in zip(host_ids, kept) if b is not None])
            moved += len(copy) * pp.bytes_per_block(alloc)
            copy_host = [h for _, h in copy]
            done = lambda h=host, ids=copy_host: h.give_back(ids)  # noqa: E731
            self.pipeline.submit(Transfer(alloc, [d for d, _ in copy], copy_host, False, done, host.storage))
        self.swapped_in_bytes += moved
        self.ledger.add_swapped(rid, moved)
        self.prefix.forget(rid)  # blocks copied back are unnamed, wherever they sit: name them from the start
        self._sync_device(rid)
        self._sync_host(rid)
        return moved

    def load_host_block(self, host_id: int, dev_id: int) -> None:
        """Copy one host block into a device block now (a prefix hit on a host copy, which keeps its owner)."""
        alloc, host = self.prefix.alloc, next(iter(self.host.values()))
        self.pipeline.submit(Transfer(alloc, [dev_id], [host_id], False, lambda: None, host.storage))
        self.pipeline.finish()

    def finish_transfers(self) -> None:
        """Complete outstanding copies and release what they freed (the engine calls this every step)."""
        self.pipeline.finish()

    def discard_device(self, rid: str, num_blocks: int | None = None) -> int:
        """Free the request's last `num_blocks` device blocks (all by default) without saving them."""
        self.pipeline.finish()
        if self.host_blocks(rid):
            raise ValueError(f"request {rid}: drop its host tail before discarding device blocks")
        n = self._tail_count(rid, num_blocks, self.device_blocks(rid))
        for alloc in self.allocators.values():
            tables = pp.block_tables(alloc)
            table = tables.get(rid, [])
            self.prefix.release(alloc, _pop_tail(table, n))
            if not table:
                tables.pop(rid, None)
        self._sync_device(rid)
        self.ledger.keep_within(rid, self.device_blocks(rid))
        return n

    def discard_host(self, rid: str, num_blocks: int | None = None) -> int:
        """Drop the request's last `num_blocks` host blocks (all by default)."""
        self.pipeline.finish()
        n = self._tail_count(rid, num_blocks, self.host_blocks(rid))
        for host in self.host.values():
            table = host.tables.get(rid, [])
            host.give_back(_pop_tail(table, n))
            if not table:
                host.tables.pop(rid, None)
        self._sync_host(rid)
        self.ledger.keep_within(rid, self.device_blocks(rid) + self.host_blocks(rid))
        return n

    def truncate(self, rid: str, num_tokens: int) -> int:
        """Keep the KV of the request's first `num_tokens` tokens only (its token log goes on
        differently from there): blocks wholly past them are freed, host tail first, and a
        partly used last block is kept, its stale slots overwritten by the next forward. Models
        with sliding-window layers cannot cut a ring-ordered table, so they drop everything
        when anything is cut. Returns the cached tokens left."""
        if num_tokens < 0:
            raise ValueError(f"request {rid}: cannot keep {num_tokens} tokens")
        self.pipeline.finish()
        cut = num_tokens < self.ledger.computed(rid)
        keep = -(-num_tokens // self.block_size) if self.supports_partial or not cut else 0
        surplus = self.device_blocks(rid) + self.host_blocks(rid) - keep
        from_host = min(max(surplus, 0), self.host_blocks(rid))
        if from_host:
            self.discard_host(rid, from_host)
        if surplus > from_host:
            self.discard_device(rid, surplus - from_host)
        self.ledger.truncate(rid, num_tokens)
        return self.ledger.computed(rid)

    def _room_for_host_tail(self, rid: str) -> bool:
        """Room on device for the whole host tail (transformers' admission check, allocators sharing free sectors)."""
        return pp.admits(self, {name: len(host.tables.get(rid, ())) for name, host in self.host.items()})

    # ------------------------------------------------------------------ integrity
    def check_integrity(self) -> None:
        """Raise AssertionError unless every block is accounted for exactly: on device, free, cached
        for reuse, or listed by as many tables (and copies in flight) as its reference count says;
        on host, free or owned by one request; and no name points at a block nobody holds."""
        in_flight = self.pipeline.in_flight()
        free_sectors = pp.free_sector_ids(self)
        claimed: set[int] = set()
        for alloc in self.allocators.values():
            refs: dict[int, int] = {}  # block -> tables (and swap-outs in flight) that list it
            for b in [b for table in pp.block_tables(alloc).values() for b in table] + [
                    b for t in in_flight if t.alloc is alloc and t.to_host for b in t.dev_ids]:
                refs[b] = refs.get(b, 0) + 1
            owned = list(refs)
            wrong = {b: (n, pp.ref_count(alloc, b)) for b, n in refs.items() if n != pp.ref_count(alloc, b)}
            assert not wrong, f"device blocks listed a different number of times than their reference counts: {wrong}"
            cached = pp.cached_block_ids(alloc)
            assert not set(cached) & set(owned), "device block both cached for reuse and referenced"
            free_leaves = pp.free_block_ids(self, alloc)
            assert not set(owned + cached) & set(free_leaves), "device block both free and owned"
            assert all(pp.block_hash(alloc, b) is not None for b in cached), "cached device block without a name"
            # a named block nobody lists would let a later match read whatever is written there next
            assert set(pp.named_block_ids(alloc)) <= set(owned) | set(cached), "device block still named, listed nowhere"
            bps = pp.blocks_per_sector(alloc)
            mine = {b // bps for b in owned + cached + free_leaves}
            assert not mine & free_sectors, "block inside a free sector"
            assert not mine & claimed, "sector claimed by two allocators"
            claimed |= mine
            # every block of every claimed sector is either referenced, cached or free
            assert len(owned) + len(cached) + len(free_leaves) == len(mine) * bps, "device blocks leaked inside a sector"
        assert len(claimed) + len(free_sectors) == pp.num_sectors(self), "device sector leaked"
        for name, host in self.host.items():
            owned = [b for t in host.tables.values() for b in t]
            owned += [b for t in in_flight if not t.to_host and t.host_storage is host.storage for b in t.host_ids]
            assert len(owned) == len(set(owned)), f"host block owned twice ({name})"
            assert not set(owned) & set(host.free), f"host block both free and owned ({name})"
            assert len(owned) + len(host.free) == host.num_blocks, f"host block leaked ({name})"
            assert self.prefix.named_host_blocks() <= set(owned), f"a free host block is still named ({name})"
        ids = self.request_ids()
        device = {rid: n for rid in ids if (n := self._count_device(rid))}
        host_held = {rid: n for rid in ids if (n := self._count_host(rid))}
        assert self._device.held == device, f"running device counts {self._device.held} != tables {device}"
        assert self._host.held == host_held, f"running host counts {self._host.held} != tables {host_held}"
        assert self._device.total == sum(device.values()), "running device total disagrees with the tables"
        assert self._host.total == sum(host_held.values()), "running host total disagrees with the tables"

    def is_empty(self) -> bool:
        return not self.request_ids()
