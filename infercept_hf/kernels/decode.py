"""Paged decode attention in Triton: one query token per sequence, split-K over long contexts.

One program serves one (sequence, KV head, split): it packs the KV head's `G = Hq / Hkv`
query heads into the rows of a tile (padded to 16 for `tl.dot`), so every cached key and
value is read once per KV head whatever the GQA ratio. With one split the program writes
the normalised output. With S splits each program covers one contiguous slice of the
context and leaves a partial (running max `m`, sum `l`, unnormalised output); a second
kernel merges the S partials of a head:

    out = sum_s 2^(m_s - M) * acc_s / sum_s 2^(m_s - M) * l_s,   M = max_s m_s

Scores are kept in base 2 (scaled by `scale * log2(e)`) so the kernels use `exp2`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_tile import attend_tile, attention_shape, base2_scale, head_dim_block

MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 32


@triton.jit
def _decode_kernel(
    Q, K, V, TABLE, LENS, OUT, M, L,
    qk_scale, tokens_per_split,
    stride_qb, stride_qh, stride_qd,
    stride_kp, stride_kr, stride_kh, stride_kd,
    stride_vp, stride_vr, stride_vh, stride_vd,
    stride_tb, stride_tp,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_mb, stride_mh, stride_ms,
    GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, FP32: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM

    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    seq_len = tl.load(LENS + b)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)
    table_row = TABLE + b * stride_tb

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        tok = tile_start + n
        tok_mask = tok < end
        m_i, l_i, acc = attend_tile(
            q, m_i, l_i, acc, K, V, table_row, stride_tp, tok, tok_mask, tok_mask[None, :], kv_head, d, d_mask,
            qk_scale, stride_kp, stride_kr, stride_kh, stride_kd, stride_vp, stride_vr, stride_vh, stride_vd,
            PAGE, FP32,
        )

    out_ptrs = OUT + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :] * stride_od
    out_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        tl.store(out_ptrs, acc, mask=out_mask)
        m_ptrs = b * stride_mb + heads * stride_mh + split * stride_ms
        tl.store(M + m_ptrs, m_i, mask=g_mask)
        tl.store(L + m_ptrs, l_i, mask=g_mask)
    else:
        l_safe = tl.where(l_i > 0, l_i, 1.0)  # an empty sequence yields zeros
        tl.store(out_ptrs, acc / l_safe[:, None], mask=out_mask)


@triton.jit
def _merge_kernel(
    PART, M, L, OUT,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_mb, stride_mh, stride_ms,
    stride_ob, stride_oh, stride_od,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < NUM_SPLITS
    m_ptrs = b * stride_mb + h * stride_mh + s * stride_ms
    m_s = tl.load(M + m_ptrs, mask=s_mask, other=float("-inf"))
    l_s = tl.load(L + m_ptrs, mask=s_mask, other=0.0)
    m_max = tl.max(m_s, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty: weights 0, output 0
    w = tl.exp2(m_s - m_max)
    denom = tl.sum(w * l_s, 0)
    part = tl.load(PART + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :] * stride_pd,
                   mask=s_mask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(OUT + b * stride_ob + h * stride_oh + d * stride_od, out, mask=d < HEAD_DIM)


def default_num_splits(batch: int, num_kv_heads: int, max_len: int, device: torch.device) -> int:
    """Enough splits to give every SM about two programs, none shorter than MIN_TOKENS_PER_SPLIT."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = -(-2 * sms // max(1, batch * num_kv_heads))
    return max(1, min(wanted, -(-max_len // MIN_TOKENS_PER_SPLIT), MAX_SPLITS))


def paged_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`q [B, Hq, D]` attends to its sequence's first `seq_lens[b]` cached tokens; returns `[B, Hq, D]`.

    Splits cut the block table's full width (`max_pages * P` tokens, known without a device
    sync) into equal slices, so size the table to the batch's longest sequence.
    """
    shape = attention_shape(q, k_pages, v_pages)
    batch, num_heads, head_dim = q.shape
    out = torch.empty_like(q) if out is None else out
    max_len = block_table.shape[1] * shape.page_size
    if num_splits is None:
        num_splits = default_num_splits(batch, shape.num_kv_heads, max_len, q.device)
    tokens_per_split = triton.cdiv(triton.cdiv(max_len, num_splits), shape.block_n) * shape.block_n
    split = num_splits > 1
    if split:
        part = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        m = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
        l_sum = torch.empty_like(m)
        target, target_strides, stat_strides = part, part.stride(), m.stride()
    else:  # the kernel writes `out` directly and never touches m, l
        m = l_sum = target = out
        target_strides, stat_strides = (out.stride(0), out.stride(1), 0, out.stride(2)), (0, 0, 0)
    _decode_kernel[(batch, shape.num_kv_heads, num_splits)](
        q, k_pages, v_pages, block_table, seq_lens, target, m, l_sum,
        base2_scale(scale), tokens_per_split,
        *q.stride(), *k_pages.stride(), *v_pages.stride(), *block_table.stride(),
        *target_strides, *stat_strides,
        **shape.constexprs(), BLOCK_G=max(16, triton.next_power_of_2(shape.group)), SPLIT=split,
    )
    if split:
        _merge_kernel[(batch, num_heads)](
            part, m, l_sum, out, *part.stride(), *m.stride(), *out.stride(),
            NUM_SPLITS=num_splits, HEAD_DIM=head_dim,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=head_dim_block(head_dim),
        )
    return out
