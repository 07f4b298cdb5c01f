"""infercept-serve on a CPU lets torch's SDPA read grouped KV heads as they are (no per-head copies):
the same tokens as plain transformers with the copies, and a setting the environment can override."""
from __future__ import annotations

import os

import torch

import infercept_hf as ih
from infercept_hf.patches.transformers_serve import SDPA_GQA_SWITCH, sdpa_reads_kv_heads_once

from conftest import TEST_COST, greedy, prompts_for


def test_grouped_heads_read_once_give_the_tokens_of_the_copies(llama, monkeypatch):
    assert llama.config.num_attention_heads > llama.config.num_key_value_heads
    prompts = prompts_for(5, [23, 9, 31])
    monkeypatch.delenv(SDPA_GQA_SWITCH, raising=False)
    expected = [greedy(llama, p, 8) for p in prompts]  # plain transformers, repeat_kv
    monkeypatch.setenv(SDPA_GQA_SWITCH, "1")
    grouped: list[bool] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: (grouped.append(k.get("enable_gqa", False)), sdpa(*a, **k))[1])
    with ih.InterceptEngine(llama, num_blocks=64, block_size=4, cost_model=TEST_COST) as engine:
        ids = [engine.add_request(p, max_new_tokens=8) for p in prompts]
        results = engine.run()
    assert [results[i].token_ids for i in ids] == expected
    assert grouped and all(grouped)


def test_the_switch_is_set_on_a_cpu_only_and_never_over_the_environment(monkeypatch):
    monkeypatch.delenv(SDPA_GQA_SWITCH, raising=False)
    sdpa_reads_kv_heads_once(torch.device("cuda"))
    assert SDPA_GQA_SWITCH not in os.environ
    sdpa_reads_kv_heads_once(torch.device("cpu"))
    assert os.environ[SDPA_GQA_SWITCH] == "1"
    monkeypatch.setenv(SDPA_GQA_SWITCH, "0")
    sdpa_reads_kv_heads_once(torch.device("cpu"))
    assert os.environ[SDPA_GQA_SWITCH] == "0"
