"""Tools, scripted interceptions, and what a paused request waits on.

A request pauses when its freshly generated tokens complete a trigger: a `Tool`'s `end`
marker (`triggers.py` finds it), or the token count of the next `Scripted` segment. The step
loop never blocks on a tool: `Tool.fn` runs on a worker thread (`tool_pool.py`) and the loop
polls a `PendingCall` every iteration; a `Scripted` pause is a deadline on the engine's clock
(real or simulated).

Whatever a tool does (raise, hang past its timeout, return the wrong type), the outcome is
an `Answer` for that one request: the engine and every other request carry on.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .checks import as_token_ids, positive_int

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
    policy uses. `timeout` abandons a call that has run longer (time spent waiting for a free
    worker does not count; its late answer is dropped).
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

    def on_change(self, callback: Callable[[], None]) -> None:
        """Have `callback()` told (from any thread) whenever `poll` may give something new before
        `next_check`: an answer came in, or a worker took the call up (its timeout starts). A call
        that changes only with the clock, like a scripted one, never calls it."""


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
