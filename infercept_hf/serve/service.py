"""The server's engine side: renders prompts, admits turns, starts or continues sessions, and
ends them (a turn's end, a client gone, a session evicted)."""
from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..chat_tools import ChatFormat, ChatTemplateError, FunctionTool
from ..engine import InterceptEngine
from ..patches.chat_templates import fallback_response_template
from ..patches.transformers_serve import template_messages
from ..serving import AsyncInterceptEngine
from .errors import APIError, bad_request
from .forced_call import ForcedCall, forced_call
from .metrics import ServerMetrics
from .params import DEFAULT_MAX_TOKENS, TurnParams
from .sessions import ClientTool, HeldSession, SessionStore, TurnSpec
from .turns import Turn

RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServeConfig:
    """Server-wide settings (the `infercept-serve` options other than the model and the pools)."""

    model_name: str = "infercept-demo"
    api_key: str | None = None
    session_ttl_s: float = 300.0  # a held context the client has not come back to is dropped after this
    max_sessions: int = 256  # held contexts beyond this: the oldest is dropped
    max_queue: int = 64  # turns in flight (generating or waiting to) beyond this: 429


class Service:
    """One engine behind the HTTP routes; owns the sessions and the metrics."""

    def __init__(self, engine: InterceptEngine, tokenizer: Any, config: ServeConfig,
                 server_tools: Sequence[FunctionTool] = ()) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.server_tools = {t.name: t for t in server_tools}
        self.response_template = (getattr(tokenizer, "response_template", None)
                                  or fallback_response_template(engine.spec.model_type))
        self.metrics = ServerMetrics()
        self.store = SessionStore(config.max_sessions, on_evict=self._end_session)
        self.aengine = AsyncInterceptEngine(engine)
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()

    # ------------------------------------------------------------------ limits
    @property
    def context_limit(self) -> int:
        """The most tokens one context may hold: the model's positions or the KV pool, the smaller."""
        positions = self.engine.max_positions or math.inf
        return int(min(positions, self.engine.cache.capacity_tokens))

    def _budget(self, prompt_len: int, max_tokens: int | None) -> int:
        limit = self.context_limit
        room = limit - prompt_len - 1  # one position spare: the engine may look a token past the turn
        want = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise APIError(400, f"this model's context limit is {limit} tokens; the prompt has {prompt_len} and "
                                f"max_tokens asks for {want} more (at most {max(0, room)} fit)",
                           param="messages", code="context_length_exceeded")
        return min(want, room)

    def admit(self) -> None:
        with self._in_flight_lock:
            if self._in_flight >= self.config.max_queue:
                raise APIError(429, f"the server is at its bound of {self.config.max_queue} requests in flight; "
                                    "retry shortly", type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
            self._in_flight += 1

    def release(self) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1

    # ------------------------------------------------------------------ prompts
    def tool_schemas(self, client_tools: list[dict]) -> list[dict]:
        names = {t["function"]["name"] for t in client_tools}
        return [*client_tools, *(t.schema for n, t in self.server_tools.items() if n not in names)]

    def render_chat(self, messages: list[dict], client_tools: list[dict]) -> list[int]:
        schemas = self.tool_schemas(client_tools)
        try:
            ids = self.tokenizer.apply_chat_template(template_messages(messages), tools=schemas or None,
                                                     add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as exc:  # noqa: BLE001 - the template refusing these messages is the client's error
            raise bad_request(f"the chat template cannot render these messages: {exc}", param="messages") from exc
        return list(ids)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt).input_ids)
        bad = [t for t in prompt if not 0 <= t < self.engine.vocab_size]
        if bad:
            raise bad_request(f"prompt has token ids outside the vocabulary [0, {self.engine.vocab_size}): {bad[:5]}",
                              param="prompt")
        return list(prompt)

    def _format(self, client_tools: list[dict]) -> ChatFormat | None:
        if not client_tools and not self.server_tools:
            return None
        names = {t["function"]["name"] for t in client_tools}
        functions = [*(ClientTool(t) for t in client_tools),
                     *(t for n, t in self.server_tools.items() if n not in names)]
        try:
            return ChatFormat(self.tokenizer, functions, sorted(self.engine.default_eos), self.engine.spec.model_type,
                              self.response_template)
        except ValueError as exc:
            raise bad_request(f"tools cannot be used with this model: {exc}", param="tools") from exc

    def _forced(self, fmt: ChatFormat | None, params: TurnParams) -> ForcedCall:
        """The call `tool_choice` forces ("required" or a named function): the tokens that open it,
        to follow the generation prompt, and what constrains the model's first tokens after them."""
        if not params.call_required:
            return ForcedCall([], ())
        if fmt is None:
            raise bad_request("tool_choice asks for a tool call but the request offers no tools", param="tool_choice")
        if params.call_name is not None and params.call_name not in fmt.functions:
            raise bad_request(f"tool_choice names the function {params.call_name!r}, which is not among the tools "
                              f"{sorted(fmt.functions)}", param="tool_choice")
        try:
            return forced_call(fmt, params.call_name)
        except ChatTemplateError as exc:
            raise bad_request(f"tool_choice cannot force a call with this model's chat template: {exc}",
                              param="tool_choice") from exc

    # ------------------------------------------------------------------ turns
    async def start_turn(self, prompt: list[int], params: TurnParams, client_tools: list[dict], chat: bool) -> Turn:
        """Continue the held session the prompt matches, or start one; the turn's events follow."""
        fmt = self._format(client_tools)
        forced = self._forced(fmt, params)
        opener = forced.opener
        prompt = [*prompt, *opener]
        sampler = forced.sampler(params.sampler, len(prompt))
        max_tokens = self._budget(len(prompt), params.max_tokens)
        server_names = frozenset(n for n in self.server_tools if n not in {t["function"]["name"] for t in client_tools})
        spec = TurnSpec(self.tokenizer, max_tokens, params.stop, fmt, server_names, self.config.session_ttl_s,
                        len(opener), params.parallel_calls)
        schemas = self.tool_schemas(client_tools)
        # calls are read only where tools are offered; otherwise (and for completions) the text is the model's own
        template = self.response_template if chat and schemas else None
        claimed = self.store.claim(prompt, params.session_key)
        if claimed is not None:
            session = claimed[0]
            turn = Turn(session, prompt, self.tokenizer, template, schemas, params.stop, self.engine.default_eos, spec)
            session.begin(prompt, spec, turn.listener)
            rid = session.request_id
            shared_before = self.engine.reused_tokens(rid)  # paused: nothing attaches blocks to it meanwhile
            try:
                kept = await asyncio.to_thread(self.engine.continue_request, rid, prompt, max_tokens + 1, sampler)
                # and what its admission takes from the prefix index (a context the policy discarded)
                turn.cached_tokens = kept
                turn.reused = lambda: kept + self.engine.reused_tokens(rid) - shared_before
                return turn
            except ValueError:  # expired meanwhile, or refused: that context is gone, start afresh
                session.listener = None
                self._end_session(session)
        session = self.store.new(params.session_key)
        turn = Turn(session, prompt, self.tokenizer, template, schemas, params.stop, self.engine.default_eos, spec)
        turn.reused = lambda: self.engine.reused_tokens(session.request_id)
        session.begin(prompt, spec, turn.listener)
        try:
            session.request_id = await asyncio.to_thread(
                self.engine.add_request, prompt, max_new_tokens=max_tokens + 1, sampler=sampler,
                on_event=session.hear, chat_session=session)
        except ValueError as exc:
            raise bad_request(str(exc)) from exc
        return turn

    def end_turn(self, turn: Turn, endpoint: str, outcome: str) -> None:
        self.metrics.request_done(endpoint, outcome)
        self.metrics.turn_done(turn.prompt_tokens, turn.cached_tokens, turn.ttft, turn.token_times)

    def abandon(self, turn: Turn) -> None:
        """The client left mid-turn: cancel its request, which frees its KV."""
        if not turn.ended:
            turn.session.listener = None
            self._end_session(turn.session)

    def _end_session(self, session: HeldSession) -> None:
        self.store.forget(session)
        rid = session.request_id
        if rid is not None:
            threading.Thread(target=self._cancel, args=(rid,), name="infercept-serve-cancel", daemon=True).start()

    def _cancel(self, request_id: int) -> None:
        try:
            self.engine.cancel(request_id)
        except RuntimeError:  # closed meanwhile: its blocks are already free
            pass

    # ------------------------------------------------------------------ scrape and lifetime
    def render_metrics(self) -> str:
        cache = self.engine.cache
        return self.metrics.render(self.engine.stats(), len(self.store), cache.block_bytes // cache.block_size)

    @property
    def healthy(self) -> bool:
        return not self.aengine.failed and not self.engine.closed

    def close(self) -> None:
        self.aengine.close()
