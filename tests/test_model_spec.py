"""ModelSpec: the model's facts, worked out once per engine and shared by its parts."""
from __future__ import annotations

import torch

import infercept_hf as ih
from infercept_hf import model_spec
from infercept_hf.model_spec import ModelSpec
from infercept_hf.patches.paged_pool import pool_kv_bytes_per_token

from conftest import TEST_COST, VOCAB, tiny_model


def test_llama_facts(llama):
    spec = ModelSpec.of(llama)
    # K and V x 2 layers x 2 KV heads x head dim 8 x 4 bytes
    assert spec.kv_bytes_per_token == 2 * 2 * 2 * 8 * 4
    assert (spec.max_positions, spec.vocab_size, spec.num_layers) == (512, VOCAB, 2)
    assert (spec.dtype, spec.device, spec.mask_dtype) == (torch.float32, torch.device("cpu"), torch.float32)
    assert spec.sliding_window is None and spec.layer_groups == ("full_attention",)
    assert spec.streamed_weight_bytes == 0  # not dispatched by accelerate


def test_gpt2_names_its_positions_differently():
    spec = ModelSpec.of(tiny_model("gpt2"))
    assert spec.max_positions == 512  # n_positions
    assert spec.kv_bytes_per_token == 2 * 2 * 4 * 8 * 4


def test_sliding_window_model():
    spec = ModelSpec.of(tiny_model("mistral"))
    assert spec.sliding_window == 12
    assert set(spec.layer_groups) <= {"full_attention", "sliding_attention"}


def test_dtype_override_changes_the_bytes(llama):
    assert ModelSpec.of(llama, torch.float16).kv_bytes_per_token == ModelSpec.of(llama).kv_bytes_per_token // 2


def test_an_engine_works_the_facts_out_once(llama, monkeypatch):
    calls = []
    real = model_spec.execution_device
    monkeypatch.setattr(model_spec, "execution_device", lambda m: calls.append(m) or real(m))
    with ih.InterceptEngine(llama, num_blocks=8, block_size=4, host_pool_bytes=0, cost_model=TEST_COST) as engine:
        assert engine.cache.spec is engine.spec and engine.runner.device == engine.spec.device
        # one process: the whole model's KV, as transformers sized the pool
        pool = pool_kv_bytes_per_token(engine.cache)
        assert pool == engine.spec.rank_kv_bytes_per_token == engine.spec.kv_bytes_per_token
        assert (engine.max_positions, engine.vocab_size) == (512, VOCAB)
    assert len(calls) == 1
