"""Named access to transformers' paged pool: its allocators, block tables and sectors.

Tested against transformers 5.23 (see setup.py's pin). `PagedAttentionCache` keeps one
allocator per attention type (full, sliding); each owns per-request block tables and takes
its blocks from a shared pool of sectors. These attributes are not a public API, so the
package reads and changes them only through the functions here: an upgrade that renames
them breaks this file only.
"""
from __future__ import annotations

import itertools
from typing import Any

import torch
from transformers.generation.continuous_batching.cache_allocators.cache_allocator import compute_block_hash

Allocator = Any  # transformers' cache allocator (FullAttentionAllocator, SlidingAttentionAllocator)

__all__ = [
    "Allocator",
    "acquire",
    "admits",
    "block_hash",
    "cached_block_ids",
    "copy_block",
    "count_cached",
    "count_shared",
    "evict_cached",
    "extra_references",
    "hashed_block",
    "index_block",
    "name_block",
    "named_block_ids",
    "named_block",
    "ref_count",
    "release_refs",
    "shares_blocks",
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


# ---------------------------------------------------------------------- shared blocks
# transformers' `BlockLedger` (one per allocator) is the one owner of reference counts, content
# hashes and the unreferenced blocks kept for reuse; these functions are its only readers here.
def shares_blocks(alloc: Allocator) -> bool:
    """Whether transformers lets this allocator's blocks be shared (full attention: yes; sliding
    windows: no, their ring-ordered blocks are overwritten in place once the window wraps)."""
    return bool(alloc.use_block_sharing)


def ref_count(alloc: Allocator, block_id: int) -> int:
    """Block tables (and in-flight copies) that reference a block the ledger does not hold as cached."""
    return alloc.ledger.shared_ref_counts.get(block_id, 1)


def extra_references(alloc: Allocator) -> int:
    """References beyond the first, summed over the allocator's shared blocks."""
    return sum(n - 1 for n in alloc.ledger.shared_ref_counts.values())


def block_hash(alloc: Allocator, block_id: int) -> int | None:
    """The chained content hash of a full block, None for a block not (yet) indexed."""
    return alloc.ledger.block_to_hash.get(block_id)


def hashed_block(alloc: Allocator, parent: int | None, tokens: list[int]) -> tuple[int, int | None]:
    """`(hash, block id or None)`: the hash of a block of `tokens` after the block hashed `parent`,
    and the block that holds exactly that content, if the ledger knows one."""
    h = compute_block_hash(parent, tokens)
    return h, alloc.ledger.hash_to_block.get(h)


def cached_block_ids(alloc: Allocator) -> list[int]:
    """Blocks no request references, kept for their content, least recently released first."""
    return list(alloc.ledger.cached_blocks)


def named_block_ids(alloc: Allocator) -> list[int]:
    """Every block that holds a name (referenced or cached)."""
    return list(alloc.ledger.block_to_hash)


def count_cached(alloc: Allocator) -> int:
    return len(alloc.ledger.cached_blocks)


def count_shared(alloc: Allocator) -> int:
    """Blocks referenced more than once."""
    return len(alloc.ledger.shared_ref_counts)


def acquire(alloc: Allocator, block_id: int) -> None:
    """One more reference to a block (a cached block becomes referenced again)."""
    alloc.ledger.acquire(block_id)


def release_refs(cache: Any, alloc: Allocator, ids: list[int], keep_hashed: bool = True) -> None:
    """Drop one reference to each block: a block nobody references any more goes back to the
    pool, or, when it holds indexed content and `keep_hashed`, into the cache of reusable blocks."""
    freed = [b for b in ids if alloc.ledger.release(b, no_cache=not keep_hashed)]
    if freed:
        cache.pool.free_blocks(alloc.index, freed)


def index_block(cache: Any, alloc: Allocator, rid: str, i: int, block_hash_: int) -> None:
    """Name the request's `i`-th block by its chained hash; when another block already holds that
    content, the request reads that one instead and its own copy is released."""
    table = alloc.block_table[rid]
    same = alloc.ledger.register_new_hash(table[i], block_hash_)
    if same is not None and same != table[i]:
        alloc.ledger.acquire(same)
        release_refs(cache, alloc, [table[i]])
        table[i] = same


def named_block(alloc: Allocator, block_hash_: int) -> int | None:
    """The device block holding the content of this name, if any."""
    return alloc.ledger.hash_to_block.get(block_hash_)


def name_block(alloc: Allocator, block_id: int, block_hash_: int) -> None:
    """Give a block no other block's name (checked by the caller: the ledger knows no block of that content)."""
    assert alloc.ledger.register_new_hash(block_id, block_hash_) is None, "content already named"


def evict_cached(cache: Any, alloc: Allocator, n: int) -> int:
    """Return the `n` least recently released cached blocks to the pool (their content is forgotten)."""
    ledger = alloc.ledger
    victims = list(itertools.islice(ledger.cached_blocks, n))
    for b in victims:
        del ledger.cached_blocks[b]
        ledger.hash_to_block.pop(ledger.block_to_hash.pop(b))
    cache.pool.free_blocks(alloc.index, victims)
    return len(victims)


def copy_block(alloc: Allocator, src: int, dst: int) -> None:
    """Copy one whole block (every layer of the allocator) inside the device cache."""
    alloc.copy_blocks([src], [dst])
