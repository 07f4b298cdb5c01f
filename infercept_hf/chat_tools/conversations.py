"""`chat()`: conversations in, completed conversations out, tool calls answered on the way.

The output has the shape transformers' text-generation pipeline returns for chats: one chat
gives `[{"generated_text": messages}]`, a list of chats a list of those. `messages` is the
conversation followed by, for each pause, the assistant turn with its `tool_calls` and one
`tool` message per call, then the final assistant message.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..outputs import RequestEvent, RequestResult
from .format import ChatFormat
from .functions import split_tools

Conversation = list[dict[str, Any]]


def chat(
    model: torch.nn.Module,
    tokenizer: Any,
    conversations: Conversation | Sequence[Conversation],
    tools: Sequence[Callable[..., Any]] | None = None,
    *,
    response_template: dict | None = None,
    **generate_kwargs: Any,
) -> list[dict[str, Conversation]] | list[list[dict[str, Conversation]]]:
    """Complete each conversation with `model`, calling `tools` (plain functions) as it asks.

    `generate_kwargs` go to `infercept_hf.generate` (`policy=`, `max_new_tokens=`, sampling ...).
    """
    from ..api import generate  # api imports the engine, which imports this package

    single = bool(conversations) and isinstance(conversations[0], dict)
    convs: list[Conversation] = [list(conversations)] if single else [list(c) for c in conversations]
    if not convs:
        raise ValueError("chat() needs at least one conversation")
    _, functions = split_tools(tools)
    schemas = [f.schema for f in functions] or None
    prompts = [tokenizer.apply_chat_template(c, tools=schemas, add_generation_prompt=True, return_dict=False)
               for c in convs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long, device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=model.device)
    logs = [_RowLog() for _ in convs]
    generate(model, ids, attention_mask=mask, tokenizer=tokenizer, tools=tools, response_template=response_template,
             on_event=lambda ev: logs[ev.request_id].hear(ev), **generate_kwargs)
    eos = generate_kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    fmt = ChatFormat(tokenizer, functions, eos_ids, getattr(model.config, "model_type", None), response_template)
    out = [[{"generated_text": conv + log.messages(fmt, prompt)}] for conv, log, prompt in zip(convs, logs, prompts)]
    return out[0] if single else out


class _RowLog:
    """One row's events: the model's turns (ids between answers) and the finished result."""

    def __init__(self) -> None:
        self.turns: list[list[int]] = [[]]
        self.answers: list[list[int]] = []
        self.result: RequestResult | None = None

    def hear(self, ev: RequestEvent) -> None:
        if ev.kind == "token":
            self.turns[-1].extend(ev.token_ids)
        elif ev.kind == "tool_answer":
            self.answers.append(list(ev.token_ids))
            self.turns.append([])
        elif ev.kind == "finish":
            self.result = ev.result

    def messages(self, fmt: ChatFormat, prompt: list[int]) -> Conversation:
        decode = fmt.tokenizer.decode
        records = self.result.interceptions if self.result is not None else []
        context, out, n_calls = list(prompt), [], 0
        for turn, answer, record in zip(self.turns, self.answers, records):
            parsed = fmt.parse(decode(context), decode(turn), n_calls)
            n_calls += len(parsed.calls)
            out.append(parsed.assistant_message())
            out += [{"role": "tool", "tool_call_id": c.id, "name": c.name or "", "content": c.result}
                    for c in record.calls]
            context += turn + answer
        if len(self.turns) > len(self.answers):
            final = fmt.parse(decode(context), decode(self.turns[-1]), n_calls)
            out.append(final.assistant_message())
        return out
