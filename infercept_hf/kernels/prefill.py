"""Paged prefill attention in Triton: many query tokens per sequence over KV already in the pages.

Used for a prompt, a resumed tool answer or a recompute chunk. The chunk's K/V has been
written into the pages first, so sequence b holds `seq_lens_k[b]` tokens and its `q_len`
queries are the last ones: query j sits at position `seq_lens_k[b] - q_len + j` and sees
keys `0 ..= position` (causal, aligned to the end).

One program serves `BLOCK_M` queries of one sequence and one query head; it stops reading
keys after the last position its queries can see, and skips the key tiles beyond it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_tile import attend_tile, attention_shape, base2_scale


@triton.jit
def _prefill_kernel(
    Q, K, V, TABLE, CU_Q, LENS, OUT,
    qk_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kp, stride_kr, stride_kh, stride_kd,
    stride_vp, stride_vr, stride_vh, stride_vd,
    stride_tb, stride_tp,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FP32: tl.constexpr,
):
    m_block = tl.program_id(0)
    b = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP

    q_start = tl.load(CU_Q + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    kv_len = tl.load(LENS + b)

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    row_mask = rows < q_len
    d_mask = d < HEAD_DIM
    positions = kv_len - q_len + rows
    q_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :] * stride_qd,
                mask=q_mask, other=0.0)

    table_row = TABLE + b * stride_tb
    last_visible = tl.minimum(kv_len, kv_len - q_len + (m_block + 1) * BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for tile_start in range(0, last_visible, BLOCK_N):
        tok = tile_start + n
        tok_mask = tok < kv_len
        visible = (tok[None, :] <= positions[:, None]) & tok_mask[None, :]
        m_i, l_i, acc = attend_tile(
            q, m_i, l_i, acc, K, V, table_row, stride_tp, tok, tok_mask, visible, kv_head, d, d_mask,
            qk_scale, stride_kp, stride_kr, stride_kh, stride_kd, stride_vp, stride_vr, stride_vh, stride_vd,
            PAGE, FP32,
        )

    out = acc / l_i[:, None]
    tl.store(OUT + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :] * stride_od, out, mask=q_mask)


def paged_prefill_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens_k: torch.Tensor,
    scale: float,
    max_seqlen_q: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed queries `q [T, Hq, D]` (sequence b owns rows `cu_seqlens_q[b]:cu_seqlens_q[b+1]`); returns `[T, Hq, D]`.

    Rows past `cu_seqlens_q[-1]` (padding) are left as they are in `out`. Pass `max_seqlen_q`
    to spare a device sync.
    """
    shape = attention_shape(q, k_pages, v_pages)
    batch = cu_seqlens_q.numel() - 1
    out = torch.empty_like(q) if out is None else out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if batch else 0
    if batch == 0 or max_seqlen_q == 0:
        return out
    block_m = min(shape.block_n, max(16, triton.next_power_of_2(max_seqlen_q)))  # query tiles no wider than a chunk
    _prefill_kernel[(triton.cdiv(max_seqlen_q, block_m), batch, shape.num_heads)](
        q, k_pages, v_pages, block_table, cu_seqlens_q, seq_lens_k, out,
        base2_scale(scale),
        *q.stride(), *k_pages.stride(), *v_pages.stride(), *block_table.stride(), *out.stride(),
        **shape.constexprs(), BLOCK_M=block_m,
    )
    return out
