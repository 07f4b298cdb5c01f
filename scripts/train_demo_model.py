"""Train the bundled demo model from scratch on synthetic tool-use dialogues (one CPU core).

    python scripts/train_demo_model.py --steps 3000 --out infercept_hf/assets/demo_model

Seeded and single-threaded, so the same command gives the same weights on the same
torch build. The loss covers only what the model writes (tool calls, replies, EOS):
prompts and tool answers are context. Ends with the held-out evaluation of
`infercept_hf.demo.evaluate` and writes the figures to `train_info.json` beside the weights.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infercept_hf.demo.data import Piece, dialogues  # noqa: E402
from infercept_hf.demo.evaluate import MAX_NEW_TOKENS, evaluate_all  # noqa: E402
from infercept_hf.demo.model import ASSET_DIR, demo_config  # noqa: E402
from infercept_hf.demo.tokenizer import build_tokenizer  # noqa: E402

IGNORE = -100
POOL = 512  # dialogues drawn at a time, sorted by length so a batch wastes little padding


def encode(tokenizer: PreTrainedTokenizerFast, pieces: list[Piece]) -> tuple[list[int], list[int]]:
    """Token ids and labels; labels are IGNORE where the text is context, not model output."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return ids, labels


def batches(tokenizer: PreTrainedTokenizerFast, seed: int, batch_tokens: int,
            copy_steps: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless padded batches of about `batch_tokens` tokens (rows x longest row).

    The first `copy_steps` batches hold only echo dialogues: a small model trained on the
    full mix from the start never learned to copy digits (its loss on them stayed at
    ln 10), while dense copying forms the circuit within a few hundred steps.
    """
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id
    served = 0
    for pool in range(sys.maxsize):
        drawn = dialogues(seed * 1_000_003 + pool, POOL, copy_only=served < copy_steps)
        examples = sorted((encode(tokenizer, d) for d in drawn), key=lambda e: len(e[0]))
        groups, group = [], []
        for example in examples:
            if group and (len(group) + 1) * len(example[0]) > batch_tokens:
                groups.append(group)
                group = []
            group.append(example)
        groups.append(group)
        rng.shuffle(groups)
        if served < copy_steps:
            groups = groups[: copy_steps - served]
        for group in groups:
            served += 1
            width = max(len(ids) for ids, _ in group)
            ids = torch.full((len(group), width), pad, dtype=torch.long)
            labels = torch.full((len(group), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, (x, y) in enumerate(group):
                ids[row, : len(x)] = torch.tensor(x)
                labels[row, : len(y)] = torch.tensor(y)
                mask[row, : len(x)] = 1
            yield ids, mask, labels


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=ASSET_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--copy-steps", type=int, default=400, help="echo-only steps before the full mix")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation at the end")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    model = AutoModelForCausalLM.from_config(demo_config(tokenizer), dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, {args.steps} steps of ~{args.batch_tokens} tokens", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)

    model.train()
    started = time.perf_counter()
    running = 0.0
    stream = batches(tokenizer, args.seed, args.batch_tokens, args.copy_steps)
    for step, (ids, mask, labels) in zip(range(args.steps), stream):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % 50 == 0:
            elapsed = time.perf_counter() - started
            print(f"step {step + 1:5d}  loss {running / 50:.4f}  {elapsed:7.1f} s", flush=True)
            running = 0.0
    train_seconds = time.perf_counter() - started

    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    info = {"steps": args.steps, "copy_steps": args.copy_steps, "seed": args.seed, "batch_tokens": args.batch_tokens,
            "lr": args.lr, "parameters": n_params, "train_seconds": round(train_seconds, 1), "torch": torch.__version__}
    if not args.no_eval:
        for name, score in evaluate_all(model, tokenizer).items():
            info[name] = f"{score.correct}/{score.total}"
            print(score.line(name), flush=True)
    (args.out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {args.out} after {train_seconds:.0f} s of training", flush=True)


if __name__ == "__main__":
    main()
