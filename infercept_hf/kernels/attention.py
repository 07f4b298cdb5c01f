"""An attention function for transformers' `AttentionInterface` that runs our paged kernels.

transformers' own paged paths (`sdpa_attention.py`, `flash_attention.py`) either copy the
whole context out of the cache with `read_index` (sdpa) or need flash-attn. This one writes
the new K/V into the cache's page views at `write_index`, then attends straight from the
pages through the engine's block table, so no context is ever copied:

    decode (one query per sequence)  -> paged_decode_attention
    anything else (chunks, padding)  -> paged_prefill_attention

Beside transformers' paged kwargs (`cache`, `write_index`, `cu_seq_lens_q`, `max_length_q`)
the engine passes `infercept_block_table [B, max_pages]` int32 (page indices, as the
allocator's `fill_block_table` writes them) and `infercept_seq_lens_k [B]` int32 (tokens in
the cache after this step's write), and optionally `infercept_backend` ("triton"/"torch").
"""
from __future__ import annotations

from typing import Any

import torch

from ..patches.paged_pool import allocator_index, layer_allocator, layer_pages, layer_type
from . import paged_decode_attention, paged_prefill_attention, write_kv


def infercept_paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """`query [1, Hq, T, D]`, `key, value [1, Hkv, T, D]` -> `([1, T, Hq, D], None)`.

    The causal structure comes from the block table and lengths, so `attention_mask` is unused.
    """
    if dropout:
        raise ValueError("paged attention is for inference: dropout must be 0")
    cache = kwargs["cache"]
    layer_idx = module.layer_idx
    allocator = layer_allocator(cache, layer_idx)
    if layer_type(allocator) != "full_attention":
        raise NotImplementedError(f"paged kernels cover full attention layers, not {layer_type(allocator)}")
    backend = kwargs.get("infercept_backend")
    k_pages, v_pages = layer_pages(allocator, layer_idx)
    write_kv(key[0].transpose(0, 1), value[0].transpose(0, 1), k_pages, v_pages,
             kwargs["write_index"][allocator_index(allocator)], backend=backend)

    q = query[0].transpose(0, 1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    block_table = kwargs["infercept_block_table"]
    seq_lens_k = kwargs["infercept_seq_lens_k"]
    if q.shape[0] == block_table.shape[0]:  # decode writes every row: no need to clear them first
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        paged_decode_attention(q, k_pages, v_pages, block_table, seq_lens_k, scale, out=out, backend=backend)
    else:
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)  # padding rows, if any, stay 0
        paged_prefill_attention(q, k_pages, v_pages, block_table, kwargs["cu_seq_lens_q"], seq_lens_k, scale,
                                max_seqlen_q=kwargs.get("max_length_q"), out=out, backend=backend)
    return out.unsqueeze(0), None
