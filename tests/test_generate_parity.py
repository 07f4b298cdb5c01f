"""generate() gives plain transformers' tokens, with and without interceptions, under every policy."""
from __future__ import annotations

import pytest
import torch

import infercept_hf as ih
from conftest import TEST_COST, TIGHT_POOL, left_pad, prompts_for, reference_scripted, scripted_batch, tiny_model

ARCHS = ["llama", "qwen2", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_without_interceptions_equals_model_generate(arch):
    model = tiny_model(arch)
    ids, mask = left_pad(prompts_for(1, [5, 11, 8]))
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = ih.generate(model, ids, attention_mask=mask, max_new_tokens=12, do_sample=False, cost_model=TEST_COST)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", ih.POLICIES)
def test_scripted_interceptions_match_reference_in_a_tight_pool(arch, policy):
    model = tiny_model(arch)
    prompts, trace = scripted_batch()
    ids, mask = left_pad(prompts)
    max_new = 16
    out = ih.generate(model, ids, attention_mask=mask, interceptions=trace, policy=policy, max_new_tokens=max_new,
                      cost_model=TEST_COST, **TIGHT_POOL)
    for i, (p, s) in enumerate(zip(prompts, trace)):
        expected = reference_scripted(model, p, s, max_new)
        row = out[i, ids.shape[1]:].tolist()[: len(expected)]
        assert row == expected, f"row {i} differs under {policy}"


def test_sampling_is_reproducible_under_a_seed(llama):
    ids, mask = left_pad(prompts_for(3, [6, 9]))
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, cost_model=TEST_COST)
    torch.manual_seed(7)
    a = ih.generate(llama, ids, **kw)
    torch.manual_seed(7)
    b = ih.generate(llama, ids, **kw)
    assert torch.equal(a, b)
    assert a.shape == (2, ids.shape[1] + 8)


def test_custom_generate_hook(llama):
    ids, mask = left_pad(prompts_for(4, [7]))
    trace = [ih.Scripted([(3, 0.0, [5, 6])])]
    out = llama.generate(ids, attention_mask=mask, custom_generate=ih.custom_generate, interceptions=trace,
                         policy="swap", max_new_tokens=6, do_sample=False, cost_model=TEST_COST)
    assert out[0, ids.shape[1]:].tolist() == reference_scripted(llama, prompts_for(4, [7])[0], trace[0], 6)


def test_model_stays_an_ordinary_model(llama):
    ids, mask = left_pad(prompts_for(5, [6]))
    before = llama.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    ih.generate(llama, ids, attention_mask=mask, max_new_tokens=5, interceptions=[ih.Scripted([(2, 0.0, [3])])],
                cost_model=TEST_COST)
    assert llama.config._attn_implementation in ("sdpa", "eager")
    assert torch.equal(llama.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False), before)
    assert llama(ids).logits.shape == (1, 6, llama.config.vocab_size)
