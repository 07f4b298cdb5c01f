"""A tensor-parallel group: transformers' `DistributedHelper` behind named methods.

Tested against transformers 5.23 (see setup.py's pin). The helper's members (its CPU gloo
group, the driver's global rank, the device mesh it is built from) are not a public API, so
the package reaches them only through `TPGroup`: an upgrade that renames them breaks this
file only.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .transformers_cb import DistributedHelper

__all__ = ["TPGroup"]


class TPGroup:
    """The ranks that shard one model, with the collectives the replicas exchange over the CPU group."""

    def __init__(self, helper: DistributedHelper) -> None:
        self.helper = helper  # what the paged cache divides KV heads by

    @classmethod
    def for_model(cls, model: torch.nn.Module, cpu_group_timeout: float | None) -> TPGroup:
        """The group of `model`'s device mesh, where transformers' own continuous batching finds it."""
        mesh = getattr(model, "_device_mesh", None)
        return cls(DistributedHelper(mesh, cpu_group_timeout, tp_plan=getattr(model, "tp_plan", None)))

    @property
    def size(self) -> int:
        return self.helper.tp_size

    @property
    def is_driver(self) -> bool:
        return self.helper.is_tp_driver

    def shards_kv_heads(self) -> bool:
        """Whether the model's tp_plan splits `k_proj` / `v_proj`, by which the paged cache splits KV heads."""
        return self.helper.are_kv_heads_tp_ed()

    def all_reduce_min(self, values: torch.Tensor) -> torch.Tensor:
        return self.helper.tp_all_reduce_min(values, on_cpu=True)

    def broadcast_object(self, obj: Any) -> Any:
        """The driver's `obj` on every rank."""
        return self.helper.tp_broadcast_object_from_rank_0(obj)

    def broadcast(self, values: torch.Tensor) -> torch.Tensor:
        """The driver's `values` on every rank, in place (a CPU tensor)."""
        dist.broadcast(values, src=self.helper.tp_root_global_rank, group=self.helper.cpu_comm_group)
        return values

    def all_gather(self, value: torch.Tensor) -> list[torch.Tensor]:
        every = [torch.zeros_like(value) for _ in range(self.size)]
        dist.all_gather(every, value, group=self.helper.cpu_comm_group)
        return every

    def close(self) -> None:
        """Wait for every rank, then tear the CPU group down (nobody does it under a late receiver)."""
        dist.barrier(group=self.helper.cpu_comm_group)
        self.helper.destroy_cpu_comm_group()
