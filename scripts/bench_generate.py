"""Cost without interceptions: infercept_hf.generate under each policy vs model.generate vs generate_batch.

    python scripts/bench_generate.py [--batch 8] [--new 64] [--hidden 256] [--layers 4] [--repeats 3]

Same random Llama, same batch of prompts, greedy, float32, on this machine's CPU (or CUDA if
present). `infercept_hf.generate` runs with the cost model its users get (profiled on this
machine, then cached), so min-waste chunks prompts as it would for them. Each contender is
warmed up once, then the contenders run in turn, `--repeats` rounds, so a burst of load from
other processes falls on all of them alike; the line shows the fastest CPU time (process
time: all threads) and wall time, the slowest CPU time, and the ratio of the fastest CPU
times to `model.generate`'s. Timing goals live here, never in tests.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

import infercept_hf as ih
from infercept_hf.profiler import load_or_profile
from infercept_hf.scheduler import POLICIES


def interleaved(contenders: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """(CPU seconds, wall seconds) of every call, per contender: one warm-up call each, then
    `repeats` rounds of one call per contender."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append((time.process_time() - c0, time.perf_counter() - w0))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--saturation-tokens", type=int,
                   help="override the profiled saturation point S (min-waste's chunk budget), e.g. 32")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's); 1 keeps CPU time honest on a busy machine, "
                        "where idle threads spin")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=2048)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_config(cfg).eval().to(device)
    model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(0)
    lengths = [args.prompt // 2 + (i * args.prompt) // (2 * args.batch) for i in range(args.batch)]
    prompts = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.zeros(args.batch, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, pr in enumerate(prompts):
        ids[i, width - len(pr):] = torch.tensor(pr)
        mask[i, width - len(pr):] = 1
    ids, mask = ids.to(device), mask.to(device)
    total = args.batch * args.new
    # what an engine without cost_model= uses
    overrides = {} if args.saturation_tokens is None else {"saturation_tokens": args.saturation_tokens}
    cost = load_or_profile(model, **overrides)
    print(f"cost model: saturation {cost.saturation_tokens} tokens, {cost.fwd_per_token_s * 1e6:.0f} us/token "
          f"+ {cost.fwd_fixed_s * 1e3:.2f} ms")

    contenders: dict[str, Callable[[], Any]] = {
        "model.generate": lambda: model.generate(ids, attention_mask=mask, max_new_tokens=args.new, do_sample=False,
                                                 pad_token_id=0),
    }
    for policy in args.policies.split(","):
        contenders[f"infercept_hf.generate ({policy})"] = (
            lambda policy=policy: ih.generate(model, ids, attention_mask=mask, max_new_tokens=args.new,
                                              do_sample=False, pad_token_id=0, policy=policy, cost_model=cost))
    gen_cfg = GenerationConfig(max_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=args.batch * ((width + args.new) // 16 + 2), page_size=16,
                                  max_batch_tokens=256, use_async_batching=False, auto_switch_to_flash=False,
                                  allow_block_sharing=False)
    contenders["transformers generate_batch"] = lambda: model.generate_batch(
        prompts, generation_config=gen_cfg, continuous_batching_config=cb, progress_bar=False)
    times = interleaved(contenders, args.repeats)
    base_cpu = min(times["model.generate"])[0]
    for name, runs in times.items():
        cpu, wall = min(runs)
        print(f"{name:>34}: {total / wall:8.1f} tok/s  cpu {cpu:6.2f} s (slowest {max(runs)[0]:5.2f})  "
              f"wall {wall:6.2f} s  cpu x{cpu / base_cpu:.2f}")


if __name__ == "__main__":
    main()
