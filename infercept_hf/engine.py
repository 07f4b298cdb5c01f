"""InterceptEngine: continuous batching that pauses requests at tool calls instead of ending them.

The step loop: collect tool answers -> schedule (policy moves KV of paused requests) -> one
packed forward -> sample -> for each request that got a token: finish, pause at a tool
call, or go on. Tools run on worker threads; the loop never waits on one.

Threads: every public method takes the engine's lock, so `add_request` and `cancel` may be
called from any thread while another drives `run()` or `step()`; they take effect between
steps. `on_event` callbacks run outside the lock, in the order the events happened.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch

from patches.architectures import paged_cache_config
from patches.placement import execution_device

from .cache import InterceptPagedCache
from .chat_tools import ChatFormat, ChatPending, ChatSession, split_tools
from .estimator import DurationEstimator
from .memory import default_pool_sizes
from .outputs import InterceptionRecord, RequestEvent, RequestResult
from .policy import CostModel
from .profiler import load_or_profile
from .request import Request, Status
from .runner import ModelRunner
from .sampling import GREEDY, Sampler, sample_batch
from .scheduler import Scheduler, check_policy
from .stats import EngineStats
from .tools import (
    Answer,
    PendingCall,
    Scripted,
    ScriptedCall,
    Tool,
    ToolCall,
    ToolExecutor,
    TriggerMatcher,
    as_token_ids,
    positive_int,
)

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.05  # longest sleep of an idle loop: bounds how late an unannounced event is seen

EventCallback = Callable[[RequestEvent], None]


class AnswerError(ValueError):
    """A tool answer this request cannot use: it fails the request, never the engine."""


class InterceptEngine:
    """Serve many tool-calling requests on one model with a paged KV cache.

    Example::

        with InterceptEngine(model, tokenizer=tok, policy="min-waste", num_blocks=256, block_size=16) as engine:
            rid = engine.add_request(prompt_ids, max_new_tokens=64, tools=[calc])
            results = engine.run()          # {rid: RequestResult}
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        policy: str = "min-waste",
        num_blocks: int | None = None,
        block_size: int | None = None,
        host_pool_bytes: int | None = None,
        max_batch_tokens: int = 256,
        cost_model: CostModel | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_tool_workers: int = 8,
        executor: Callable[[torch.nn.Module, InterceptPagedCache], Any] | None = None,
        attention_backend: str = "auto",
        distributed_helper: Any = None,
    ) -> None:
        """`executor(model, cache)` builds what runs each batch (`.forward(chunks) -> logits`): the
        default `ModelRunner` runs the model; the simulator passes one that advances a virtual `clock`
        by a cost model instead, so the same scheduler and policy code is measured at GPU scale.
        `distributed_helper` (transformers' `DistributedHelper`) gives the cache this rank's share of
        KV heads under tensor parallelism (`distributed.TensorParallelEngine`)."""
        self.model = model
        self.tokenizer = tokenizer
        self.policy = check_policy(policy)
        self.clock = clock
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if distributed_helper is None and (getattr(model, "tp_size", None) or 1) > 1:
            raise ValueError(f"the model is sharded across {model.tp_size} ranks (tensor parallel): serve it with "
                             "infercept_hf.distributed.TensorParallelEngine (or build_engine) on every rank")
        config = paged_cache_config(model)
        dtype = next(model.parameters()).dtype
        device = execution_device(model)
        sizes = default_pool_sizes(model, dtype, num_blocks, block_size, host_pool_bytes)
        self.cache = InterceptPagedCache(
            config,
            num_blocks=sizes.num_blocks,
            block_size=sizes.block_size,
            num_host_blocks=sizes.num_host_blocks,
            max_batch_tokens=max_batch_tokens,
            dtype=dtype,
            device=device,
            distributed_helper=distributed_helper,
        )
        self.cost = cost_model or load_or_profile(model, dtype, device)
        self.estimator = DurationEstimator()
        self.scheduler = Scheduler(self.cache, policy, max_batch_tokens, self.cost, self.estimator)
        self.runner = executor(model, self.cache) if executor else ModelRunner(model, self.cache, attention_backend)
        self.executor = ToolExecutor(max_tool_workers)
        self.stats_ = EngineStats(self.cache)
        self.max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.vocab_size = config.vocab_size
        self._requests: dict[int, Request] = {}
        self._matchers: dict[int, TriggerMatcher] = {}
        self._chats: dict[int, ChatSession] = {}  # requests with function tools: their chat-format calls
        self._next_id = 0
        self._lock = threading.RLock()
        self._wakeup = threading.Event()
        self._closed = False
        self._cancelled: list[Request] = []
        self._events: deque[tuple[EventCallback, RequestEvent]] = deque()
        self._dispatch_lock = threading.RLock()
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        self.default_eos = frozenset([eos] if isinstance(eos, int) else (eos or []))

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int = 128,
        tools: Sequence[Tool | Callable[..., Any]] | None = None,
        interceptions: Scripted | None = None,
        sampler: Sampler | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        arrival_time: float | None = None,
        on_event: EventCallback | None = None,
        response_template: dict | None = None,
    ) -> int:
        """Queue a request; returns its id. Bad input raises here, never inside the forward.

        `tools` holds `Tool`s (text triggers) and plain functions (called through the model's chat
        format: see `infercept_hf.chat_tools`; `response_template` overrides the tokenizer's call format).
        `on_event(RequestEvent)` hears of every token, tool call, tool answer and the finish, in
        order (it runs on whichever thread drove the engine: keep it quick).
        """
        prompt = self._check_prompt(prompt_ids)
        max_new_tokens = positive_int(max_new_tokens, "max_new_tokens")
        if interceptions is not None and not isinstance(interceptions, Scripted):
            raise TypeError(f"interceptions must be an infercept_hf.Scripted, got {type(interceptions).__name__}")
        tools, functions = split_tools(tools)
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be callable, got {type(on_event).__name__}")
        matcher = TriggerMatcher(tools, self.tokenizer) if tools else None
        answers = self._check_scripted(interceptions)
        self._check_fits(len(prompt), max_new_tokens, answers)
        eos = self.default_eos if eos_token_id is None else frozenset(
            [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
        )
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        chat = ChatSession(ChatFormat(self.tokenizer, functions, sorted(eos), model_type, response_template)) \
            if functions else None
        with self._lock:
            self._check_open()
            rid = self._next_id
            self._next_id += 1
            req = Request(
                request_id=rid,
                tokens=list(prompt),
                prompt_len=len(prompt),
                max_new_tokens=max_new_tokens,
                arrival_time=self.clock() if arrival_time is None else arrival_time,
                tools=tools,
                scripted=interceptions,
                eos_token_ids=eos,
                sampler=sampler or GREEDY,
                on_event=on_event,
            )
            for t in (*tools, *(f.worker for f in functions)):
                if t.expected_duration is not None:
                    self.estimator.seed(t.name, t.expected_duration)
            self._requests[rid] = req
            if matcher:
                self._matchers[rid] = matcher
            if chat:
                self._chats[rid] = chat
            self.scheduler.add(req)
        self._wakeup.set()
        return rid

    def _check_prompt(self, prompt_ids: Sequence[int] | torch.Tensor) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
                prompt_ids = prompt_ids[0]
            if prompt_ids.dim() != 1:
                raise ValueError(f"prompt_ids must be 1-D, got shape {tuple(prompt_ids.shape)}")
            if prompt_ids.dtype.is_floating_point or prompt_ids.dtype.is_complex or prompt_ids.dtype == torch.bool:
                raise TypeError(f"prompt_ids must hold integer token ids, got a {prompt_ids.dtype} tensor")
            prompt_ids = prompt_ids.tolist()
        prompt = as_token_ids(prompt_ids, "prompt_ids")
        if not prompt:
            raise ValueError("prompt_ids is empty: a request needs at least one token")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if self.max_positions is not None and len(prompt) >= self.max_positions:
            raise ValueError(
                f"prompt has {len(prompt)} tokens but the model supports {self.max_positions} positions, "
                "with at least one left to generate"
            )
        return prompt

    def _check_scripted(self, scripted: Scripted | None) -> int:
        """Scripted answers are known in advance: check them now. Returns their total length."""
        if scripted is None:
            return 0
        for i, seg in enumerate(scripted.segments):
            bad = [t for t in seg.answer_ids if t >= self.vocab_size]
            if bad:
                raise ValueError(f"Scripted segment {i}: answer ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        return sum(len(s.answer_ids) for s in scripted.segments)

    def _check_fits(self, prompt_len: int, max_new_tokens: int, answers: int) -> None:
        """Refuse a request that could never run to its end: it would wait in the queue forever."""
        total = prompt_len + max_new_tokens + answers
        parts = f"prompt {prompt_len} + max_new_tokens {max_new_tokens} + answers {answers}"
        if not self.cache.fits(total):
            raise ValueError(
                f"request needs up to {total} tokens of KV ({parts}) but the pool holds {self.cache.capacity_tokens}"
                f" ({self.cache.num_blocks} blocks of {self.cache.block_size}); raise num_blocks"
            )
        if self.max_positions is not None and total > self.max_positions:
            raise ValueError(f"request needs up to {total} positions ({parts}) but the model supports {self.max_positions}")

    def cancel(self, request_id: int) -> bool:
        """Stop a request wherever it is; its blocks are freed at once and the next `step()` or
        `run()` returns its result with `finish_reason="cancelled"`. False if it is unknown or
        has already finished."""
        with self._lock:
            self._check_open()
            req = self._requests.get(request_id)
            if req is None or req.status == Status.FINISHED:
                return False
            self._cancel(req)
            self._cancelled.append(req)
        self._wakeup.set()
        self._dispatch_events()
        return True

    def _cancel(self, req: Request) -> None:
        if req.pending is not None:
            req.pending.abandon()
        self._finish(req, "cancelled", self.clock())

    def has_unfinished(self) -> bool:
        """True while some request's result has yet to be returned by `step()` or `run()`
        (a cancelled request's result comes with the next step)."""
        with self._lock:
            return bool(self._requests)

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestResult]:
        """One iteration. Returns the results of requests that finished in it (or were cancelled since the last)."""
        with self._lock:
            results = self._step()
        self._dispatch_events()
        return results

    def _step(self) -> list[RequestResult]:
        self._check_open()
        done, self._cancelled = self._cancelled, []
        now = self.clock()
        self._collect_answers(now, done)
        plan = self.scheduler.schedule(now)
        if plan.chunks:
            t0 = self.clock()
            logits = self.runner.forward(plan.chunks)
            sampled = [c.request for c in plan.chunks if c.sample]
            tokens = self._sample(sampled, logits)
            self.stats_.record_forward(plan, self.clock() - t0)
            for c in plan.chunks:
                c.request.num_cached += c.length
                c.request.high_water = max(c.request.high_water, c.request.num_cached)
            now = self.clock()
            for req, tok in zip(sampled, tokens):
                self._append_token(req, tok, now, done)
        self.cache.finish_transfers()
        self.stats_.record_step(self.scheduler, self.clock())
        for r in done:
            self._requests.pop(r.request_id, None)
            self._matchers.pop(r.request_id, None)
            self._chats.pop(r.request_id, None)
        return [r.result() for r in done]

    def run(self, progress: bool = False) -> dict[int, RequestResult]:
        """Drive until every request has finished (requests added meanwhile, from any thread,
        included); returns {request_id: result}. Returns early if another thread closes the engine."""
        self._check_open()
        results: dict[int, RequestResult] = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self._requests), desc="requests", unit="req")
        while True:
            with self._lock:
                finished = self._run_step()
            if finished is None:
                break
            self._dispatch_events()
            results.update((r.request_id, r) for r in finished)
            if bar is not None and finished:
                bar.update(len(finished))
            if not finished:
                self.wait_for_work()
        if bar is not None:
            bar.close()
        return results

    def _run_step(self) -> list[RequestResult] | None:
        """One iteration of `run()`, under the lock; None once there is nothing left to drive."""
        if self._closed or not self._requests:
            return None
        return self._step()

    def wait_for_work(self, timeout: float = IDLE_POLL_S) -> None:
        """Sleep until a step could do something: a request is runnable, a tool answered, a
        scripted pause or a tool timeout is due, or another thread added, cancelled or closed;
        at most `timeout` seconds. Returns at once when there is work."""
        self._wakeup.clear()  # before looking: a wake-up from here on cuts the wait short
        with self._lock:
            if self._closed or self._cancelled or self.scheduler.has_work():
                return
            now = self.clock()
            due = [t for r in self.scheduler.paused if (t := r.pending.next_check(now)) is not None]
        if due:
            timeout = min(timeout, min(due) - now)
        if timeout > 0:
            self._wakeup.wait(timeout)

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> list[int]:
        """One token per row of `logits`, by each request's sampler (a hook: under tensor
        parallelism every rank takes the driver's tokens)."""
        return sample_batch([r.sampler for r in requests], [r.tokens for r in requests], logits)

    # ------------------------------------------------------------------ per-token work
    def _append_token(self, req: Request, tok: int, now: float, done: list[Request]) -> None:
        req.tokens.append(tok)
        req.num_generated += 1
        req.token_times.append(now)
        self._emit(req, "token", token_ids=(tok,))
        if req.first_token_time is None:
            req.first_token_time = now
        if req.resume_pending_since is not None:
            rec = req.interceptions[-1]
            req.interceptions[-1] = rec._replace(resumed_at=now)
            req.resume_pending_since = None
        stop = tok in req.eos_token_ids  # unless it ends a turn of chat tool calls: then it pauses
        if req.num_generated < req.max_new_tokens and self._maybe_pause(req, now, at_eos=stop):
            return
        if stop:
            self._finish(req, "stop", now)
            done.append(req)
        elif req.num_generated >= req.max_new_tokens:
            self._finish(req, "length", now)
            done.append(req)

    def _maybe_pause(self, req: Request, now: float, at_eos: bool = False) -> bool:
        pending: PendingCall | None = None
        segment = req.next_segment
        matcher = self._matchers.get(req.request_id)
        chat = self._chats.get(req.request_id)
        if at_eos:
            pass  # only a chat turn's calls pause at EOS
        elif segment is not None and req.segment_len >= segment.n_tokens:
            pending = ScriptedCall(segment, now, req.scripted.name)
        elif matcher is not None:
            generated = req.generated_since_resume()
            hit = matcher.match(generated)
            if hit is not None:
                tool, text = hit
                call = ToolCall(tool.name, text, req.request_id, tuple(generated), now)
                pending = self.executor.submit(tool, call)
                pending.future.add_done_callback(lambda _f: self._wakeup.set())
        if pending is None and chat is not None:
            pending = chat.pause(req.tokens, req.segment_start, at_eos, now, req.request_id, self.executor,
                                 self._wakeup.set)
        if pending is None:
            return False
        req.pending = pending
        req.num_pauses += 1
        self.scheduler.pause(req, now)
        req.interceptions.append(
            InterceptionRecord(pending.tool_name, pending.call_text, now, None, None, req.strategy, 0, dict(req.waste))
        )
        self._emit(req, "tool_call", tool=pending.tool_name, text=pending.call_text)
        return True

    def _collect_answers(self, now: float, done: list[Request]) -> None:
        for req in list(self.scheduler.paused):
            answer = req.pending.poll(now)
            if answer is None:
                continue
            self._resume(req, answer, now, done)

    def _resume(self, req: Request, answer: Answer, now: float, done: list[Request]) -> None:
        """Append the answer and queue the request, or fail it when the answer is unusable."""
        pending, req.pending = req.pending, None
        self.estimator.observe(pending.tool_name, now - pending.started_at)
        error = answer.error
        try:
            if answer.fail:
                raise AnswerError(answer.error)
            ids = self._answer_ids(pending.tool_name, answer)
            total = len(req.tokens) + len(ids) + (req.max_new_tokens - req.num_generated)
            if not self.cache.fits(total) or self.max_positions is not None and total > self.max_positions:
                raise AnswerError(
                    f"tool {pending.tool_name!r}: the context after its answer ({total} tokens) exceeds what the "
                    "model or the pool can hold"
                )
        except AnswerError as exc:
            req.interceptions[-1] = req.interceptions[-1]._replace(returned_at=now, error=str(exc))
            req.error = str(exc)
            self._finish(req, "error", now)
            done.append(req)
            return
        rec = req.interceptions[-1]
        req.interceptions[-1] = rec._replace(
            returned_at=now, strategy=req.strategy or rec.strategy, answer_len=len(ids), waste=dict(req.waste),
            error=error, calls=pending.records() if isinstance(pending, ChatPending) else (),
        )
        req.tokens.extend(ids)
        req.segment_start = len(req.tokens)
        req.resume_pending_since = now
        self.scheduler.resume(req, now)
        self._emit(req, "tool_answer", token_ids=tuple(ids), tool=pending.tool_name, error=error)

    def _answer_ids(self, tool: str, answer: Answer) -> list[int]:
        value = answer.value
        if isinstance(value, str):
            if self.tokenizer is None:
                what = answer.error or f"tool {tool!r} answered with text"
                raise AnswerError(f"{what}; the engine has no tokenizer to encode it (pass tokenizer=, or answer ids)")
            return list(self.tokenizer.encode(value, add_special_tokens=False))
        bad = [t for t in value if not 0 <= t < self.vocab_size]
        if bad:
            raise AnswerError(f"tool {tool!r} answered with token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        return list(value)

    def _finish(self, req: Request, reason: str, now: float) -> None:
        self.scheduler.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finish_time = now
        if req.interceptions and req.interceptions[-1].returned_at is None:  # ended inside a tool call
            req.interceptions[-1] = req.interceptions[-1]._replace(returned_at=now)
        req.resume_pending_since = None
        self.stats_.record_finish(req)
        if req.on_event is not None:
            self._emit(req, "finish", result=req.result())

    # ------------------------------------------------------------------ events
    def _emit(self, req: Request, kind: str, **fields: Any) -> None:
        if req.on_event is not None:
            self._events.append((req.on_event, RequestEvent(req.request_id, kind, **fields)))

    def _dispatch_events(self) -> None:
        """Run queued callbacks outside the engine lock, oldest first, one thread at a time (so the
        order holds even when a cancel on another thread dispatches too). A raising callback is
        logged and skipped: it must not take the engine or other requests down."""
        with self._dispatch_lock:
            while self._events:
                callback, event = self._events.popleft()
                try:
                    callback(event)
                except Exception:
                    logger.exception("on_event callback of request %d raised; event dropped", event.request_id)

    # ------------------------------------------------------------------ reporting and lifetime
    def stats(self) -> dict[str, Any]:
        with self._lock:
            out = self.stats_.snapshot(self.scheduler)
            out["duration_estimates"] = self.estimator.snapshot()
            return out

    def pause_placements(self) -> dict[int, tuple[str, dict[str, float]]]:
        """`{request_id: (strategy, waste figures)}` for every paused request: where its KV lies
        now (it may move again before the tool returns) and the figures the policy compared.
        A consistent snapshot, taken under the step lock, for live views such as the demo's."""
        with self._lock:
            return {r.request_id: (r.strategy, dict(r.waste)) for r in self.scheduler.paused}

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the InterceptEngine is closed; create a new one")

    def close(self) -> None:
        """Cancel every request, free every block and stop the tool workers. Idempotent; afterwards
        `add_request`, `cancel`, `step` and `run` raise RuntimeError (`stats` still answers)."""
        with self._lock:
            if self._closed:
                return
            self.executor.close()  # first, so abandoning a running call does not start a queued one
            for req in list(self._requests.values()):
                if req.status != Status.FINISHED:
                    self._cancel(req)
            self._requests.clear()
            self._matchers.clear()
            self._chats.clear()
            self._cancelled.clear()
            self._closed = True
        self._wakeup.set()
        self._dispatch_events()

    def __enter__(self) -> InterceptEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
