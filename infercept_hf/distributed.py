"""Tensor-parallel serving under `torchrun`: one engine replica per rank, one driver.

A model loaded with transformers' `DistributedConfig(tp_plan="auto")` computes every forward
on all ranks together (its all-reduces are collectives), and each rank's paged cache holds
only its own share of the KV heads (transformers' `DistributedHelper` divides them). So
every rank must run the same batch, with the same block tables, every step.

Design: deterministic replicas. Every rank runs the unmodified `InterceptEngine` scheduler
(admission, preserve / swap / discard, chunk sizes, swap budget) on identical inputs, and
the replicas stay identical because every input that is not a function of the shared state
comes from rank 0 (the driver), once per step:

    driver (rank 0)                             every rank
    add_request / cancel -> inbox
    run(): broadcast ("step", inbox,   ------>  replay the inbox (adds, cancels)
                      now, answers)             the step's `now`; resume the same requests
                                                 with the answers the driver polled at `now`
           clock() -> broadcast time   ------>  same time on every rank (each later clock read)
           sample (real samplers)      ------>  the same token ids
                                                 every rank: schedule, forward (collective),
                                                 swap its own shard, finish / pause
           digest of queues + block tables  <->  compared: a divergence raises at once

Why replicas rather than deciding on rank 0 and broadcasting the plan: the plan is not a
list of chunks but a sequence of cache mutations (allocate, evict, swap out part of a tail,
drop a host copy) interleaved with the policy's reasoning; shipping it would mean a second,
replayable scheduler. Replicas run the one scheduler unchanged, and the per-step digest
proves they agree (block ids included), so a bug shows up as an error, not as wrong tokens.

Tools run once, on the driver's worker threads; other ranks hold a placeholder call that
never runs. Results and `stats()` are identical on every rank (byte figures are per rank).
Workers follow the driver: on ranks > 0 `add_request` is ignored (returns None, like
transformers' `ContinuousBatchingManager`), `cancel` returns False, and `run()` mirrors the
driver's steps until the driver's `run()` returns or it closes the engine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import torch
import torch.distributed as dist
from typing_extensions import Unpack  # typing.Unpack is 3.11+

from .patches.paged_pool import allocators, block_tables
from .patches.tp_group import TPGroup
from .patches.transformers_cb import find_num_key_value_heads

from .batch_runner import ModelRunner
from .chat_tools import split_tools
from .engine import InterceptEngine
from .memory import PoolSizes
from .model_spec import ModelSpec
from .outputs import RequestResult
from .policy import CostModel
from .profiler import forward_figures, load_or_profile, measure_forward
from .request import Chunk
from .tp_replica import ReplicatedClock, ReplicatedInputs, ReplicaToolPool, VerifiedRunner, driver_only
from .tp_sizing import rank_pool_sizes

__all__ = [
    "ReplicaDivergenceError",
    "ReplicaOptions",
    "TensorParallelEngine",
    "TensorParallelError",
    "build_engine",
    "check_tp_config",
    "is_torchrun",
    "load_tp_model",
]


class TensorParallelError(ValueError):
    """A model, launch or backend that tensor-parallel serving cannot run."""


class ReplicaDivergenceError(RuntimeError):
    """The ranks' schedulers disagree: continuing would read another request's KV."""


def is_torchrun() -> bool:
    """Launched by `torchrun` (or any launcher that sets WORLD_SIZE) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_tp_config(config, tp_size: int) -> None:
    """Refuse, before any weights load, a model that `tp_size` ranks cannot shard."""
    text = config.get_text_config()
    arch = type(config).__name__
    if not getattr(text, "base_model_tp_plan", None):
        raise TensorParallelError(
            f"{arch} has no tensor-parallel plan (config.base_model_tp_plan is empty): transformers cannot shard it "
            f"across {tp_size} ranks. Run it on one device, or pick a model with a tp_plan (Llama, Qwen2, Mistral ...)"
        )
    heads = text.num_attention_heads
    kv_heads = find_num_key_value_heads(text)
    for name, n in (("attention heads", heads), ("key/value heads", kv_heads)):
        if n % tp_size:
            raise TensorParallelError(f"{arch} has {n} {name}, not divisible by the tensor-parallel size {tp_size}")


def load_tp_model(path: str, dtype: torch.dtype = torch.float32, **kwargs: Any) -> torch.nn.Module:
    """`from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"))` after `check_tp_config`.

    Call it on every rank of a `torchrun` launch; transformers starts the process group
    (gloo on CPU, NCCL on CUDA) and loads each rank's shard.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    if not is_torchrun():
        raise TensorParallelError("load_tp_model shards across ranks: launch with `torchrun --nproc_per_node N ...`")
    check_tp_config(AutoConfig.from_pretrained(path), int(os.environ["WORLD_SIZE"]))
    model = AutoModelForCausalLM.from_pretrained(
        path, distributed_config=DistributedConfig(tp_plan="auto"), dtype=dtype, **kwargs
    )
    return model.eval()


def build_engine(
    model: str | torch.nn.Module, policy: str = "min-waste", dtype: torch.dtype = torch.float32, **engine_kwargs: Any
) -> InterceptEngine:
    """The engine for this launch: a `TensorParallelEngine` under `torchrun`, else an `InterceptEngine`.

    `model` is a path (loaded with `load_tp_model` under torchrun, plainly otherwise) or a
    loaded model. `engine_kwargs` are the engines' own (num_blocks, cost_model, clock ...).
    Every rank calls this and then `run()`; only the driver's `add_request` counts.
    """
    if isinstance(model, str):
        if is_torchrun():
            model = load_tp_model(model, dtype)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
    if getattr(model, "tp_size", None) and model.tp_size > 1:
        return TensorParallelEngine(model, policy=policy, **engine_kwargs)
    return InterceptEngine(model, policy=policy, **engine_kwargs)


def _group_for(model: torch.nn.Module, cpu_group_timeout: float | None) -> TPGroup:
    """The tensor-parallel group of this model's mesh, after the checks that make its errors clear."""
    if not (dist.is_available() and dist.is_initialized()) or not getattr(model, "tp_size", None):
        raise TensorParallelError(
            "TensorParallelEngine needs a model sharded by transformers under torchrun: launch with "
            "`torchrun --nproc_per_node N ...` and load it with `infercept_hf.distributed.load_tp_model(path)` "
            "(from_pretrained(..., distributed_config=DistributedConfig(tp_plan='auto')))"
        )
    check_tp_config(model.config, model.tp_size)
    if model.tp_size != dist.get_world_size():
        raise TensorParallelError(
            f"tensor-parallel size {model.tp_size} != world size {dist.get_world_size()}: data parallelism across "
            "TP groups is not supported; launch exactly tp_size ranks"
        )
    backend = dist.get_backend()
    if model.device.type == "cpu" and backend != "gloo":
        raise TensorParallelError(f"CPU ranks need the gloo backend, but the process group uses {backend!r}")
    group = TPGroup.for_model(model, cpu_group_timeout)
    if group.size != model.tp_size:
        raise TensorParallelError(f"the model's device mesh has no {model.tp_size}-way 'tp' dimension")
    if not group.shards_kv_heads():
        raise TensorParallelError(
            f"{type(model).__name__}'s tp_plan does not shard `self_attn.k_proj` / `v_proj`, the layers by which "
            "transformers' paged cache splits KV heads across ranks: this model is not supported under TP"
        )
    return group


class ReplicaOptions(TypedDict, total=False):
    """`InterceptEngine` arguments that a replica passes on unchanged: meaning and defaults are the engine's."""

    tokenizer: Any
    policy: str
    max_batch_tokens: int
    max_tool_workers: int
    estimator: Any


class TensorParallelEngine(InterceptEngine):
    """`InterceptEngine` over a tensor-parallel model: one replica per rank, driven by rank 0.

    Every rank constructs it (same arguments) and calls `run()`. Pool arguments are per rank:
    `num_blocks` blocks of `block_size` tokens (the same token capacity as on one device, each
    block `1/tp` the bytes), `host_pool_bytes` of host memory per rank. Without `cost_model`
    the forward is measured on the sharded model (all-reduces included) and the KV bytes per
    token are this rank's share; the driver's figures are used everywhere (measuring takes a
    moment and is not cached: pass one engine's `.cost` to the next).
    `verify_replicas` compares a digest of every rank's queues, block tables and batch before
    each forward and after each step (two 8-byte all-gathers) and raises
    `ReplicaDivergenceError` on a mismatch. The other `InterceptEngine` arguments
    (`ReplicaOptions`: tokenizer, policy, max_batch_tokens, max_tool_workers) pass through.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        num_blocks: int | None = None,
        block_size: int | None = None,
        host_pool_bytes: int | None = None,
        cost_model: CostModel | None = None,
        clock: Callable[[], float] = time.monotonic,
        attention_backend: str = "auto",
        verify_replicas: bool = True,
        cpu_group_timeout: float | None = None,
        **options: Unpack[ReplicaOptions],
    ) -> None:
        unknown = options.keys() - ReplicaOptions.__optional_keys__
        if unknown:  # before any collective: every rank fails alike, and at once
            raise TypeError(f"TensorParallelEngine got unexpected arguments {sorted(unknown)}; besides its own "
                            f"it takes {sorted(ReplicaOptions.__optional_keys__)}")
        group = _group_for(model, cpu_group_timeout)
        self.group = group
        self.verify_replicas = verify_replicas
        spec = ModelSpec.of(model)
        tp_size = group.size
        ranks_per_host = int(os.environ.get("LOCAL_WORLD_SIZE", tp_size))
        sizes = rank_pool_sizes(spec, num_blocks, block_size, host_pool_bytes, ranks_per_host)
        agreed = group.all_reduce_min(torch.tensor([sizes.num_blocks, sizes.num_host_blocks]))
        num_blocks, num_host_blocks = agreed.tolist()
        cost = group.broadcast_object(cost_model)  # the driver's choice decides who measures
        if cost is None:
            cost = group.broadcast_object(self._measure_cost(model, spec))
        self._inbox: list[tuple] = []
        replicated_clock = ReplicatedClock(clock, group)
        super().__init__(
            model,
            pool_sizes=PoolSizes(num_blocks, sizes.block_size, num_host_blocks),
            cost_model=cost,
            clock=replicated_clock,
            batch_runner=(lambda m, c: VerifiedRunner(ModelRunner(m, c, attention_backend), self._verify))
            if verify_replicas else None,
            attention_backend=attention_backend,
            distributed_helper=group.helper,
            model_spec=spec,
            step_inputs=ReplicatedInputs(group, replicated_clock, self._outbox,
                                         self._verify if verify_replicas else None),
            tool_pool=None if group.is_driver else ReplicaToolPool(),
            **options,
        )

    def _measure_cost(self, model: torch.nn.Module, spec: ModelSpec) -> CostModel | None:
        """T_fwd of the sharded forward (all ranks run it: it is collective); the driver fits it."""
        points = measure_forward(model, spec=spec)
        if not self.group.is_driver:
            return None
        return load_or_profile(model, spec, **forward_figures(points))

    @property
    def is_driver(self) -> bool:
        return self.group.is_driver

    # ------------------------------------------------------------------ driver-side input
    def add_request(self, prompt_ids: Sequence[int] | torch.Tensor, **kwargs: Any) -> int | None:
        """On the driver: `InterceptEngine.add_request` (the id is final), and tell the workers at
        the next step what they need to replay it. On a worker: ignored, returns None."""
        if not self.is_driver:
            return None
        if split_tools(kwargs.get("tools"))[1]:
            raise ValueError("function tools (chat-format calls) are not supported under tensor parallelism yet: "
                             "pass infercept_hf.Tool objects")
        with self._lock:  # queued and in the inbox together: no step sends one without the other
            rid = super().add_request(prompt_ids, **kwargs)
            req = self._requests[rid]
            replica = dict(
                prompt_ids=req.tokens[: req.prompt_len],
                max_new_tokens=req.max_new_tokens,
                tools=[dataclasses.replace(t, fn=driver_only) for t in req.tools],
                interceptions=req.scripted,
                eos_token_id=sorted(req.eos_token_ids),
                arrival_time=req.arrival_time,
            )
            self._inbox.append(("add", rid, replica))
        return rid

    def cancel(self, request_id: int) -> bool:
        """On the driver as `InterceptEngine.cancel`, replayed on the workers; False on a worker."""
        if not self.is_driver:
            return False
        return super().cancel(request_id)

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestResult]:
        """One step on every rank (driver only: workers mirror it inside `run()`)."""
        if not self.is_driver:
            raise RuntimeError("on a worker rank call run(): it mirrors every step the driver takes")
        return super().step()

    def run(self, progress: bool = False) -> dict[int, RequestResult]:
        """Driver: as `InterceptEngine.run`, every rank stepping along. Worker: mirror the driver
        until its `run()` returns or it closes the engine; returns the same results."""
        if self.is_driver:
            return super().run(progress)
        self._check_open()
        return self._follow(until_close=False)

    def close(self) -> None:
        """Every rank calls it; a worker keeps mirroring the driver until the driver closes too."""
        if self._closed:
            return
        if self.is_driver:
            with self._lock:
                self.inputs.send("close")
                self._shut_down()
        else:
            self._follow(until_close=True)

    def _shut_down(self) -> None:
        super().close()
        self.group.close()

    def _follow(self, until_close: bool) -> dict[int, RequestResult]:
        results: dict[int, RequestResult] = {}
        while True:
            message = self.inputs.receive()
            with self._lock:
                self._replay(message.events)
                if message.command == "close":
                    self._shut_down()
                    return results
                if message.command == "step":
                    results.update((r.request_id, r) for r in super().step())
                elif not until_close:
                    return results

    def _outbox(self) -> list[tuple]:
        """The driver's adds and cancels since its last message, for the next one (`ReplicatedInputs`).

        The cancels are those the engine will report at its next step, each at its time (the
        ones `close()` makes are never sent: every rank's own close cancels the rest)."""
        cancels = [("cancel", r.request_id, r.finish_time) for r in self._ready if r.finish_reason == "cancelled"]
        events, self._inbox = self._inbox + cancels, []
        return events

    def _replay(self, events: list[tuple]) -> None:
        """Workers apply the driver's adds and cancels in the driver's order, at the driver's times."""
        if self.is_driver:
            return
        for kind, rid, payload in events:
            if kind == "add":
                got = super().add_request(**payload)
                if got != rid:
                    raise ReplicaDivergenceError(f"request id {got} on this rank, {rid} on the driver")
            else:
                with self.clock.frozen(payload):
                    super().cancel(rid)

    # ------------------------------------------------------------------ replica check
    def state_digest(self, chunks: Sequence[Chunk] = ()) -> int:
        """A hash of what must agree across ranks: queues, per-request progress, block tables, the batch."""
        s, cache = self.scheduler, self.cache
        batch = [(c.request.request_id, c.start, c.length) for c in chunks]
        queues = [[(r.request_id, r.status.value, r.num_cached, len(r.tokens), r.tokens[-1], r.strategy) for r in q]
                  for q in (s.waiting, s.running, s.paused)]
        device = [sorted((rid, tuple(t)) for rid, t in block_tables(a).items()) for a in allocators(cache).values()]
        host = [sorted((rid, tuple(t)) for rid, t in h.tables.items()) for h in cache.host.values()]
        blob = repr((batch, queues, device, host, self._next_id, cache.free_device_blocks(), cache.free_host_blocks()))
        return int.from_bytes(hashlib.blake2b(blob.encode(), digest_size=7).digest(), "big")

    def _verify(self, chunks: Sequence[Chunk] = ()) -> None:
        """Checked before each forward and after each step: a rank with a forward and one without
        still pair up their all-gathers here, so a divergence raises instead of deadlocking."""
        mine = torch.tensor([self.state_digest(chunks)], dtype=torch.int64)
        every = self.group.all_gather(mine)
        if len({int(d) for d in every}) > 1:
            raise ReplicaDivergenceError(
                f"step {self.stats_.steps}: scheduler state differs across ranks (digests {[int(d) for d in every]})"
            )

