"""accelerate-placed models: exact tokens with layers offloaded to CPU and disk, and pools sized from what is left.

CPU only: accelerate's main device is then CPU and "disk" layers are memory-mapped from
`offload_dir` and loaded for their forward, the same hooks that stream offloaded layers onto
a GPU. The embedding goes to disk in the second map, so `model.device` reads `meta` there.
"""
from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model

import infercept_hf as ih
from conftest import TEST_COST, TIGHT_POOL, left_pad, reference_scripted, scripted_batch, tiny_model
from infercept_hf.memory import CPU_DEVICE_CAP_BLOCKS, HOST_TO_DEVICE_RATIO, MemoryView, default_pool_sizes
from infercept_hf.model_spec import ModelSpec
from infercept_hf.patches.placement import execution_device, largest_offloaded_module_bytes

MAPS = {
    "layers split cpu/disk": {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                              "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"},
    "embedding on disk": {"model.embed_tokens": "disk", "model.layers.0": "disk", "model.layers.1": "cpu",
                          "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"},
}
GIB = 1 << 30


def dispatched(device_map: dict[str, str], offload_dir) -> torch.nn.Module:
    return dispatch_model(tiny_model("llama"), device_map=device_map, offload_dir=str(offload_dir))


@pytest.fixture(scope="module")
def expected():
    prompts, trace = scripted_batch()
    plain = tiny_model("llama")
    return [reference_scripted(plain, p, s, 16) for p, s in zip(prompts, trace)]


@pytest.mark.parametrize("policy", ["swap", "discard", "min-waste"])
@pytest.mark.parametrize("placement", list(MAPS))
def test_dispatched_model_gives_the_undispatched_models_tokens(placement, policy, expected, tmp_path):
    model = dispatched(MAPS[placement], tmp_path)
    assert any(p.device.type == "meta" for p in model.parameters())  # really offloaded
    prompts, trace = scripted_batch()
    ids, mask = left_pad(prompts)
    out = ih.generate(model, ids, attention_mask=mask, interceptions=trace, policy=policy, max_new_tokens=16,
                      cost_model=TEST_COST, **TIGHT_POOL)
    assert [out[i, ids.shape[1]:].tolist()[: len(e)] for i, e in enumerate(expected)] == expected


def test_execution_device_is_where_accelerate_computes(tmp_path):
    model = dispatched(MAPS["embedding on disk"], tmp_path)
    assert model.device.type == "meta"
    assert execution_device(model) == torch.device("cpu")
    assert execution_device(tiny_model("llama")) == torch.device("cpu")


def test_default_pools_serve_a_dispatched_model(expected, tmp_path):
    model = dispatched(MAPS["layers split cpu/disk"], tmp_path)
    prompts, trace = scripted_batch()
    with ih.InterceptEngine(model, cost_model=TEST_COST) as engine:
        assert engine.cache.num_blocks == CPU_DEVICE_CAP_BLOCKS  # a tiny model: the CPU cap binds
        assert engine.cache.num_host_blocks <= HOST_TO_DEVICE_RATIO * CPU_DEVICE_CAP_BLOCKS
        rid = engine.add_request(prompts[1], max_new_tokens=16, interceptions=trace[1])
        assert engine.run()[rid].token_ids == expected[1]


def _gpu(free: int, streamed: int, host_free: int = 64 * GIB) -> MemoryView:
    return MemoryView(torch.device("cuda", 0), free, streamed, host_free, 128 * GIB)


def test_device_pool_is_what_the_weights_and_one_streamed_layer_leave():
    model = tiny_model("llama")
    block = 2 * 2 * 2 * 8 * 4 * 16  # K and V x layers x kv heads x head dim x float32 bytes x tokens
    sizes = default_pool_sizes(ModelSpec.of(model), None, 16, 0, memory=_gpu(10 * GIB, 2 * GIB))
    assert sizes.num_blocks == int(8 * GIB * 0.8) // block
    with pytest.raises(ValueError, match="no room for a KV block"):
        default_pool_sizes(ModelSpec.of(model), None, 16, 0, memory=_gpu(GIB, GIB))


def test_host_pool_keeps_a_safety_margin():
    model = tiny_model("llama")
    block = 2 * 2 * 2 * 8 * 4 * 16
    # 20 GiB available of 128: 12.8 GiB stay for the system, half of the rest is the swap pool
    tight = default_pool_sizes(ModelSpec.of(model), 10**9, 16, None, memory=_gpu(GIB, 0, 20 * GIB))
    assert tight.num_host_blocks == int((20 * GIB - int(12.8 * GIB)) * 0.5) // block
    none_left = default_pool_sizes(ModelSpec.of(model), 10, 16, None, memory=_gpu(GIB, 0, 10 * GIB))
    assert none_left.num_host_blocks == 0
    roomy = default_pool_sizes(ModelSpec.of(model), 10, 16, None, memory=_gpu(GIB, 0))
    assert roomy.num_host_blocks == HOST_TO_DEVICE_RATIO * 10


def test_largest_offloaded_module_is_counted(tmp_path):
    model = dispatched(MAPS["layers split cpu/disk"], tmp_path)
    layer = sum(p.numel() for p in tiny_model("llama").model.layers[1].parameters()) * 4
    head = 128 * 32 * 4
    assert largest_offloaded_module_bytes(model) == max(layer, head)
    assert largest_offloaded_module_bytes(tiny_model("llama")) == 0
