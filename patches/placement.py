"""Where a model computes when accelerate has placed it (`device_map`, offloaded layers).

Checked with accelerate 1.15. A model dispatched with `dispatch_model` or loaded with a
`device_map` runs CPU- and disk-offloaded modules on its main device: the first accelerator
of the map, or CPU if there is none. Its first parameters may live on disk (`meta`), so
`model.device` cannot say where inputs and the KV cache belong; `execution_device` can.
"""
from __future__ import annotations

import torch
from accelerate.utils import compute_module_sizes

OFFLOADED = ("cpu", "disk")  # device_map entries that accelerate streams to the main device

__all__ = ["OFFLOADED", "execution_device", "largest_offloaded_module_bytes"]


def execution_device(model: torch.nn.Module) -> torch.device:
    """The device the model computes on: accelerate's main device for a dispatched model."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return model.device
    accelerators = [d for d in device_map.values() if d not in OFFLOADED]
    return torch.device(accelerators[0] if accelerators else "cpu")


def largest_offloaded_module_bytes(model: torch.nn.Module) -> int:
    """The most weight bytes accelerate moves onto the main device at once (one offloaded module)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    offloaded = [name for name, d in device_map.items() if d in OFFLOADED]
    if not offloaded:
        return 0
    sizes = compute_module_sizes(model)
    return max(sizes[name] for name in offloaded)
