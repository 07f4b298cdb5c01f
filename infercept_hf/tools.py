"""Tools, scripted interceptions, and how a paused request waits for its answer.

A request pauses when its freshly generated tokens complete a trigger: a `Tool`'s `end`
marker, or the token count of the next `Scripted` segment. The step loop never blocks on
a tool: `Tool.fn` runs on a worker thread and the loop polls a `PendingCall` every
iteration; a `Scripted` pause is a deadline on the engine's clock (real or simulated).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

ON_ERROR_CHOICES = ("answer", "fail")


@dataclass(frozen=True)
class ToolCall:
    """What a tool function receives: the call text between `start` and `end`, and context."""

    name: str
    text: str
    request_id: int
    generated_ids: tuple[int, ...]
    started_at: float


@dataclass
class Tool:
    """A tool the model may call mid-generation.

    `end` ends a call: a string matched on the decoded generated text (needs a tokenizer) or
    a list of token ids matched on the generated ids. The call text is what lies between the
    last `start` (when given) and `end`. `fn(call)` returns a `str` (tokenized, appended) or a
    `list[int]` (appended as is). `expected_duration` seeds the pause estimate the min-waste
    policy uses; `timeout` abandons a call that runs longer; `on_error` chooses between
    resuming with an error text as the answer (`"answer"`) and failing the request (`"fail"`).
    """

    name: str
    end: str | Sequence[int]
    fn: Callable[[ToolCall], str | list[int]]
    start: str | Sequence[int] | None = None
    expected_duration: float | None = None
    timeout: float | None = None
    on_error: str = "answer"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Tool needs a non-empty name")
        if not callable(self.fn):
            raise TypeError(f"Tool {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        if isinstance(self.end, str):
            if not self.end:
                raise ValueError(f"Tool {self.name!r}: end must not be empty")
        else:
            self.end = tuple(int(t) for t in self.end)
            if not self.end:
                raise ValueError(f"Tool {self.name!r}: end must not be empty")
        if self.start is not None and not isinstance(self.start, str):
            self.start = tuple(int(t) for t in self.start)
        if isinstance(self.start, str) != isinstance(self.end, str) and self.start is not None:
            raise TypeError(f"Tool {self.name!r}: start and end must both be strings or both token ids")
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"Tool {self.name!r}: on_error must be one of {ON_ERROR_CHOICES}, got {self.on_error!r}")
        for attr in ("expected_duration", "timeout"):
            value = getattr(self, attr)
            if value is not None and value < 0:
                raise ValueError(f"Tool {self.name!r}: {attr} must be >= 0, got {value}")

    @property
    def needs_tokenizer(self) -> bool:
        return isinstance(self.end, str)


@dataclass(frozen=True)
class Segment:
    """Generate `n_tokens`, pause `pause_s` seconds, then append `answer_ids`."""

    n_tokens: int
    pause_s: float
    answer_ids: tuple[int, ...]


class Scripted:
    """A request's interceptions fixed in advance: the benchmark's form.

    `Scripted([(40, 0.5, [11, 12]), (25, 3.0, [14])])`: after 40 generated tokens pause
    0.5 s and append [11, 12]; 25 tokens after resuming pause 3 s and append [14]; then
    generate on normally.
    """

    name = "scripted"

    def __init__(self, segments: Sequence[tuple[int, float, Sequence[int]]]) -> None:
        parsed = []
        for i, seg in enumerate(segments):
            try:
                n_tokens, pause_s, answer_ids = seg
            except (TypeError, ValueError):
                raise TypeError(f"Scripted segment {i} must be (n_tokens, pause_s, answer_ids), got {seg!r}") from None
            if int(n_tokens) != n_tokens or n_tokens < 1:
                raise ValueError(f"Scripted segment {i}: n_tokens must be a positive integer, got {n_tokens!r}")
            if pause_s < 0:
                raise ValueError(f"Scripted segment {i}: pause_s must be >= 0, got {pause_s!r}")
            ids = tuple(int(t) for t in answer_ids)
            if any(t < 0 for t in ids):
                raise ValueError(f"Scripted segment {i}: answer ids must be >= 0, got {list(ids)}")
            parsed.append(Segment(int(n_tokens), float(pause_s), ids))
        self.segments: tuple[Segment, ...] = tuple(parsed)

    def __len__(self) -> int:
        return len(self.segments)

    def __repr__(self) -> str:
        return f"Scripted({[(s.n_tokens, s.pause_s, list(s.answer_ids)) for s in self.segments]})"


class PendingCall:
    """A paused request's outstanding answer. `poll(now)` returns None until it is ready."""

    def __init__(self, tool_name: str, call_text: str, started_at: float, expected_duration: float | None) -> None:
        self.tool_name = tool_name
        self.call_text = call_text
        self.started_at = started_at
        self.expected_duration = expected_duration

    def poll(self, now: float) -> Answer | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def abandon(self) -> None:
        """Called when the request is cancelled: a late answer must be ignored."""


@dataclass(frozen=True)
class Answer:
    """A tool's outcome: the answer to append (str or ids), or the error that stood in for it."""

    value: str | list[int]
    error: str | None = None
    fail: bool = False


class ScriptedCall(PendingCall):
    """Ready once the engine's clock passes the scripted deadline."""

    def __init__(self, segment: Segment, started_at: float) -> None:
        super().__init__(Scripted.name, "", started_at, segment.pause_s)
        self.deadline = started_at + segment.pause_s
        self.answer = list(segment.answer_ids)

    def poll(self, now: float) -> Answer | None:
        return Answer(self.answer) if now >= self.deadline else None


class ToolFuture(PendingCall):
    """A tool function running on a worker thread, with its timeout and error policy."""

    def __init__(self, tool: Tool, call: ToolCall, future: Future[Any]) -> None:
        super().__init__(tool.name, call.text, call.started_at, tool.expected_duration)
        self.tool = tool
        self.future = future

    def poll(self, now: float) -> Answer | None:
        fail = self.tool.on_error == "fail"
        if self.future.done():
            exc = self.future.exception()
            if exc is not None:
                msg = f"tool {self.tool.name!r} raised {type(exc).__name__}: {exc}"
                return Answer(f"[error: {msg}]", error=msg, fail=fail)
            value = self.future.result()
            if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(t, int) for t in value))):
                msg = f"tool {self.tool.name!r} returned {type(value).__name__}, expected str or list[int]"
                return Answer(f"[error: {msg}]", error=msg, fail=fail)
            return Answer(value)
        if self.tool.timeout is not None and now - self.started_at > self.tool.timeout:
            self.abandon()
            msg = f"tool {self.tool.name!r} timed out after {self.tool.timeout:g} s"
            return Answer(f"[error: {msg}]", error=msg, fail=fail)
        return None

    def abandon(self) -> None:
        self.future.cancel()


class ToolExecutor:
    """Runs tool functions on worker threads so the step loop never waits on a tool."""

    def __init__(self, max_workers: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="infercept-tool")
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, tool: Tool, call: ToolCall) -> ToolFuture:
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            return ToolFuture(tool, call, self._pool.submit(tool.fn, call))

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class TriggerMatcher:
    """Finds the tool call that the tokens generated since the last resumption complete.

    Only the tail of the segment is decoded each step (`window` tokens), so the per-token
    cost does not grow with the segment; the whole segment is decoded once, on a match.
    """

    tools: Sequence[Tool]
    tokenizer: Any = None
    _windows: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        if any(t.needs_tokenizer for t in self.tools) and self.tokenizer is None:
            bad = [t.name for t in self.tools if t.needs_tokenizer]
            raise ValueError(f"tools {bad} match a string `end` on decoded text and need a tokenizer; pass tokenizer=")

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
                window = max(16, 2 * max(len(t.end) for t in self.tools if isinstance(t.end, str)))
                tail_text = self.tokenizer.decode(list(segment_ids[-window:]), skip_special_tokens=False)
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
