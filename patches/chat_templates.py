"""transformers' chat-parsing internals the chat tool calls use: one place to fix on an upgrade.

- `_RESPONSE_TEMPLATE_FALLBACKS` (`transformers serve`'s per-`model_type` response templates for
  tokenizers that ship none) is private to the serving CLI, and importing it pulls the serving
  stack in (seconds), so it is imported only when a tokenizer lacks a template.
- A loaded response template's compiled `close_re` per field tells where a tool call ends;
  the public API parses whole messages but does not expose the anchors.
"""
from __future__ import annotations

from typing import Any

from transformers.utils.chat_parsing.response_templates import load_response_template

TOOL_CALLS_FIELD = "tool_calls"


def fallback_response_template(model_type: str | None) -> dict | None:
    """The response template `transformers serve` falls back to for `model_type`, if any."""
    if not model_type:
        return None
    from transformers.cli.serving.utils import _RESPONSE_TEMPLATE_FALLBACKS

    return next((t for types, t in _RESPONSE_TEMPLATE_FALLBACKS.items() if model_type in types), None)


def tool_call_close(template: dict) -> Any:
    """The compiled pattern that ends a tool call in `template` (None when calls end only at EOS).

    Raises ValueError (transformers' message) when the template is malformed, and when it has
    no `tool_calls` field: such a template cannot describe a call."""
    fields = load_response_template(template).fields
    if TOOL_CALLS_FIELD not in fields:
        raise ValueError(f"the response template has no {TOOL_CALLS_FIELD!r} field (fields: {sorted(fields)})")
    return fields[TOOL_CALLS_FIELD].close_re
