"""How one request reads in the chat: the model's own text, and one panel per tool pause.

A panel shows the call, the answer the engine spliced into the context, how long the tool
took, and where the pause kept its KV (preserve / swap / partial-swap / discard) with the
waste figures the policy compared. Strategies are watched while the pause lasts, since
min-waste may move a paused context more than once (preserve first, swap when the budget
allows).
"""
from __future__ import annotations

import html
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import infercept_hf as ih
from infercept_hf.outputs import InterceptionRecord, RequestEvent

WASTE_ORDER = ("preserve", "swap", "discard")
TITLE_PREFIX = "tool call · "
_UNITS = ("B", "kB", "MB", "GB", "TB")


def byte_seconds(value: float) -> str:
    """Waste (bytes x seconds) with a unit that keeps 3 significant digits readable."""
    unit = 0
    while abs(value) >= 1000 and unit < len(_UNITS) - 1:
        value /= 1000
        unit += 1
    return f"{value:.3g} {_UNITS[unit]}·s"


def _code(text: str) -> str:
    """Inline code that survives any text (the model may write backticks)."""
    return f"`{text.replace('`', chr(39))}`" if text else "*(empty)*"


@dataclass
class ToolStep:
    """One pause, as much of it as is known so far."""

    tool: str
    call: str
    started: float
    answer: str | None = None
    seconds: float | None = None
    strategies: list[str] = field(default_factory=list)  # in the order they were seen
    waste: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def saw(self, strategy: str, waste: dict[str, float]) -> None:
        if strategy and (not self.strategies or self.strategies[-1] != strategy):
            self.strategies.append(strategy)
        if waste:
            self.waste = dict(waste)

    def settle(self, record: InterceptionRecord) -> None:
        """The engine's final word on this pause."""
        self.seconds = record.tool_seconds
        self.saw(record.strategy, record.waste)
        self.error = record.error or self.error

    def _why(self, policy: str) -> str:
        """min-waste decides at each engine step; the pause itself only leaves the KV where it is.
        A preserve that is not the cheapest figure therefore means the answer came first."""
        if policy != "min-waste":
            return f"fixed by policy `{policy}`"
        stayed = self.done and self.strategies == ["preserve"] and bool(self.waste)
        if stayed and min(self.waste.values()) < self.waste.get("preserve", 0.0):
            return "policy `min-waste`: answered before the next engine step could move the KV"
        return "policy `min-waste`: least waste"

    @property
    def done(self) -> bool:
        return self.answer is not None or self.error is not None

    def message(self, policy: str) -> dict[str, Any]:
        chosen = self.strategies[-1] if self.strategies else "deciding"
        lines = [f"**call** {_code(self.call)}"]
        if self.answer is not None:
            lines.append(f"**answer spliced in** {_code(self.answer)}")
        if self.error:
            lines.append(f"**tool error** {_code(self.error)}")
        lines.append(f"**pause handled by** {' → '.join(self.strategies) or 'deciding'} ({self._why(policy)})")
        if self.waste:
            picked = {"preserve", "swap"} if chosen == "partial-swap" else {chosen}
            parts = [f"**{k} {byte_seconds(self.waste[k])}**" if k in picked else f"{k} {byte_seconds(self.waste[k])}"
                     for k in WASTE_ORDER if k in self.waste]
            lines.append("**waste if** " + " · ".join(parts))
        # no status once done: the panel stays open, so the figures are in view without a click
        metadata: dict[str, Any] = {"title": f"{TITLE_PREFIX}{self.tool}: {self.call}", "log": chosen}
        if not self.done:
            metadata["status"] = "pending"
        if self.seconds is not None:
            metadata["duration"] = round(self.seconds, 3)
        return {"role": "assistant", "content": "  \n".join(lines), "metadata": metadata}


class Turn:
    """Folds a request's events (`RequestEvent`) into chat messages."""

    def __init__(self, tokenizer: Any, tools: Sequence[ih.Tool | ih.FunctionTool], policy: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tokenizer = tokenizer
        self.tools = {t.name: t for t in tools}
        self.policy = policy
        self.clock = clock
        self.request_id: int | None = None
        self.pieces: list[list[int] | str | ToolStep] = []  # text ids (open), text (closed), pauses
        self.note: str | None = None

    @property
    def steps(self) -> list[ToolStep]:
        return [p for p in self.pieces if isinstance(p, ToolStep)]

    def apply(self, event: RequestEvent) -> None:
        self.request_id = event.request_id
        if event.kind == "token":
            if not self.pieces or not isinstance(self.pieces[-1], list):
                self.pieces.append([])
            self.pieces[-1].extend(event.token_ids)
        elif event.kind == "tool_call":
            self._close_text_before_call(event.tool)
            self.pieces.append(ToolStep(event.tool, event.text or "", self.clock()))
        elif event.kind == "tool_answer":
            step = self.steps[-1]
            step.answer = self.tokenizer.decode(list(event.token_ids), skip_special_tokens=False)
            step.seconds = self.clock() - step.started
            step.error = event.error
        elif event.kind == "finish":
            self._finish(event.result)

    @property
    def open_step(self) -> ToolStep | None:
        """The pause still waiting for its answer: the only one whose KV the engine may yet move."""
        steps = self.steps
        return steps[-1] if steps and steps[-1].answer is None else None

    def watch(self, placements: Mapping[int, tuple[str, dict[str, float]]]) -> None:
        """Note where this request's open pause keeps its KV now (`InterceptEngine.pause_placements()`)."""
        step = self.open_step
        if step is not None and self.request_id in placements:
            step.saw(*placements[self.request_id])

    def _close_text_before_call(self, tool: str) -> None:
        """The call's own text moves into its panel; what the model wrote before it stays as text."""
        if not self.pieces or not isinstance(self.pieces[-1], list):
            return
        text = self.tokenizer.decode(self.pieces[-1], skip_special_tokens=False)
        start = getattr(self.tools.get(tool), "start", None)  # a function tool has no start marker
        self.pieces[-1] = text[: text.rindex(start)] if isinstance(start, str) and start in text else ""

    def _finish(self, result: ih.RequestResult) -> None:
        for step, record in zip(self.steps, result.interceptions, strict=False):
            step.settle(record)
        if result.finish_reason == "error":
            self.note = f"Error: the request failed: {result.error}"
        elif result.finish_reason == "cancelled":
            self.note = "The request was cancelled (the model or policy was changed meanwhile)."
        elif result.finish_reason == "length":
            self.note = f"*(stopped after {result.num_generated} tokens: the limit)*"

    def _text(self, piece: list[int] | str) -> str:
        text = piece if isinstance(piece, str) else self.tokenizer.decode(piece, skip_special_tokens=True)
        return html.escape(text.strip(), quote=False)

    def messages(self) -> list[dict[str, Any]]:
        out = []
        for piece in self.pieces:
            if isinstance(piece, ToolStep):
                out.append(piece.message(self.policy))
            elif text := self._text(piece):
                out.append({"role": "assistant", "content": text})
        if self.note:
            out.append({"role": "assistant", "content": self.note})
        if not out:
            out.append({"role": "assistant", "content": "…"})
        return out
