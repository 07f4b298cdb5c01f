"""The swap pipeline: block copies between device and host pools, layer by layer.

A block holds every layer's keys and values (`[L0 K | L0 V | L1 K | L1 V | ...]`), so a move
splits into one copy per layer. Two rules keep it correct however the copies are timed:

- a swapped-in block is never read before it lands: the forward reaches layer `l`'s cache
  through `PagedKVView.update(layer=l)`, which calls `before_layer(l)` first, and that waits
  for layer `l`'s copy (CUDA: an event on the side stream);
- a swapped-out block is never freed before it leaves: its device ids go back to the free
  pool only in `finish()`, after every layer's copy has completed.

Modes:
- `sync` (CPU default): each copy runs at once, in layer order.
- `cuda`: copies are issued on a side stream with one event per layer, so copying layer
  `l+1` overlaps the compute of layer `l`; host memory is pinned.
- `lazy` (tests): each swap-in layer is copied only when the forward first asks for it, and
  swap-outs only in `finish()`, the latest moments the rules allow; exact tokens under this
  mode show the ordering is right.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .patches.paged_pool import block_rows, layer_indices

from .kernels import gather_blocks, scatter_blocks

MODES = ("sync", "cuda", "lazy")


@dataclass
class Transfer:
    """One move of some blocks of one allocator, copied per layer."""

    alloc: object
    dev_ids: list[int]
    host_ids: list[int]
    to_host: bool
    on_done: Callable[[], None]
    host_storage: torch.Tensor
    layers_done: set[int] = field(default_factory=set)
    staged: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # cuda: (layer, pinned copy) to scatter
    events: list[torch.cuda.Event] = field(default_factory=list)  # cuda: one per layer, recorded after its copy

    @property
    def num_layers(self) -> int:
        return len(layer_indices(self.alloc))


class SwapPipeline:
    def __init__(self, mode: str = "sync") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown swap pipeline mode {mode!r}; choose one of {MODES}")
        if mode == "cuda" and not torch.cuda.is_available():
            raise ValueError("swap pipeline mode 'cuda' needs a CUDA device")
        self.mode = mode
        self.pending: list[Transfer] = []
        self.stream = torch.cuda.Stream() if mode == "cuda" else None
        self.seconds = 0.0  # wall time spent copying outside the forward (sync mode: all of it)

    @staticmethod
    def default_mode(device: torch.device) -> str:
        return "cuda" if device.type == "cuda" else "sync"

    # ------------------------------------------------------------------ issuing
    def submit(self, transfer: Transfer) -> None:
        if self.mode == "sync":
            t0 = time.perf_counter()
            for layer in range(transfer.num_layers):
                self._copy_layer(transfer, layer)
            transfer.on_done()
            self.seconds += time.perf_counter() - t0
            return
        self.pending.append(transfer)
        if self.mode == "cuda":
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                for layer in range(transfer.num_layers):
                    self._copy_layer(transfer, layer)
                    event = torch.cuda.Event()
                    event.record(self.stream)
                    transfer.events.append(event)

    # ------------------------------------------------------------------ the two rules
    def before_layer(self, layer_idx: int) -> None:
        """Called as the forward first touches `layer_idx`'s cache: its swap-ins must have landed."""
        for t in self.pending:
            if t.to_host or layer_idx not in layer_indices(t.alloc):
                continue
            local = layer_indices(t.alloc).index(layer_idx)
            if self.mode == "cuda":
                torch.cuda.current_stream().wait_event(t.events[local])
            else:
                self._copy_layer(t, local)

    def finish(self) -> None:
        """Complete every outstanding copy, then release the blocks they freed."""
        if not self.pending:
            return
        t0 = time.perf_counter()
        if self.mode == "cuda":
            self.stream.synchronize()
        for t in self.pending:
            for layer in range(t.num_layers):
                self._copy_layer(t, layer)
            for layer, pinned in t.staged:  # device->host copies have landed in pinned memory
                self._scatter_host(t, layer, pinned)
            t.on_done()
        self.pending.clear()
        if self.mode == "lazy":
            self.seconds += time.perf_counter() - t0

    def in_flight(self) -> list[Transfer]:
        return list(self.pending)

    # ------------------------------------------------------------------ copies
    @staticmethod
    def _ids(ids: list[int], device: torch.device) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=device)

    @staticmethod
    def _staging(t: Transfer, device: torch.device, pin: bool = False) -> torch.Tensor:
        """Contiguous rows of one layer's bytes for every block of the transfer."""
        span = t.host_storage.shape[1] // t.num_layers
        return torch.empty((len(t.dev_ids), span), dtype=torch.uint8, device=device, pin_memory=pin)

    def _scatter_host(self, t: Transfer, layer: int, rows: torch.Tensor) -> None:
        scatter_blocks(rows, t.host_storage, self._ids(t.host_ids, rows.device), layer, t.num_layers, backend="torch")

    def _copy_layer(self, t: Transfer, layer: int) -> None:
        """Copy one layer's keys and values of every block in the transfer (the kernels' gather/scatter), once."""
        if layer in t.layers_done:
            return
        t.layers_done.add(layer)
        if not t.dev_ids:
            return
        n = t.num_layers
        view = block_rows(t.alloc)
        d = self._ids(t.dev_ids, view.device)
        if t.to_host:
            rows = gather_blocks(view, d, self._staging(t, view.device), layer, n)
            if self.mode == "cuda":  # lands in pinned memory; scattered into the host pool in finish()
                pinned = self._staging(t, torch.device("cpu"), pin=True)
                pinned.copy_(rows, non_blocking=True)
                t.staged.append((layer, pinned))
            else:
                self._scatter_host(t, layer, rows.to(t.host_storage.device))
            return
        host_rows = self._staging(t, t.host_storage.device, pin=self.mode == "cuda")
        gather_blocks(t.host_storage, self._ids(t.host_ids, host_rows.device), host_rows, layer, n, backend="torch")
        scatter_blocks(host_rows.to(view.device, non_blocking=True), view, d, layer, n)
