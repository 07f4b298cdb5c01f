"""Sessions: one engine request per conversation, paused between its HTTP turns.

A turn ends where an OpenAI server would end the response (a client tool call, an end of
turn, `max_tokens`, a stop string), but the request is paused there (`held.AwaitingCaller`)
instead of finished, so its KV stays under the engine's policy while the client runs its tool
or its user types. The caller's gap plays the tool's duration: it is keyed by the called
tools' names (`client:get_weather`) or `client:reply`, so min-waste learns how long each kind
of gap lasts. A call to a tool the server runs itself (`--tools`) pauses the same request
through `ChatSession` and goes on within the same response.

The next request is matched to a held session by the longest common token prefix of its
rendered prompt (`SessionStore.claim`); the engine keeps the KV up to the first differing
token and computes the rest.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..chat_tools import ChatFormat, ChatPending, ChatSession, ParsedTurn
from ..chat_tools.session import TAIL_TOKENS
from ..engine import common_prefix_len
from ..held import AwaitingCaller
from ..outputs import RequestEvent
from ..tool_pool import ToolPool

CLIENT_PREFIX = "client:"  # pause names of client gaps: never confused with a server tool's duration
REPLY = CLIENT_PREFIX + "reply"  # a turn that ended without calls: the gap is the user's
MIN_SHARED = 0.5  # without a matching session key, share at least this much of a held context to take it


class ClientTool:
    """A tool the client runs: only its name and schema, which is all `ChatFormat` needs to read calls."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema

    @property
    def name(self) -> str:
        return self.schema["function"]["name"]


class ServerCalls(ChatSession):
    """The server's own tools for one session: a `ChatSession` that keeps each pause's results for
    the stream (the engine appends them as rendered text)."""

    def __init__(self, fmt: ChatFormat) -> None:
        super().__init__(fmt)
        self.last_results: list[tuple[str, str | None, dict | None, str]] = []

    def answer(self, turn: ParsedTurn, results: Sequence[str]) -> str:
        suffix = super().answer(turn, results)
        self.last_results = [(c.id, c.name, c.arguments, r) for c, r in zip(turn.calls, results)]
        return suffix


class TurnSpec:
    """Where one HTTP turn ends: its budget, stop strings and tools, whether it opens with a forced
    call, and whether it may hold several calls (else the first call's close ends it)."""

    def __init__(self, tokenizer: Any, max_tokens: int, stop: Sequence[str], fmt: ChatFormat | None,
                 server_names: frozenset[str], ttl_s: float, opened: int = 0, parallel_calls: bool = True) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.stop = tuple(stop)
        self.format = fmt
        self.server_names = server_names
        self.ttl_s = ttl_s
        self.opened = opened  # the prompt's last tokens open a forced call: parsed as the model's own
        self.parallel_calls = parallel_calls


class HeldSession:
    """One conversation's engine request, asked by the engine after each token whether the turn
    ends there (`pause`), and told of its events (`hear`), which go to the current turn's listener."""

    def __init__(self, store: SessionStore, key: str | None) -> None:
        self.store = store
        self.key = key
        self.request_id: int | None = None
        self.tokens: list[int] = []  # the request's token log, mirrored from its events
        self._prompt_len = 0  # this turn's prompt
        self.held_at = 0.0
        self.spec: TurnSpec | None = None
        self.server: ServerCalls | None = None
        self.end_reason: str | None = None
        self.listener: Callable[[RequestEvent, str | None], None] | None = None  # (event, why the turn ended)
        self._generated_before = 0  # this turn's tokens in segments before the current one
        self._segment: tuple[int, int] | None = None  # (start, length) of the current segment

    def begin(self, prompt: Sequence[int], spec: TurnSpec,
              listener: Callable[[RequestEvent, str | None], None]) -> None:
        """A new turn: set before the request is added or continued (nothing runs it meanwhile)."""
        self.tokens = list(prompt)
        self._prompt_len = len(prompt)
        self.spec = spec
        self.listener = listener
        self.end_reason = None
        self._generated_before = 0
        self._segment = None
        self.server = ServerCalls(spec.format) if spec.format is not None and spec.server_names else None

    # ------------------------------------------------------------------ engine thread, under its lock
    def pause(self, context: Sequence[int], turn_start: int, at_eos: bool, now: float, request_id: int,
              executor: ToolPool, wake: Callable[[], None]) -> ChatPending | AwaitingCaller | None:
        spec = self.spec
        generated = self._count(len(context), turn_start)
        fmt, decode = spec.format, spec.tokenizer.decode
        start = turn_start - spec.opened if turn_start == self._prompt_len else turn_start  # a forced opener
        calls_end = fmt is not None and (fmt.calls_end_turn or not spec.parallel_calls)
        if fmt is not None and (at_eos or (calls_end and fmt.closes_call(self._tail(context, start)))):
            turn = fmt.parse(decode(list(context[:start])), decode(list(context[start:])), 0)
            names = [c.name for c in turn.calls]
            if names and self.server is not None and all(c.error is None and c.name in spec.server_names
                                                         for c in turn.calls):
                # server calls run where the format ends the turn (parallel_tool_calls is the client's)
                return self.server.pause(context, start, at_eos, now, request_id, executor, wake)
            if names:
                return self._hold("tool_calls", "+".join(sorted({n or "?" for n in names})), now)
        if at_eos:
            return self._hold("stop", None, now)
        if spec.stop and any(s in self._tail(context, turn_start) for s in spec.stop):  # not in a forced opener
            return self._hold("stop", None, now)
        if generated >= spec.max_tokens:
            return self._hold("length", None, now)
        return None

    def _tail(self, context: Sequence[int], start: int) -> str:
        return self.spec.tokenizer.decode(list(context[max(start, len(context) - TAIL_TOKENS):]))

    def _count(self, length: int, turn_start: int) -> int:
        """Tokens generated this turn: a server tool's answer starts a new segment and is not counted."""
        if self._segment is not None and self._segment[0] != turn_start:
            self._generated_before += self._segment[1]
        self._segment = (turn_start, length - turn_start)
        return self._generated_before + self._segment[1]

    def _hold(self, reason: str, tools: str | None, now: float) -> AwaitingCaller:
        self.end_reason = reason
        name = REPLY if tools is None else CLIENT_PREFIX + tools
        return AwaitingCaller(name, now, now + self.spec.ttl_s)

    # ------------------------------------------------------------------ any thread, outside the engine lock
    def hear(self, event: RequestEvent) -> None:
        # a continued session's first answer is the new prompt's rest, already in `tokens` (`begin`)
        continued = event.kind == "tool_answer" and len(self.tokens) == self._prompt_len
        if event.kind == "token" or event.kind == "tool_answer" and not continued:
            self.tokens.extend(event.token_ids)
        reason = self.end_reason if event.kind == "tool_call" else None  # read now: the next turn resets it
        held = reason is not None
        if held:
            self.held_at = time.monotonic()
            self.store.hold(self)  # before the client hears of it: its follow-up must find the session
        elif event.kind == "finish":
            self.store.forget(self)
        listener = self.listener
        if held or event.kind == "finish":
            self.listener = None
        if listener is not None:
            listener(event, reason)


class SessionStore:
    """Held sessions, matched to new prompts by longest common prefix; the oldest go past `max_held`."""

    def __init__(self, max_held: int, on_evict: Callable[[HeldSession], None]) -> None:
        self.max_held = max_held
        self.on_evict = on_evict
        self._held: dict[HeldSession, None] = {}  # oldest hold first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def new(self, key: str | None) -> HeldSession:
        return HeldSession(self, key)

    def hold(self, session: HeldSession) -> None:
        with self._lock:
            self._held.pop(session, None)
            self._held[session] = None
            evicted = list(self._held)[: max(0, len(self._held) - self.max_held)]
            for old in evicted:
                del self._held[old]
        for old in evicted:
            self.on_evict(old)

    def forget(self, session: HeldSession) -> None:
        with self._lock:
            self._held.pop(session, None)

    def claim(self, prompt: Sequence[int], key: str | None) -> tuple[HeldSession, int] | None:
        """Take the held session whose context shares the longest prefix with `prompt` (ties: the one
        with the same session key, then the latest held), with that length; None when no session
        shares enough: a session key's own context, any shared token; another's, `MIN_SHARED` of it."""
        with self._lock:
            best, best_rank = None, None
            for session in self._held:
                shared = common_prefix_len(session.tokens, prompt)
                own = key is not None and session.key == key
                if shared == 0 or (not own and shared < MIN_SHARED * len(session.tokens)):
                    continue
                rank = (shared, own, session.held_at)
                if best_rank is None or rank > best_rank:
                    best, best_rank = session, rank
            if best is None:
                return None
            del self._held[best]
            return best, best_rank[0]

    def all(self) -> list[HeldSession]:
        with self._lock:
            return list(self._held)
