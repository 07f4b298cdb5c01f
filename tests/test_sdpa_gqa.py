"""The packed forward's grouped-query SDPA: on only inside the block, on this thread, for CPU tensors,
with the attention transformers' own path computes."""
from __future__ import annotations

import threading

import torch
from transformers.integrations import sdpa_attention

from infercept_hf.patches.sdpa_gqa import grouped_query_attention


class _Layer(torch.nn.Module):
    num_key_value_groups = 2
    layer_idx = 0
    is_causal = True


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 6, 8, generator=g)
    k, v = torch.randn(1, 2, 10, 8, generator=g), torch.randn(1, 2, 10, 8, generator=g)
    mask = torch.full((1, 1, 6, 10), torch.finfo(torch.float32).min)
    for i, (lo, hi) in enumerate([(0, 4)] * 3 + [(4, 10)] * 3):  # two packed sequences
        mask[0, 0, i, lo:hi] = 0
    return q, k, v, mask


def test_masked_gqa_only_inside_the_block():
    _, k, v, mask = _inputs()
    assert not sdpa_attention.use_gqa_in_sdpa(mask, k, v)
    with grouped_query_attention():
        assert sdpa_attention.use_gqa_in_sdpa(mask, k, v)
        seen = []
        other = threading.Thread(target=lambda: seen.append(sdpa_attention.use_gqa_in_sdpa(mask, k, v)))
        other.start()
        other.join()
        assert seen == [False]  # another thread keeps transformers' choice
    assert not sdpa_attention.use_gqa_in_sdpa(mask, k, v)


def test_masked_gqa_attends_as_repeated_heads_do():
    q, k, v, mask = _inputs()
    plain, _ = sdpa_attention.sdpa_attention_forward(_Layer(), q, k, v, mask)
    with grouped_query_attention():
        grouped, _ = sdpa_attention.sdpa_attention_forward(_Layer(), q, k, v, mask)
    torch.testing.assert_close(grouped, plain, rtol=1e-6, atol=1e-6)
