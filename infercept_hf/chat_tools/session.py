"""One request's chat tool calls: when its turn ends in calls, and the pause that answers them.

`ChatSession.pause(...)` is asked after each generated token; when the turn ends with calls it
returns a `ChatPending`, the engine's `PendingCall` for them: every call runs at once on the
tool workers, and the pause ends when all have answered, with the template's rendering of
the results (in call order) as the text to append.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ..tool_pool import ToolFuture, ToolPool
from ..tools import Answer, PendingCall, ToolCall
from .format import PLACEHOLDER_HISTORY, ChatFormat, ChatTemplateError, ParsedTurn
from .functions import FunctionTool

TAIL_TOKENS = 32  # decoded per token to spot a call's close: longer than any close marker


class CallRecord(NamedTuple):
    """One tool call of one pause, as it happened (`seconds`: from the pause to its answer)."""

    id: str
    name: str | None
    arguments: dict[str, Any] | None
    result: str
    seconds: float
    error: str | None = None


class ChatSession:
    """The transcript a request's tool results are rendered into, and its call counter."""

    def __init__(self, fmt: ChatFormat) -> None:
        self.format = fmt
        self.history: list[dict[str, Any]] = list(PLACEHOLDER_HISTORY)
        self.num_calls = 0

    def pause(self, context: Sequence[int], turn_start: int, at_eos: bool, now: float, request_id: int,
              executor: ToolPool, wake: Callable[[], None]) -> ChatPending | None:
        """The pending calls if the turn (`context[turn_start:]`) ends here with calls, else None."""
        fmt = self.format
        if not at_eos and not fmt.calls_end_turn:
            return None
        if not at_eos:  # checked after every token: decode the tail only, copy the turn only on a call
            tail = list(context[max(turn_start, len(context) - TAIL_TOKENS):])
            if not fmt.closes_call(fmt.tokenizer.decode(tail)):
                return None
        turn_ids = list(context[turn_start:])
        turn = fmt.parse(fmt.tokenizer.decode(list(context[:turn_start])), fmt.tokenizer.decode(turn_ids),
                         self.num_calls)
        if not turn.calls:
            return None
        self.num_calls += len(turn.calls)
        return ChatPending(self, turn, now, request_id, tuple(turn_ids), executor, wake)

    def answer(self, turn: ParsedTurn, results: Sequence[str]) -> str:
        """Add the turn and its results to the transcript; the text to append to the context."""
        assistant = turn.assistant_message()
        tool_messages = [{"role": "tool", "tool_call_id": c.id, "name": c.name or "", "content": r}
                         for c, r in zip(turn.calls, results)]
        suffix = self.format.results_suffix(self.history, assistant, tool_messages)
        self.history += [assistant, *tool_messages]
        return suffix


class ChatPending(PendingCall):
    """A turn's calls, running concurrently; `poll` answers once all have answered."""

    def __init__(self, session: ChatSession, turn: ParsedTurn, started_at: float, request_id: int,
                 turn_ids: tuple[int, ...], executor: ToolPool, wake: Callable[[], None]) -> None:
        names = [c.name or "?" for c in turn.calls]
        tools: list[FunctionTool | None] = [session.format.functions.get(c.name) if c.error is None else None
                                            for c in turn.calls]
        durations = [t.expected_duration for t in tools if t is not None and t.expected_duration is not None]
        # One name keys the pause estimate: the tool's own for one tool, the combination otherwise.
        text = "; ".join(turn.raw if c.arguments is None else json.dumps(c.arguments) for c in turn.calls)
        super().__init__(names[0] if len(set(names)) == 1 else "+".join(names), text, started_at,
                         max(durations) if durations else None)
        self.session = session
        self.turn = turn
        self.answers: list[Answer | None] = [None] * len(turn.calls)
        self.seconds = [0.0] * len(turn.calls)
        self.futures: list[ToolFuture | None] = []
        fail_unrunnable = bool(session.format.functions) and all(
            f.on_error == "fail" for f in session.format.functions.values())
        for i, (call, tool) in enumerate(zip(turn.calls, tools)):
            if tool is None:
                self.answers[i] = Answer(f"[error: {call.error}]", error=call.error, fail=fail_unrunnable)
                self.futures.append(None)
                continue
            future = executor.submit(tool.worker, ToolCall(call.name, json.dumps(call.arguments), request_id,
                                                           turn_ids, started_at))
            future.future.add_done_callback(lambda _f: wake())
            self.futures.append(future)

    def poll(self, now: float) -> Answer | None:
        for i, future in enumerate(self.futures):
            if self.answers[i] is None and (answer := future.poll(now)) is not None:
                self.answers[i] = answer
                self.seconds[i] = now - self.started_at
        if any(a is None for a in self.answers):
            return None
        failed = next((a for a in self.answers if a.fail), None)
        if failed is not None:
            return Answer("", error=failed.error, fail=True)
        try:
            suffix = self.session.answer(self.turn, [a.value for a in self.answers])
        except ChatTemplateError as exc:
            return Answer("", error=str(exc), fail=True)
        errors = [a.error for a in self.answers if a.error]
        return Answer(suffix, error="; ".join(errors) if errors else None)

    def next_check(self, now: float) -> float | None:
        checks = [f.next_check(now) for f, a in zip(self.futures, self.answers) if a is None]
        if not checks:
            return now
        known = [c for c in checks if c is not None]
        return min(known) if known else None

    def on_change(self, callback: Callable[[], None]) -> None:
        for future in self.futures:
            if future is not None:
                future.on_change(callback)

    def abandon(self) -> None:
        for future, answer in zip(self.futures, self.answers):
            if future is not None and answer is None:
                future.abandon()

    def records(self) -> tuple[CallRecord, ...]:
        """Each call with its parsed arguments, result text and time to answer."""
        return tuple(
            CallRecord(c.id, c.name, c.arguments, a.value if a is not None and isinstance(a.value, str) else "",
                       s, a.error if a is not None else c.error)
            for c, a, s in zip(self.turn.calls, self.answers, self.seconds))
