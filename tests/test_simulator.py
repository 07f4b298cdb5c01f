"""The simulator: the same scheduling as a real run on the same costs, paper scale fast, no leaks."""
from __future__ import annotations

import time

import pytest
import torch

from infercept_hf.bench import policy_runs
from infercept_hf.bench.jobs import make_jobs
from infercept_hf.bench.presets import A100_80G, PRESETS, get_preset
from infercept_hf.bench.simulator import HardwareModel, VirtualClock, meta_model, sim_engine
from infercept_hf.bench.workloads import generate_trace
from infercept_hf.request import Request
from infercept_hf.request import Chunk

from conftest import VOCAB, tiny_model


class Recorder:
    """Wraps an engine's executor to log each forward's batch: (request id, start, length) per chunk."""

    def __init__(self, engine) -> None:
        self.inner = engine.runner
        self.batches: list[list[tuple[int, int, int]]] = []
        engine.runner = self

    def forward(self, chunks):
        self.batches.append([(c.request.request_id, c.start, c.length) for c in chunks])
        return self.inner.forward(chunks)


def _small_trace(seed: int):
    """Eight mixed requests, lengths cut to a tiny model's scale and pauses to a few dozen steps."""
    return generate_trace("mix", 8, 40.0, seed, time_scale=0.004, context_scale=0.04, max_context=64)


def _replay(engine, clock, jobs):
    recorder = Recorder(engine)
    results, _, duration = policy_runs.replay(engine, jobs, clock, policy_runs.virtual_wait(clock))
    strategies = {r.request_id: [(i.strategy, round(i.paused_at, 9)) for i in r.interceptions] for r in results}
    stats = engine.stats()
    engine.cache.check_integrity()
    assert engine.cache.is_empty()
    engine.close()
    return recorder.batches, strategies, duration, stats


@pytest.mark.parametrize("policy", ["min-waste", "predictive", "swap", "discard"])
def test_simulated_and_executed_runs_schedule_alike(policy):
    """A tiny real model run on a virtual clock advanced by the cost model, against its meta-device
    twin: every batch, every interception's strategy, every figure the policy moved must match."""
    model = tiny_model("llama")
    twin = meta_model(model.config, dtype=torch.float32)
    hardware = HardwareModel.for_model(model, A100_80G)
    assert hardware == HardwareModel.for_model(twin, A100_80G)
    jobs = make_jobs(_small_trace(seed=3), VOCAB, seed=3)
    sizes = dict(num_blocks=24, block_size=4, host_pool_bytes=6 * 4 * hardware.kv_bytes_per_token, max_batch_tokens=48)
    real = _replay(*sim_engine(model, hardware, policy, run_model=True, **sizes), jobs)
    sim = _replay(*sim_engine(twin, hardware, policy, **sizes), jobs)
    assert len(real[0]) > 50
    assert real[0] == sim[0]  # per-step batch composition
    assert real[1] == sim[1]  # per-interception strategy and time
    assert real[2] == sim[2]
    for key in ("recomputed_tokens", "swapped_out_bytes", "swapped_in_bytes", "preemptions", "strategies"):
        assert real[3][key] == sim[3][key], key
    moved = real[3]["swapped_bytes"] + real[3]["recomputed_tokens"]
    assert moved > 0  # the pool was small enough to force moves


def test_two_thousand_requests_fast_and_leak_free():
    preset = get_preset("gpt-j-6b/a100-80g")
    model = meta_model(preset.make_config())
    trace = generate_trace("mix", 2000, 10.0, 0, time_scale=0.02, context_scale=0.2, max_context=preset.max_context)
    jobs = make_jobs(trace, model.config.vocab_size, 0)
    t0 = time.perf_counter()
    run = policy_runs.run_simulated(preset, model, "min-waste", jobs)  # checks integrity and empty pools itself
    assert time.perf_counter() - t0 < 60
    assert len(run.results) == 2000
    assert all(r.finish_reason == "length" for r in run.results)
    assert run.stats["device_blocks_used"] == 0 and run.stats["host_blocks_used"] == 0
    assert run.stats["device_blocks_free"] == run.stats["device_blocks_total"]
    assert sum(run.stats["strategies"].values()) == sum(len(r.interceptions) for r in run.results)


def test_cost_model_by_hand():
    """Decode is memory bound (weights + KV over HBM), a long prefill compute bound; copies that
    outlast the forward stretch the step; the 8-GPU split adds all-reduces."""
    preset = get_preset("gpt-j-6b/a100-80g")
    hw = HardwareModel.for_preset(meta_model(preset.make_config()), preset)
    eff, gpu = preset.efficiency, preset.gpu
    assert hw.kv_bytes_per_token == 2 * 28 * 4096 * 2
    decode = hw.forward_seconds([(999, 1, True)])
    memory = (hw.weight_bytes + 1000 * hw.kv_bytes_per_token) / (gpu.hbm_bytes_per_s * eff.hbm)
    assert decode == pytest.approx(memory + eff.step_overhead_s)
    prefill = hw.forward_seconds([(0, 2048, True)])
    assert prefill > 2 * 2048 * hw.body_params / (gpu.fp16_flops * eff.compute)
    assert hw.swap_seconds(25.6e9) == pytest.approx(1.0)
    cost = hw.cost_model()
    assert cost.swap_bytes_per_s == pytest.approx(25.6e9)
    assert 64 <= cost.saturation_tokens <= 2048 and cost.fwd_per_token_s > 0
    big = get_preset("llama-3-70b/8xa100-80g")
    hw70 = HardwareModel.for_preset(meta_model(big.make_config()), big)
    single = HardwareModel(**{**hw70.__dict__, "num_gpus": 1})
    batch = [(500, 1, True)] * 64
    assert hw70.forward_seconds(batch) < single.forward_seconds(batch)  # the split pays for its all-reduces
    assert hw70.kv_pool_blocks() * 16 * hw70.kv_bytes_per_token < 8 * gpu.memory_bytes - hw70.weight_bytes


def test_sim_executor_stalls_only_for_copies_beyond_the_forward():
    model = tiny_model("llama")
    hardware = HardwareModel.for_model(model, A100_80G)
    engine, clock = sim_engine(meta_model(model.config, dtype=torch.float32), hardware, "swap",
                               num_blocks=8, host_pool_bytes=8 * 4 * hardware.kv_bytes_per_token,
                               max_batch_tokens=32, block_size=4)
    req = Request(0, list(range(1, 9)), 8, 4, 0.0)
    chunk = Chunk(req, 0, 8)
    t_fwd = hardware.forward_seconds([(0, 8, True)])
    logits = engine.runner.forward([chunk])
    assert logits.shape[0] == 1 and clock() == pytest.approx(t_fwd)
    engine.cache.swapped_out_bytes += int(3 * t_fwd * hardware.gpu.pcie_bytes_per_s * hardware.eff.pcie)
    engine.runner.forward([chunk])
    assert clock() == pytest.approx(t_fwd + 3 * t_fwd)  # the copy took 3 forwards: 2 of them stalled
    assert engine.cache.pipeline.seconds == pytest.approx(2 * t_fwd)
    engine.close()


def test_virtual_clock_only_moves_forward():
    clock = VirtualClock()
    clock.advance(1.5)
    clock.advance_to(1.0)
    assert clock() == 1.5
    clock.advance_to(2.0)
    assert clock() == 2.0


def test_presets_fit_their_gpus():
    for name, preset in PRESETS.items():
        hw = HardwareModel.for_preset(meta_model(preset.make_config()), preset)
        assert hw.kv_pool_blocks() > 1000, name
    with pytest.raises(ValueError, match="unknown simulator preset"):
        get_preset("gpt-5/toaster")


def test_step_cost_benchmark_runs_every_case(capsys):
    """The step-cost benchmark's small version: a row per policy and the nearly-full-host line."""
    from infercept_hf.bench import step_cost

    step_cost.main(["--paused", "2,4", "--decoding", "2", "--steps", "2", "--policies", "preserve,min-waste",
                    "--host-full-paused", "4"])
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[2:4]] == ["preserve", "min-waste"]
    assert out[4].startswith("min-waste at 4 paused: host roomy")
