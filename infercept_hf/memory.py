"""Where the KV cache lives and how big its pools are by default.

Explicit `num_blocks` / `block_size` / `host_pool_bytes` always win. Otherwise:

- device pool: free memory of the device the model computes on, after its resident weights
  (accelerate's `get_max_memory` reads it after loading), less the largest module accelerate
  streams in from CPU or disk for its forward (a model dispatched with offloaded layers), times
  `DEVICE_FRACTION` for activations. On CPU the cap below keeps test runs from zeroing gigabytes.
- host swap pool: available RAM less a safety margin (and less the device pool when that, too,
  is RAM), times `HOST_FRACTION`, at most `HOST_TO_DEVICE_RATIO` device pools.

For a model placed by accelerate, "the device" is `ModelSpec.device` (accelerate's main device).
"""
from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch
from accelerate.utils import get_max_memory

from .model_spec import ModelSpec

DEVICE_FRACTION = 0.8  # of free accelerator memory once the weights (and one streamed module) are in
HOST_FRACTION = 0.5  # of available host RAM after the safety margin, for the swap pool
HOST_SAFETY_FRACTION = 0.1  # of total RAM, never given to pools: the OS, tokenizers, Python, tool workers
HOST_SAFETY_MIN_BYTES = 1 << 30
CPU_DEVICE_FRACTION = 0.25  # of available RAM when the model computes on CPU (the host pool shares that RAM)
CPU_DEVICE_CAP_BYTES = 2 << 30  # CPU "device" pool cap
CPU_DEVICE_CAP_BLOCKS = 4096  # tiny test models would otherwise get hundreds of thousands of blocks
HOST_TO_DEVICE_RATIO = 4  # default host pool: this many device pools, if RAM allows


@dataclass(frozen=True)
class PoolSizes:
    num_blocks: int
    block_size: int
    num_host_blocks: int


@dataclass(frozen=True)
class MemoryView:
    """The figures pool sizing reads, taken once the model is loaded."""

    device: torch.device
    free_device_bytes: int  # free on the execution device, resident weights excluded
    streamed_weight_bytes: int  # largest offloaded module, moved onto the device during its forward
    available_host_bytes: int
    total_host_bytes: int


def memory_view(spec: ModelSpec) -> MemoryView:
    device = spec.device
    host = psutil.virtual_memory()
    free = host.available
    if device.type not in ("cpu", "meta"):
        free = get_max_memory().get(device.type if device.type == "mps" else (device.index or 0), 0)
    return MemoryView(device, free, spec.streamed_weight_bytes, host.available, host.total)


def default_pool_sizes(
    spec: ModelSpec,
    num_blocks: int | None,
    block_size: int | None,
    host_pool_bytes: int | None,
    memory: MemoryView | None = None,
) -> PoolSizes:
    """Pool sizes for the model of `spec`; `memory` overrides the live figures (tests, planning for another machine)."""
    block_size = 16 if block_size is None else int(block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    bytes_per_block = spec.kv_bytes_per_token * block_size
    if num_blocks is not None and host_pool_bytes is not None:
        return _checked(num_blocks, block_size, host_pool_bytes, bytes_per_block)
    memory = memory or memory_view(spec)
    on_host = memory.device.type in ("cpu", "meta")
    if num_blocks is None:
        if on_host:
            budget = min(int(memory.available_host_bytes * CPU_DEVICE_FRACTION), CPU_DEVICE_CAP_BYTES)
        else:
            budget = int((memory.free_device_bytes - memory.streamed_weight_bytes) * DEVICE_FRACTION)
            if budget < bytes_per_block:
                raise ValueError(
                    f"{memory.device} has {memory.free_device_bytes} bytes free and a forward streams in up to "
                    f"{memory.streamed_weight_bytes} bytes of offloaded weights: no room for a KV block of "
                    f"{bytes_per_block} bytes; offload more layers or pass num_blocks"
                )
        num_blocks = max(1, budget // bytes_per_block)
        if on_host:
            num_blocks = min(num_blocks, CPU_DEVICE_CAP_BLOCKS)
    if host_pool_bytes is None:
        margin = max(HOST_SAFETY_MIN_BYTES, int(memory.total_host_bytes * HOST_SAFETY_FRACTION))
        spare = memory.available_host_bytes - margin - (int(num_blocks) * bytes_per_block if on_host else 0)
        cap = HOST_TO_DEVICE_RATIO * int(num_blocks) * bytes_per_block
        host_pool_bytes = max(0, min(int(spare * HOST_FRACTION), cap))
    return _checked(num_blocks, block_size, host_pool_bytes, bytes_per_block)


def _checked(num_blocks: int, block_size: int, host_pool_bytes: int, bytes_per_block: int) -> PoolSizes:
    if host_pool_bytes < 0:
        raise ValueError(f"host_pool_bytes must be >= 0, got {host_pool_bytes}")
    if int(num_blocks) < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    return PoolSizes(int(num_blocks), block_size, host_pool_bytes // bytes_per_block)
