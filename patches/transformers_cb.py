"""Every touch of transformers' private continuous-batching internals, in one file.

Tested against transformers 5.23 (see setup.py's pin). A transformers upgrade that moves
these names breaks this file only.

Why a `Cache` adapter rather than the attention-interface route: every causal LM in
transformers writes its new keys and values through `past_key_values.update(k, v, layer)`,
including GPT-J, whose attention bypasses the attention interface (transformers' own
`generate_batch` silently returns wrong tokens for it). Handing the model a
`PagedKVView` whose `update()` forwards to `PagedAttentionCache.update` puts every
architecture on transformers' paged read/write path, with the model's own attention
(eager or sdpa) doing the arithmetic under a packed block-diagonal mask. The model object
is never mutated: a plain `model(...)` or `model.generate(...)` works at any time.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any

import torch
from transformers.cache_utils import Cache
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import cache as _cb_cache
from transformers.generation.continuous_batching.cache import PagedAttentionCache, PagedAttentionMemoryHandler
from transformers.generation.continuous_batching.cache_allocators import FULL_ATTENTION, SLIDING_ATTENTION
from transformers.generation.continuous_batching.distributed import DistributedHelper
from transformers.generation.continuous_batching.utils import (
    build_attention_mask,
    find_head_dim,
    find_num_key_value_heads,
)

__all__ = [
    "FULL_ATTENTION",
    "KERNEL_ATTENTION",
    "SLIDING_ATTENTION",
    "DistributedHelper",
    "PagedAttentionCache",
    "PagedKVView",
    "UnsupportedModelError",
    "attention_implementation",
    "build_packed_mask",
    "cb_config",
    "explicit_pool_sizing",
    "find_head_dim",
    "find_num_key_value_heads",
    "register_kernel_attention",
    "routes_attention_through_interface",
    "single_process_helper",
]


class _ExplicitSizing(PagedAttentionMemoryHandler):
    """Sizing when the caller fixed num_blocks: no device-memory probe, no footprint check.

    transformers' check counts [max_batch_tokens, whole-pool] attention masks that its own
    manager preallocates; we build masks per step over the active tokens only, so the check
    would refuse pools that fit, and on the meta device (the simulator) it cannot run at all.
    """

    def get_available_memory(self) -> int:
        return 0

    def _check_footprint(self, max_batch_tokens: int, num_sectors: int) -> tuple[int, int]:
        if max_batch_tokens <= 0 or num_sectors <= 0:
            raise ValueError(f"invalid pool: {max_batch_tokens = }, {num_sectors = }")
        return max_batch_tokens, num_sectors


_sizing_lock = threading.Lock()


@contextmanager
def explicit_pool_sizing():
    """Within this block, PagedAttentionCache sizes itself from num_blocks alone."""
    with _sizing_lock:
        original = _cb_cache.PagedAttentionMemoryHandler
        _cb_cache.PagedAttentionMemoryHandler = _ExplicitSizing
        try:
            yield
        finally:
            _cb_cache.PagedAttentionMemoryHandler = original


def cb_config(num_blocks: int, block_size: int, max_batch_tokens: int,
              block_sharing: bool = False) -> ContinuousBatchingConfig:
    """A continuous-batching config for a synchronous engine with an explicitly sized pool.

    `block_sharing` turns on the allocators' block ledgers (reference counts, content names,
    cached blocks); the engine names blocks itself over its own token log, tool answers
    included (`prefix_index.py`), never through transformers' request states. Async batching
    is off: our step loop is synchronous by design.
    """
    return ContinuousBatchingConfig(
        num_blocks=num_blocks,
        page_size=block_size,
        max_batch_tokens=max_batch_tokens,
        allow_block_sharing=block_sharing,
        max_memory_percent=0.9,
        max_blocks_per_request=0,
        use_async_batching=False,
        auto_switch_to_flash=False,
    )


def single_process_helper() -> DistributedHelper:
    return DistributedHelper(None, None)


def build_packed_mask(
    cu_q: list[int], cu_k: list[int], sliding_window: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive [1, 1, T, K] mask: block-diagonal per sequence, causal, optionally windowed."""
    mask = torch.full((1, 1, cu_q[-1], cu_k[-1]), torch.finfo(dtype).min, dtype=dtype, device=device)
    build_attention_mask(mask, cu_q, cu_k, sliding_window=sliding_window)
    return mask


class UnsupportedModelError(NotImplementedError):
    """The model cannot run on the packed paged forward; the message names the architecture and why."""


class PagedKVView(Cache):
    """`past_key_values` for one packed forward: routes each layer's update to the paged cache.

    `kwargs` are the paged-attention arguments of this batch (read/write indices,
    cumulative lengths); `update` consumes a fresh copy each call because transformers'
    `PagedAttentionCache.update` narrows the per-layer-type entries in place.
    """

    def __init__(self, cache: PagedAttentionCache, kwargs: dict[str, Any], write: bool = True) -> None:
        self.cache = cache
        self.kwargs = kwargs
        self.write = write  # False: a paged-kernel attention function writes and reads the pages itself
        self.layers = []
        self.layer_class_to_replicate = None
        self.updated_layers: set[int] = set()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self.updated_layers:
            self._check_geometry(key_states, layer_idx)
        self.updated_layers.add(layer_idx)
        # every read of this layer's pages (ours below, or a paged-kernel attention's) follows its swap-ins
        self.cache.pipeline.before_layer(layer_idx)
        if not self.write:
            return key_states, value_states
        home, store = key_states.device, self.cache.cache_tensor.device
        if home == store:
            return self.cache.update(key_states, value_states, layer_idx, dict(self.kwargs))
        # a layer that accelerate placed on another device than the cache (a multi-GPU device_map)
        k, v = self.cache.update(key_states.to(store), value_states.to(store), layer_idx, dict(self.kwargs))
        return k.to(home), v.to(home)

    def _check_geometry(self, key_states: torch.Tensor, layer_idx: int) -> None:
        """A config that misstates the KV heads would otherwise fail deep in an index copy, or not at all."""
        alloc = self.cache.layer_to_allocator[layer_idx]
        got = tuple(key_states.shape[1::2])
        if got != (alloc.num_key_value_heads, alloc.head_dim):
            raise UnsupportedModelError(
                f"layer {layer_idx} writes keys of {got[0]} heads x {got[1]} dims but its config says "
                f"{alloc.num_key_value_heads} x {alloc.head_dim}: the paged cache cannot hold them "
                "(a per-model entry in patches/architectures.py can correct the geometry)"
            )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        raise RuntimeError("infercept_hf passes a prepared 4D mask; the model tried to build its own")

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return []


KERNEL_ATTENTION = "infercept_paged"
_registered = False


def register_kernel_attention(fn: Any) -> str:
    """Register the paged-kernel attention function with transformers' AttentionInterface (once)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(KERNEL_ATTENTION, fn)
        _registered = True
    return KERNEL_ATTENTION


def routes_attention_through_interface(model: Any) -> bool:
    """True for models whose attention calls transformers' AttentionInterface (not GPT-J, for one)."""
    return bool(getattr(type(model), "_supports_attention_backend", False))


@contextmanager
def attention_implementation(model: Any, name: str):
    """Use attention `name` for the calls inside this block only, then restore the model's own.

    The config object is shared by every layer, so one assignment switches the whole model;
    a plain `model(...)` before or after this block sees the model exactly as it was.
    """
    config = model.config
    saved = config._attn_implementation_internal
    config._attn_implementation_internal = name
    try:
        yield
    finally:
        config._attn_implementation_internal = saved
