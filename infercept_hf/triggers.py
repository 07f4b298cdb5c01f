"""Trigger matching: which tool call, if any, the tokens generated since the last resumption complete."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .faults import describe
from .tools import Tool

MIN_WINDOW = 16  # tokens: short ends still see a few tokens of context around them


@dataclass
class TriggerMatcher:
    """Finds the tool call that the tokens generated since the last resumption complete.

    Only the tail of the segment is decoded each step (`_window` tokens), so the per-token
    cost does not grow with the segment; the whole segment is decoded once, on a match. The
    window is twice the most tokens a string `end` can span: its encoded length, or its UTF-8
    length where that is more (a byte-level tokenizer may split it into one token per byte).
    """

    tools: Sequence[Tool]
    tokenizer: Any = None
    _window: int = field(init=False, default=0)  # tail tokens decoded per step

    def __post_init__(self) -> None:
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        text_tools = [t for t in self.tools if t.needs_tokenizer]
        if text_tools and self.tokenizer is None:
            bad = [t.name for t in text_tools]
            raise ValueError(f"tools {bad} match a string `end` on decoded text and need a tokenizer; pass tokenizer=")
        if text_tools:
            self._window = max(MIN_WINDOW, 2 * max(self._span(t) for t in text_tools))

    def _span(self, tool: Tool) -> int:
        try:
            encoded = len(self.tokenizer.encode(tool.end, add_special_tokens=False))
        except Exception as exc:  # noqa: BLE001 - any tokenizer failure is bad input at the boundary
            raise ValueError(
                f"Tool {tool.name!r}: the tokenizer cannot encode its end {tool.end!r}: {describe(exc)}"
            ) from exc
        return max(encoded, len(tool.end.encode("utf-8", "surrogatepass")))

    def match(self, segment_ids: Sequence[int]) -> tuple[Tool, str] | None:
        """Return (tool, call text) if the segment's last token completes a call."""
        if not segment_ids:
            return None
        tail_text: str | None = None
        for tool in self.tools:
            if isinstance(tool.end, tuple):
                n = len(tool.end)
                if tuple(segment_ids[-n:]) == tool.end:
                    return tool, self._call_text_ids(tool, segment_ids[:-n])
                continue
            if tail_text is None:
                tail_text = self.tokenizer.decode(list(segment_ids[-self._window :]), skip_special_tokens=False)
            if tool.end in tail_text:
                text = self.tokenizer.decode(list(segment_ids), skip_special_tokens=False)
                before = text[: text.index(tool.end)]
                if tool.start is not None and tool.start in before:
                    before = before[before.rindex(tool.start) + len(tool.start):]
                return tool, before.strip()
        return None

    def _call_text_ids(self, tool: Tool, body: Sequence[int]) -> str:
        body = list(body)
        if tool.start is not None:
            n = len(tool.start)
            for i in range(len(body) - n, -1, -1):
                if tuple(body[i : i + n]) == tool.start:
                    body = body[i + n :]
                    break
        if self.tokenizer is not None:
            return self.tokenizer.decode(body, skip_special_tokens=False).strip()
        return " ".join(str(t) for t in body)
