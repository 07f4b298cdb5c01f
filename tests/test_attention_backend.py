"""generate(..., attention_backend="triton") runs the paged kernels (CPU: Triton's interpreter), exactly."""
from __future__ import annotations

import pytest
import torch

import infercept_hf as ih
from infercept_hf.kernels import triton_available
from conftest import TEST_COST, left_pad, prompts_for, reference_scripted, tiny_model

needs_triton = pytest.mark.skipif(not triton_available(torch.device("cpu")) and not torch.cuda.is_available(),
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)")


@needs_triton
@pytest.mark.parametrize("policy", ["swap", "discard"])
def test_triton_backend_gives_plain_transformers_tokens(policy):
    model = tiny_model("llama")
    prompts = prompts_for(41, [5, 9])
    ids, mask = left_pad(prompts)
    trace = [ih.Scripted([(3, 0.0, [7, 8])]), ih.Scripted([(2, 0.01, [9])])]
    out = ih.generate(model, ids, attention_mask=mask, interceptions=trace, policy=policy, max_new_tokens=6,
                      num_blocks=8, block_size=4, cost_model=TEST_COST, attention_backend="triton")
    for i, (p, s) in enumerate(zip(prompts, trace)):
        expected = reference_scripted(model, p, s, 6)
        assert out[i, ids.shape[1]:].tolist()[: len(expected)] == expected
    assert model.config._attn_implementation == "sdpa"  # switched for the engine's calls only


def test_backend_choice_and_errors():
    llama = tiny_model("llama")
    assert ih.InterceptEngine(llama, num_blocks=4, cost_model=TEST_COST).runner.backend == "torch"  # CPU: auto -> torch
    with pytest.raises(ValueError, match="unknown attention_backend 'cudnn'"):
        ih.InterceptEngine(llama, num_blocks=4, cost_model=TEST_COST, attention_backend="cudnn")
    gptj = tiny_model("gptj")
    with pytest.raises(ih.UnsupportedModelError, match="GPTJForCausalLM.*attention_backend='torch'"):
        ih.InterceptEngine(gptj, num_blocks=4, cost_model=TEST_COST, attention_backend="triton")
