"""Every architecture of the support matrix under every policy: exact tokens, or a clear refusal.

The parity scenario is conftest's `scripted_batch` in `TIGHT_POOL`: four left-padded prompts of mixed
lengths, several scripted tool pauses per row, a pool too small to hold them all, against
plain transformers re-running `generate` after each answer. The outcomes this file records
*are* the support matrix: its last test renders them and requires docs/SUPPORT_MATRIX.md and
the table between README.md's support-matrix markers to be exactly that
(`python scripts/support_matrix.py` rewrites both from a fresh run).
"""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    Gemma2Config,
    Gemma3nTextConfig,
    Gemma3Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTBigCodeConfig,
    GPTNeoConfig,
    JambaConfig,
    MambaConfig,
    MptConfig,
    Phi3Config,
    Qwen3Config,
    T5Config,
    T5ForConditionalGeneration,
)

import infercept_hf as ih
from infercept_hf.patches import paged_pool as pp
from conftest import (_SMALL, CONFIGS, TEST_COST, TIGHT_POOL, VOCAB, left_pad, prompts_for, reference_scripted,
                      scripted_batch, tiny_model)

ROOT = Path(__file__).resolve().parents[1]
MATRIX_FILE = ROOT / "docs" / "SUPPORT_MATRIX.md"
README_FILE = ROOT / "README.md"
README_BEGIN, README_END = "<!-- support-matrix:begin -->", "<!-- support-matrix:end -->"
WRITE_ENV = "INFERCEPT_WRITE_SUPPORT_MATRIX"
MAX_NEW = 16
WINDOW = 12  # sliding window of the tiny configs: shorter than the contexts, so it matters

# Tiny configs beyond conftest's, added to its table so `tiny_model` builds them all alike.
CONFIGS.update({
    "qwen3": lambda: Qwen3Config(**_SMALL, head_dim=8),
    "phi3": lambda: Phi3Config(**_SMALL, pad_token_id=0),
    "gemma2": lambda: Gemma2Config(**_SMALL, head_dim=8, sliding_window=WINDOW),
    "gemma3": lambda: Gemma3TextConfig(**_SMALL, head_dim=8, sliding_window=WINDOW,
                                       layer_types=["sliding_attention", "full_attention"]),
    "gemma3_multimodal": lambda: Gemma3Config(  # how Gemma-3 4B+ checkpoints load; text-only prompts here
        text_config=dict(_SMALL, head_dim=8, sliding_window=WINDOW,
                         layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2, image_token_index=VOCAB - 1),
    "falcon": lambda: FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "gpt_bigcode": lambda: GPTBigCodeConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512),
    "bloom": lambda: BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
    "falcon_alibi": lambda: FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         alibi=True),
    "gpt_neo": lambda: GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, window_size=WINDOW,
                                    attention_types=[[["global", "local"], 1]], max_position_embeddings=512),
    "mpt": lambda: MptConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=512),
    "mamba": lambda: MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4),
    "jamba": lambda: JambaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
                                 expert_layer_period=2, expert_layer_offset=1, num_experts=2, mamba_d_state=4,
                                 mamba_d_conv=2, mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False),
    "gemma3n": lambda: Gemma3nTextConfig(  # 4 layers: the last 2 share the first 2's KV
        **_SMALL | dict(num_hidden_layers=4), head_dim=8, sliding_window=WINDOW, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"] * 2, vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8, activation_sparsity_pattern=[0.0] * 4, altup_num_inputs=2, laurel_rank=4),
})
SUPPORTED = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gemma3_multimodal", "gpt2", "gptj",
             "gpt_neox", "falcon", "gpt_bigcode"]
REFUSED_AT_BUILD = ["bloom", "mpt", "falcon_alibi", "gpt_neo", "mamba", "jamba", "t5"]

# (kind, row) -> cell: parity outcomes per policy, and refusal messages; rendered by the last test.
RESULTS: dict[tuple[str, str], dict[str, str]] = {}
_models: dict[str, torch.nn.Module] = {}
_expected: dict[str, list[list[int]]] = {}


def model_for(arch: str) -> torch.nn.Module:
    if arch not in _models:
        if arch == "t5":
            torch.manual_seed(0)
            _models[arch] = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                                                                num_layers=2, num_heads=4)).eval()
        else:
            _models[arch] = tiny_model(arch)  # transformers picks eager where sdpa is missing (GPT-J, Gemma-2)
    return _models[arch]


@contextmanager
def deadline(seconds: int):
    """A stuck engine fails its test instead of hanging the suite."""
    def expire(*_):
        raise TimeoutError(f"no result within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def kv_layout(model: torch.nn.Module) -> tuple[str, str]:
    engine = ih.InterceptEngine(model, cost_model=TEST_COST, **TIGHT_POOL)
    kinds = " + ".join(k.replace("_attention", "") for k in pp.allocators(engine.cache))
    engine.close()
    return kinds, "partial" if engine.cache.supports_partial else "whole request"


@pytest.mark.parametrize("policy", ih.POLICIES)
@pytest.mark.parametrize("arch", SUPPORTED)
def test_scripted_interceptions_are_exact(arch, policy):
    model = model_for(arch)
    prompts, trace = scripted_batch()
    if arch not in _expected:
        _expected[arch] = [reference_scripted(model, p, s, MAX_NEW) for p, s in zip(prompts, trace)]
    row = RESULTS.setdefault(("parity", arch), {})
    if "cls" not in row:
        row.update(zip(("layout", "moves"), kv_layout(model)), cls=type(model).__name__,
                   attn=model.config._attn_implementation)
    row[policy] = "error"
    ids, mask = left_pad(prompts)
    with deadline(120):
        out = ih.generate(model, ids, attention_mask=mask, interceptions=trace, policy=policy, max_new_tokens=MAX_NEW,
                          cost_model=TEST_COST, **TIGHT_POOL)
    got = [out[i, ids.shape[1]:].tolist()[: len(e)] for i, e in enumerate(_expected[arch])]
    row[policy] = "exact" if got == _expected[arch] else "wrong tokens"
    assert got == _expected[arch], f"{arch} under {policy}: rows differ from plain transformers"


@pytest.mark.parametrize("move", ["swap_out", "discard_device"])
def test_a_whole_move_empties_every_layer_group(move):
    """Sliding-window layers hold fewer blocks than full-attention ones: a whole-request move
    (the only kind such models allow) must still take every block of every group."""
    engine = ih.InterceptEngine(model_for("gemma3"), policy="preserve", num_blocks=32, block_size=4,
                                host_pool_bytes=1 << 20, cost_model=TEST_COST)
    rid = engine._requests[engine.add_request(prompts_for(5, [17])[0], max_new_tokens=4)].rid
    engine.step()  # the prompt's KV: 5 full-attention blocks, 3 sliding ones (window 12)
    cache = engine.cache
    before = [len(pp.block_tables(a)[rid]) for a in pp.allocators(cache).values()]
    assert sorted(before) == [3, 5]
    getattr(cache, move)(rid)
    assert all(not pp.block_tables(a).get(rid) for a in pp.allocators(cache).values())
    cache.check_integrity()
    if move == "swap_out":
        assert [len(h.tables[rid]) for h in cache.host.values()] == before
        assert cache.swap_in(rid)
        assert [len(pp.block_tables(a)[rid]) for a in pp.allocators(cache).values()] == before
    engine.close()


@pytest.mark.parametrize("arch", REFUSED_AT_BUILD)
def test_unsupported_architecture_is_refused_when_the_engine_is_built(arch):
    model = model_for(arch)
    with pytest.raises(ih.UnsupportedModelError, match=type(model).__name__) as err:
        ih.InterceptEngine(model, cost_model=TEST_COST, **TIGHT_POOL)
    RESULTS[("refused", arch)] = {"cls": type(model).__name__, "when": "engine build", "why": str(err.value)}


def test_layers_that_skip_the_cache_are_refused_after_the_first_forward():
    """Gemma-3n's last layers reuse earlier layers' KV without writing: only running it shows that."""
    model = model_for("gemma3n")
    ids, mask = left_pad(prompts_for(1, [5, 8]))
    with pytest.raises(ih.UnsupportedModelError, match="Gemma3nForCausalLM.*2 of its 4 layers") as err:
        ih.generate(model, ids, attention_mask=mask, max_new_tokens=3, cost_model=TEST_COST, **TIGHT_POOL)
    RESULTS[("refused", "gemma3n")] = {"cls": type(model).__name__, "when": "first forward", "why": str(err.value)}


def test_a_config_that_misstates_kv_heads_fails_clearly():
    """GPT-2 ignores `num_key_value_heads`; a config carrying one must not reach an index copy."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                        num_key_value_heads=2)).eval()
    ids, mask = left_pad(prompts_for(1, [5]))
    with pytest.raises(ih.UnsupportedModelError, match="4 heads x 8 dims but its config says 2 x 8"):
        ih.generate(model, ids, attention_mask=mask, max_new_tokens=2, cost_model=TEST_COST, **TIGHT_POOL)


def parity_table() -> list[str]:
    """One row per architecture, one column per policy, from this session's RESULTS."""
    policies = list(ih.POLICIES)
    lines = [
        "| model | `model_type` | attention | KV layout | moves | " + " | ".join(f"`{p}`" for p in policies) + " |",
        "|---|---|---|---|---|" + "---|" * len(policies),
    ]
    for arch in SUPPORTED:
        row = RESULTS[("parity", arch)]
        lines.append(f"| {row['cls']} | {model_for(arch).config.model_type} | {row['attn']} | {row['layout']} | "
                     f"{row['moves']} | " + " | ".join(row[p] for p in policies) + " |")
    return lines


def render_matrix() -> str:
    """docs/SUPPORT_MATRIX.md: the parity table, what its cells mean, and the refusals."""
    lines = [
        "# Support matrix",
        "",
        "Generated by `python scripts/support_matrix.py` from `tests/test_architectures.py`; that test fails",
        "when this file differs from what it computes. Do not edit by hand.",
        "",
        f"transformers {transformers.__version__}, tiny random float32 models (2 layers, hidden 32), greedy decoding.",
        "Each cell: four left-padded prompts, several scripted tool pauses per row, a 13-block pool that cannot",
        "hold them all, compared token for token with plain `model.generate` re-run after every tool answer.",
        "",
        *parity_table(),
        "",
        "`whole request`: models with sliding-window layers keep ring-ordered block tables, so swap and",
        "discard move all of a paused request's KV at once (full-attention models may move a tail).",
        "",
        "## Refused, with the error a user sees",
        "",
        "| model | `model_type` | refused at | error |",
        "|---|---|---|---|",
    ]
    for arch in [*REFUSED_AT_BUILD, "gemma3n"]:
        row = RESULTS[("refused", arch)]
        lines.append(f"| {row['cls']} | {model_for(arch).config.model_type} | {row['when']} | {row['why']} |")
    return "\n".join(lines) + "\n"


def readme_with_table(readme: str) -> str:
    """README.md with the parity table between its support-matrix markers."""
    head, rest = readme.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return head + README_BEGIN + "\n" + "\n".join(parity_table()) + "\n" + README_END + tail


def test_support_matrix_is_what_these_tests_computed():
    expected_rows = {("parity", a) for a in SUPPORTED} | {("refused", a) for a in [*REFUSED_AT_BUILD, "gemma3n"]}
    if not expected_rows <= RESULTS.keys():
        pytest.skip("the matrix needs every architecture test of this file in the same session")
    matrix, readme = render_matrix(), readme_with_table(README_FILE.read_text())
    if os.environ.get(WRITE_ENV):
        MATRIX_FILE.write_text(matrix)
        README_FILE.write_text(readme)
    stale = "is stale: run python scripts/support_matrix.py"
    assert MATRIX_FILE.read_text() == matrix, f"docs/SUPPORT_MATRIX.md {stale}"
    assert README_FILE.read_text() == readme, f"README.md's support matrix {stale}"
