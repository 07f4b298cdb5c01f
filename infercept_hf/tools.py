"""Tools, scripted interceptions, and how a paused request waits for its answer.

A request pauses when its freshly generated tokens complete a trigger: a `Tool`'s `end`
marker, or the token count of the next `Scripted` segment. The step loop never blocks on
a tool: `Tool.fn` runs on a worker thread and the loop polls a `PendingCall` every
iteration; a `Scripted` pause is a deadline on the engine's clock (real or simulated).

Whatever a tool does (raise, hang past its timeout, return the wrong type), the outcome is
an `Answer` for that one request: the engine and every other request carry on.
"""
from __future__ import annotations

import math
import numbers
import operator
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

ON_ERROR_CHOICES = ("answer", "fail")


def as_token_ids(values: Any, what: str) -> list[int]:
    """`values` as a list of ints. Floats, strings and bools are refused: a float where an id
    belongs is a bug upstream, and silently truncating it would hide that bug."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of int token ids, got {type(values).__name__}")
    try:
        ids = []
        for t in values:
            if isinstance(t, bool):
                raise TypeError
            ids.append(operator.index(t))
    except TypeError:
        raise TypeError(f"{what} must be a sequence of int token ids, got {values!r:.80}") from None
    return ids


def positive_int(value: Any, what: str) -> int:
    """`value` as an int >= 1; `2.5`, `True` and `"3"` are refused rather than coerced."""
    try:
        n = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        n = None
    if n is None or n < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return n


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
    policy uses. `timeout` abandons a call that runs longer (its late answer is dropped).
    `on_error` says what a raising or timed-out call does to its request: `"answer"` resumes
    it with the error text as the answer (this needs the engine's tokenizer; without one the
    request fails), `"fail"` ends it with `finish_reason="error"`. A wrong return type always
    fails the request: it is a bug in the tool, not an answer the model can use.
    """

    name: str
    end: str | Sequence[int]
    fn: Callable[[ToolCall], str | list[int]]
    start: str | Sequence[int] | None = None
    expected_duration: float | None = None
    timeout: float | None = None
    on_error: str = "answer"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Tool needs a non-empty str name, got {self.name!r}")
        if not callable(self.fn):
            raise TypeError(f"Tool {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        if not isinstance(self.end, str):
            self.end = tuple(as_token_ids(self.end, f"Tool {self.name!r}: end"))
        if not self.end:
            raise ValueError(f"Tool {self.name!r}: end must not be empty")
        if self.start is not None and not isinstance(self.start, str):
            self.start = tuple(as_token_ids(self.start, f"Tool {self.name!r}: start"))
        if self.start is not None and isinstance(self.start, str) != isinstance(self.end, str):
            raise TypeError(f"Tool {self.name!r}: start and end must both be strings or both token ids")
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"Tool {self.name!r}: on_error must be one of {ON_ERROR_CHOICES}, got {self.on_error!r}")
        if self.expected_duration is not None and not 0 <= self.expected_duration < math.inf:
            raise ValueError(f"Tool {self.name!r}: expected_duration must be a finite number >= 0, "
                             f"got {self.expected_duration!r}")
        if self.timeout is not None and not 0 < self.timeout < math.inf:
            raise ValueError(f"Tool {self.name!r}: timeout must be a finite number > 0, got {self.timeout!r}")

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
    generate on normally. `name` plays the tool's part for pause estimates: scripted pauses of
    one kind (e.g. a workload type) share a running estimate, different kinds do not.
    """

    def __init__(self, segments: Sequence[tuple[int, float, Sequence[int]]], name: str = "scripted") -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"Scripted name must be a non-empty string, got {name!r}")
        self.name = name
        parsed = []
        for i, seg in enumerate(segments):
            try:
                n_tokens, pause_s, answer_ids = seg
            except (TypeError, ValueError):
                raise TypeError(f"Scripted segment {i} must be (n_tokens, pause_s, answer_ids), got {seg!r}") from None
            n_tokens = positive_int(n_tokens, f"Scripted segment {i}: n_tokens")
            if isinstance(pause_s, bool) or not isinstance(pause_s, numbers.Real) or not 0 <= pause_s < math.inf:
                raise ValueError(f"Scripted segment {i}: pause_s must be a finite number >= 0, got {pause_s!r}")
            ids = tuple(as_token_ids(answer_ids, f"Scripted segment {i}: answer_ids"))
            if any(t < 0 for t in ids):
                raise ValueError(f"Scripted segment {i}: answer ids must be >= 0, got {list(ids)}")
            parsed.append(Segment(n_tokens, float(pause_s), ids))
        self.segments: tuple[Segment, ...] = tuple(parsed)

    def __len__(self) -> int:
        return len(self.segments)

    def __repr__(self) -> str:
        return f"Scripted({[(s.n_tokens, s.pause_s, list(s.answer_ids)) for s in self.segments]})"


@dataclass(frozen=True)
class Answer:
    """A tool's outcome: the answer to append (str or ids), or the error that stood in for it.

    `fail` ends the request with `error` instead of resuming it."""

    value: str | list[int]
    error: str | None = None
    fail: bool = False


class PendingCall:
    """A paused request's outstanding answer. `poll(now)` returns None until it is ready."""

    def __init__(self, tool_name: str, call_text: str, started_at: float, expected_duration: float | None) -> None:
        self.tool_name = tool_name
        self.call_text = call_text
        self.started_at = started_at
        self.expected_duration = expected_duration

    def poll(self, now: float) -> Answer | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def next_check(self, now: float) -> float | None:
        """The earliest engine time at which `poll` may return an answer (None: only when woken)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def abandon(self) -> None:
        """The request is gone (cancelled, closed): a late answer must be ignored."""


class ScriptedCall(PendingCall):
    """Ready once the engine's clock passes the scripted deadline."""

    def __init__(self, segment: Segment, started_at: float, name: str = "scripted") -> None:
        super().__init__(name, "", started_at, segment.pause_s)
        self.deadline = started_at + segment.pause_s
        self.answer = list(segment.answer_ids)

    def poll(self, now: float) -> Answer | None:
        return Answer(self.answer) if now >= self.deadline else None

    def next_check(self, now: float) -> float | None:
        return self.deadline


class ToolFuture(PendingCall):
    """A tool function running on a worker thread, with its timeout and error policy."""

    def __init__(self, tool: Tool, call: ToolCall, executor: ToolExecutor) -> None:
        super().__init__(tool.name, call.text, call.started_at, tool.expected_duration)
        self.tool = tool
        self.call = call
        self.future: Future[Any] = Future()
        self.abandoned = False
        self._executor = executor

    def poll(self, now: float) -> Answer | None:
        if self.future.done():
            return self._outcome()
        if self.tool.timeout is not None and now - self.started_at >= self.tool.timeout:
            self.abandon()
            return self._error(f"tool {self.tool.name!r} timed out after {self.tool.timeout:g} s")
        return None

    def next_check(self, now: float) -> float | None:
        if self.future.done():
            return now
        return None if self.tool.timeout is None else self.started_at + self.tool.timeout

    def abandon(self) -> None:
        self._executor.abandon(self)

    def _outcome(self) -> Answer:
        exc = self.future.exception()
        if exc is not None:
            return self._error(f"tool {self.tool.name!r} raised {type(exc).__name__}: {exc}")
        value = self.future.result()
        if isinstance(value, str):
            return Answer(value)
        try:
            if isinstance(value, (list, tuple)):
                return Answer(as_token_ids(value, "answer"))
        except TypeError:
            pass
        msg = f"tool {self.tool.name!r} returned {type(value).__name__} ({value!r:.60}), expected str or list[int]"
        return Answer("", error=msg, fail=True)

    def _error(self, msg: str) -> Answer:
        return Answer(f"[error: {msg}]", error=msg, fail=self.tool.on_error == "fail")


class ToolExecutor:
    """Runs each tool call on its own daemon thread, at most `max_workers` calls at once.

    Not a ThreadPoolExecutor: a call abandoned on timeout or cancel may never return, and a pool
    would lose that worker for good (then join it at interpreter exit and hang shutdown). Here an
    abandoned call hands its slot to the next queued call at once; its thread is left to finish
    on its own, and its answer is dropped.
    """

    def __init__(self, max_workers: int = 8) -> None:
        if max_workers < 1:
            raise ValueError(f"max_tool_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers
        self._queue: deque[ToolFuture] = deque()
        self._holding: set[ToolFuture] = set()  # calls that occupy a slot
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, tool: Tool, call: ToolCall) -> ToolFuture:
        pending = ToolFuture(tool, call, self)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._queue.append(pending)
            self._start_queued()
        return pending

    def abandon(self, pending: ToolFuture) -> None:
        with self._lock:
            pending.abandoned = True
            pending.future.cancel()  # succeeds only while it is still queued
            self._release(pending)

    def close(self) -> None:
        """Abandon every call: queued ones never start, running ones are left to their threads."""
        with self._lock:
            self._closed = True
            for pending in [*self._queue, *self._holding]:
                pending.abandoned = True
                pending.future.cancel()
            self._queue.clear()
            self._holding.clear()

    @property
    def busy(self) -> int:
        """Calls holding a worker slot right now."""
        with self._lock:
            return len(self._holding)

    def _start_queued(self) -> None:
        while self._queue and len(self._holding) < self.max_workers and not self._closed:
            pending = self._queue.popleft()
            if pending.abandoned or not pending.future.set_running_or_notify_cancel():
                continue
            self._holding.add(pending)
            name = f"infercept-tool-{pending.tool.name}"
            threading.Thread(target=self._run, args=(pending,), name=name, daemon=True).start()

    def _run(self, pending: ToolFuture) -> None:
        try:
            result = pending.tool.fn(pending.call)
        except BaseException as exc:  # noqa: BLE001 - whatever the tool does becomes its request's answer
            pending.future.set_exception(exc)
        else:
            pending.future.set_result(result)
        finally:
            with self._lock:
                self._release(pending)

    def _release(self, pending: ToolFuture) -> None:
        if pending in self._holding:
            self._holding.discard(pending)
            self._start_queued()


@dataclass
class TriggerMatcher:
    """Finds the tool call that the tokens generated since the last resumption complete.

    Only the tail of the segment is decoded each step (`_window` tokens), so the per-token
    cost does not grow with the segment; the whole segment is decoded once, on a match.
    """

    tools: Sequence[Tool]
    tokenizer: Any = None
    _window: int = field(init=False, default=0)  # tail tokens decoded per step: twice the longest string `end`

    def __post_init__(self) -> None:
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        text_tools = [t for t in self.tools if t.needs_tokenizer]
        if text_tools and self.tokenizer is None:
            bad = [t.name for t in text_tools]
            raise ValueError(f"tools {bad} match a string `end` on decoded text and need a tokenizer; pass tokenizer=")
        if text_tools:
            self._window = max(16, 2 * max(len(t.end) for t in text_tools))

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
