"""Triton helpers shared by the attention kernels: reading a tile of tokens through a block table.

A sequence's token `t` lives in page `block_table[t // P]`, row `t % P` of a page view
`[num_pages, P, H, D]` (any strides). A tile of `BLOCK_N` consecutive tokens may straddle
several pages, so each row looks its page up on its own: any page size works, including
ones smaller than the tile (transformers' default is 32, our tests use 4).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def page_rows(table_row, stride_table, tok, tok_mask, PAGE: tl.constexpr):
    """(page index as int64, row inside the page) of each token of a tile."""
    page = tl.load(table_row + (tok // PAGE) * stride_table, mask=tok_mask, other=0).to(tl.int64)
    return page, tok % PAGE


@triton.jit
def load_rows(pages, page, row, head, d, mask, stride_page, stride_row, stride_head, stride_dim):
    """The `[BLOCK_N, BLOCK_D]` tile of one KV head at the given (page, row) pairs; masked entries are 0."""
    token_rows = pages + page[:, None] * stride_page + row[:, None] * stride_row + head * stride_head
    return tl.load(token_rows + d[None, :] * stride_dim, mask=mask, other=0.0)


@triton.jit
def mma(a, b, FP32: tl.constexpr):
    """`a @ b` with a float32 result.

    FP32 multiplies in IEEE float32: float32 caches stay exact (no TF32), and bfloat16 is
    upcast where `tl.dot` on it is unreliable (the CPU interpreter). Otherwise `a` is cast to
    `b`'s half type so the product runs on tensor cores.
    """
    if FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(a.to(b.dtype), b)
    return acc


def dot_in_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `mma` must multiply in float32 for this cache dtype and device."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and device.type == "cpu")


def head_dim_block(head_dim: int) -> int:
    """Head dims such as 80 or 96 are padded to a power of two and masked."""
    return max(16, triton.next_power_of_2(head_dim))
