"""Paper-scale simulation: the real engine, scheduler and policy code on a virtual clock.

`InterceptEngine` runs unchanged on a model built on the meta device (weights and KV pools
allocate nothing); only its executor is swapped for `SimExecutor`, which returns dummy
logits and advances a `VirtualClock` by what the iteration would take on the preset's GPUs.
Scripted tool pauses are deadlines on that clock, and the replay loop jumps the clock to
the next deadline or arrival when nothing is runnable, so a 30-minute trace takes seconds.

Cost model of one iteration (`HardwareModel`, docs/BENCHMARK.md), per GPU of `p`
(tensor parallelism splits weights, FLOPs and KV evenly):

    t_compute = FLOPs / p / (peak * eff.compute)
        FLOPs = 2 * body_params * T + 2 * head_params * n_sampled + 4 * L * d_attn * sum(len * (start + (len+1)/2))
    t_memory  = (weight_bytes + KV bytes read and written) / p / (HBM * eff.hbm)
    t_reduce  = 2 L all-reduces of T * hidden * 2 bytes: 2 L (latency + 2 (p-1)/p * bytes / NVLink)   (p > 1)
    T_fwd     = max(t_compute, t_memory) + t_reduce + step overhead
    T_swap    = bytes the cache moved since the last iteration / (p * PCIe * eff.pcie)
    step      = max(T_fwd, T_swap): copies run layer by layer behind the forward (`offload.py`'s
                pipeline); only what outlasts the forward stalls it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from ..patches.transformers_cb import find_head_dim
from transformers import AutoModelForCausalLM, PretrainedConfig

from ..cache import InterceptPagedCache
from ..engine import InterceptEngine
from ..estimator import DurationEstimator
from ..offload import SwapPipeline, Transfer
from ..policy import CostModel
from ..predictive import PredictorSettings
from ..model_spec import kv_bytes_per_token
from ..profiler import CUDA_TOKEN_COUNTS, forward_figures
from ..batch_runner import ModelRunner
from ..request import Chunk
from .presets import Efficiency, GPU, Preset

BLOCK_SIZE = 16


class VirtualClock:
    """A clock that only moves when told: the engine reads it, the executor and replay advance it."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def advance_to(self, t: float) -> None:
        self.now = max(self.now, t)


@dataclass(frozen=True)
class HardwareModel:
    """The cost of an iteration for one model shape on `num_gpus` GPUs of one kind."""

    body_params: int  # parameters every token passes through (all but the embeddings and LM head)
    head_params: int  # LM head: only rows that sample a token pay for it
    weight_bytes: int
    num_layers: int
    hidden_size: int
    attn_dim: int  # query heads x head dim
    kv_bytes_per_token: int
    gpu: GPU
    num_gpus: int
    eff: Efficiency

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, gpu: GPU, num_gpus: int = 1, eff: Efficiency = Efficiency()
    ) -> HardwareModel:
        """Shape figures read off `model` (meta or real) and its config."""
        config = model.config.get_text_config()
        total = sum(p.numel() for p in model.parameters())
        embed = model.get_input_embeddings().weight
        head = list(model.get_output_embeddings().parameters())
        untied = sum(p.numel() for p in head if p is not embed)  # a tied head adds nothing to `total`
        dtype = next(model.parameters()).dtype
        return cls(
            body_params=total - embed.numel() - untied,
            head_params=sum(p.numel() for p in head),
            weight_bytes=total * dtype.itemsize,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            attn_dim=config.num_attention_heads * find_head_dim(config),
            kv_bytes_per_token=kv_bytes_per_token(config, dtype),
            gpu=gpu,
            num_gpus=num_gpus,
            eff=eff,
        )

    @classmethod
    def for_preset(cls, model: torch.nn.Module, preset: Preset) -> HardwareModel:
        return cls.for_model(model, preset.gpu, preset.num_gpus, preset.efficiency)

    # ------------------------------------------------------------------ iteration costs
    def forward_seconds(self, spans: Sequence[tuple[int, int, bool]]) -> float:
        """One packed forward over `(start, length, samples)` spans; 0 for an empty batch."""
        if not spans:
            return 0.0
        p, gpu, eff = self.num_gpus, self.gpu, self.eff
        tokens = sum(n for _, n, _ in spans)
        sampled = sum(1 for _, _, s in spans if s)
        attn = sum(n * (start + (n + 1) / 2) for start, n, _ in spans)
        flops = (2 * self.body_params * tokens + 2 * self.head_params * sampled
                 + 4 * self.num_layers * self.attn_dim * attn)
        kv_bytes = sum(start + n for start, n, _ in spans) * self.kv_bytes_per_token
        t_compute = flops / p / (gpu.fp16_flops * eff.compute)
        t_memory = (self.weight_bytes + kv_bytes) / p / (gpu.hbm_bytes_per_s * eff.hbm)
        t_reduce = 0.0
        if p > 1:
            message = tokens * self.hidden_size * 2
            ring = 2 * (p - 1) / p * message / (gpu.nvlink_bytes_per_s * eff.nvlink)
            t_reduce = 2 * self.num_layers * (eff.allreduce_latency_s + ring)
        return max(t_compute, t_memory) + t_reduce + eff.step_overhead_s

    @property
    def host_link_bytes_per_s(self) -> float:
        """Achieved host-link bandwidth of all GPUs together: each moves its own shard over its own PCIe link."""
        return self.num_gpus * self.gpu.pcie_bytes_per_s * self.eff.pcie

    def swap_seconds(self, nbytes: int) -> float:
        """Copy time over the host links."""
        return nbytes / self.host_link_bytes_per_s

    # ------------------------------------------------------------------ sizing
    def kv_pool_blocks(self, block_size: int = BLOCK_SIZE) -> int:
        """Device KV blocks: usable memory of all GPUs minus weights and activation workspace."""
        eff = self.eff
        usable = self.num_gpus * (self.gpu.memory_bytes * eff.memory_fraction - eff.activation_bytes_per_gpu)
        free = usable - self.weight_bytes
        if free < self.kv_bytes_per_token * block_size:
            raise ValueError(
                f"the weights ({self.weight_bytes / 1e9:.1f} GB) leave no room for KV on {self.num_gpus} GPU(s)"
            )
        return int(free // (self.kv_bytes_per_token * block_size))

    def cost_model(self) -> CostModel:
        """What `profiler.load_or_profile` would measure on this hardware: the forward of one
        sequence of n tokens at the profiler's CUDA token counts, fitted as `a*n + b` with the
        same code, and the saturation point read off the same points."""
        points = [(n, self.forward_seconds([(0, n, True)])) for n in CUDA_TOKEN_COUNTS]
        return CostModel(
            swap_bytes_per_s=self.host_link_bytes_per_s,
            kv_bytes_per_token=self.kv_bytes_per_token,
            **forward_figures(points),
        )


class _BookkeepingPipeline(SwapPipeline):
    """On the meta device there is nothing to copy: a move is its block accounting alone.
    `seconds` (the copy time outside the forward, which stats read) is set by `SimExecutor`."""

    def __init__(self) -> None:
        super().__init__("sync")

    def submit(self, transfer: Transfer) -> None:
        transfer.on_done()


class SimExecutor:
    """The engine's executor (`forward(chunks) -> logits`) for simulation.

    Advances `clock` by the iteration's cost (forward, stretched by copies that outlast it)
    and returns logits whose argmax is token 0, so a request runs to its scripted length
    (the simulator's models have no EOS). Given `inner` (a real executor, e.g.
    `ModelRunner`), its logits are returned instead and the cache's real copies are kept:
    the same clock then drives a real model, which is how the tests show that simulation
    and execution schedule alike.
    """

    def __init__(self, cache: InterceptPagedCache, hardware: HardwareModel, clock: VirtualClock,
                 inner: ModelRunner | None = None) -> None:
        self.cache = cache
        self.hardware = hardware
        self.clock = clock
        self.inner = inner
        if inner is None:
            cache.pipeline = _BookkeepingPipeline()
        self.stall_s = 0.0
        self._moved_bytes = 0

    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        moved = self.cache.swapped_out_bytes + self.cache.swapped_in_bytes
        t_swap = self.hardware.swap_seconds(moved - self._moved_bytes)
        self._moved_bytes = moved
        t_fwd = self.hardware.forward_seconds([(c.start, c.length, c.yields_token) for c in chunks])
        stall = max(0.0, t_swap - t_fwd)
        self.stall_s += stall
        self.cache.pipeline.seconds = self.stall_s
        self.clock.advance(t_fwd + stall)
        if self.inner is not None:
            return self.inner.forward(chunks)
        return torch.zeros(sum(1 for c in chunks if c.yields_token), 1)


def meta_model(config: PretrainedConfig, dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    """The model of `config` on the meta device: shapes only, no memory; no EOS, so every
    request runs to its scripted length."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None
    return model.eval()


def sim_engine(
    model: torch.nn.Module,
    hardware: HardwareModel,
    policy: str,
    *,
    num_blocks: int,
    host_pool_bytes: int,
    max_batch_tokens: int,
    block_size: int = BLOCK_SIZE,
    run_model: bool = False,
    estimator: DurationEstimator | None = None,
    predictor_settings: PredictorSettings | None = None,
) -> tuple[InterceptEngine, VirtualClock]:
    """An engine on a fresh virtual clock that `hardware` advances. `run_model=True` also runs
    `model` (a real one) for its logits: the same schedule, executed. `estimator`: the engine's."""
    clock = VirtualClock()

    def executor(model: torch.nn.Module, cache: InterceptPagedCache) -> SimExecutor:
        return SimExecutor(cache, hardware, clock, ModelRunner(model, cache) if run_model else None)

    engine = InterceptEngine(
        model, policy=policy, num_blocks=num_blocks, block_size=block_size, host_pool_bytes=host_pool_bytes,
        max_batch_tokens=max_batch_tokens, cost_model=hardware.cost_model(), clock=clock, batch_runner=executor,
        estimator=estimator, predictor_settings=predictor_settings,
    )
    return engine, clock


def preset_engine(
    preset: Preset, policy: str, model: torch.nn.Module | None = None, estimator: DurationEstimator | None = None,
    predictor_settings: PredictorSettings | None = None,
) -> tuple[InterceptEngine, VirtualClock]:
    """An engine for `preset`, its KV pool sized from GPU memory minus weights (`model`: a
    `meta_model` of the preset's config to reuse across runs)."""
    model = model if model is not None else meta_model(preset.make_config())
    hardware = HardwareModel.for_preset(model, preset)
    return sim_engine(
        model, hardware, policy, num_blocks=hardware.kv_pool_blocks(BLOCK_SIZE),
        host_pool_bytes=preset.host_pool_bytes, max_batch_tokens=preset.max_batch_tokens, estimator=estimator,
        predictor_settings=predictor_settings,
    )
