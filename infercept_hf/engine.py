"""InterceptEngine: continuous batching that pauses requests at tool calls instead of ending them.

The step loop: collect tool answers -> schedule (policy moves KV of paused requests) -> one
packed forward -> sample -> for each request that got a token: finish, pause at a tool
call, or go on. Tools run on worker threads; the loop never waits on one.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .cache import InterceptPagedCache
from .estimator import DurationEstimator
from .memory import default_pool_sizes
from .outputs import InterceptionRecord, RequestResult
from .policy import CostModel
from .profiler import load_or_profile
from .request import Request, Status
from .runner import ModelRunner
from .sampling import GREEDY, Sampler, sample_batch
from .scheduler import Scheduler, check_policy
from .stats import EngineStats
from .tools import Answer, PendingCall, Scripted, ScriptedCall, Tool, ToolCall, ToolExecutor, TriggerMatcher


class InterceptEngine:
    """Serve many tool-calling requests on one model with a paged KV cache.

    Example::

        engine = InterceptEngine(model, tokenizer=tok, policy="min-waste", num_blocks=256, block_size=16)
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
    ) -> None:
        """`executor(model, cache)` builds what runs each batch (`.forward(chunks) -> logits`): the
        default `ModelRunner` runs the model; the simulator passes one that advances a virtual `clock`
        by a cost model instead, so the same scheduler and policy code is measured at GPU scale."""
        self.model = model
        self.tokenizer = tokenizer
        self.policy = check_policy(policy)
        self.clock = clock
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        config = model.config.get_text_config()
        dtype = next(model.parameters()).dtype
        sizes = default_pool_sizes(model, dtype, num_blocks, block_size, host_pool_bytes)
        self.cache = InterceptPagedCache(
            config,
            num_blocks=sizes.num_blocks,
            block_size=sizes.block_size,
            num_host_blocks=sizes.num_host_blocks,
            max_batch_tokens=max_batch_tokens,
            dtype=dtype,
            device=model.device,
        )
        self.cost = cost_model or load_or_profile(model, dtype, model.device)
        self.estimator = DurationEstimator()
        self.scheduler = Scheduler(self.cache, policy, max_batch_tokens, self.cost, self.estimator)
        self.runner = (executor or ModelRunner)(model, self.cache)
        self.executor = ToolExecutor(max_tool_workers)
        self.stats_ = EngineStats(self.cache)
        self.max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.vocab_size = config.vocab_size
        self._requests: dict[int, Request] = {}
        self._matchers: dict[int, TriggerMatcher] = {}
        self._next_id = 0
        self._lock = threading.RLock()
        self._wakeup = threading.Event()
        self._closed = False
        self._cancelled: list[Request] = []
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        self.default_eos = frozenset([eos] if isinstance(eos, int) else (eos or []))

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int = 128,
        tools: Sequence[Tool] | None = None,
        interceptions: Scripted | None = None,
        sampler: Sampler | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        arrival_time: float | None = None,
    ) -> int:
        """Queue a request; returns its id. Bad input raises here, never inside the forward."""
        prompt = self._check_prompt(prompt_ids)
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if interceptions is not None and not isinstance(interceptions, Scripted):
            raise TypeError(f"interceptions must be an infercept_hf.Scripted, got {type(interceptions).__name__}")
        tools = tuple(tools or ())
        for t in tools:
            if not isinstance(t, Tool):
                raise TypeError(f"tools must be infercept_hf.Tool objects, got {type(t).__name__}")
        matcher = TriggerMatcher(tools, self.tokenizer) if tools else None
        answers = sum(len(s.answer_ids) for s in interceptions.segments) if interceptions else 0
        total = len(prompt) + max_new_tokens + answers
        if total > self.cache.capacity_tokens and self.cache.supports_partial:
            raise ValueError(
                f"request needs up to {total} tokens of KV (prompt {len(prompt)} + max_new_tokens {max_new_tokens}"
                f" + answers {answers}) but the pool holds {self.cache.capacity_tokens}; raise num_blocks"
            )
        if self.max_positions is not None and total > self.max_positions:
            raise ValueError(
                f"request needs up to {total} positions but the model supports {self.max_positions}"
            )
        eos = self.default_eos if eos_token_id is None else frozenset(
            [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
        )
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            rid = self._next_id
            self._next_id += 1
            req = Request(
                request_id=rid,
                tokens=list(prompt),
                prompt_len=len(prompt),
                max_new_tokens=int(max_new_tokens),
                arrival_time=self.clock() if arrival_time is None else arrival_time,
                tools=tools,
                scripted=interceptions,
                eos_token_ids=eos,
                sampler=sampler or GREEDY,
            )
            for t in tools:
                if t.expected_duration is not None:
                    self.estimator.seed(t.name, t.expected_duration)
            self._requests[rid] = req
            if matcher:
                self._matchers[rid] = matcher
            self.scheduler.add(req)
        self._wakeup.set()
        return rid

    def _check_prompt(self, prompt_ids: Sequence[int] | torch.Tensor) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
                prompt_ids = prompt_ids[0]
            if prompt_ids.dim() != 1:
                raise ValueError(f"prompt_ids must be 1-D, got shape {tuple(prompt_ids.shape)}")
            prompt_ids = prompt_ids.tolist()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids is empty: a request needs at least one token")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        return prompt

    def cancel(self, request_id: int) -> bool:
        """Stop a request wherever it is; its blocks are freed and its result says "cancelled"."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or req.status == Status.FINISHED:
                return False
            if req.pending is not None:
                req.pending.abandon()
            self._finish(req, "cancelled", self.clock())
            self._cancelled.append(req)
        return True

    def has_unfinished(self) -> bool:
        with self._lock:
            return any(r.status != Status.FINISHED for r in self._requests.values())

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestResult]:
        """One iteration. Returns the results of requests that finished in it."""
        with self._lock:
            done, self._cancelled = self._cancelled, []
            now = self.clock()
            self._collect_answers(now, done)
            plan = self.scheduler.schedule(now)
            if plan.chunks:
                t0 = self.clock()
                logits = self.runner.forward(plan.chunks)
                sampled = [c for c in plan.chunks if c.sample]
                tokens = sample_batch([c.request.sampler for c in sampled], [c.request.tokens for c in sampled], logits)
                self.stats_.record_forward(plan, self.clock() - t0)
                for c in plan.chunks:
                    c.request.num_cached += c.length
                    c.request.high_water = max(c.request.high_water, c.request.num_cached)
                now = self.clock()
                for c, tok in zip(sampled, tokens):
                    self._append_token(c.request, tok, now, done)
            self.cache.finish_transfers()
            self.stats_.record_step(self.scheduler, self.clock())
            results = [r.result() for r in done]
            for r in done:
                self._requests.pop(r.request_id, None)
                self._matchers.pop(r.request_id, None)
            return results

    def run(self, progress: bool = False) -> dict[int, RequestResult]:
        """Drive until every request has finished; returns {request_id: result}."""
        results: dict[int, RequestResult] = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self._requests), desc="requests", unit="req")
        while self.has_unfinished() or self._cancelled:
            finished = self.step()
            for r in finished:
                results[r.request_id] = r
            if bar is not None and finished:
                bar.update(len(finished))
            if not finished and not self.scheduler.has_work():
                self._idle_wait()
        if bar is not None:
            bar.close()
        return results

    def _idle_wait(self) -> None:
        """Nothing to compute: sleep until a tool answers or the next scripted deadline."""
        deadlines = [
            r.pending.deadline for r in self.scheduler.paused if isinstance(r.pending, ScriptedCall)
        ]
        timeout = 0.05
        if deadlines:
            timeout = max(0.0, min(min(deadlines) - self.clock(), timeout))
        self._wakeup.wait(timeout)
        self._wakeup.clear()

    # ------------------------------------------------------------------ per-token work
    def _append_token(self, req: Request, tok: int, now: float, done: list[Request]) -> None:
        req.tokens.append(tok)
        req.num_generated += 1
        req.token_times.append(now)
        if req.first_token_time is None:
            req.first_token_time = now
        if req.resume_pending_since is not None:
            rec = req.interceptions[-1]
            req.interceptions[-1] = rec._replace(resumed_at=now)
            req.resume_pending_since = None
        if tok in req.eos_token_ids:
            self._finish(req, "stop", now)
            done.append(req)
        elif req.num_generated >= req.max_new_tokens:
            self._finish(req, "length", now)
            done.append(req)
        else:
            self._maybe_pause(req, now)

    def _maybe_pause(self, req: Request, now: float) -> None:
        pending: PendingCall | None = None
        segment = req.next_segment
        if segment is not None and len(req.generated_since_resume()) >= segment.n_tokens:
            pending = ScriptedCall(segment, now)
        elif req.request_id in self._matchers:
            hit = self._matchers[req.request_id].match(req.generated_since_resume())
            if hit is not None:
                tool, text = hit
                call = ToolCall(tool.name, text, req.request_id, tuple(req.generated_since_resume()), now)
                pending = self.executor.submit(tool, call)
                pending.future.add_done_callback(lambda _f: self._wakeup.set())
        if pending is None:
            return
        req.pending = pending
        req.num_pauses += 1
        self.scheduler.pause(req, now)
        req.interceptions.append(
            InterceptionRecord(pending.tool_name, pending.call_text, now, None, None, req.strategy, 0, dict(req.waste))
        )

    def _collect_answers(self, now: float, done: list[Request]) -> None:
        for req in list(self.scheduler.paused):
            answer = req.pending.poll(now)
            if answer is None:
                continue
            self._resume(req, answer, now, done)

    def _resume(self, req: Request, answer: Answer, now: float, done: list[Request]) -> None:
        ids = self._answer_ids(answer.value)
        pending = req.pending
        req.pending = None
        self.estimator.observe(pending.tool_name, now - pending.started_at)
        rec = req.interceptions[-1]
        req.interceptions[-1] = rec._replace(
            returned_at=now, strategy=req.strategy or rec.strategy, answer_len=len(ids), waste=dict(req.waste),
            error=answer.error,
        )
        if answer.fail:
            req.error = answer.error
            self._finish(req, "error", now)
            done.append(req)
            return
        total = len(req.tokens) + len(ids) + (req.max_new_tokens - req.num_generated)
        if self.max_positions is not None and total > self.max_positions or (
            self.cache.supports_partial and total > self.cache.capacity_tokens
        ):
            req.error = f"context of {total} tokens after the tool answer exceeds what the model or pool can hold"
            self._finish(req, "error", now)
            done.append(req)
            return
        req.tokens.extend(ids)
        req.segment_start = len(req.tokens)
        req.resume_pending_since = now
        self.scheduler.resume(req, now)

    def _answer_ids(self, value: str | list[int]) -> list[int]:
        if isinstance(value, str):
            if self.tokenizer is None:
                raise ValueError("a tool returned a str but the engine has no tokenizer to encode it")
            return list(self.tokenizer.encode(value, add_special_tokens=False))
        bad = [t for t in value if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"tool answer has token ids outside the vocabulary: {bad[:5]}")
        return list(value)

    def _finish(self, req: Request, reason: str, now: float) -> None:
        self.scheduler.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finish_time = now
        if req.resume_pending_since is not None or (req.interceptions and req.interceptions[-1].returned_at is None):
            rec = req.interceptions[-1]
            req.interceptions[-1] = rec._replace(returned_at=rec.returned_at or now)
            req.resume_pending_since = None
        self.stats_.record_finish(req)

    # ------------------------------------------------------------------ reporting and lifetime
    def stats(self) -> dict[str, Any]:
        with self._lock:
            out = self.stats_.snapshot(self.scheduler)
            out["duration_estimates"] = self.estimator.snapshot()
            return out

    def close(self) -> None:
        """Stop tool workers and free every block; the engine cannot be used afterwards."""
        with self._lock:
            for req in list(self._requests.values()):
                if req.status != Status.FINISHED:
                    if req.pending is not None:
                        req.pending.abandon()
                    self._finish(req, "cancelled", self.clock())
            self._requests.clear()
            self._closed = True
        self.executor.close()

    def __enter__(self) -> InterceptEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
