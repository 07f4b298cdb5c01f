"""Grouped-query attention inside torch's SDPA for the packed forward on CPU.

transformers' `sdpa_attention_forward` asks torch for grouped-query attention (`enable_gqa`)
only when there is no attention mask, because CUDA's fast kernels take none; with a mask it
copies every key and value head `num_key_value_groups` times (`repeat_kv`) first. The packed
forward always has a mask (block-diagonal over the batch's sequences), and on CPU torch's
SDPA takes that mask with `enable_gqa` at the same arithmetic and without the copies: for a
small Llama on one thread, the attention of a decode step costs several times less. So while
`grouped_query_attention()` is active on this thread, CPU tensors take the `enable_gqa` path;
every other call (other threads, other devices) keeps transformers' own choice.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.integrations import sdpa_attention

_ACTIVE = threading.local()
_ORIGINAL = sdpa_attention.use_gqa_in_sdpa


def _use_gqa_in_sdpa(attention_mask: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor) -> bool:
    if getattr(_ACTIVE, "on", False) and key.device.type == "cpu" and key.shape[-1] == value.shape[-1]:
        return True
    return _ORIGINAL(attention_mask, key, value)


@contextmanager
def grouped_query_attention() -> Iterator[None]:
    """Within the block, SDPA on CPU tensors of this thread runs grouped-query attention under a mask."""
    sdpa_attention.use_gqa_in_sdpa = _use_gqa_in_sdpa  # idempotent; transformers looks the name up per call
    before = getattr(_ACTIVE, "on", False)
    _ACTIVE.on = True
    try:
        yield
    finally:
        _ACTIVE.on = before
