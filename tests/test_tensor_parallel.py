"""Tensor parallelism: 2 CPU ranks (gloo) give the tokens of one process, with identical replicas.

One `torchrun` launch runs every policy in sequence inside the ranks (tests/tp_worker.py);
the single-process engine and the plain-transformers reference run here meanwhile.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, LlamaConfig

import infercept_hf as ih
from infercept_hf import distributed as tp
from infercept_hf.model_spec import kv_bytes_per_token
from infercept_hf.tp_sizing import tensor_parallel_cost
from conftest import TEST_COST, greedy, prompts_for, reference_scripted

WORKER = Path(__file__).with_name("tp_worker.py")
TRACES = [
    [(4, 0.05, [7, 8, 9, 10]), (5, 0.02, [11])],
    [(3, 0.08, [12, 13]), (2, 0.0, [14, 15, 16])],
    [(6, 0.03, [17])],
    [(2, 0.06, [18, 19, 20]), (3, 0.01, [21])],
]
NEW_TOKENS = 14
NUM_BLOCKS, BLOCK_SIZE, HOST_BLOCKS = 14, 4, 32  # tight: 56 tokens for four requests that grow to ~35 each
# A slow host link: min-waste's swap budget is ~10 tokens an iteration, so long tails move out in parts.
COST = dataclasses.replace(TEST_COST, swap_bytes_per_s=TEST_COST.kv_bytes_per_token * 9000)


def _spec(llama) -> dict:
    tool_prompt, cancel_prompt = prompts_for(13, [8, 6])
    return {
        "policies": list(ih.POLICIES),
        "prompts": prompts_for(11, [9, 14, 7, 12]),
        "traces": TRACES,
        "tool_prompt": tool_prompt,
        "tool_end": greedy(llama, tool_prompt, 3)[2],  # the tool is called where this token first comes out
        "cancel_prompt": cancel_prompt,
        "cancel_after": 4,
        "max_new_tokens": NEW_TOKENS,
        "num_blocks": NUM_BLOCKS,
        "block_size": BLOCK_SIZE,
        "host_pool_bytes_per_rank": HOST_BLOCKS * BLOCK_SIZE * kv_bytes_per_token(llama.config, torch.float32) // 2,
        "max_batch_tokens": 64,
        "cost": dataclasses.asdict(COST),
    }


def _single_process(llama, spec: dict, policy: str) -> list[list[int]]:
    """The same requests on one process: scripted ones and the tool request."""
    engine = ih.InterceptEngine(
        llama, policy=policy, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, cost_model=COST,
        host_pool_bytes=HOST_BLOCKS * BLOCK_SIZE * kv_bytes_per_token(llama.config, torch.float32),
        max_batch_tokens=spec["max_batch_tokens"],
    )
    ids = [engine.add_request(p, max_new_tokens=NEW_TOKENS, interceptions=ih.Scripted(t), eos_token_id=[])
           for p, t in zip(spec["prompts"], spec["traces"])]
    tool = ih.Tool(name="echo", end=[spec["tool_end"]], fn=lambda call: [21, 22])
    ids.append(engine.add_request(spec["tool_prompt"], max_new_tokens=NEW_TOKENS, tools=[tool], eos_token_id=[]))
    results = engine.run()
    engine.close()
    return [results[i].token_ids for i in ids]


@pytest.fixture(scope="module")
def tp_run(llama, tmp_path_factory):
    """Launch the two ranks; compute the one-process answers while they run."""
    root = tmp_path_factory.mktemp("tp")
    llama.save_pretrained(root / "llama")
    spec = _spec(llama)
    (root / "spec.json").write_text(json.dumps(spec))
    repo = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "INFERCEPT_CACHE_DIR": str(root / "profiles")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), str(root / "llama"), str(root / "spec.json"), str(root)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    single = {policy: _single_process(llama, spec, policy) for policy in spec["policies"]}
    reference = [reference_scripted(llama, p, ih.Scripted(t), NEW_TOKENS) for p, t in zip(spec["prompts"], TRACES)]
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the ranks did not finish in 300 s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-6000:]
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    return spec, ranks, single, reference


def test_ranks_are_identical_replicas(tp_run):
    _, (rank0, rank1), _, _ = tp_run
    for policy in ih.POLICIES:
        a, b = dict(rank0["policies"][policy]), dict(rank1["policies"][policy])
        calls0, calls1 = a.pop("tool_ranks"), b.pop("tool_ranks")
        assert calls0 and set(calls0) == {0} and calls1 == [], "every tool call runs once, on the driver"
        assert a == b, policy  # tokens, finish reasons, strategies, step counts, swaps, preemptions


@pytest.mark.parametrize("policy", ih.POLICIES)
def test_tokens_match_one_process_and_transformers(tp_run, policy):
    spec, (rank0, _), single, reference = tp_run
    got = rank0["policies"][policy]
    n_scripted = len(spec["prompts"])
    assert got["tokens"][:n_scripted] == reference
    assert got["tokens"][: n_scripted + 1] == single[policy]  # scripted requests and the tool request
    assert got["finish"] == ["length"] * (n_scripted + 1) + ["cancelled"]
    assert len(got["tokens"][-1]) == spec["cancel_after"]


def test_the_tight_pool_exercises_every_move(tp_run):
    _, (rank0, _), _, _ = tp_run
    stats = {policy: rank0["policies"][policy]["stats"] for policy in ih.POLICIES}
    assert stats["discard"]["recomputed_tokens"] > 0 and stats["discard"]["swapped_bytes"] == 0
    assert stats["swap"]["swapped_bytes"] > 0
    assert stats["preserve"]["swapped_bytes"] == 0
    assert any(s["preemptions"] for s in stats.values())
    strategies = {s for p in ih.POLICIES for r in rank0["policies"][p]["strategies"] for s in r}
    assert {"preserve", "swap", "discard"} <= strategies
    log = rank0["policies"]["min-waste"]["swap_log"]  # budgets and moves: identical on both ranks (test above)
    assert any(out for _, _, out in log)


def test_each_rank_holds_half_the_kv(tp_run, llama):
    _, ranks, _, _ = tp_run
    full = kv_bytes_per_token(llama.config, torch.float32)
    for rank in ranks:
        got = rank["policies"]["min-waste"]
        assert got["kv_bytes_per_token"] == got["pool_kv_bytes_per_token"] == full // 2
        assert got["blocks"] == [NUM_BLOCKS, HOST_BLOCKS]


def test_measured_cost_model_is_the_drivers_with_per_rank_kv(tp_run, llama):
    _, (rank0, rank1), _, _ = tp_run
    assert rank0["measured_cost"] == rank1["measured_cost"]
    assert rank0["measured_cost"]["kv_bytes_per_token"] == kv_bytes_per_token(llama.config, torch.float32) // 2
    assert rank0["measured_cost"]["fwd_per_token_s"] + rank0["measured_cost"]["fwd_fixed_s"] > 0


def test_unsupported_combinations_inside_the_ranks(tp_run):
    _, ranks, _, _ = tp_run
    for rank in ranks:
        assert "TensorParallelEngine" in rank["errors"]["plain_engine"]
        assert "gloo" in rank["errors"]["backend"]


# ---------------------------------------------------------------- no launch needed
def test_model_without_a_tp_plan_is_refused():
    with pytest.raises(tp.TensorParallelError, match="no tensor-parallel plan"):
        tp.check_tp_config(GPT2Config(n_embd=32, n_layer=2, n_head=4), 2)


def test_kv_heads_must_divide_by_tp_size():
    config = LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=2)
    with pytest.raises(tp.TensorParallelError, match="3 key/value heads, not divisible by the tensor-parallel size 2"):
        tp.check_tp_config(config, 2)
    tp.check_tp_config(config, 3)


def test_engine_needs_a_sharded_model_under_torchrun(llama):
    with pytest.raises(tp.TensorParallelError, match="torchrun"):
        tp.TensorParallelEngine(llama, cost_model=TEST_COST)


def test_load_tp_model_needs_torchrun(monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(tp.TensorParallelError, match="torchrun"):
        tp.load_tp_model(str(tmp_path))


def test_build_engine_outside_torchrun_is_the_plain_engine(llama, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    engine = tp.build_engine(llama, "swap", num_blocks=8, block_size=4, host_pool_bytes=0, cost_model=TEST_COST)
    assert type(engine) is ih.InterceptEngine and engine.policy == "swap"
    engine.close()


def test_tensor_parallel_cost_model(llama):
    tp4 = tensor_parallel_cost(TEST_COST, llama.config, torch.float16, 4, allreduce_bytes_per_s=1e11,
                               allreduce_latency_s=1e-5)
    collectives = 2 * llama.config.num_hidden_layers
    per_token = 2 * 3 / 4 * llama.config.hidden_size * 2 / 1e11
    assert tp4.fwd_per_token_s == pytest.approx(TEST_COST.fwd_per_token_s / 4 + collectives * per_token)
    assert tp4.fwd_fixed_s == pytest.approx(TEST_COST.fwd_fixed_s + collectives * 1e-5)
    assert tp4.kv_bytes_per_token == TEST_COST.kv_bytes_per_token // 4
    assert tp4.swap_bytes_per_s == TEST_COST.swap_bytes_per_s
    assert tp4.saturation_tokens == TEST_COST.saturation_tokens
    assert tensor_parallel_cost(TEST_COST, llama.config, torch.float16, 1, 1e11) == TEST_COST


BENCH_ARGS = ["--num-requests", "4", "--qps", "4", "--policies", "discard,min-waste", "--num-blocks", "64",
              "--block-size", "8", "--max-batch-tokens", "64", "--warmup", "0", "--window", "60"]


def test_bench_runs_tensor_parallel(llama, tmp_path):
    """`torchrun -m infercept_hf.bench`: the driver replays the trace, the other rank mirrors it, rank 0
    alone writes the results; the same requests and tokens as the one-process benchmark."""
    from infercept_hf.bench.__main__ import main

    llama.save_pretrained(tmp_path / "llama")
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p),
           "OMP_NUM_THREADS": "1", "INFERCEPT_CACHE_DIR": str(tmp_path / "profiles")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "infercept_hf.bench", "--model", str(tmp_path / "llama"), *BENCH_ARGS, "--out", str(tmp_path / "tp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    threads = torch.get_num_threads()
    try:
        main(["--model", str(tmp_path / "llama"), *BENCH_ARGS, "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    tp_runs = json.loads((tmp_path / "tp" / "results.json").read_text())["runs"]
    one_runs = json.loads((tmp_path / "one" / "results.json").read_text())["runs"]
    assert [r["policy"] for r in tp_runs] == ["discard", "min-waste"]
    for a, b in zip(tp_runs, one_runs, strict=True):
        assert a["completed"] == a["requests"] == 4
        for key in ("completed", "total_output_tokens", "interceptions"):
            assert a[key] == b[key], key


@pytest.mark.parametrize("extra, message", [
    (["--policies", "discard,hf-cb"], "cannot run tensor-parallel"),
    (["--simulate", "gpt-j-6b/a100-80g"], "without torchrun"),
    (["--model", "tiny"], "built in memory"),
])
def test_bench_refuses_what_cannot_run_tensor_parallel(monkeypatch, capsys, extra, message):
    from infercept_hf.bench.__main__ import parse_args

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        parse_args(extra)
    assert message in capsys.readouterr().err
