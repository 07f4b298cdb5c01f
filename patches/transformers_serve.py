"""The pieces of `transformers serve` the OpenAI server reuses: one place to fix on an upgrade.

`transformers serve` (`transformers/cli/serving/`) keeps its message normalization and its
stream-event translation as methods and helpers of its own handlers, not as public API; this
module imports them and gives them stable names.

- `template_messages`: OpenAI chat messages -> what a text model's chat template takes (content
  parts joined into text, `tool_calls[].function.arguments` parsed from JSON strings);
- `parser_items`: a `ResponseParser`'s events -> content deltas (`str`), reasoning deltas
  (`ReasoningText`) and completed calls (`ToolCall`, arguments as a JSON string);
- `sse`: a pydantic chunk (or a string) as one server-sent-events `data:` line;
- `sdpa_reads_kv_heads_once`: transformers' SDPA attention, on a CPU, hands grouped KV heads to
  torch as they are instead of copying each once per query head.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from transformers.cli.serving.utils import (
    BaseHandler,
    Modality,
    ReasoningText,
    ToolCall,
    response_events_to_chunks,
)

__all__ = ["ReasoningText", "ToolCall", "parser_items", "sdpa_reads_kv_heads_once", "sse", "template_messages"]

SDPA_GQA_SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"  # read by transformers.integrations.sdpa_attention at each call


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Raises KeyError, TypeError or ValueError (bad JSON arguments) on a malformed message."""
    return BaseHandler.get_processor_inputs_from_messages(messages, Modality.LLM)


def parser_items(events: list[dict[str, Any]]) -> list[str | ReasoningText | ToolCall]:
    return response_events_to_chunks(events)


def sse(chunk: Any) -> str:
    return BaseHandler.chunk_to_sse(chunk)


def sdpa_reads_kv_heads_once(device: torch.device) -> None:
    """With a mask (the packed batch's), transformers' SDPA path expands the gathered keys and values
    to every query head (`repeat_kv`) because CUDA's fast kernels take grouped heads only without a
    mask; torch's CPU kernels take them with one (`enable_gqa`), the same attention without the
    copies, which cost as much as the attention itself at a server's context lengths. Process-wide,
    CPU only, and only where the environment does not decide otherwise."""
    if device.type == "cpu":
        os.environ.setdefault(SDPA_GQA_SWITCH, "1")
