"""The load-test tab: N simulated users on a workload mix, every policy on the same trace.

All of it is the benchmark's own code (`infercept_hf.bench`): the trace generator, the
replay loop and the metrics. This module only picks defaults small enough to finish in
seconds on a CPU and shapes one row per policy for the UI. Run as a script, it repeats the
tab's test on the bundled chat model and prints the rows (on a shared machine one run says
little: repeat it and read the spread):

    python demos/load_test.py --repeats 3 --mix mix
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from infercept_hf.bench import policy_runs
from infercept_hf.bench.jobs import EngineSettings, make_jobs
from infercept_hf.bench.models import max_positions
from infercept_hf.bench.presets import PRESETS, get_preset
from infercept_hf.bench.simulator import meta_model
from infercept_hf.bench.workloads import KINDS, MIX, generate_trace
from infercept_hf.policy import CostModel
from infercept_hf.scheduler import POLICIES

REAL = "this machine (the chat model)"
HARDWARE = (REAL, *PRESETS)
MIXES = (MIX, *KINDS)
DEFAULT_POLICIES = ("discard", "preserve", "swap", "min-waste")
# short headers: the table's columns share the page's width, and a long header pushes the last off it
RPS_COLUMN, LATENCY_COLUMN = "completed/s", "norm. latency (ms/tok)"
COLUMNS = ("policy", RPS_COLUMN, LATENCY_COLUMN, "p99 (ms/tok)", "recomputed tok", "swapped MB", "pauses")


@dataclass(frozen=True)
class LoadTest:
    """One load test. On this machine tool pauses and lengths are scaled down (the paper's
    pauses last up to a minute); a simulator preset replays them at full scale on a virtual clock."""

    users: int = 16
    rate: float = 20.0  # users arriving per second (Poisson): a burst, so paused contexts compete
    mix: str = MIX
    policies: tuple[str, ...] = DEFAULT_POLICIES
    hardware: str = REAL
    time_scale: float = 0.01
    context_scale: float = 0.1
    num_blocks: int = 32  # 512 tokens of KV: sixteen users do not all fit
    seed: int = 0

    def check(self) -> None:
        """Raise ValueError with a message fit for the UI."""
        if not 1 <= self.users <= 500:
            raise ValueError(f"Users must be between 1 and 500, got {self.users}.")
        if not self.rate > 0:
            raise ValueError(f"The arrival rate must be above 0 users/s, got {self.rate}.")
        if self.mix not in MIXES:
            raise ValueError(f"Unknown workload {self.mix!r}; choose one of {', '.join(MIXES)}.")
        if not self.policies:
            raise ValueError("Pick at least one policy.")
        bad = [p for p in self.policies if p not in POLICIES]
        if bad:
            raise ValueError(f"Unknown policies {bad}; choose from {', '.join(POLICIES)}.")
        if self.hardware not in HARDWARE:
            raise ValueError(f"Unknown hardware {self.hardware!r}; choose one of {', '.join(HARDWARE)}.")


def _row(policy: str, summary: dict) -> dict:
    latency = summary["normalized_latency_mean_s"]
    p99 = summary["normalized_latency_p99_s"]
    return dict(zip(COLUMNS, (
        policy,
        round(summary["completed_rps"], 3),
        None if latency is None else round(latency * 1000, 2),
        None if p99 is None else round(p99 * 1000, 2),
        summary.get("recomputed_tokens", 0),
        round(summary.get("swapped_bytes", 0) / 1e6, 2),
        ", ".join(f"{k} {v}" for k, v in sorted(summary.get("strategies", {}).items())),
    ), strict=True))


def run(test: LoadTest, model: torch.nn.Module, cost_model: CostModel | None) -> Iterator[dict]:
    """One row per policy, yielded as each run ends (the UI redraws in between)."""
    test.check()
    if test.hardware == REAL:
        settings = EngineSettings(num_blocks=test.num_blocks, cost_model=cost_model)
        limits = [n for n in (max_positions(model), settings.num_blocks * settings.block_size) if n]
        trace = generate_trace(test.mix, test.users, test.rate, test.seed, test.time_scale, test.context_scale,
                               min(limits))
    else:
        preset = get_preset(test.hardware)
        model = meta_model(preset.make_config())
        trace = generate_trace(test.mix, test.users, test.rate, test.seed, max_context=preset.max_context)
    jobs = make_jobs(trace, model.config.get_text_config().vocab_size, test.seed)
    for policy in test.policies:
        if test.hardware == REAL:
            result = policy_runs.run_real(model, policy, jobs, settings)
        else:
            result = policy_runs.run_simulated(preset, model, policy, jobs)
        yield _row(policy, policy_runs.summarize_run(policy, test.rate, result))


def parse_policies(names: Sequence[str]) -> tuple[str, ...]:
    """Policies in the engine's order, whatever order they were ticked in."""
    return tuple(p for p in POLICIES if p in names) + tuple(p for p in names if p not in POLICIES)


def main(argv: list[str] | None = None) -> None:
    from chat_session import BUNDLED, load_model  # the demo's own loader (demos/ is the script's folder)

    from infercept_hf.model_spec import ModelSpec
    from infercept_hf.profiler import load_or_profile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mix", default=MIX, choices=MIXES)
    p.add_argument("--users", type=int, default=LoadTest.users)
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                   help="comma list, run in this order within each repeat (interleaved across repeats)")
    args = p.parse_args(argv)
    test = LoadTest(users=args.users, mix=args.mix, policies=tuple(n for n in args.policies.split(",") if n))
    try:
        test.check()
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(1)
    model = load_model(BUNDLED).model
    cost = load_or_profile(model, ModelSpec.of(model))
    for repeat in range(args.repeats):
        for row in run(test, model, cost):
            print(json.dumps({"repeat": repeat, **row}), flush=True)


if __name__ == "__main__":
    main()
