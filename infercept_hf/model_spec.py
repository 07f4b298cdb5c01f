"""What the engine needs to know about a model, worked out once per engine.

Memory sizing, the profiler, the paged cache, the batch runner and the stats all read the
same facts (the config the cache is sized from, dtype, the device the model computes on, KV
bytes per token, positions, vocabulary, sliding window, layer groups). `ModelSpec.of(model)`
derives them in one place, so no two parts of the engine can disagree about them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .patches.architectures import paged_cache_config
from .patches.placement import execution_device, largest_offloaded_module_bytes
from .patches.transformers_cb import FULL_ATTENTION, find_head_dim, find_num_key_value_heads


def max_positions(config: Any) -> int | None:
    """The most positions the model takes (GPT-2 / GPT-J configs name it `n_positions`); None if unbounded."""
    config = config.get_text_config()
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """`2 (K and V) * layers * kv_heads * head_dim * itemsize`: the KV one token adds.

    transformers' attribute maps let GPT-2 / GPT-J configs (`n_layer`, `n_head`, `n_embd`)
    answer to the Llama-style names; grouped-query models count `num_key_value_heads`.
    """
    config = config.get_text_config()
    layers = config.num_hidden_layers
    return 2 * layers * find_num_key_value_heads(config) * find_head_dim(config) * dtype.itemsize


@dataclass(frozen=True)
class ModelSpec:
    """The facts of one model that the engine's parts share."""

    config: Any  # the text config the paged cache is sized from (`paged_cache_config`)
    model_type: str | None  # the whole model's (`model.config.model_type`): it picks a chat call format
    dtype: torch.dtype
    device: torch.device  # where the model computes (accelerate's main device when dispatched)
    kv_bytes_per_token: int  # M, over all layers, the whole model (one rank holds 1/tp of it)
    max_positions: int | None
    vocab_size: int
    num_layers: int
    sliding_window: int | None
    layer_groups: tuple[str, ...]  # attention types present, in layer order of first appearance
    streamed_weight_bytes: int  # largest offloaded module accelerate moves onto the device per forward
    tp_size: int = 1  # ranks the model is sharded across (transformers' tensor parallel): each holds 1/tp of the KV

    @classmethod
    def of(cls, model: torch.nn.Module, dtype: torch.dtype | None = None) -> ModelSpec:
        """Refuses an unsupported architecture (`UnsupportedModelError`). `dtype` defaults to the weights'."""
        config = paged_cache_config(model)
        dtype = dtype or next(model.parameters()).dtype
        layer_types = getattr(config, "layer_types", None) or (FULL_ATTENTION,)
        return cls(
            config=config,
            model_type=getattr(getattr(model, "config", None), "model_type", None),
            dtype=dtype,
            device=execution_device(model),
            kv_bytes_per_token=kv_bytes_per_token(config, dtype),
            max_positions=max_positions(config),
            vocab_size=config.vocab_size,
            num_layers=config.num_hidden_layers,
            sliding_window=getattr(config, "sliding_window", None),
            layer_groups=tuple(dict.fromkeys(layer_types)),
            streamed_weight_bytes=largest_offloaded_module_bytes(model),
            tp_size=getattr(model, "tp_size", None) or 1,
        )

    @property
    def rank_kv_bytes_per_token(self) -> int:
        """KV bytes one token adds to this process's pool: all of `kv_bytes_per_token` on one
        device, one rank's share of the KV heads under tensor parallelism."""
        return self.kv_bytes_per_token // self.tp_size

    @property
    def mask_dtype(self) -> torch.dtype:
        """The dtype of additive attention masks: the weights', or float32 for quantized weights."""
        return self.dtype if self.dtype.is_floating_point else torch.float32
