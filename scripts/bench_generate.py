"""Tokens/s without interceptions: infercept_hf.generate vs model.generate vs transformers' generate_batch.

    python scripts/bench_generate.py [--batch 8] [--new 64] [--hidden 256] [--layers 4]

Same random Llama, same batch of prompts, greedy, float32, on this machine's CPU (or CUDA if
present). Prints one line per contender; timing goals live here, never in tests.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
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
    # a fixed cost model: the same chunk budget (S) on every machine, and no profiling run
    cost = ih.CostModel(fwd_per_token_s=1e-4, fwd_fixed_s=1e-3, swap_bytes_per_s=1e10, kv_bytes_per_token=1,
                        saturation_tokens=256)

    def timed(name: str, fn: Callable[[], Any]) -> None:
        """Time the second of two calls: the first pays for warm-up (allocations, caches)."""
        fn()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        print(f"{name:>22}: {total / dt:8.1f} tok/s  ({dt:.2f} s for {total} tokens)")

    timed("model.generate", lambda: model.generate(ids, attention_mask=mask, max_new_tokens=args.new,
                                                    do_sample=False, pad_token_id=0))
    timed("infercept_hf.generate", lambda: ih.generate(model, ids, attention_mask=mask, max_new_tokens=args.new,
                                                       do_sample=False, pad_token_id=0, cost_model=cost))
    gen_cfg = GenerationConfig(max_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=args.batch * ((width + args.new) // 16 + 2), page_size=16,
                                  max_batch_tokens=256, use_async_batching=False, auto_switch_to_flash=False,
                                  allow_block_sharing=False)
    timed("transformers generate_batch", lambda: model.generate_batch(prompts, generation_config=gen_cfg,
                                                                      continuous_batching_config=cb, progress_bar=False))


if __name__ == "__main__":
    main()
