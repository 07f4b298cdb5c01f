"""The cost model from measurement. Timings are never asserted, only their shape and the caching."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTJConfig, LlamaConfig

from infercept_hf import profiler
from infercept_hf.model_spec import ModelSpec, kv_bytes_per_token
from infercept_hf.policy import CostModel
from infercept_hf.profiler import (
    fit_linear,
    load_or_profile,
    profile_forward,
    profile_link,
    saturation_point,
)

LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA)).eval()


@pytest.fixture
def no_measuring(monkeypatch):
    """Any measurement fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("measured although it should not have")
    monkeypatch.setattr(profiler, "measure_forward", refuse)
    monkeypatch.setattr(profiler, "profile_link", refuse)


@pytest.fixture
def fake_measurements(monkeypatch):
    """Fixed measurements: t = n/8 s for n tokens, a 1 GB/s link."""
    monkeypatch.setattr(profiler, "measure_forward", lambda model, spec=None: [(8, 1.0), (16, 2.0)])
    monkeypatch.setattr(profiler, "profile_link", lambda device: 1e9)


# ---------------------------------------------------------------- fitting
def test_fit_linear_exact():
    assert fit_linear([(1, 3.0), (2, 5.0), (3, 7.0)]) == (2.0, 1.0)  # t = 2n + 1


def test_fit_linear_clamps_negative_slope_to_a_constant():
    assert fit_linear([(1, 3.0), (2, 1.0)]) == (0.0, 2.0)  # mean time


def test_fit_linear_clamps_negative_intercept_through_the_origin():
    # free fit t = 2n - 1; through the origin a = sum(n t) / sum(n^2) = (1 + 6) / (1 + 4)
    assert fit_linear([(1, 1.0), (2, 3.0)]) == (pytest.approx(1.4), 0.0)


def test_fit_linear_single_point_and_empty():
    assert fit_linear([(8, 2.0)]) == (0.0, 2.0)
    with pytest.raises(ValueError):
        fit_linear([])


def test_saturation_point():
    # per token: 8 -> 1.0, 16 -> 0.5, 32 -> 0.3, 64 -> 0.28125: past 32 it drops by < 10%
    assert saturation_point([(8, 8.0), (16, 8.0), (32, 9.6), (64, 18.0)]) == 32
    # still falling at the largest count: that count is the lower bound
    assert saturation_point([(8, 8.0), (16, 8.0)]) == 16
    assert saturation_point([(16, 8.0), (8, 8.0)]) == 16  # order does not matter


# ---------------------------------------------------------------- measuring
def test_profile_forward_gives_non_negative_fit(model):
    a, b = profile_forward(model, token_counts=(4, 8, 16), repeats=1)
    assert a >= 0 and b >= 0 and math.isfinite(a) and math.isfinite(b)


def test_profile_forward_rejects_unusable_counts(model):
    with pytest.raises(ValueError):
        profile_forward(model, token_counts=(0, 10**9))
    with pytest.raises(ValueError):
        profile_forward(model, token_counts=(4,), repeats=0)


def test_profile_link_cpu_stand_in():
    bandwidth = profile_link("cpu", nbytes=1 << 16, repeats=1)
    assert bandwidth > 0 and math.isfinite(bandwidth)


# ---------------------------------------------------------------- KV bytes
@pytest.mark.parametrize(
    "config, dtype, expected",
    [
        # 2 (K, V) * 2 layers * 2 kv heads * head_dim 32/4 = 8 * 4 bytes
        (LlamaConfig(**LLAMA), torch.float32, 256),
        (LlamaConfig(**LLAMA), torch.float16, 128),
        # explicit head_dim wins over hidden / heads: 2 * 2 * 2 * 16 * 4
        (LlamaConfig(**LLAMA, head_dim=16), torch.float32, 512),
        # GPT-2: n_layer 2, n_head 4 (no GQA), head_dim n_embd / n_head = 8: 2 * 2 * 4 * 8 * 4
        (GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4), torch.float32, 512),
        # GPT-J: same names; bfloat16 is 2 bytes
        (GPTJConfig(vocab_size=100, n_embd=32, n_layer=2, n_head=4, rotary_dim=4), torch.bfloat16, 256),
    ],
)
def test_kv_bytes_per_token(config, dtype, expected):
    assert kv_bytes_per_token(config, dtype) == expected


# ---------------------------------------------------------------- load_or_profile
def test_cache_written_then_reread(model, tmp_path, request):
    first = load_or_profile(model, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())["measured"]
    assert set(stored) == {"fwd_per_token_s", "fwd_fixed_s", "fwd_points", "saturation_tokens", "swap_bytes_per_s"}
    assert [n for n, _ in stored["fwd_points"]] == list(profiler.CPU_TOKEN_COUNTS)
    assert first.fwd_per_token_s >= 0 and first.fwd_fixed_s >= 0 and first.saturation_tokens >= 1
    assert first.kv_bytes_per_token == 256
    request.getfixturevalue("no_measuring")
    assert load_or_profile(model, cache_dir=tmp_path) == first


def test_cache_dir_from_environment(model, tmp_path, monkeypatch, fake_measurements):
    monkeypatch.setenv("INFERCEPT_CACHE_DIR", str(tmp_path))
    cost = load_or_profile(model)
    assert cost == CostModel(fwd_per_token_s=0.125, fwd_fixed_s=0.0, swap_bytes_per_s=1e9, kv_bytes_per_token=256,
                             saturation_tokens=8, fwd_points=((8, 1.0), (16, 2.0)),  # t = n/8; per token flat from 8
                             copies_overlap=False)  # a CPU's copies hold up the step
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_cache_is_keyed_by_dtype(model, tmp_path, fake_measurements):
    load_or_profile(model, cache_dir=tmp_path)
    load_or_profile(model, ModelSpec.of(model, torch.float16), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_overrides_bypass_measurement(model, tmp_path, no_measuring):
    cost = load_or_profile(model, cache_dir=tmp_path,
                           fwd_per_token_s=1e-4, fwd_fixed_s=1e-3, swap_bytes_per_s=1e9)
    assert cost == CostModel(fwd_per_token_s=1e-4, fwd_fixed_s=1e-3, swap_bytes_per_s=1e9, kv_bytes_per_token=256,
                             saturation_tokens=profiler.SATURATION_FALLBACK["cpu"], copies_overlap=False)
    assert not list(tmp_path.glob("*.json"))  # overrides are never cached
    assert load_or_profile(model, cache_dir=tmp_path, fwd_per_token_s=0.0, fwd_fixed_s=0.0,
                           swap_bytes_per_s=1.0, kv_bytes_per_token=7, saturation_tokens=3).kv_bytes_per_token == 7


def test_partial_override_measures_only_the_rest(model, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(profiler, "measure_forward", lambda model, spec=None: calls.append("fwd") or [(8, 1.0), (16, 2.0)])
    monkeypatch.setattr(profiler, "profile_link", lambda device: calls.append("link") or 1e9)
    cost = load_or_profile(model, cache_dir=tmp_path, swap_bytes_per_s=5.0)
    assert calls == ["fwd"] and cost.swap_bytes_per_s == 5.0
    stored = json.loads(next(tmp_path.glob("*.json")).read_text())["measured"]
    assert "swap_bytes_per_s" not in stored  # the override did not leak into the cache
    load_or_profile(model, cache_dir=tmp_path)
    assert calls == ["fwd", "link"]  # forward came from the cache, the link was measured once


def test_corrupt_cache_is_remeasured(model, tmp_path, fake_measurements):
    load_or_profile(model, cache_dir=tmp_path)
    path = next(tmp_path.glob("*.json"))
    path.write_text("{not json")
    assert load_or_profile(model, cache_dir=tmp_path).swap_bytes_per_s == 1e9
    assert json.loads(path.read_text())["measured"]["swap_bytes_per_s"] == 1e9


def test_unknown_override_is_an_error(model, tmp_path, no_measuring):
    with pytest.raises(TypeError, match="fwd_per_tok"):
        load_or_profile(model, cache_dir=tmp_path, fwd_per_tok=1.0)
