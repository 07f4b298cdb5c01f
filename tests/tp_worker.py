"""One rank of the tensor-parallel test: every policy in turn on a 2-way sharded tiny Llama.

Launched by tests/test_tensor_parallel.py as
`torchrun --nproc_per_node=2 tests/tp_worker.py MODEL_DIR SPEC_JSON OUT_DIR`; every rank runs
this same program (as a user's script would) and writes OUT_DIR/rank<r>.json for the test to
compare with the single-process engine and plain transformers. Any failed check exits non-zero.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import infercept_hf as ih
from infercept_hf import distributed as tp
from infercept_hf.outputs import RequestEvent
from infercept_hf.patches.paged_pool import pool_kv_bytes_per_token
from infercept_hf.policy import CostModel

torch.set_num_threads(1)

TOOL_RANKS: list[int] = []  # the rank of every tool call that ran: the driver's, once each


def echo(call: ih.ToolCall) -> list[int]:
    TOOL_RANKS.append(dist.get_rank())
    time.sleep(0.01)  # answers land between steps, at times only the driver sees
    return [21, 22]


def error_checks(model: torch.nn.Module, spec: dict) -> dict[str, str]:
    """Unsupported combinations fail with clear errors (in a launched rank, where they can happen)."""
    seen = {}
    try:
        ih.InterceptEngine(model, num_blocks=8, block_size=4, host_pool_bytes=0, cost_model=CostModel(**spec["cost"]))
    except ValueError as exc:
        seen["plain_engine"] = str(exc)
    real = tp.dist.get_backend
    tp.dist.get_backend = lambda *a: "nccl"
    try:
        tp.TensorParallelEngine(model, num_blocks=8, block_size=4, cost_model=CostModel(**spec["cost"]))
    except tp.TensorParallelError as exc:
        seen["backend"] = str(exc)
    finally:
        tp.dist.get_backend = real
    return seen


def run_policy(model: torch.nn.Module, spec: dict, policy: str) -> dict:
    engine = tp.build_engine(
        model, policy, num_blocks=spec["num_blocks"], block_size=spec["block_size"],
        host_pool_bytes=spec["host_pool_bytes_per_rank"], max_batch_tokens=spec["max_batch_tokens"],
        cost_model=CostModel(**spec["cost"]),
    )
    assert isinstance(engine, tp.TensorParallelEngine)
    n = spec["max_new_tokens"]
    ids = []
    for prompt, trace in zip(spec["prompts"], spec["traces"]):
        ids.append(engine.add_request(prompt, max_new_tokens=n, interceptions=ih.Scripted(trace), eos_token_id=[]))
    tool = ih.Tool(name="echo", end=[spec["tool_end"]], fn=echo, expected_duration=0.01)
    ids.append(engine.add_request(spec["tool_prompt"], max_new_tokens=n, tools=[tool], eos_token_id=[]))

    tokens_seen = []

    def cancel_midway(event: RequestEvent) -> None:
        """Runs on the driver after a step: the cancel reaches the workers with the next one."""
        tokens_seen.extend(event.token_ids if event.kind == "token" else ())
        if len(tokens_seen) == spec["cancel_after"]:
            engine.cancel(event.request_id)

    ids.append(engine.add_request(spec["cancel_prompt"], max_new_tokens=n, eos_token_id=[],
                                  sampler=ih.Sampler(do_sample=True, seed=5), on_event=cancel_midway))
    results = engine.run()
    engine.cache.check_integrity()
    assert engine.cache.is_empty(), "blocks left in this rank's pools"
    assert engine.cache.used_device_blocks() == 0 and engine.cache.used_host_blocks() == 0
    ordered = [results[i] for i in range(len(results))]  # workers' ids: assigned in the driver's order
    if engine.is_driver:
        assert ids == list(range(len(ids)))
    else:
        assert ids == [None] * len(ids)
    stats = engine.stats()
    out = {
        "tokens": [r.token_ids for r in ordered],
        "finish": [r.finish_reason for r in ordered],
        "strategies": [[rec.strategy for rec in r.interceptions] for r in ordered],
        "stats": {k: stats[k] for k in ("steps", "recomputed_tokens", "swapped_bytes", "preemptions", "strategies")},
        "swap_log": [[it.budget, it.swapped_in, it.swapped_out] for it in engine.scheduler.swap_log],
        "kv_bytes_per_token": engine.spec.rank_kv_bytes_per_token,
        "pool_kv_bytes_per_token": pool_kv_bytes_per_token(engine.cache),
        "blocks": [engine.cache.num_blocks, engine.cache.num_host_blocks],
        "cost_kv": engine.cost.kv_bytes_per_token,
    }
    engine.close()
    return out


def measured_cost(model_dir: str) -> dict:
    """No cost model given: the sharded forward is measured by all ranks, the driver's fit is used."""
    engine = tp.build_engine(model_dir, num_blocks=8, block_size=4, host_pool_bytes=0)
    cost = dataclasses.asdict(engine.cost)
    engine.close()
    return cost


def main(model_dir: str, spec_path: str, out_dir: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    model = tp.load_tp_model(model_dir)
    report = {"errors": error_checks(model, spec), "measured_cost": measured_cost(model_dir), "policies": {}}
    for policy in spec["policies"]:
        TOOL_RANKS.clear()
        report["policies"][policy] = run_policy(model, spec, policy) | {"tool_ranks": list(TOOL_RANKS)}
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
