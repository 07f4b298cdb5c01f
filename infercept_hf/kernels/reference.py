"""Plain-torch versions of every kernel: the CPU backend and the tests' oracle.

They read the same paged layout as the Triton kernels (see `kernels/__init__.py`) and do
the arithmetic in at least float32, so a float64 call is an exact reference and a float16
call is what a CPU engine runs. Sequences are handled one by one: simple, and the batch on
a CPU is small.
"""
from __future__ import annotations

import torch


def gather_sequence(pages: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence, `[length, H, D]`, read through its block table row."""
    page_size = pages.shape[1]
    num_pages = -(-length // page_size)
    return pages[table_row[:num_pages].long()].flatten(0, 1)[:length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, visible: torch.Tensor) -> torch.Tensor:
    """Softmax attention of `q [Tq, Hq, D]` over `k, v [Tk, Hkv, D]` where `visible [Tq, Tk]` allows it."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[1] // k.shape[1]
    k = k.to(dtype).repeat_interleave(group, dim=1)
    v = v.to(dtype).repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.to(dtype), k) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def decode_attention_ref(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence (`q [B, Hq, D]`) over its whole cached context: a prefill of
    one query each, whose causal mask then hides nothing."""
    one_query_each = torch.arange(seq_lens.numel() + 1)
    return prefill_attention_ref(q, k_pages, v_pages, block_table, one_query_each, seq_lens, scale, out)


def prefill_attention_ref(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens_k: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed queries `q [T, Hq, D]`; sequence b's last query is its last cached key, causal before it."""
    out = torch.empty_like(q) if out is None else out
    cu = cu_seqlens_q.tolist()
    for b, length in enumerate(seq_lens_k.tolist()):
        start, end = cu[b], cu[b + 1]
        if end == start:
            continue
        k = gather_sequence(k_pages, block_table[b], length)
        v = gather_sequence(v_pages, block_table[b], length)
        positions = torch.arange(length - (end - start), length, device=q.device)
        visible = torch.arange(length, device=q.device)[None, :] <= positions[:, None]
        out[start:end] = _attend(q[start:end], k, v, scale, visible).to(out.dtype)
    return out


def write_kv_ref(
    k_new: torch.Tensor, v_new: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Token t goes to page `slot // P`, row `slot % P` of both page views (any strides)."""
    page_size = k_pages.shape[1]
    pages, offsets = slot_mapping // page_size, slot_mapping % page_size
    k_pages[pages, offsets] = k_new.to(k_pages.dtype)
    v_pages[pages, offsets] = v_new.to(v_pages.dtype)


def block_span(copy_view: torch.Tensor, layer: int | None, num_layers: int) -> torch.Tensor:
    """The bytes of every block that a copy moves: all of it, or one layer's page (its keys and values)."""
    if layer is None:
        return copy_view
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is outside a block of {num_layers} layers")
    return copy_view.view(copy_view.shape[0], num_layers, -1)[:, layer]


def gather_blocks_ref(
    copy_view: torch.Tensor,
    block_ids: torch.Tensor,
    out: torch.Tensor,
    layer: int | None = None,
    num_layers: int = 1,
) -> torch.Tensor:
    """`out[i] = span(copy_view[block_ids[i]])`: the swap-out side; `out` is contiguous `[n, span bytes]`."""
    return torch.index_select(block_span(copy_view, layer, num_layers), 0, block_ids.long(), out=out)


def scatter_blocks_ref(
    staging: torch.Tensor,
    copy_view: torch.Tensor,
    block_ids: torch.Tensor,
    layer: int | None = None,
    num_layers: int = 1,
) -> None:
    """`span(copy_view[block_ids[i]]) = staging[i]`: the swap-in side."""
    block_span(copy_view, layer, num_layers).index_copy_(0, block_ids.long(), staging)
