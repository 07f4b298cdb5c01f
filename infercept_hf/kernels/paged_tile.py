"""Triton helpers shared by the attention kernels: reading a tile of tokens through a block table.

A sequence's token `t` lives in page `block_table[t // P]`, row `t % P` of a page view
`[num_pages, P, H, D]` (any strides). A tile of `BLOCK_N` consecutive tokens may straddle
several pages, so each row looks its page up on its own: any page size works, including
ones smaller than the tile (transformers' default is 32, our tests use 4).
"""
from __future__ import annotations

import math
from typing import NamedTuple

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


@triton.jit
def attend_tile(
    q, m_i, l_i, acc, K, V, table_row, stride_table, tok, tok_mask, visible, kv_head, d, d_mask, qk_scale,
    stride_kp, stride_kr, stride_kh, stride_kd,
    stride_vp, stride_vr, stride_vh, stride_vd,
    PAGE: tl.constexpr, FP32: tl.constexpr,
):
    """One online-softmax step over a tile of tokens `tok`: returns the new running max `m_i`,
    sum `l_i` and unnormalised output `acc` of the query rows `q` (scores in base 2, masked
    by `visible`). Decode and prefill differ only in which keys a query may see."""
    page, row = page_rows(table_row, stride_table, tok, tok_mask, PAGE)
    kv_mask = tok_mask[:, None] & d_mask[None, :]
    k = load_rows(K, page, row, kv_head, d, kv_mask, stride_kp, stride_kr, stride_kh, stride_kd)
    scores = mma(q, tl.trans(k), FP32) * qk_scale
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = load_rows(V, page, row, kv_head, d, kv_mask, stride_vp, stride_vr, stride_vh, stride_vd)
    acc = acc * alpha[:, None] + mma(p, v, FP32)
    return m_new, l_i, acc


def tile_tokens(head_dim: int) -> int:
    """Tokens per tile: 64, halved for head dims over 128 to keep a tile's registers and shared memory in bounds."""
    return 64 if head_dim <= 128 else 32


class AttentionShape(NamedTuple):
    """Sizes both attention launchers need, and whether their tiles multiply in float32."""

    num_heads: int
    head_dim: int
    page_size: int
    num_kv_heads: int
    fp32: bool

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def block_n(self) -> int:
        return tile_tokens(self.head_dim)

    def constexprs(self) -> dict[str, int | bool]:
        """The compile-time arguments that both kernels pass on to `attend_tile`, chosen in one place."""
        return dict(GROUP=self.group, PAGE=self.page_size, HEAD_DIM=self.head_dim,
                    BLOCK_N=self.block_n, BLOCK_D=head_dim_block(self.head_dim), FP32=self.fp32)


def base2_scale(scale: float) -> float:
    """The score scale `attend_tile` takes: scores are kept in base 2, for `exp2`."""
    return scale * math.log2(math.e)


def attention_shape(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> AttentionShape:
    """The sizes of `q [rows, Hq, D]` over pages `[num_pages, P, Hkv, D]`, refusing what a kernel
    cannot run: query heads that do not split evenly into KV groups, or a cache dtype other than
    the query's (one tile multiplies both)."""
    _, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} KV heads evenly")
    if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise ValueError(f"query dtype {q.dtype} differs from cache dtype {k_pages.dtype}")
    return AttentionShape(num_heads, head_dim, page_size, num_kv_heads, dot_in_fp32(q.dtype, q.device))
