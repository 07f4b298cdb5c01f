"""The base class of the engine's paged cache: transformers' `PagedAttentionCache`, adapted.

The engine's cache (`infercept_hf.cache.InterceptPagedCache`) must *be* a
`PagedAttentionCache`, since transformers' paged read/write path (`update`, the index
builders) runs on it. Everything that subclassing touches of transformers, the
constructor's arguments, the allocation and release methods transformers itself calls,
the `RequestState` stand-in they read, is here, so the engine's cache uses only the named
methods below (`reserve_device`, `release_device`) and one hook (`device_blocks_changed`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import paged_pool as pp
from .transformers_cb import PagedAttentionCache, cb_config, explicit_pool_sizing, single_process_helper

__all__ = ["PagedCacheBase", "plain_paged_cache"]


@dataclass
class _AllocationState:
    """Stands in for a transformers RequestState in allocation calls: the two fields they read."""

    request_id: str
    length: int

    def current_len(self) -> int:
        return self.length


class PagedCacheBase(PagedAttentionCache):
    """A `PagedAttentionCache` of exactly `num_blocks` blocks that reports every change to a
    request's device blocks, by whatever path (ours or transformers'), to `device_blocks_changed`."""

    def __init__(self, config: Any, num_blocks: int, block_size: int, max_batch_tokens: int,
                 device: torch.device | str, dtype: torch.dtype, distributed_helper: Any = None,
                 block_sharing: bool = False) -> None:
        with explicit_pool_sizing():
            super().__init__(
                config,
                cb_config(num_blocks, block_size, max_batch_tokens, block_sharing),
                device,
                distributed_helper or single_process_helper(),
                dtype=dtype,
            )

    def device_blocks_changed(self, request_id: str | None) -> None:
        """Called after a request's device block tables changed (None: every request's)."""

    def reserve_device(self, rid: str, past_len: int, new_tokens: int) -> bool:
        """Reserve device blocks so `new_tokens` can be written after `past_len`; False if full.
        Wholly free sectors go back to the shared pool before giving up, for any allocator to claim."""
        state = _AllocationState(rid, past_len)
        if self.can_store_request_tokens(state, new_tokens):
            return True
        pp.try_to_free_sectors(self)
        return self.can_store_request_tokens(state, new_tokens)

    def release_device(self, rid: str) -> None:
        """Drop the request's reference to each of its device blocks; with block sharing, a named
        block nobody else reads stays cached for reuse (see `prefix_index.py`)."""
        self.free_blocks(rid, no_cache=not self.allow_block_sharing)

    # transformers' own entry points, overridden so that no path changes blocks unreported
    def can_store_request_tokens(self, state: Any, request_len: int, dry_run: bool = False) -> bool:
        stored = super().can_store_request_tokens(state, request_len, dry_run)
        if stored and not dry_run:
            self.device_blocks_changed(state.request_id)
        return stored

    def free_blocks(self, request_id: str, no_cache: bool = False) -> None:
        super().free_blocks(request_id, no_cache)
        self.device_blocks_changed(request_id)

    def free_all_requests(self, clear_ledgers: bool = False) -> None:
        super().free_all_requests(clear_ledgers)
        self.device_blocks_changed(None)


def plain_paged_cache(config: Any, num_blocks: int, block_size: int, max_batch_tokens: int,
                      device: torch.device | str, dtype: torch.dtype) -> PagedAttentionCache:
    """transformers' own paged cache, unadapted, of exactly `num_blocks` blocks: the reference
    that checks compare the engine's kernels and copies against."""
    with explicit_pool_sizing():
        return PagedAttentionCache(config, cb_config(num_blocks, block_size, max_batch_tokens), device,
                                   single_process_helper(), dtype=dtype)
