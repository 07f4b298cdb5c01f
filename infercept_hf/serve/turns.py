"""One HTTP turn as the client sees it: the engine's events turned into text deltas, tool calls
and the turn's end, on the server's event loop.

The model's text is parsed as it streams with transformers' `ResponseParser` (the tokenizer's
response template), so content deltas leave out tool-call markup and calls come out whole,
arguments as JSON strings. A server tool's answer starts a new segment, parsed with the whole
context before it as prefix, as the chat template rendered it.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NamedTuple

from transformers.utils.chat_parsing import ResponseParser

from ..outputs import RequestEvent
from ..patches.transformers_serve import ToolCall, parser_items
from .sessions import HeldSession, TurnSpec

logger = logging.getLogger(__name__)


class TextDelta(NamedTuple):
    text: str


class ServerCall(NamedTuple):
    """A server tool called (`result` None) or answered, as it happens."""

    id: str
    name: str
    arguments: str
    result: str | None = None


class TurnEnd(NamedTuple):
    finish_reason: str  # "stop" | "length" | "tool_calls" | "error" | "cancelled"
    tool_calls: list[dict[str, Any]]  # OpenAI `tool_calls` entries, for "tool_calls"
    error: str | None = None


Piece = TextDelta | ServerCall | TurnEnd


class _Segment:
    """Model text between server tool answers, decoded and parsed as it grows."""

    def __init__(self, tokenizer: Any, template: dict | None, tools: list[dict], prefix_ids: Sequence[int],
                 eos_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.ids: list[int] = []
        self.fed = 0
        self.parser = ResponseParser(template, prefix=tokenizer.decode(list(prefix_ids)), tools=tools or None) \
            if template is not None else None

    def feed(self, ids: Sequence[int]) -> list[Any]:
        # the parser reads the raw text (markers included); plain text drops only the end of turn
        self.ids.extend(ids if self.parser is not None else [i for i in ids if i not in self.eos_ids])
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return []
        new, self.fed = text[self.fed:], len(text)
        if self.parser is not None:
            try:
                return parser_items(self.parser.feed(new))
            except Exception:  # noqa: BLE001 - text the template cannot read goes out as it is
                logger.warning("the response parser failed; the rest of the turn is sent as plain text", exc_info=True)
                self.parser = None
        return [new] if new else []

    def finish(self) -> list[Any]:
        if self.parser is None:
            return []
        try:
            _, events = self.parser.finalize()
        except Exception:  # noqa: BLE001 - as in feed
            logger.warning("the response parser failed at the end of the turn", exc_info=True)
            return []
        return parser_items(events)


class Turn:
    """Listens to a session's events for one turn (any thread) and yields its pieces (event loop)."""

    def __init__(self, session: HeldSession, prompt_ids: Sequence[int], tokenizer: Any, template: dict | None,
                 tools: list[dict], stop: Sequence[str], eos_ids: frozenset[int], spec: TurnSpec) -> None:
        self.session = session
        self.opened = spec.opened
        self.parallel_calls = spec.parallel_calls
        self.eos_ids = eos_ids
        self.tokenizer = tokenizer
        self.template = template
        self.tools = tools
        self.stop = tuple(stop)
        self.context = list(prompt_ids)
        self.prompt_tokens = len(prompt_ids)
        self.cached_tokens = 0
        # a new session's prompt may start with blocks other sessions computed (the prefix index):
        # read at its first token, once admission has attached them
        self.reused: Callable[[], int] | None = None
        self.completion_tokens = 0
        self.started = time.monotonic()
        self.token_times: list[float] = []
        self.ended = False
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[tuple[RequestEvent, str | None]] = asyncio.Queue()
        self._content = ""
        self._stopped = False

    def listener(self, event: RequestEvent, end_reason: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to tell
            self._loop.call_soon_threadsafe(self._events.put_nowait, (event, end_reason))

    async def pieces(self) -> AsyncIterator[Piece]:
        """Everything the client is to see of this turn, ending with one `TurnEnd`."""
        # a forced call's opener is in the prompt but is the model's text to the parser
        opens = len(self.context) - self.opened
        segment = _Segment(self.tokenizer, self.template, self.tools, self.context[:opens], self.eos_ids)
        calls: list[ToolCall] = []
        if self.opened:
            for piece in self._items(segment.feed(self.context[opens:]), calls):
                yield piece
        while True:
            event, end_reason = await self._events.get()
            if event.kind == "token":
                if not self.completion_tokens and self.reused is not None:
                    self.cached_tokens = self.reused()
                self.completion_tokens += 1
                self.token_times.append(time.monotonic())
                self.context.extend(event.token_ids)
                for piece in self._items(segment.feed(event.token_ids), calls):
                    yield piece
            elif event.kind == "tool_call":
                for piece in self._items(segment.finish(), calls):
                    yield piece
                if end_reason is not None:
                    self.ended = True
                    reason = end_reason if end_reason != "tool_calls" or calls else "stop"
                    calls = calls if self.parallel_calls else calls[:1]
                    yield TurnEnd(reason, [_openai_call(c) for c in calls] if reason == "tool_calls" else [])
                    return
                for call in calls:
                    yield ServerCall("", call.name, call.arguments)
                calls = []
            elif event.kind == "tool_answer":
                if not self.completion_tokens:  # a held session continued: the prompt's rest, already in context
                    continue
                self.context.extend(event.token_ids)
                server = self.session.server
                for call_id, name, arguments, result in (server.last_results if server else []):
                    yield ServerCall(call_id, name or "", _json(arguments), result)
                segment = _Segment(self.tokenizer, self.template, self.tools, self.context, self.eos_ids)
            elif event.kind == "finish":
                for piece in self._items(segment.finish(), calls):
                    yield piece
                self.ended = True
                result = event.result
                yield TurnEnd(result.finish_reason, [], result.error)
                return

    def _items(self, items: list[Any], calls: list[ToolCall]) -> list[Piece]:
        """Content deltas (cut at a stop string) out; completed calls kept in `calls`."""
        out: list[Piece] = []
        for item in items:
            if isinstance(item, ToolCall):
                calls.append(item)
            elif type(item) is str and not self._stopped:  # ReasoningText (a str subclass) is not content
                text = self._content + item
                cut = min((i for s in self.stop if (i := text.find(s)) >= 0), default=-1)
                if cut >= 0:
                    self._stopped = True
                    text = text[:cut]
                delta = text[len(self._content):]
                self._content = text
                if delta:
                    out.append(TextDelta(delta))
        return out

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.started if self.token_times else None


def _json(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def _openai_call(call: ToolCall) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}
