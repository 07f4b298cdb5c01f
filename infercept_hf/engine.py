"""InterceptEngine: continuous batching that pauses requests at tool calls instead of ending them.

The step loop: collect tool answers -> schedule (policy moves KV of paused requests) -> one
packed forward -> sample -> for each request that got a token: finish, pause at a tool
call, or go on. Tools run on worker threads; the loop never waits on one.

Threads: every public method takes the engine's lock, so `add_request` and `cancel` may be
called from any thread while another drives `run()` or `step()`; they take effect between
steps. `on_event` callbacks run outside the lock, in the order the events happened.

Faults: whatever fails while the engine works for one request (tokenizing its answer,
decoding for its triggers, its sampler, its tool's outcome) ends that request with
`finish_reason="error"` and frees its blocks; the others carry on. A request's state moves
forward only once the step's work for it has succeeded. A failure that is no one request's
(the forward) leaves every request where it was: `step()` raises, and the next call picks up
from the same state and returns what was already finished.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .batch_runner import ModelRunner
from .cache import InterceptPagedCache
from .chat_tools import ChatFormat, ChatPending, ChatSession, FunctionTool, split_tools
from .checks import as_token_ids, finite_time, positive_int, token_id_set
from .estimator import DurationEstimator
from .faults import AnswerError, RequestFault, describe
from .held import AwaitingCaller
from .memory import PoolSizes, default_pool_sizes
from .model_spec import ModelSpec
from .outputs import InterceptionRecord, RequestEvent, RequestResult
from .paused_calls import PausedCalls
from .policy import CostModel
from .predictive import PredictorSettings
from .profiler import load_or_profile
from .request import Request, Status
from .sampling import GREEDY, Sampler
from .scheduler import Scheduler, StepPlan, check_policy
from .stats import EngineStats
from .step_inputs import LocalInputs
from .tool_pool import ToolPool
from .tools import Answer, PendingCall, Scripted, ScriptedCall, Tool, ToolCall
from .triggers import TriggerMatcher

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.05  # longest sleep of an idle loop: bounds how late an unannounced event is seen

EventCallback = Callable[[RequestEvent], None]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


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
        batch_runner: Callable[[torch.nn.Module, InterceptPagedCache], Any] | None = None,
        attention_backend: str = "auto",
        distributed_helper: Any = None,
        model_spec: ModelSpec | None = None,
        pool_sizes: PoolSizes | None = None,
        step_inputs: LocalInputs | None = None,
        estimator: DurationEstimator | None = None,
        tool_pool: ToolPool | None = None,
        prefix_sharing: bool = True,
        predictor_settings: PredictorSettings | None = None,
    ) -> None:
        """`batch_runner(model, cache)` builds what runs each batch (`.forward(chunks) -> logits`): the
        default `ModelRunner` runs the model; the simulator passes one that advances a virtual `clock`
        by a cost model instead, so the same scheduler and policy code is measured at GPU scale.
        `distributed_helper` (transformers' `DistributedHelper`) gives the cache this rank's share of
        KV heads under tensor parallelism (`distributed.TensorParallelEngine`). `model_spec` is
        `ModelSpec.of(model)`, for a caller that worked it out already (tensor parallel, to size pools);
        `pool_sizes`, pools that caller sized itself (then `num_blocks`, `block_size` and
        `host_pool_bytes` stay None). `step_inputs` gives each step its tool answers and sampled
        tokens: `LocalInputs` by default; tensor-parallel replicas take the driver's. `estimator`
        predicts pause lengths for min-waste (the benchmark's oracle passes one told the true durations).
        `tool_pool` runs the tool calls (a `ToolPool(max_tool_workers)` by default; replicas other than
        the driver pass one that runs nothing). `prefix_sharing` lets requests read the full KV blocks
        of equal prefixes (tool answers included) instead of computing them again (`prefix_index.py`;
        `engine.cache.prefix.off_reason` says why it is off, e.g. for sliding-window models).
        `predictor_settings` tunes `policy="predictive"` (prefetch quantile and reserve, aging)."""
        self.model = model
        self.tokenizer = tokenizer
        self.policy = check_policy(policy)
        self.clock = clock
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if distributed_helper is None and (getattr(model, "tp_size", None) or 1) > 1:
            raise ValueError(f"the model is sharded across {model.tp_size} ranks (tensor parallel): serve it with "
                             "infercept_hf.distributed.TensorParallelEngine (or build_engine) on every rank")
        self.spec = model_spec or ModelSpec.of(model)
        if pool_sizes is not None and (num_blocks, block_size, host_pool_bytes) != (None, None, None):
            raise ValueError("pass pool_sizes or num_blocks / block_size / host_pool_bytes, not both")
        sizes = pool_sizes or default_pool_sizes(self.spec, num_blocks, block_size, host_pool_bytes)
        self.cache = InterceptPagedCache(
            self.spec,
            num_blocks=sizes.num_blocks,
            block_size=sizes.block_size,
            num_host_blocks=sizes.num_host_blocks,
            max_batch_tokens=max_batch_tokens,
            distributed_helper=distributed_helper,
            prefix_sharing=prefix_sharing,
        )
        self.cost = cost_model or load_or_profile(model, self.spec)
        self.estimator = estimator or DurationEstimator()
        self.inputs = step_inputs or LocalInputs()
        self.paused_calls = PausedCalls()
        self.scheduler = Scheduler(self.cache, policy, max_batch_tokens, self.cost, self.estimator, predictor_settings)
        build_runner = batch_runner or (lambda m, c: ModelRunner(m, c, attention_backend))
        self.runner = build_runner(model, self.cache)
        self.executor = tool_pool or ToolPool(max_tool_workers)
        self.stats_ = EngineStats(self.cache)
        self._requests: dict[int, Request] = {}
        self._matchers: dict[int, TriggerMatcher] = {}
        self._chats: dict[int, ChatSession] = {}  # requests with function tools: their chat-format calls
        self._next_id = 0
        self._lock = threading.RLock()
        self._wakeup = threading.Event()
        self._closed = False
        self._ready: list[Request] = []  # finished (cancelled, failed, done), result not yet returned
        self._held: list[RequestResult] = []  # results a raising run() had gathered: returned by the next call
        self._last_time = -math.inf
        self._events: deque[tuple[EventCallback, RequestEvent]] = deque()
        self._dispatch_lock = threading.RLock()
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        self.default_eos = frozenset([eos] if isinstance(eos, int) else (eos or []))

    @property
    def max_positions(self) -> int | None:
        return self.spec.max_positions

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

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
        chat_session: ChatSession | None = None,
    ) -> int:
        """Queue a request; returns its id. Bad input raises here, never inside the forward.

        `tools` holds `Tool`s (text triggers) and plain functions (called through the model's chat
        format: see `infercept_hf.chat_tools`; `response_template` overrides the tokenizer's call format).
        `on_event(RequestEvent)` hears of every token, tool call, tool answer and the finish, in
        order (it runs on whichever thread drove the engine: keep it quick).
        `chat_session` (instead of function tools) is asked after every token, as a `ChatSession`
        is, whether the turn ends there: the server's sessions pause at a turn's end this way
        (`held.AwaitingCaller`) and go on with `continue_request`.
        """
        prompt = self._check_prompt(prompt_ids)
        max_new_tokens = positive_int(max_new_tokens, "max_new_tokens")
        if interceptions is not None and not isinstance(interceptions, Scripted):
            raise TypeError(f"interceptions must be an infercept_hf.Scripted, got {type(interceptions).__name__}")
        tools, functions = self._check_tools(tools)
        if chat_session is not None and functions:
            raise ValueError("pass function tools or chat_session, not both: the session decides where turns end")
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be callable, got {type(on_event).__name__}")
        if sampler is not None and not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be an infercept_hf.Sampler (None: greedy), got {type(sampler).__name__}")
        if arrival_time is not None:
            arrival_time = finite_time(arrival_time, "arrival_time")
        eos = self.default_eos if eos_token_id is None else token_id_set(eos_token_id, "eos_token_id")
        matcher = TriggerMatcher(tools, self.tokenizer) if tools else None
        chat = ChatSession(ChatFormat(self.tokenizer, functions, sorted(eos), self.spec.model_type,
                                      response_template)) if functions else chat_session
        answers = self._check_scripted(interceptions)
        self._check_fits(len(prompt), max_new_tokens, answers)
        with self._lock:
            self._check_open()
            rid = self._next_id
            self._next_id += 1
            req = Request(
                request_id=rid,
                tokens=list(prompt),
                prompt_len=len(prompt),
                max_new_tokens=max_new_tokens,
                arrival_time=self._now() if arrival_time is None else arrival_time,
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

    @staticmethod
    def _check_tools(tools: Sequence[Any] | None) -> tuple[tuple[Tool, ...], tuple[FunctionTool, ...]]:
        """(trigger tools, function tools) from `tools=`: a list, never a lone tool or string."""
        if tools is not None and (callable(tools) or isinstance(tools, (Tool, str, bytes))
                                  or not isinstance(tools, Sequence)):
            raise TypeError(f"tools must be a list of infercept_hf.Tool objects or functions, got {type(tools).__name__}")
        return split_tools(tools)

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

    def continue_request(self, request_id: int, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
                         sampler: Sampler | None = None) -> int:
        """Resume a request paused awaiting its caller (`held.AwaitingCaller`) with the caller's next
        prompt, the whole transcript: KV is kept as far as the prompt agrees with the request's token
        log (their longest common prefix) and only the rest is computed. `max_new_tokens` counts
        from here. Returns how many of the prompt's tokens had their KV reused."""
        prompt = self._check_prompt(prompt_ids)
        max_new_tokens = positive_int(max_new_tokens, "max_new_tokens")
        if sampler is not None and not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be an infercept_hf.Sampler (None: greedy), got {type(sampler).__name__}")
        self._check_fits(len(prompt), max_new_tokens, 0)
        with self._lock:
            self._check_open()
            req = self._requests.get(request_id)
            if req is None or not isinstance(req.pending, AwaitingCaller):
                raise ValueError(f"request {request_id} is not paused awaiting its caller")
            keep = min(common_prefix_len(req.tokens, prompt), len(prompt) - 1)  # one token left to forward
            self.cache.truncate(req.rid, keep)
            del req.tokens[keep:]
            req.prompt_len = min(req.prompt_len, keep)
            req.num_generated = 0
            req.max_new_tokens = max_new_tokens
            req.sampler = sampler or GREEDY
            self._resume(req, Answer(prompt[keep:]), self._now())
            if req.status is Status.FINISHED:
                raise ValueError(f"request {request_id} could not go on: {req.error}")
            self.scheduler.expedite(req)  # its caller waits on the first token: ahead of the decodes
            reused = req.num_cached
        self._wakeup.set()
        self._dispatch_events()
        return reused

    def reused_tokens(self, request_id: int) -> int:
        """Context tokens whose KV the request has so far taken from shared or retained blocks
        instead of computing them (its `RequestResult.cached_tokens` once it ends); 0 if unknown."""
        req = self._requests.get(request_id)
        return req.kv.reused if req is not None else 0

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
            self._ready.append(req)
        self._wakeup.set()
        self._dispatch_events()
        return True

    def _cancel(self, req: Request) -> None:
        if req.pending is not None:
            req.pending.abandon()
        self._finish(req, "cancelled", self._now())

    def has_unfinished(self) -> bool:
        """True while some request's result has yet to be returned by `step()` or `run()`
        (a cancelled request's result comes with the next step)."""
        with self._lock:
            return bool(self._requests or self._held)

    def _now(self) -> float:
        """The engine's time: its clock, never stepping back (a wall clock may be corrected
        backwards; every duration the engine measures is a difference of these reads)."""
        t = self.clock()
        if t > self._last_time:  # a NaN read compares False and is ignored too
            self._last_time = t
        return self._last_time

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestResult]:
        """One iteration. Returns the results of requests that finished in it (or were cancelled
        or failed since the last call).

        Raises only for a failure that is no one request's (the forward itself, e.g. a device
        error): then no request has moved, nothing is lost, and the next `step()` or `run()`
        carries on and returns what had finished."""
        try:
            with self._lock:
                results = self._step()
        finally:
            self._dispatch_events()
        return results

    def _step(self) -> list[RequestResult]:
        self._check_open()
        with self.inputs.step(self.paused_calls):
            now = self._now()
            self._collect_answers(now)
            plan = self.scheduler.schedule(now)
            try:
                if plan.chunks:
                    self._compute(plan)
            finally:
                self.cache.finish_transfers()
            self.stats_.record_step(self.scheduler, self._now())
            return self._deliver()

    def _compute(self, plan: StepPlan) -> None:
        """Forward and sample, then advance every chunk's request. Nothing moves until both
        succeeded, so a raise leaves the step to be run again from the same state."""
        t0 = self._now()
        logits = self.runner.forward(plan.chunks)
        sampled = [c.request for c in plan.chunks if c.yields_token]
        tokens = self.inputs.tokens(sampled, logits)
        self.stats_.record_forward(plan, self._now() - t0)
        for c in plan.chunks:
            self.cache.record_computed(c.request.rid, c.length)
        now = self._now()
        for req, tok in zip(sampled, tokens):
            if isinstance(tok, RequestFault):
                self._fail(req, f"sampling failed: {tok}", now)
            else:
                self._append_token(req, tok, now)

    def _deliver(self) -> list[RequestResult]:
        done, self._ready = self._ready, []
        results, self._held = self._held, []
        for r in done:
            self._requests.pop(r.request_id, None)
            self._matchers.pop(r.request_id, None)
            self._chats.pop(r.request_id, None)
            results.append(r.result())
        return results

    def run(self, progress: bool = False) -> dict[int, RequestResult]:
        """Drive until every request has finished (requests added meanwhile, from any thread,
        included); returns {request_id: result}. Returns early if another thread closes the engine."""
        self._check_open()
        results: dict[int, RequestResult] = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self._requests), desc="requests", unit="req")
        try:
            while True:
                try:
                    with self._lock:
                        finished = self._run_step()
                        if finished is None and not self._closed:
                            self.inputs.run_ended()
                finally:
                    self._dispatch_events()
                if finished is None:
                    break
                results.update((r.request_id, r) for r in finished)
                if bar is not None and finished:
                    bar.update(len(finished))
                if not finished:
                    self.wait_for_work()
        except BaseException:
            with self._lock:  # a step raised: the next call returns what this one had gathered
                self._held[:0] = results.values()
            raise
        finally:
            if bar is not None:
                bar.close()
        return results

    def _run_step(self) -> list[RequestResult] | None:
        """One iteration of `run()`, under the lock; None once there is nothing left to drive."""
        if self._closed or not (self._requests or self._held):
            return None
        return self._step()

    def wait_for_work(self, timeout: float = IDLE_POLL_S) -> None:
        """Sleep until a step could do something: a request is runnable, a tool answered, a
        scripted pause or a tool timeout is due, or another thread added, cancelled or closed;
        at most `timeout` seconds. Returns at once when there is work."""
        self._wakeup.clear()  # before looking: a wake-up from here on cuts the wait short
        with self._lock:
            if self._closed or self._ready or self._held or self.scheduler.has_work():
                return
            now = self._now()
            due = self._next_due(now)
        if due is not None:
            timeout = min(timeout, due - now)
        if timeout > 0:
            self._wakeup.wait(timeout)

    # ------------------------------------------------------------------ per-request work
    @contextmanager
    def _isolated(self, req: Request, what: str, now: float) -> Iterator[None]:
        """Work done for `req` alone: if it fails, `req` ends with the cause and the step goes on."""
        try:
            yield
        except RequestFault as exc:
            self._fail(req, str(exc), now)
        except Exception as exc:  # noqa: BLE001 - one request's fault must not stop the others
            logger.warning("request %d: %s failed", req.request_id, what, exc_info=True)
            self._fail(req, f"{what} failed: {describe(exc)}", now)

    def _fail(self, req: Request, message: str, now: float) -> None:
        """End `req` with `finish_reason="error"`, from whatever state it is in; its blocks are freed."""
        if req.status is Status.FINISHED:
            return
        if req.pending is not None:
            req.pending.abandon()
            req.pending = None
        if req.interceptions and req.interceptions[-1].returned_at is None:  # failed inside a tool call
            req.interceptions[-1] = req.interceptions[-1]._replace(returned_at=now, error=message)
        req.error = message
        self._finish(req, "error", now)
        self._ready.append(req)

    def _append_token(self, req: Request, tok: int, now: float) -> None:
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
        if req.num_generated < req.max_new_tokens and self._can_pause(req):
            paused = False
            with self._isolated(req, "looking for a tool call (trigger matching)", now):
                paused = self._maybe_pause(req, now, at_eos=stop)
            if paused or req.status is Status.FINISHED:
                return
        if stop:
            self._finish(req, "stop", now)
            self._ready.append(req)
        elif req.num_generated >= req.max_new_tokens:
            self._finish(req, "length", now)
            self._ready.append(req)

    def _can_pause(self, req: Request) -> bool:
        """Whether anything could pause `req` (checked per token, before the costlier isolated look)."""
        return req.next_segment is not None or req.request_id in self._matchers or req.request_id in self._chats

    def _maybe_pause(self, req: Request, now: float, at_eos: bool = False) -> bool:
        """Pause `req` if its last token completes a tool call (at an EOS, only a chat turn's calls do)."""
        pending: PendingCall | None = None
        segment = req.next_segment
        matcher = self._matchers.get(req.request_id)
        chat = self._chats.get(req.request_id)
        if at_eos:
            pass
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
        req.interceptions.append(InterceptionRecord(pending.tool_name, pending.call_text, now, None, None, "", 0, {}))
        self.scheduler.pause(req, now)
        self.paused_calls.add(req)
        req.interceptions[-1] = req.interceptions[-1]._replace(strategy=req.strategy, waste=dict(req.waste))
        self._emit(req, "tool_call", tool=pending.tool_name, text=pending.call_text)
        return True

    def _collect_answers(self, now: float) -> None:
        for req, answer in self.inputs.answers(self.paused_calls, now):
            self._resume(req, answer, now)

    def _resume(self, req: Request, answer: Answer, now: float) -> None:
        """Append the answer and queue the request, or fail it when the answer is unusable.
        Everything that can fail runs before the request is touched."""
        pending = req.pending
        due = pending.next_check(now)  # a scripted answer is due at its deadline, not at the step that saw it
        now = now if due is None else min(now, due)
        with self._isolated(req, f"using the answer of tool {pending.tool_name!r}", now):
            self.estimator.observe(pending.tool_name, now - pending.started_at)
            if answer.fail:
                raise AnswerError(answer.error)
            ids = self._answer_ids(pending.tool_name, answer)
            total = len(req.tokens) + len(ids) + (req.max_new_tokens - req.num_generated)
            if not self.cache.fits(total) or self.max_positions is not None and total > self.max_positions:
                raise AnswerError(
                    f"tool {pending.tool_name!r}: the context after its answer ({total} tokens) exceeds what the "
                    "model or the pool can hold"
                )
            req.pending = None
            self.paused_calls.forget(req)
            rec = req.interceptions[-1]
            req.interceptions[-1] = rec._replace(
                returned_at=now, strategy=req.strategy or rec.strategy, answer_len=len(ids), waste=dict(req.waste),
                error=answer.error, calls=pending.records() if isinstance(pending, ChatPending) else (),
            )
            req.tokens.extend(ids)
            req.segment_start = len(req.tokens)
            req.resume_pending_since = now
            self.scheduler.resume(req, now)
            self._emit(req, "tool_answer", token_ids=tuple(ids), tool=pending.tool_name, error=answer.error)

    def _answer_ids(self, tool: str, answer: Answer) -> list[int]:
        """The answer as ids inside the vocabulary, text or ids alike (an id past the vocabulary
        would fail every later forward, of every request in the batch)."""
        value = answer.value
        if isinstance(value, str):
            if self.tokenizer is None:
                what = answer.error or f"tool {tool!r} answered with text"
                raise AnswerError(f"{what}; the engine has no tokenizer to encode it (pass tokenizer=, or answer ids)")
            try:
                value = as_token_ids(self.tokenizer.encode(value, add_special_tokens=False), "the encoded answer")
            except Exception as exc:  # noqa: BLE001 - the tokenizer's failure is this answer's
                raise AnswerError(f"tool {tool!r}: the tokenizer could not encode its answer: {describe(exc)}") from exc
        bad = [t for t in value if not 0 <= t < self.vocab_size]
        if bad:
            raise AnswerError(
                f"tool {tool!r} answered with token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}"
            )
        return list(value)

    def _finish(self, req: Request, reason: str, now: float) -> None:
        self.scheduler.remove(req)
        self.paused_calls.forget(req)
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

    def timeline(self) -> list[dict[str, float]]:
        """KV blocks by state after each step, oldest first (`{"t", "running", "preserved",
        "swapped_host", "free"}`; thinned to every other sample on long runs)."""
        with self._lock:
            return list(self.stats_.timeline)

    @property
    def steps(self) -> int:
        """Iterations that ran a forward so far: a caller driving `step()` sees whether one did."""
        return self.stats_.steps

    def next_answer_due(self) -> float | None:
        """The earliest engine time at which a paused request's answer may be due, or (`predictive`)
        a prefetch falls due (None: none is known, only a finishing tool can wake the engine): a
        driver may sleep until then."""
        with self._lock:
            return self._next_due(self._now())

    def _next_due(self, now: float) -> float | None:
        due = [t for t in (self.paused_calls.next_check(now), self.scheduler.next_prefetch(now)) if t is not None]
        return min(due, default=None)

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
            self._ready.clear()
            self._held.clear()
            self._closed = True
        self._wakeup.set()
        self._dispatch_events()

    def __enter__(self) -> InterceptEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
