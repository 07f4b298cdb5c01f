"""Shared fixtures: tiny random models built from configs, and the plain-transformers reference."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's CPU interpreter is chosen when triton is first imported (transformers imports it
    # through torch._dynamo), so it must be set before anything else loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Profiles measured by tests (generate() without a cost_model) stay out of the user's cache.
os.environ.setdefault("INFERCEPT_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "infercept_test_cache"))

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from infercept_hf import CostModel, Scripted  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

VOCAB = 128
_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
CONFIGS = {
    "llama": lambda: LlamaConfig(**_SMALL),
    "qwen2": lambda: Qwen2Config(**_SMALL),
    "mistral": lambda: MistralConfig(**_SMALL, sliding_window=12),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512),
    "gptj": lambda: GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=512),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=512),
}

# Fixed, cheap cost figures so tests never profile; min-waste still sees real trade-offs.
TEST_COST = CostModel(fwd_per_token_s=1e-4, fwd_fixed_s=1e-3, swap_bytes_per_s=1e9, kv_bytes_per_token=512,
                      saturation_tokens=64)
# The parity scenario's pool: `scripted_batch`'s 4 rows of up to ~47 tokens do not fit in 13 blocks of 4,
# so every policy has to swap, discard or preempt.
TIGHT_POOL = dict(num_blocks=13, block_size=4, host_pool_bytes=8 * 4 * 1024)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, attn: str | None = None):
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    kwargs = {"dtype": dtype}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    elif arch == "gptj":
        kwargs["attn_implementation"] = "eager"
    model = AutoModelForCausalLM.from_config(config, **kwargs).eval()
    # Random models emit EOS at random; without one, every scripted pause is reached.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama")


def prompts_for(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def scripted_batch() -> tuple[list[list[int]], list[Scripted]]:
    """The parity scenario: four prompts of mixed lengths, several scripted tool pauses per row."""
    prompts = prompts_for(2, [6, 13, 9, 17])
    trace = [
        Scripted([(5, 0.01, [7, 8, 9]), (4, 0.03, [10])]),
        Scripted([(3, 0.02, [11, 12, 13, 14, 15, 16]), (6, 0.0, [17, 18])]),
        Scripted([(7, 0.04, [19])]),
        Scripted([(2, 0.0, [20, 21]), (2, 0.01, [22]), (3, 0.02, [23, 24, 25])]),
    ]
    return prompts, trace


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def greedy(model, ctx: list[int], n: int) -> list[int]:
    """Plain transformers: `n` greedy tokens after `ctx` (an explicit mask: without one, generate infers it from the pad id and masks every such id in the context)."""
    ids = torch.tensor([ctx])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(ctx):].tolist()


def reference_scripted(model, prompt: list[int], scripted: Scripted | None, max_new_tokens: int) -> list[int]:
    """What the engine must produce: generate, append the answer, re-run generate on the whole context."""
    ctx = list(prompt)
    generated = 0
    for seg in (scripted.segments if scripted else ()):
        n = min(seg.n_tokens, max_new_tokens - generated)
        ctx += greedy(model, ctx, n)
        generated += n
        if generated >= max_new_tokens:
            return ctx[len(prompt):]
        ctx += list(seg.answer_ids)
    if max_new_tokens > generated:
        ctx += greedy(model, ctx, max_new_tokens - generated)
    return ctx[len(prompt):]
