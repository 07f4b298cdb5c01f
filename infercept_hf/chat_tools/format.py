"""A model's tool-call format: parse its calls with the response template, render results with
the chat template.

Where calls are read from, in order: the `response_template=` the caller passes, the
tokenizer's `response_template`, the fallback `transformers serve` keeps for the model's
`model_type`. Results are rendered by the tokenizer's chat template and appended as the
text it writes after the assistant's turn, so the context at resume decodes to the
template's rendering of the whole transcript (messages, the assistant turn with its
`tool_calls`, the `tool` messages, the generation prompt); the model's own call tokens stay
as generated.

Where a turn with calls ends (the pause point) is read off the chat template once: if it
writes an end-of-turn (EOS) token after the calls, the model's EOS ends the turn (several
calls may come first); if not (the bundled demo model), the close of a call ends it.

    ...<|im_start|>assistant\n<tool_call>{...}</tool_call><|im_end|>   <- model, pause at EOS
    \n<|im_start|>user\n<tool_response>...<|im_end|>\n<|im_start|>assistant\n   <- appended
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..patches.chat_templates import fallback_response_template, tool_call_close

from .functions import FunctionTool

# Stands in for the conversation before the request when only its token ids are known: the
# template's rendering of an assistant turn and of tool messages depends on what comes
# before them only through the messages' own roles, which this keeps valid.
PLACEHOLDER_HISTORY: tuple[dict[str, str], ...] = ({"role": "user", "content": ""},)


class ChatTemplateError(ValueError):
    """The chat template cannot render this transcript the way tool results need."""


@dataclass(frozen=True)
class ParsedCall:
    """One call in a turn; `error` says why it cannot run (then `name`/`arguments` may be None)."""

    id: str
    name: str | None
    arguments: dict[str, Any] | None
    error: str | None = None

    def message(self) -> dict[str, Any]:
        """The call as an assistant message's `tool_calls` entry (arguments as a dict, as chat
        templates take them)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedTurn:
    """An assistant turn as the response template reads it: `message` is what
    `tokenizer.parse_response` returns (None when parsing failed), `calls` its tool calls."""

    raw: str
    message: dict[str, Any] | None
    calls: tuple[ParsedCall, ...]

    def assistant_message(self) -> dict[str, Any]:
        """The turn as the transcript holds it: parsed content plus the runnable calls."""
        if self.message is None:  # unparseable: the raw text stands for the turn
            return {"role": "assistant", "content": self.raw}
        message = {k: v for k, v in self.message.items() if k != "tool_calls"}
        message.setdefault("content", "")
        calls = [c.message() for c in self.calls if c.name is not None]
        if calls:
            message["tool_calls"] = calls
        return message


class ChatFormat:
    """One tokenizer's call format for one set of function tools."""

    def __init__(self, tokenizer: Any, functions: Sequence[FunctionTool], end_of_turn_ids: Sequence[int],
                 model_type: str | None = None, response_template: dict | None = None) -> None:
        if tokenizer is None:
            raise ValueError("function tools need the model's tokenizer (with a chat template): pass tokenizer=")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("function tools need a tokenizer with a chat template (tokenizer.chat_template is None); "
                             "set one, or use infercept_hf.Tool with start/end markers instead")
        template = (response_template or getattr(tokenizer, "response_template", None)
                    or fallback_response_template(model_type))
        if template is None:
            raise ValueError(f"no tool-call format for this model: the tokenizer has no response_template and "
                             f"transformers has no fallback for model_type {model_type!r}; pass response_template= "
                             "(a transformers response template with a 'tool_calls' field), or set "
                             "tokenizer.response_template")
        self.close_re = tool_call_close(template)
        self.template = template
        self.tokenizer = tokenizer
        self.functions = {f.name: f for f in functions}
        self.schemas = [f.schema for f in functions]
        self.eos_texts = tuple(t for t in (tokenizer.decode([i]) for i in end_of_turn_ids) if t)
        self.calls_end_turn = self._template_ends_turn_at_call()

    # ------------------------------------------------------------------ rendering
    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tools=self.schemas, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def results_suffix(self, history: Sequence[dict], assistant: dict, tool_messages: Sequence[dict]) -> str:
        """The text the template writes after the assistant's turn: the tool messages and the
        generation prompt. Taken as the difference of the transcript rendered with and without the
        tool messages, from where the assistant's turn ends (its EOS, or its last call's close)."""
        base = self.render([*history, assistant], add_generation_prompt=False)
        full = self.render([*history, assistant, *tool_messages], add_generation_prompt=True)
        end = self._turn_end(base)
        if end is None:
            raise ChatTemplateError("the chat template's rendering of the assistant turn has no end-of-turn token or "
                                    "call close where the model's turn ended; cannot place the tool results")
        if full[:end] != base[:end]:
            raise ChatTemplateError("the chat template renders the assistant turn differently once tool messages "
                                    "follow it; the tool results cannot be appended after the model's own tokens")
        return full[end:]

    def _turn_end(self, rendered: str) -> int | None:
        if self.calls_end_turn:
            return _last_match_end(self.close_re, rendered)
        ends = [rendered.rfind(t) + len(t) for t in self.eos_texts if t in rendered]
        return max(ends) if ends else None

    def _template_ends_turn_at_call(self) -> bool:
        """True when the template writes no EOS after a turn's calls (the close of a call ends it)."""
        if self.close_re is None or not self.functions:
            return False
        fn = next(iter(self.functions.values()))
        params = fn.schema["function"].get("parameters", {}).get("properties", {})
        probe = ParsedCall("call00000", fn.name, {p: "0" for p in params})
        turn = {"role": "assistant", "content": "", "tool_calls": [probe.message()]}
        try:
            rendered = self.render([*PLACEHOLDER_HISTORY, turn], add_generation_prompt=False)
        except Exception:  # noqa: BLE001 - a template that cannot render the probe: pause at EOS
            return False
        end = _last_match_end(self.close_re, rendered)
        return end is not None and not any(t in rendered[end:] for t in self.eos_texts)

    def forced_opener(self, name: str) -> list[int]:
        """The token ids to append after the generation prompt so that the model writes a call to
        `name`: the template's own tokens for an assistant turn holding that call, from its
        generation prompt through the name and the character after it (a quote or delimiter).
        Raises ChatTemplateError when no opening can be read off the template."""
        turn = {"role": "assistant", "content": "", "tool_calls": [ParsedCall("call00000", name, {}).message()]}
        try:
            prompt = self.render(PLACEHOLDER_HISTORY, add_generation_prompt=True)
            rendered = self.render([*PLACEHOLDER_HISTORY, turn], add_generation_prompt=False)
        except Exception as exc:  # noqa: BLE001 - any template failure means no known opening
            raise ChatTemplateError(f"the chat template cannot render a call to {name!r}: {exc}") from exc
        at = rendered.find(name, len(prompt))
        prompt_ids, ids = self._encode(prompt), self._encode(rendered)
        if at < 0 or ids[:len(prompt_ids)] != prompt_ids:
            raise ChatTemplateError("the chat template does not write a call right after its generation prompt, "
                                    "so the opening of a call cannot be read off it")
        end = at + len(name)
        end += end < len(rendered) and not (rendered[end].isalnum() or rendered[end] in "_-")
        call = ids[len(prompt_ids):]
        k = next(k for k in range(1, len(call) + 1) if len(self.tokenizer.decode(ids[:len(prompt_ids) + k])) >= end)
        return call[:k]

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    # ------------------------------------------------------------------ parsing
    def closes_call(self, tail_text: str) -> bool:
        """Does `tail_text` (the end of the turn so far) end with the close of a call?"""
        return self.close_re is not None and _last_match_end(self.close_re, tail_text) == len(tail_text)

    def parse(self, prefix_text: str, turn_text: str, first_id: int) -> ParsedTurn:
        """Read the turn's calls; call ids are numbered from `first_id` unless the model wrote its own."""
        raw = self._strip_eos(turn_text)
        try:
            message = self.tokenizer.parse_response(turn_text, self.template, prefix=prefix_text, tools=self.schemas)
        except (ValueError, KeyError, TypeError) as exc:
            err = f"the tool call could not be parsed: {str(exc).splitlines()[0]}"
            return ParsedTurn(raw, None, (ParsedCall(_call_id(first_id), None, None, err),))
        calls = tuple(self._call(value, _call_id(first_id + i)) for i, value in enumerate(message.get("tool_calls") or []))
        return ParsedTurn(raw, message, calls)

    def _call(self, value: Any, default_id: str) -> ParsedCall:
        fn = value.get("function", value) if isinstance(value, dict) else {}
        call_id = value.get("id") if isinstance(value, dict) and isinstance(value.get("id"), str) else default_id
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            return ParsedCall(call_id, None, None, f"the tool call names no tool: {value!r:.120}")
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI style: arguments as a JSON string
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as exc:
                return ParsedCall(call_id, name, None, f"the arguments of {name!r} are not valid JSON: {exc}")
        if not isinstance(args, dict):
            return ParsedCall(call_id, name, None, f"the arguments of {name!r} must be a JSON object, got {args!r:.80}")
        if name not in self.functions:
            return ParsedCall(call_id, name, args, f"unknown tool {name!r}; the tools are {sorted(self.functions)}")
        return ParsedCall(call_id, name, args)

    def _strip_eos(self, text: str) -> str:
        for t in self.eos_texts:
            if text.endswith(t):
                return text[: -len(t)]
        return text


def _call_id(n: int) -> str:
    """Nine characters, as the strictest templates (Mistral's) require of a call id."""
    return f"call{n:05d}"


def _last_match_end(pattern: Any, text: str) -> int | None:
    end = None
    for m in pattern.finditer(text):
        end = m.end()
    return end
