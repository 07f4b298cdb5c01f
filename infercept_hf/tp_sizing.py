"""What tensor parallelism changes in the numbers: per-rank KV bytes, pool sizes, and T_fwd.

Under TP each of `tp` ranks holds `kv_heads / tp` of every layer's KV heads, so one token
costs each rank `M / tp` bytes of pool, and each rank swaps only its own share over its own
host link. A forward computes `1/tp` of every matmul per rank but adds two all-reduces per
layer (after the attention output and the MLP down projection), each over `n * hidden`
activations::

    T_fwd_tp(n) = (a / tp) * n + b                                      compute, per rank
                + 2 * L * (2 (tp-1) / tp * n * hidden * itemsize / bw    ring all-reduce bytes
                           + latency)                                    per collective

A measured TP forward (`measure_forward` on the sharded model, all ranks together) already
contains that term; `tensor_parallel_cost` derives it from single-device figures, to plan a
TP deployment without TP hardware at hand. (The simulator's multi-GPU presets do not use it:
`bench.simulator.HardwareModel.forward_seconds` adds the same all-reduce term to its roofline.)
"""
from __future__ import annotations

import dataclasses

import psutil
import torch

from .memory import HOST_FRACTION, HOST_TO_DEVICE_RATIO, PoolSizes, default_pool_sizes
from .model_spec import ModelSpec
from .policy import CostModel

ALL_REDUCES_PER_LAYER = 2  # attention output projection and MLP down projection (row-wise layers)


def tensor_parallel_cost(
    single: CostModel,
    config,
    dtype: torch.dtype,
    tp_size: int,
    allreduce_bytes_per_s: float,
    allreduce_latency_s: float = 10e-6,
) -> CostModel:
    """The cost model of one rank in a `tp_size`-way group, from a one-device `single` model.

    `allreduce_bytes_per_s` is the per-GPU bus bandwidth of the interconnect (NVLink, ...).
    Saturation stays: it depends on tokens per matmul, which TP does not change; swap
    bandwidth stays: every rank has its own host link.
    """
    if tp_size < 1 or allreduce_bytes_per_s <= 0 or allreduce_latency_s < 0:
        raise ValueError(f"need tp_size >= 1, bandwidth > 0, latency >= 0; got {tp_size}, "
                         f"{allreduce_bytes_per_s}, {allreduce_latency_s}")
    config = config.get_text_config()
    collectives = ALL_REDUCES_PER_LAYER * config.num_hidden_layers if tp_size > 1 else 0
    ring = 2 * (tp_size - 1) / tp_size
    per_token = ring * config.hidden_size * dtype.itemsize / allreduce_bytes_per_s
    return dataclasses.replace(
        single,
        fwd_per_token_s=single.fwd_per_token_s / tp_size + collectives * per_token,
        fwd_fixed_s=single.fwd_fixed_s + collectives * allreduce_latency_s,
        kv_bytes_per_token=max(1, single.kv_bytes_per_token // tp_size),
    )


def rank_pool_sizes(
    spec: ModelSpec,
    num_blocks: int | None,
    block_size: int | None,
    host_pool_bytes: int | None,
    ranks_per_host: int,
) -> PoolSizes:
    """One rank's pools (`spec` is the sharded model's). A block still holds `block_size` tokens,
    so `num_blocks` means the same token capacity as on one device; its bytes shrink by
    `spec.tp_size`. `host_pool_bytes` is per rank; by default the ranks of a machine share its
    free RAM rather than each taking half."""
    one_device = default_pool_sizes(spec, num_blocks, block_size, 0)
    rank_block_bytes = spec.rank_kv_bytes_per_token * one_device.block_size
    if num_blocks is None:  # the device budget holds tp_size times more of this rank's smaller blocks
        num_blocks = one_device.num_blocks * spec.tp_size
    if host_pool_bytes is None:
        free_share = int(psutil.virtual_memory().available * HOST_FRACTION) // ranks_per_host
        host_pool_bytes = min(free_share, HOST_TO_DEVICE_RATIO * num_blocks * rank_block_bytes)
    if host_pool_bytes < 0:
        raise ValueError(f"host_pool_bytes must be >= 0, got {host_pool_bytes}")
    return PoolSizes(int(num_blocks), one_device.block_size, host_pool_bytes // rank_block_bytes)
