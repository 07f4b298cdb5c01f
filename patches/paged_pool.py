"""Named access to transformers' paged pool: its allocators, block tables and sectors.

Tested against transformers 5.23 (see setup.py's pin). `PagedAttentionCache` keeps one
allocator per attention type (full, sliding); each owns per-request block tables and takes
its blocks from a shared pool of sectors. These attributes are not a public API, so the
package reads and changes them only through the functions here: an upgrade that renames
them breaks this file only.
"""
from __future__ import annotations

from typing import Any

import torch

Allocator = Any  # transformers' cache allocator (FullAttentionAllocator, SlidingAttentionAllocator)

__all__ = [
    "Allocator",
    "admits",
    "allocator_index",
    "allocators",
    "block_tables",
    "blocks_needed",
    "page_table",
    "block_rows",
    "free_block_ids",
    "blocks_for_tokens",
    "blocks_per_sector",
    "bytes_per_block",
    "count_free_blocks",
    "extend_indices",
    "fill_block_table",
    "free_sector_ids",
    "layer_allocator",
    "layer_indices",
    "layer_pages",
    "layer_type",
    "num_free_sectors",
    "num_sectors",
    "pool_kv_bytes_per_token",
    "release_blocks",
    "seqlen_k",
    "take_blocks",
    "tokens_per_block",
    "try_to_free_sectors",
]


# ---------------------------------------------------------------------- allocators
def allocators(cache: Any) -> dict[str, Allocator]:
    """The cache's allocators by attention type, in transformers' order."""
    return cache.cache_allocators


def layer_allocator(cache: Any, layer_idx: int) -> Allocator:
    return cache.layer_to_allocator[layer_idx]


def allocator_index(alloc: Allocator) -> int:
    """The allocator's index into the pool and into per-allocator index lists."""
    return alloc.index


def layer_type(alloc: Allocator) -> str:
    return alloc.layer_type


def layer_indices(alloc: Allocator) -> list[int]:
    """The model layers whose KV this allocator holds, in order."""
    return alloc.layer_indices


def bytes_per_block(alloc: Allocator) -> int:
    """Bytes of one block over all of the allocator's layers."""
    return alloc.bytes_per_block


def tokens_per_block(alloc: Allocator) -> int:
    return alloc.tokens_per_page


def pool_kv_bytes_per_token(cache: Any) -> int:
    """KV bytes per token of the pool transformers built (this rank's KV heads under tensor
    parallelism): what `ModelSpec.rank_kv_bytes_per_token` must match; checks read it here."""
    return sum(bytes_per_block(a) // tokens_per_block(a) for a in allocators(cache).values())


def blocks_per_sector(alloc: Allocator) -> int:
    return alloc.blocks_per_sector


def block_tables(alloc: Allocator) -> dict[str, list[int]]:
    """The allocator's live block tables, `{request id: [block ids]}`; callers change them in place."""
    return alloc.block_table


def blocks_needed(alloc: Allocator, rid: str, past_len: int, new_tokens: int) -> int:
    """New blocks the allocator needs to write `new_tokens` after `past_len` tokens of `rid`."""
    return alloc.needs_new_blocks(rid, past_len, new_tokens)


def seqlen_k(alloc: Allocator, start: int, length: int) -> int:
    """Keys a chunk of `length` tokens at `start` attends to in this allocator's layers."""
    return alloc.get_seqlen_k(start, length)


def layer_pages(alloc: Allocator, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's key and value page views, indexed by `page_table` entries."""
    return alloc.get_cache_for_block_table(layer_idx)


def blocks_for_tokens(alloc: Allocator, num_tokens: int) -> int:
    """Blocks of one allocator that a request of `num_tokens` tokens holds (sliding layers stop at the window)."""
    return alloc._compute_blocks_needed(0, 0, num_tokens)


def free_block_ids(cache: Any, alloc: Allocator) -> list[int]:
    """The free blocks inside the sectors `alloc` has claimed (not the unclaimed sectors)."""
    return [b for tree in cache.pool._free_blocks[alloc.index].trees.values() for b in tree]


def block_rows(alloc: Allocator) -> torch.Tensor:
    """The allocator's cache as `[num_blocks, bytes_per_block]` uint8, one row per block: the handle for copies."""
    return alloc._copy_view


def page_table(cache: Any, request_id: str, allocator_index: int) -> list[int]:
    """A request's blocks as indices into one allocator's per-layer page views (the kernels' block table)."""
    alloc = next(a for a in cache.cache_allocators.values() if a.index == allocator_index)
    stride = alloc.block_physical_stride // alloc.tokens_per_page
    return [b * stride for b in alloc.block_table[request_id]]


def extend_indices(
    cache: Any, rid: str, start: int, length: int, read: list[list[int]], write: list[list[int]]
) -> None:
    """Append, per allocator, the cache rows a chunk of `length` tokens at `start` reads and writes."""
    cache.extend_read_and_write_indices(rid, start, length, read, write)


def fill_block_table(alloc: Allocator, rid: str, past_len: int, new_tokens: int, out: torch.Tensor) -> None:
    """Write into `out` the page-table row the kernels read for a chunk of `new_tokens` after `past_len`."""
    alloc.fill_block_table(rid, past_len, new_tokens, out)


def admits(cache: Any, blocks_by_allocator: dict[str, int]) -> bool:
    """Whether the free pool holds one request of these many blocks per allocator (sectors shared)."""
    return cache.count_storable_requests([blocks_by_allocator]) == 1


# ---------------------------------------------------------------------- the pool
def num_sectors(cache: Any) -> int:
    return cache.pool.num_sectors


def num_free_sectors(cache: Any) -> int:
    return cache.pool.num_free_sectors


def free_sector_ids(cache: Any) -> set[int]:
    return set(cache.pool.free_sectors)


def count_free_blocks(cache: Any, alloc: Allocator) -> int:
    """Free blocks inside the sectors the allocator has claimed (unclaimed sectors not counted)."""
    return cache.pool.count_free_blocks(alloc.index)


def try_to_free_sectors(cache: Any) -> None:
    """Return the allocators' wholly free sectors to the pool, for any allocator to claim."""
    cache.pool.try_to_free_sectors()


def release_blocks(cache: Any, alloc: Allocator, ids: list[int]) -> None:
    cache.pool.free_blocks(alloc.index, ids)


def take_blocks(cache: Any, alloc: Allocator, n: int) -> list[int]:
    """`n` free blocks for the allocator, claiming sectors as needed (the caller checked there is room)."""
    while cache.pool.count_free_blocks(alloc.index) < n:
        cache.pool.allocate_sector(alloc.index)
    return cache.pool.get_free_blocks(alloc.index, n)
