"""Paged-KV kernels on transformers' own cache tensor, in Triton (CUDA) or plain torch (CPU).

transformers' `PagedAttentionCache` keeps one flat tensor; its full-attention allocator sees
it as rows of `[H_kv, D]`, one block being `P` tokens of every one of `L` layers:

    block b:  [ L0 K (P rows) | L0 V (P rows) | L1 K | L1 V | ... ]   rows b*2PL .. (b+1)*2PL

Per layer it exposes page views `k_pages, v_pages [num_pages, P, H_kv, D]` (layer i's
views start at row 2iP and 2iP + P) in which block b is page `b * 2L`; block tables hold
those page indices, as for `flash_attn_with_kvcache(block_table=...)`. Every kernel here
takes the page views (any strides) and such a block table, so it runs on the cache in place.

Each public function takes `backend`: "triton", "torch", or None for Triton on CUDA and
torch elsewhere. On CPU, Triton runs only in its interpreter (~300x slower than torch, for
tests: ask for it by name), which `TRITON_INTERPRET=1` turns on at the moment triton is
first imported (`torch._dynamo`, pulled in by transformers, imports it): set it before
importing either.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from functools import cache
from typing import Literal

import torch

from . import reference

Backend = Literal["triton", "torch"]


def triton_available(device: torch.device | str) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only under its interpreter."""
    device = torch.device(device)
    if not _triton_installed():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and _interpreter_loaded()


@cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreter_loaded() -> bool:
    """Whether triton's own library was built for the interpreter (it is, if triton is imported after the flag)."""
    if "triton" not in sys.modules:
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(sys.modules["triton"].language.zeros, InterpretedFunction)


def _use_triton(backend: Backend | None, device: torch.device) -> bool:
    if backend is None:
        return device.type == "cuda" and triton_available(device)
    if backend not in ("triton", "torch"):
        raise ValueError(f"unknown kernel backend {backend!r}; choose 'triton' or 'torch'")
    if backend == "triton" and not triton_available(device):
        raise RuntimeError(f"Triton cannot run on {device} here: on CPU set TRITON_INTERPRET=1 before triton or "
                           "transformers is imported (tests: in tests/conftest.py, before importing transformers)")
    return backend == "triton"


def paged_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    backend: Backend | None = None,
) -> torch.Tensor:
    """One query per sequence: `q [B, Hq, D]` over its `seq_lens[b]` cached tokens -> `[B, Hq, D]`."""
    if _use_triton(backend, q.device):
        from .decode import paged_decode_attention as triton_decode

        return triton_decode(q, k_pages, v_pages, block_table, seq_lens, scale, num_splits, out)
    return reference.decode_attention_ref(q, k_pages, v_pages, block_table, seq_lens, scale, out)


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
    backend: Backend | None = None,
) -> torch.Tensor:
    """Packed chunks `q [T, Hq, D]` whose K/V is already in the pages, causal to the end -> `[T, Hq, D]`."""
    if _use_triton(backend, q.device):
        from .prefill import paged_prefill_attention as triton_prefill

        return triton_prefill(q, k_pages, v_pages, block_table, cu_seqlens_q, seq_lens_k, scale, max_seqlen_q, out)
    return reference.prefill_attention_ref(q, k_pages, v_pages, block_table, cu_seqlens_q, seq_lens_k, scale, out)


def write_kv(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    slot_mapping: torch.Tensor,
    backend: Backend | None = None,
) -> None:
    """Write `k_new, v_new [T, H, D]` at `slot_mapping [T]` (slot = page * P + row) of the page views."""
    if _use_triton(backend, k_new.device):
        from .kv_copy import write_kv as triton_write_kv

        triton_write_kv(k_new, v_new, k_pages, v_pages, slot_mapping)
    else:
        reference.write_kv_ref(k_new, v_new, k_pages, v_pages, slot_mapping)


def gather_blocks(
    copy_view: torch.Tensor,
    block_ids: torch.Tensor,
    out: torch.Tensor,
    layer: int | None = None,
    num_layers: int = 1,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Swap-out side: `out[i]` = block `block_ids[i]` of `copy_view`, whole or only `layer` of `num_layers`."""
    if _use_triton(backend, copy_view.device):
        from .kv_copy import gather_rows

        return gather_rows(reference.block_span(copy_view, layer, num_layers), block_ids, out)
    return reference.gather_blocks_ref(copy_view, block_ids, out, layer, num_layers)


def scatter_blocks(
    staging: torch.Tensor,
    copy_view: torch.Tensor,
    block_ids: torch.Tensor,
    layer: int | None = None,
    num_layers: int = 1,
    backend: Backend | None = None,
) -> None:
    """Swap-in side: block `block_ids[i]` of `copy_view` (whole or only `layer`) = `staging[i]`."""
    if _use_triton(backend, copy_view.device):
        from .kv_copy import scatter_rows

        scatter_rows(staging, reference.block_span(copy_view, layer, num_layers), block_ids)
    else:
        reference.scatter_blocks_ref(staging, copy_view, block_ids, layer, num_layers)


__all__ = [
    "Backend",
    "gather_blocks",
    "paged_decode_attention",
    "paged_prefill_attention",
    "scatter_blocks",
    "triton_available",
    "write_kv",
]
