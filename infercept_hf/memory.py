"""Default pool sizes: device blocks from memory left after the weights, host blocks from free RAM.

Explicit `num_blocks` / `block_size` / `host_pool_bytes` always win. On CUDA the device pool
takes a fraction of free device memory; on CPU it is capped so a test or laptop run does
not zero gigabytes it will never touch.
"""
from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from .profiler import kv_bytes_per_token

DEVICE_FRACTION = 0.8  # of free accelerator memory, after the weights are loaded
HOST_FRACTION = 0.5  # of available host RAM, for the swap pool
CPU_DEVICE_CAP_BYTES = 2 << 30  # CPU "device" pool cap
CPU_DEVICE_CAP_BLOCKS = 4096  # tiny test models would otherwise get hundreds of thousands of blocks
HOST_TO_DEVICE_RATIO = 4  # default host pool: this many device pools, if RAM allows


@dataclass(frozen=True)
class PoolSizes:
    num_blocks: int
    block_size: int
    num_host_blocks: int


def default_pool_sizes(
    model: torch.nn.Module,
    dtype: torch.dtype,
    num_blocks: int | None,
    block_size: int | None,
    host_pool_bytes: int | None,
) -> PoolSizes:
    block_size = 16 if block_size is None else int(block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    bytes_per_block = kv_bytes_per_token(model.config.get_text_config(), dtype) * block_size
    device = model.device
    if num_blocks is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * DEVICE_FRACTION)
        else:
            budget = min(int(psutil.virtual_memory().available * 0.25), CPU_DEVICE_CAP_BYTES)
        num_blocks = max(1, budget // bytes_per_block)
        if device.type != "cuda":
            num_blocks = min(num_blocks, CPU_DEVICE_CAP_BLOCKS)
    if host_pool_bytes is None:
        host_pool_bytes = min(
            int(psutil.virtual_memory().available * HOST_FRACTION), HOST_TO_DEVICE_RATIO * int(num_blocks) * bytes_per_block
        )
    if host_pool_bytes < 0:
        raise ValueError(f"host_pool_bytes must be >= 0, got {host_pool_bytes}")
    if int(num_blocks) < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    return PoolSizes(int(num_blocks), block_size, host_pool_bytes // bytes_per_block)
