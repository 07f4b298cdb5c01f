"""`python -m infercept_hf.bench` / `infercept-bench`: replay one trace under every policy, side by side.

    infercept-bench --mix mix --num-requests 40 --qps 1,2,4 --policies discard,min-waste,hf-cb --out out/
    infercept-bench --simulate gpt-j-6b/a100-80g --num-requests 9600 --qps 4,5,6 --refine 2 --out out/sim
    infercept-bench --base-url http://127.0.0.1:8000/v1 --num-requests 16 --turns 4   # client mode, any server
    torchrun --nproc_per_node 2 -m infercept_hf.bench --model PATH --policies discard,min-waste   # tensor parallel
    infercept-bench agents --sessions 16 --prefix 512 --turns 4    # prefix sharing on an agent mix (see --help)

Results come from a measurement window after a warm-up (default: the trace's 99th-percentile
tool time per request, at least 10% of the arrival span, up to the last arrival); requests still
in flight at its end count with what they had by then. A rate is sustained when the latency SLO
holds and the number of requests in the system does not grow over the window.
Writes DIR/results.json, DIR/summary.md, DIR/latency_vs_rate.png and DIR/memory_<policy>.png
(docs/BENCHMARK.md has every flag, figure and the numbers measured here).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .presets import PRESETS
from .workloads import KINDS, MIX, TraceRequest

if TYPE_CHECKING:  # at run time imported only when used: it needs torch
    from ..predictive import PredictorSettings

log = logging.getLogger("infercept_hf.bench")

REAL_POLICIES = "discard,discard-head,preserve,swap,min-waste,oracle,predictive,predictive-oracle,hf-cb"
SIM_POLICIES = "discard,discard-head,preserve,swap,min-waste,oracle,predictive,predictive-oracle"
PEERS = ("hf-cb", "hf-generate")  # jobs.PEERS, named here so that --help needs no torch
WARMUP_SHARE = 0.1  # default warm-up: at least this share of the trace's arrival span
WARMUP_TOOL_QUANTILE = 0.99  # ... and at least this quantile of a request's tool time (`default_warmup`)
# Normalized latency SLO for the sustainable rate: 10 tokens/s outside tools, the interactive
# target of the metrics' default goodput SLO (tpot 100 ms).
DEFAULT_SLO_S = 0.1


class _Parser(argparse.ArgumentParser):
    """Errors in one line (and exit 2), not argparse's usage block first."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="infercept-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo",
                   help="demo (bundled; a tiny random Llama until it is trained), tiny, smollm2, "
                        "or a transformers id/path")
    p.add_argument("--trace",
                   help="a trace file: our JSONL (*.jsonl) or the reference form (*.json, arrivals from --qps)")
    p.add_argument("--mix", default=MIX, choices=[*KINDS, MIX], help="workload to generate when no --trace is given")
    p.add_argument("--num-requests", type=int, default=40)
    p.add_argument("--qps", default="2", help="request rate(s), comma-separated to sweep")
    p.add_argument("--policies",
                   help=f"comma list, reported in this order (real default: {REAL_POLICIES}; "
                        f"simulated or under torchrun: {SIM_POLICIES})")
    p.add_argument("--time-scale", type=float, default=None,
                   help="multiplies tool pauses (default 0.02 real, 1 simulated)")
    p.add_argument("--context-scale", type=float, default=None,
                   help="multiplies token lengths (default 0.5 real, 1 simulated)")
    p.add_argument("--warmup", type=float, default=None,
                   help=f"seconds of trace time before the measurement window opens "
                        f"(default: the 99th percentile of a request's tool time, at least "
                        f"{WARMUP_SHARE:.0%}% of the arrival span)")
    p.add_argument("--window", type=float, default=None,
                   help="length of the measurement window in seconds (default: up to the last arrival); "
                        "requests still in flight at its end count with what they had by then")
    p.add_argument("--num-blocks", type=int, default=256,
                   help="device KV blocks (real runs): small enough that paused contexts compete for memory")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=256, help="token budget per iteration (real runs)")
    p.add_argument("--host-pool-mb", type=float, help="host swap pool (real runs; default: the engine's own sizing)")
    p.add_argument("--slo", type=float, default=DEFAULT_SLO_S,
                   help="normalized latency SLO in s/token for the sustainable rate")
    p.add_argument("--refine", type=int, default=0,
                   help="after the sweep, this many more runs per policy, each halfway between its last "
                        "passing and first failing rate (a finer grid near the sustainable rate)")
    p.add_argument("--simulate", choices=list(PRESETS), help="simulate a paper-scale model and GPU instead of running")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: small models gain nothing from more, "
                        "a busy machine loses a lot)")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-url", help="client mode: replay the trace as multi-turn sessions against this "
                                      "OpenAI-compatible server (…/v1); see bench/client.py")
    p.add_argument("--turns", type=int, help="client mode: turns per session (default: the workload's calls + 1)")
    p.add_argument("--turn-tokens", type=int, help="client mode: max_tokens of every turn (default: the workload's)")
    p.add_argument("--api-key", help="client mode: the server's API key")
    p.add_argument("--served-model", help="client mode: the model name to ask for (default: the server's first)")
    p.add_argument("--no-cache-key", action="store_true",
                   help="client mode: send no prompt_cache_key (for servers that refuse unknown fields)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="client mode: seconds per turn at most")
    p.add_argument("--prefetch-quantile", type=float,
                   help="predictive: swapped KV is back by this quantile of its tool's durations (default 0.05)")
    p.add_argument("--prefetch-reserve", type=float,
                   help="predictive: at most this share of the device pool holds prefetched KV (default 0.1)")
    p.add_argument("--deadline", type=float,
                   help="client mode: stop the replay after this many seconds (unfinished sessions are reported)")
    return p


def _check_positive(p: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...],
                    allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and not (value >= 0 if allow_zero else value > 0):
            p.error(f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, got {value:g}")


def parse_args(argv: list[str] | None = None, p: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Flags checked here, before anything heavy loads: a bad one ends in one line and exit 2."""
    p = p or build_parser()
    args = p.parse_args(argv)
    simulated = args.simulate is not None
    if args.time_scale is None:
        args.time_scale = 1.0 if simulated else 0.02
    if args.context_scale is None:
        args.context_scale = 1.0 if simulated else 0.5
    _check_positive(p, args, ("num_requests", "time_scale", "context_scale", "num_blocks", "block_size",
                              "max_batch_tokens", "slo", "threads", "window", "host_pool_mb", "turns", "turn_tokens",
                              "request_timeout", "deadline"))
    _check_positive(p, args, ("warmup",), allow_zero=True)
    try:
        args.rates = sorted({float(q) for q in args.qps.split(",")})
    except ValueError:
        p.error(f"--qps takes comma-separated numbers, got {args.qps!r}")
    if not all(0 < q < float("inf") for q in args.rates):
        p.error(f"--qps rates must be > 0, got {args.qps!r}")
    if args.refine < 0:
        p.error(f"--refine must be >= 0, got {args.refine}")
    if args.refine and args.trace is not None and args.trace.endswith(".jsonl"):
        p.error("--refine needs rates to choose: a .jsonl trace carries its own arrivals")
    if args.trace is not None and not os.path.isfile(args.trace):
        p.error(f"--trace {args.trace}: no such file")
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1  # distributed.is_torchrun, without importing torch
    engine_only = simulated or torchrun  # the transformers peers run neither simulated nor sharded
    names = [n.strip() for n in (args.policies or (SIM_POLICIES if engine_only else REAL_POLICIES)).split(",")]
    known = [*REAL_POLICIES.split(","), "hf-generate"]
    if bad := [n for n in names if n not in known]:
        p.error(f"unknown policies {bad}; choose from {', '.join(known)}")
    if len(set(names)) != len(names):
        p.error(f"--policies names a policy twice: {args.policies}")
    args.policies = names
    if simulated and set(args.policies) & set(PEERS):
        p.error(f"{', '.join(PEERS)} run a real model and cannot be simulated")
    if torchrun:
        if simulated:
            p.error("--simulate runs in one process (the llama-3-70b preset models its 8 GPUs): launch it without torchrun")
        if peers := [q for q in args.policies if q in PEERS]:
            p.error(f"{', '.join(peers)} cannot run tensor-parallel: leave them out of --policies under torchrun")
        if args.model in ("tiny", "smollm2"):
            p.error(f"--model {args.model} is built in memory: under torchrun pass a directory (save_pretrained) or `demo`")
    _check_predictor_flags(p, args)
    args.command = "infercept-bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    return args


def _check_predictor_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The ranges `PredictorSettings` checks, here without importing it (it needs torch)."""
    quantile, reserve = args.prefetch_quantile, args.prefetch_reserve
    if (quantile, reserve) != (None, None) and not set(args.policies) & {"predictive", "predictive-oracle"}:
        flag = "--prefetch-quantile" if quantile is not None else "--prefetch-reserve"
        p.error(f"{flag} tunes predictive and predictive-oracle: neither is in --policies")
    if quantile is not None and not 0 < quantile <= 1:
        p.error(f"--prefetch-quantile must be in (0, 1], got {quantile:g}")
    if reserve is not None and not 0 <= reserve <= 1:
        p.error(f"--prefetch-reserve must be in [0, 1], got {reserve:g}")


def predictor_settings(args: argparse.Namespace) -> PredictorSettings | None:
    """`PredictorSettings` from the flags, None when neither was given (the engine's defaults)."""
    if args.prefetch_quantile is None and args.prefetch_reserve is None:
        return None
    from ..predictive import PredictorSettings

    given = {"prefetch_quantile": args.prefetch_quantile, "max_held_fraction": args.prefetch_reserve}
    return PredictorSettings(**{k: v for k, v in given.items() if v is not None})


def is_rank_0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------- traces
def make_trace(args: argparse.Namespace, qps: float, max_context: int | None) -> list[TraceRequest]:
    from .traces import load_jsonl, load_reference
    from .workloads import generate_trace

    if args.trace is None:
        return generate_trace(args.mix, args.num_requests, qps, args.seed, args.time_scale, args.context_scale,
                              max_context)
    if args.trace.endswith(".jsonl"):
        return load_jsonl(args.trace)
    return load_reference(args.trace, qps, args.seed)


def trace_rate(trace: list[TraceRequest], qps: float, args: argparse.Namespace) -> float:
    """The rate a run is reported under: a JSONL trace carries its own arrivals."""
    if args.trace is None or not args.trace.endswith(".jsonl") or len(trace) < 2:
        return qps
    return round(len(trace) / max(r.arrival_s for r in trace), 3)


def default_warmup(trace: list[TraceRequest]) -> float:
    """Seconds of trace time before the measurement window opens: until the requests that found
    the system empty are gone. A request lives at least as long as its tool calls take, so the
    warm-up is the 99th percentile of the trace's per-request tool time (the paper's mix: about
    5 minutes at full scale), or `WARMUP_SHARE` of the arrival span when that is longer."""
    tool = sorted(r.tool_seconds for r in trace)
    return max(WARMUP_SHARE * max(r.arrival_s for r in trace), tool[int(WARMUP_TOOL_QUANTILE * (len(tool) - 1))])


def measurement_window(trace: list[TraceRequest], args: argparse.Namespace) -> tuple[float, float, bool]:
    """(start, end, transient) in seconds of trace time: after the warm-up, up to the last arrival
    unless `--window` says otherwise. With the default warm-up, `transient` says the window is
    shorter than the warm-up it needs (a warm-up past half the arrival span is cut there), so the
    run may end before the pools fill."""
    span = max(r.arrival_s for r in trace)
    needed = default_warmup(trace)
    start = min(needed, span / 2) if args.warmup is None else args.warmup
    end = span if args.window is None else start + args.window
    if not end > start:
        raise ValueError(f"the measurement window [{start:g} s, {end:g} s] is empty: the trace's arrivals span "
                         f"{span:g} s (lower --warmup, or give --window)")
    return start, end, args.warmup is None and end - start < needed


# ---------------------------------------------------------------------- the runs
def run_all(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, list], dict[str, Any]]:
    """Every (rate, policy) run; returns the results.json entries, a memory timeline per policy
    (from its highest-rate run) and the setup to report."""
    from tqdm.auto import tqdm

    from ..memory import default_pool_sizes
    from ..profiler import load_or_profile
    from ..model_spec import ModelSpec
    from . import policy_runs
    from .jobs import EngineSettings, make_jobs
    from .models import load_model
    from .presets import get_preset
    from .simulator import BLOCK_SIZE, HardwareModel, meta_model

    runs: list[dict[str, Any]] = []
    timelines: dict[str, list] = {}
    windows: dict[float, tuple[float, float]] = {}
    if args.simulate:
        preset = get_preset(args.simulate)
        model = meta_model(preset.make_config())
        label, max_context, settings = preset.name, preset.max_context, None
    else:
        model, label = load_model(args.model)
        spec = ModelSpec.of(model)
        sizes = default_pool_sizes(spec, args.num_blocks, args.block_size, 0)
        host_bytes = None if args.host_pool_mb is None else int(args.host_pool_mb * 2**20)
        torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
        # a sharded forward needs every rank: the tensor-parallel engine measures its own cost model
        cost = None if torchrun else load_or_profile(model, spec)
        settings = EngineSettings(sizes.num_blocks, sizes.block_size, args.max_batch_tokens, host_bytes, cost)
        limits = [n for n in (spec.max_positions, sizes.num_blocks * sizes.block_size) if n]
        max_context = min(limits) if limits else None
    vocab = model.config.get_text_config().vocab_size
    predictor = predictor_settings(args)
    timeline_rate: dict[str, float] = {}

    def measure(qps: float, policies: list[str]) -> int:
        """Every policy of `policies` at `qps`; returns the trace's number of requests."""
        trace = make_trace(args, qps, max_context)
        start, end, transient = measurement_window(trace, args)
        window = (start, end)
        jobs = make_jobs(trace, vocab, args.seed)
        rate = trace_rate(trace, qps, args)
        windows[rate] = window
        for policy in policies:
            with tqdm(total=len(jobs), desc=f"{policy} @ {rate:g} req/s", unit="req", disable=not is_rank_0()) as bar:
                if args.simulate:
                    run = policy_runs.run_simulated(preset, model, policy, jobs, bar, until_s=window[1],
                                                    predictor=predictor)
                else:
                    run = policy_runs.run_real(model, policy, jobs, settings, bar, until_s=window[1],
                                               predictor=predictor)
            if run is None:  # a tensor-parallel worker rank
                continue
            runs.append(policy_runs.summarize_run(policy, rate, run, window=window, model=label, transient=transient,
                                             simulated=bool(args.simulate), time_scale=args.time_scale,
                                             context_scale=args.context_scale))
            if run.timeline and rate >= timeline_rate.get(policy, rate):  # the policy's highest-rate run
                timelines[policy], timeline_rate[policy] = run.timeline, rate
        return len(jobs)

    num_requests = 0
    for qps in args.rates:
        num_requests = measure(qps, args.policies)
    for _ in range(args.refine):  # halve each policy's bracket around its crossing
        todo: dict[float, list[str]] = {}
        for policy in args.policies:
            q = policy_runs.refine_rate(runs, policy, args.slo)
            if q is not None and all(r["qps"] != q for r in runs if r["policy"] == policy):
                todo.setdefault(q, []).append(policy)
        for q, policies in sorted(todo.items()):
            measure(q, policies)
    setup = {"command": args.command, "model": label, "trace": args.trace or args.mix,
             "num_requests": num_requests, "time_scale": args.time_scale, "context_scale": args.context_scale,
             "seed": args.seed, "slo_normalized_latency_s": args.slo,
             "window_s": {f"{q:g}": [round(a, 3), round(b, 3)] for q, (a, b) in windows.items()}}
    if settings is not None:
        setup.update(num_blocks=settings.num_blocks, block_size=settings.block_size,
                     max_batch_tokens=settings.max_batch_tokens)
    else:
        hardware = HardwareModel.for_preset(model, preset)
        setup.update(num_blocks=hardware.kv_pool_blocks(), block_size=BLOCK_SIZE,
                     max_batch_tokens=preset.max_batch_tokens, cost_model=hardware.cost_model().__dict__)
    return runs, timelines, setup


# ---------------------------------------------------------------------- output
def write_outputs(out: Path, runs: list[dict[str, Any]], timelines: dict[str, list], setup: dict[str, Any]) -> str:
    """results.json, the figures and summary.md; returns the summary text."""
    from .metrics import results_json
    from .plots import plot_latency_vs_rate, plot_memory_timeline
    from .report import markdown_summary, sustainable_table
    from .policy_runs import sustainable_rates

    out.mkdir(parents=True, exist_ok=True)
    slo = setup["slo_normalized_latency_s"]
    rates = sustainable_rates(runs, slo)
    (out / "results.json").write_text(json.dumps(
        {**results_json(runs), "setup": setup, "sustainable_rate": {p: s.rate for p, s in rates.items()},
         "sustainable_rate_note": {p: s.note for p, s in rates.items()}}, indent=2, default=str))
    plot_latency_vs_rate(runs, out / "latency_vs_rate.png", slo=slo)
    x_max = max((s["t"] - samples[0]["t"] for samples in timelines.values() for s in samples), default=0.0)
    for policy, samples in timelines.items():
        plot_memory_timeline(samples, out / f"memory_{policy}.png", policy=policy, x_max=x_max)
    lines = [f"# infercept-bench: {setup['model']}", "", f"`{setup['command']}`", "",
             ", ".join(f"{k} {v}" for k, v in setup.items() if k != "command"), "", markdown_summary(runs)]
    if len({r["qps"] for r in runs}) > 1:
        lines += [sustainable_table(rates, slo)]
    lines += ["![latency](latency_vs_rate.png)", ""]
    lines += [f"![memory {p}](memory_{p}.png)" for p in timelines]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def run_client_mode(args: argparse.Namespace) -> None:
    """Sessions against a server: DIR/client_results.json and DIR/client_summary.md."""
    from .client import markdown, run_client

    trace = make_trace(args, args.rates[0], None)
    results = run_client(args.base_url, trace, args.turns, args.turn_tokens, args.seed, args.api_key,
                         args.request_timeout, args.served_model, not args.no_cache_key, args.deadline)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results["setup"] = {"command": args.command, "base_url": args.base_url, "mix": args.mix, "qps": args.rates[0],
                        "time_scale": args.time_scale, "context_scale": args.context_scale, "turns": args.turns,
                        "turn_tokens": args.turn_tokens}
    (out / "client_results.json").write_text(json.dumps(results, indent=2))
    text = markdown(results["summary"], args.base_url) + f"\n`{args.command}`\n"
    (out / "client_summary.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["agents"]:  # the agent mix: sessions sharing a prefix, sharing on and off (bench/agents.py)
        from .agents import main as agents_main

        agents_main(argv[1:])
        return
    logging.basicConfig(format="%(message)s")
    log.setLevel(logging.INFO)
    parser = build_parser()
    args = parse_args(argv, parser)
    if args.base_url:
        return run_client_mode(args)
    import torch

    torch.set_num_threads(args.threads)
    try:  # bad input found while loading (a trace's content, a model path, the output folder): one line
        runs, timelines, setup = run_all(args)
        if is_rank_0():  # under torchrun the driver alone holds the results
            print(write_outputs(Path(args.out), runs, timelines, setup))
            print(f"results in {args.out}/")
    except (ValueError, OSError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
