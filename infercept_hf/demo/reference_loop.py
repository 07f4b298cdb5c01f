"""The plain-transformers tool loop: what `infercept_hf.generate` must reproduce token for token.

Generate greedily until EOS, the token budget, or the end of a tool call; run the tool;
append its answer; call `model.generate` again on the whole context (recomputing it, as
engines without interception support do). Only model-written tokens count against
`max_new_tokens`, and a call completed by the last allowed token is not run: the
engine's rules, so the two can be compared exactly.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..tools import Tool, ToolCall


@dataclass(frozen=True)
class CallRecord:
    """One tool call as it happened: which tool, the call text, and the answer appended."""

    tool: str
    text: str
    answer: str | list[int]


@dataclass
class Transcript:
    """A finished dialogue: the full id sequence (prompt, model tokens, answers) and its calls."""

    ids: list[int]
    prompt_len: int
    calls: list[CallRecord] = field(default_factory=list)
    finish_reason: str = "length"
    reply_start: int = 0

    @property
    def reply_ids(self) -> list[int]:
        """The tokens after the last tool answer: the model's final reply to the user."""
        return self.ids[self.reply_start:]


def find_call(tools: Sequence[Tool], tokenizer: Any, segment: Sequence[int]) -> tuple[Tool, str] | None:
    """The tool whose end the segment (tokens since the last answer) contains, and the call text."""
    text: str | None = None
    for tool in tools:
        if not isinstance(tool.end, str):
            n = len(tool.end)
            if tuple(segment[-n:]) == tool.end:
                body = list(segment[:-n])
                start = tool.start
                if start is not None:
                    hits = [i for i in range(len(body) - len(start) + 1) if tuple(body[i:i + len(start)]) == start]
                    body = body[hits[-1] + len(start):] if hits else body
                return tool, tokenizer.decode(body, skip_special_tokens=False).strip()
            continue
        if text is None:
            text = tokenizer.decode(list(segment), skip_special_tokens=False)
        if tool.end in text:
            before = text[: text.index(tool.end)]
            if tool.start is not None and tool.start in before:
                before = before[before.rindex(tool.start) + len(tool.start):]
            return tool, before.strip()
    return None


class _StopAtCall(StoppingCriteria):
    """Stops `generate` on the token that completes a tool call (single-row contexts)."""

    def __init__(self, tools: Sequence[Tool], tokenizer: Any, segment_start: int) -> None:
        self.tools = tools
        self.tokenizer = tokenizer
        self.segment_start = segment_start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        segment = input_ids[0, self.segment_start:].tolist()
        hit = find_call(self.tools, self.tokenizer, segment) is not None
        return torch.full((input_ids.shape[0],), hit, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def run_with_tools(
    model: torch.nn.Module,
    tokenizer: Any,
    tools: Sequence[Tool],
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    request_id: int = 0,
) -> Transcript:
    """Greedy decoding with tools, one `model.generate` call per segment between tool answers."""
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    pad = model.generation_config.pad_token_id
    ctx = list(prompt_ids)
    out = Transcript(ids=ctx, prompt_len=len(ctx), reply_start=len(ctx))
    generated = 0
    while True:
        ids = torch.tensor([ctx], dtype=torch.long, device=model.device)
        stop = StoppingCriteriaList([_StopAtCall(tools, tokenizer, len(ctx))])
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens - generated,
                             do_sample=False, stopping_criteria=stop, pad_token_id=pad)[0, len(ctx):].tolist()
        segment_start = len(ctx)
        ctx += new
        generated += len(new)
        if new and new[-1] in eos_ids:
            out.finish_reason = "stop"
            return out
        if generated >= max_new_tokens:
            return out
        hit = find_call(tools, tokenizer, ctx[segment_start:])
        if hit is None:
            return out
        tool, text = hit
        call = ToolCall(tool.name, text, request_id, tuple(ctx[segment_start:]), time.monotonic())
        answer = tool.fn(call)
        ctx += tokenizer.encode(answer, add_special_tokens=False) if isinstance(answer, str) else list(answer)
        out.calls.append(CallRecord(tool.name, text, answer))
        out.reply_start = len(ctx)
