"""The bundled demo model: a ~1M-parameter Llama trained to call the six demo tools.

It lives in `infercept_hf/assets/demo_model/` as a plain transformers checkpoint (config,
safetensors, tokenizer with chat template, generation config), so `from_pretrained`
loads it like any hub model; `demo_model()` adds the matching `Tool` objects.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from ..tools import Tool
from .tools import demo_tools

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_model"


def demo_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """Small enough to train on one CPU core in minutes and to ship in the wheel (~4 MB)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def demo_model(
    path: str | Path | None = None, dtype: torch.dtype = torch.float32, **tool_options: Any
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast, list[Tool]]:
    """Load the bundled (or `path`'s) demo model in eval mode, its tokenizer, and its tools.

    `tool_options` go to `demo_tools` (e.g. `image_seconds=0.0, tts_seconds=0.0` for tests,
    `chat_reply=` to route the chatbot's questions to a person).
    """
    where = Path(path) if path is not None else ASSET_DIR
    if not (where / "model.safetensors").exists():
        raise FileNotFoundError(f"no demo model at {where}; train one with scripts/train_demo_model.py --out {where}")
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(where)
    return model, tokenizer, demo_tools(**tool_options)
