"""KV movement in Triton: writing new tokens into the pages, and whole- or per-layer block copies.

`write_kv` puts token t's K and V at page `slot // P`, row `slot % P` of the page views.

Block copies work on the allocator's `_copy_view` (`[num_blocks, bytes_per_block]` uint8). A
block is `[L0 K | L0 V | L1 K | L1 V | ...]`, so one layer's K and V are the contiguous
span `[layer * bytes_per_block / L, (layer + 1) * bytes_per_block / L)` of every block row:
a per-layer copy is the same row copy on a narrower view. Rows are moved as the widest
integer words that their sizes, strides and offsets allow.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_tile import head_dim_block

WORDS_PER_PROGRAM = 1024


@triton.jit
def _write_kv_kernel(
    K_NEW, V_NEW, K, V, SLOTS,
    stride_knt, stride_knh, stride_knd,
    stride_vnt, stride_vnh, stride_vnd,
    stride_kp, stride_kr, stride_kh, stride_kd,
    stride_vp, stride_vr, stride_vh, stride_vd,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(SLOTS + t).to(tl.int64)
    page = slot // PAGE
    row = slot % PAGE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_HEADS) & (d < HEAD_DIM)
    k = tl.load(K_NEW + t * stride_knt + h * stride_knh + d * stride_knd, mask=mask)
    tl.store(K + page * stride_kp + row * stride_kr + h * stride_kh + d * stride_kd, k, mask=mask)
    v = tl.load(V_NEW + t * stride_vnt + h * stride_vnh + d * stride_vnd, mask=mask)
    tl.store(V + page * stride_vp + row * stride_vr + h * stride_vh + d * stride_vd, v, mask=mask)


@triton.jit
def _copy_rows_kernel(
    SRC, DST, IDS, row_words, stride_src, stride_dst,
    INDEXED_SRC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Row i goes from SRC[IDS[i]] to DST[i] (a gather) or from SRC[i] to DST[IDS[i]] (a scatter)."""
    i = tl.program_id(0)
    chunk = tl.program_id(1)
    block_id = tl.load(IDS + i).to(tl.int64)
    src_row = block_id if INDEXED_SRC else i
    dst_row = i if INDEXED_SRC else block_id
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < row_words
    words = tl.load(SRC + src_row * stride_src + offs, mask=mask)
    tl.store(DST + dst_row * stride_dst + offs, words, mask=mask)


def write_kv(
    k_new: torch.Tensor, v_new: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write `k_new, v_new [T, H, D]` into the page views `[num_pages, P, H, D]` at `slot_mapping [T]`."""
    num_tokens, num_heads, head_dim = k_new.shape
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k_new, v_new, k_pages, v_pages, slot_mapping,
        *k_new.stride(), *v_new.stride(), *k_pages.stride(), *v_pages.stride(),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, PAGE=k_pages.shape[1],
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=head_dim_block(head_dim),
    )


def _as_words(*rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same byte rows seen as the widest integer type that divides every size, stride and offset."""
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = dtype.itemsize
        if all(r.shape[1] % size == 0 and r.stride(0) % size == 0 and r.storage_offset() % size == 0 for r in rows):
            return tuple(r.view(dtype) for r in rows)
    return rows


def _copy_rows(src: torch.Tensor, dst: torch.Tensor, block_ids: torch.Tensor, indexed_src: bool) -> None:
    if block_ids.numel() == 0:
        return
    src, dst = _as_words(src, dst)
    row_words = src.shape[1]
    grid = (block_ids.numel(), triton.cdiv(row_words, WORDS_PER_PROGRAM))
    _copy_rows_kernel[grid](
        src, dst, block_ids, row_words, src.stride(0), dst.stride(0),
        INDEXED_SRC=indexed_src, BLOCK=WORDS_PER_PROGRAM,
    )


def _check_rows(rows: torch.Tensor, span: torch.Tensor, block_ids: torch.Tensor, name: str) -> None:
    if rows.dtype != torch.uint8 or rows.shape != (block_ids.numel(), span.shape[1]) or rows.stride(1) != 1:
        raise ValueError(f"{name} must be uint8 [{block_ids.numel()}, {span.shape[1]}] with contiguous rows")


def gather_rows(span: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out[i] = span[block_ids[i]]`: the swap-out copy, on the rows that `reference.block_span` picked."""
    _check_rows(out, span, block_ids, "out")
    _copy_rows(span, out, block_ids, indexed_src=True)
    return out


def scatter_rows(staging: torch.Tensor, span: torch.Tensor, block_ids: torch.Tensor) -> None:
    """`span[block_ids[i]] = staging[i]`: the swap-in copy, on the rows that `reference.block_span` picked."""
    _check_rows(staging, span, block_ids, "staging")
    _copy_rows(staging, span, block_ids, indexed_src=False)
