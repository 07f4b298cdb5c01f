"""The pieces that keep tensor-parallel replicas identical: the driver's clock, tokens and tool calls.

See `distributed.py` for the design. Each piece replaces one local source of difference
between ranks with the driver's value, broadcast over transformers' gloo CPU group.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from patches.transformers_cb import DistributedHelper

from .runner import Chunk, ModelRunner
from .sampling import GREEDY, Sampler, sample_batch
from .tools import Answer, PendingCall, Tool, ToolCall


class ReplicatedClock:
    """The engine's clock: every rank reads the driver's time.

    Inside a step each read is one broadcast from the driver (every replica reads the clock
    at the same points, so the broadcasts pair up). Outside a step the driver reads its own
    clock (arrivals, idle waits) and a worker repeats the last shared time; `frozen(t)`
    replays an event (an arrival, a cancel) at the time the driver recorded for it.
    """

    def __init__(self, source: Callable[[], float], helper: DistributedHelper) -> None:
        self.source = source
        self.helper = helper
        self.last = source()
        self._synced = False
        self._frozen: float | None = None

    def __call__(self) -> float:
        if self._frozen is not None:
            return self._frozen
        if not self._synced:
            return self.source() if self.helper.is_tp_driver else self.last
        t = torch.tensor([self.source() if self.helper.is_tp_driver else 0.0], dtype=torch.float64)
        dist.broadcast(t, src=self.helper.tp_root_global_rank, group=self.helper.cpu_comm_group)
        self.last = float(t)
        return self.last

    @contextmanager
    def synced(self) -> Iterator[None]:
        self._synced = True
        try:
            yield
        finally:
            self._synced = False

    @contextmanager
    def frozen(self, t: float) -> Iterator[None]:
        self._frozen = t
        try:
            yield
        finally:
            self._frozen = None


def driver_only(call: ToolCall) -> str:
    raise RuntimeError("tool functions run on the driver rank only")


class ReplicaCall(PendingCall):
    """A worker's stand-in for a tool call the driver runs: its answer comes by broadcast."""

    def __init__(self, tool: Tool, call: ToolCall) -> None:
        super().__init__(tool.name, call.text, call.started_at, tool.expected_duration)
        self.future: Future[Any] = Future()  # never completes: the engine only hangs a wake-up on it

    def poll(self, now: float) -> Answer | None:
        return None

    def next_check(self, now: float) -> float | None:
        return None


class ReplicaToolExecutor:
    """Workers' executor: hands out stand-ins, runs nothing."""

    def submit(self, tool: Tool, call: ToolCall) -> ReplicaCall:
        return ReplicaCall(tool, call)

    def close(self) -> None:
        pass


class DriverSampledRunner:
    """Runs the forward on every rank, then hands back the driver's tokens as one-hot logits.

    The driver samples with the requests' real samplers (kept on the driver only); the
    engines then take an argmax of logits that are 0 at the driver's token and -inf
    elsewhere, so every replica appends exactly the driver's tokens.
    """

    def __init__(
        self,
        inner: ModelRunner,
        helper: DistributedHelper,
        samplers: dict[int, Sampler],
        verify: Callable[[list[Chunk]], None] | None,
    ) -> None:
        self.inner = inner
        self.helper = helper
        self.samplers = samplers
        self.verify = verify

    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        if self.verify is not None:
            self.verify(chunks)  # before the model's collectives: a diverged plan must not reach them
        logits = self.inner.forward(chunks)
        sampled = [c.request for c in chunks if c.sample]
        tokens = torch.zeros(len(sampled), dtype=torch.long)
        if self.helper.is_tp_driver:
            samplers = [self.samplers.get(r.request_id, GREEDY) for r in sampled]
            tokens = torch.tensor(sample_batch(samplers, [r.tokens for r in sampled], logits), dtype=torch.long)
        dist.broadcast(tokens, src=self.helper.tp_root_global_rank, group=self.helper.cpu_comm_group)
        one_hot = torch.full((len(sampled), logits.shape[-1]), float("-inf"))
        one_hot[torch.arange(len(sampled)), tokens] = 0.0
        return one_hot
