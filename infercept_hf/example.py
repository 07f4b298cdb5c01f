"""`python -m infercept_hf.example`: generate with tool calls on the bundled model and show what
each pause cost under every policy.

Falls back to a tiny random Llama with scripted interceptions when the bundled model is not
installed, so the command always shows the engine at work.
"""
from __future__ import annotations

import argparse
import time

import torch

import infercept_hf as ih


def _bundled():
    try:
        from infercept_hf.demo import demo_model, demo_prompt
    except ImportError:
        return None
    return demo_model(), demo_prompt


def _tiny_llama() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policy", default=None, choices=ih.POLICIES, help="one policy (default: all)")
    args = parser.parse_args(argv)
    policies = [args.policy] if args.policy else list(ih.POLICIES)
    bundled = _bundled()
    if bundled is not None:
        (model, tokenizer, tools), demo_prompt = bundled
        questions = ["What is 123 * 45?", "Compute 9876 - 1234", "What is the capital of France?"]
        texts = [demo_prompt(q) for q in questions]
        enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        for policy in policies:
            t0 = time.perf_counter()
            out = ih.generate(model, enc.input_ids, attention_mask=enc.attention_mask, tokenizer=tokenizer,
                              tools=tools, policy=policy, max_new_tokens=64, do_sample=False)
            print(f"== {policy}: {time.perf_counter() - t0:.2f} s")
            for row in tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True):
                print("  ", row.strip())
        return
    print("bundled model not installed: a tiny random Llama with scripted tool pauses")
    model = _tiny_llama()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (40, 90, 60, 120)]
    for policy in policies:
        with ih.InterceptEngine(model, policy=policy, num_blocks=40, block_size=16) as engine:
            for i, p in enumerate(prompts):
                engine.add_request(p, max_new_tokens=48,
                                   interceptions=ih.Scripted([(12, 0.2 * (i + 1), [7, 8, 9]), (12, 0.05, [10])]))
            t0 = time.perf_counter()
            results = engine.run()
            s = engine.stats()
        strategies = sorted({rec.strategy for r in results.values() for rec in r.interceptions})
        print(f"{policy:>12}: {time.perf_counter() - t0:5.2f} s  recomputed {s['recomputed_tokens']:4d} tok  "
              f"swapped {s['swapped_bytes'] / 1e6:6.2f} MB  strategies {strategies}")


if __name__ == "__main__":
    main()
