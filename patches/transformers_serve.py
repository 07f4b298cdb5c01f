"""The pieces of `transformers serve` the OpenAI server reuses: one place to fix on an upgrade.

`transformers serve` (`transformers/cli/serving/`) keeps its message normalization and its
stream-event translation as methods and helpers of its own handlers, not as public API; this
module imports them and gives them stable names.

- `template_messages`: OpenAI chat messages -> what a text model's chat template takes (content
  parts joined into text, `tool_calls[].function.arguments` parsed from JSON strings);
- `parser_items`: a `ResponseParser`'s events -> content deltas (`str`), reasoning deltas
  (`ReasoningText`) and completed calls (`ToolCall`, arguments as a JSON string);
- `sse`: a pydantic chunk (or a string) as one server-sent-events `data:` line.
"""
from __future__ import annotations

from typing import Any

from transformers.cli.serving.utils import (
    BaseHandler,
    Modality,
    ReasoningText,
    ToolCall,
    response_events_to_chunks,
)

__all__ = ["ReasoningText", "ToolCall", "parser_items", "sse", "template_messages"]


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Raises KeyError, TypeError or ValueError (bad JSON arguments) on a malformed message."""
    return BaseHandler.get_processor_inputs_from_messages(messages, Modality.LLM)


def parser_items(events: list[dict[str, Any]]) -> list[str | ReasoningText | ToolCall]:
    return response_events_to_chunks(events)


def sse(chunk: Any) -> str:
    return BaseHandler.chunk_to_sse(chunk)
