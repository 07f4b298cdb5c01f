"""The AttentionInterface function against transformers' own paged sdpa, on real PagedAttentionCaches.

Two identical caches go through the same steps (two prompts, then a decode beside a
resumed chunk, then pure decode, then one request alone): transformers' `sdpa_attention_forward`
writes one through `write_index` and reads the context back through `read_index`; ours writes
the other through the page views and attends straight from the pages. Outputs must agree and
the two cache tensors must stay byte-identical.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.generation.continuous_batching.requests import RequestState
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from infercept_hf.kernels.attention import infercept_paged_attention
from infercept_hf.patches import paged_pool as pp
from kernel_helpers import paged_attention_cache

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 24, 2
STEPS = [{"a": 7, "b": 5}, {"a": 1, "b": 3}, {"a": 1, "b": 1}, {"b": 6}]  # query tokens per request
FULL = "full_attention"


def new_cache():
    return paged_attention_cache(LAYERS, HEADS, KV_HEADS, HEAD_DIM, num_blocks=12, device="cpu")


def packed_mask(past: list[int], q_lens: list[int]) -> torch.Tensor:
    """sdpa's additive mask over the read-back context: each query sees its own sequence, causally."""
    mask = torch.full((sum(q_lens), sum(past) + sum(q_lens)), torch.finfo(torch.float32).min)
    row = col = 0
    for p, q in zip(past, q_lens):
        for j in range(q):
            mask[row + j, col : col + p + j + 1] = 0.0
        row, col = row + q, col + p + q
    return mask[None, None]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_transformers_sdpa_on_paged_cache(backend):
    ours, theirs = new_cache(), new_cache()
    states = {rid: RequestState(request_id=rid, initial_tokens=[1]) for rid in ("a", "b")}
    g = torch.Generator().manual_seed(0)
    for step in STEPS:
        rids, q_lens = list(step), list(step.values())
        past = [states[rid].position_offset for rid in rids]
        read, write = [[]], [[]]
        table = torch.zeros(len(rids), 8, dtype=torch.int32)
        for row, (rid, p, q) in enumerate(zip(rids, past, q_lens)):
            assert ours.can_store_request_tokens(states[rid], q) and theirs.can_store_request_tokens(states[rid], q)
            theirs.extend_read_and_write_indices(rid, p, q, read, write)
            pp.fill_block_table(pp.allocators(ours)[FULL], rid, p, q, table[row])
        seq_lens_k = torch.tensor(past, dtype=torch.int32) + torch.tensor(q_lens, dtype=torch.int32)
        cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        cu_k = torch.tensor([0, *seq_lens_k.cumsum(0).tolist()], dtype=torch.int32)
        mask = packed_mask(past, q_lens)
        tokens = sum(q_lens)

        for layer in range(LAYERS):
            module = SimpleNamespace(layer_idx=layer, num_key_value_groups=HEADS // KV_HEADS, is_causal=True)
            query = torch.randn(1, HEADS, tokens, HEAD_DIM, generator=g)
            key = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=g)
            value = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, generator=g)
            expected, _ = sdpa_attention_forward(
                module, query, key, value, mask, scaling=0.2, cache=theirs,
                read_index=[torch.tensor(read[0])], write_index=[torch.tensor(write[0])],
                cu_seq_lens_k={FULL: cu_k}, max_length_k={FULL: int(seq_lens_k.max())},
            )
            got, _ = infercept_paged_attention(
                module, query, key, value, None, scaling=0.2, cache=ours,
                write_index=[torch.tensor(write[0])], cu_seq_lens_q=cu_q, max_length_q=max(q_lens),
                infercept_block_table=table, infercept_seq_lens_k=seq_lens_k, infercept_backend=backend,
            )
            assert got.shape == expected.shape == (1, tokens, HEADS, HEAD_DIM)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(ours.cache_tensor, theirs.cache_tensor)
        for rid, q in step.items():
            states[rid].position_offset += q


def test_rejects_dropout():
    states = torch.zeros(1, 1, 1, 8)
    with pytest.raises(ValueError):
        infercept_paged_attention(SimpleNamespace(layer_idx=0), states, states, states, None, dropout=0.1)
