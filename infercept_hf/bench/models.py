"""The models the benchmark runs on a real clock: the bundled demo model, stand-ins, or a path.

Imported only when a run starts, so `infercept-bench --help` and flag errors stay instant.
"""
from __future__ import annotations

import logging

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from ..distributed import is_torchrun, load_tp_model
from ..loading import SMOLLM2, load_causal_lm
from ..model_spec import ModelSpec

log = logging.getLogger("infercept_hf.bench")


def tiny_random_llama() -> torch.nn.Module:
    """A stand-in with random weights: the benchmark feeds dummy tokens, so only its cost matters."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


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
    label = "SmolLM2-135M-Instruct" if name == SMOLLM2 else name
    try:
        return load_causal_lm(name, with_tokenizer=False)[0], label  # a hub id, a folder or a GGUF file
    except (OSError, ImportError) as e:  # no such directory, no such model id, or no hub to ask
        raise ValueError(f"cannot load --model {name!r}: {str(e).splitlines()[0]}") from None


def max_positions(model: torch.nn.Module) -> int | None:
    return ModelSpec.of(model).max_positions
