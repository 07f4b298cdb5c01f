"""What the kernel tests share: reproducible inputs per case, and transformers' paged-cache layout."""
from __future__ import annotations

import zlib

import torch
from transformers import LlamaConfig

from infercept_hf.patches.paged_cache import plain_paged_cache


def seeded(*key: object) -> torch.Generator:
    """A fresh generator per case, so every case draws its own inputs, reproducibly."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def layer_page_views(rows: torch.Tensor, layer: int, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' per-layer views of `[blocks * 2 * layers * page, H, D]` rows: layer i's keys start
    at row 2iP, its values at (2i+1)P, and block b is page b * 2L of both."""
    heads, dim = rows.shape[1:]
    k_pages = rows[2 * layer * page :].view(-1, page, heads, dim)
    v_pages = rows[(2 * layer + 1) * page :].view(-1, page, heads, dim)
    n = min(len(k_pages), len(v_pages))
    return k_pages[:n], v_pages[:n]


def paged_attention_cache(num_layers: int, heads: int, kv_heads: int, head_dim: int, num_blocks: int,
                          device: torch.device | str):
    """transformers' own float32 paged cache (pages of 4 tokens) for a tiny Llama of this shape."""
    config = LlamaConfig(vocab_size=32, hidden_size=heads * head_dim, intermediate_size=32,
                         num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim)
    return plain_paged_cache(config, num_blocks, block_size=4, max_batch_tokens=64, device=device, dtype=torch.float32)
