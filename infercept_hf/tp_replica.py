"""The pieces that keep tensor-parallel replicas identical: the driver's clock, step inputs and tool calls.

See `distributed.py` for the design. Each piece replaces one local source of difference
between ranks with the driver's value, broadcast over transformers' gloo CPU group.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch

from .patches.tp_group import TPGroup

from .batch_runner import ModelRunner
from .faults import RequestFault
from .paused_calls import PausedCalls
from .request import Chunk, Request
from .sampling import SamplingError
from .step_inputs import LocalInputs
from .tool_pool import ToolPool
from .tools import Answer, PendingCall, Tool, ToolCall


class ReplicatedClock:
    """The engine's clock: every rank reads the driver's time.

    A step's first read is the time the driver sent with the step; each later read inside it
    is one broadcast from the driver (every replica reads the clock at the same points, so the
    broadcasts pair up). Outside a step the driver reads its own clock (arrivals, idle waits)
    and a worker repeats the last shared time; `frozen(t)` replays an event (a cancel) at the
    time the driver recorded for it.
    """

    def __init__(self, source: Callable[[], float], group: TPGroup) -> None:
        self.source = source
        self.group = group
        self.last = source()
        self._synced = False
        self._start: float | None = None
        self._frozen: float | None = None

    def __call__(self) -> float:
        if self._frozen is not None:
            return self._frozen
        if not self._synced:
            return self.source() if self.group.is_driver else self.last
        if self._start is not None:
            self.last, self._start = self._start, None
            return self.last
        t = torch.tensor([self.source() if self.group.is_driver else 0.0], dtype=torch.float64)
        self.last = float(self.group.broadcast(t))
        return self.last

    @contextmanager
    def synced(self, start: float) -> Iterator[None]:
        """One step, whose first read is `start` (the driver's time, sent with the step)."""
        self._synced, self._start = True, start
        try:
            yield
        finally:
            self._synced, self._start = False, None

    @contextmanager
    def frozen(self, t: float) -> Iterator[None]:
        self._frozen = t
        try:
            yield
        finally:
            self._frozen = None


class StepMessage(NamedTuple):
    """What the driver broadcasts before each step, and to end a `run()` or to close."""

    command: str  # "step", "return" or "close"
    events: list[tuple]  # the adds and cancels since the last message, in the driver's order
    now: float | None = None  # a step's time: its first clock read on every rank
    answers: Sequence[tuple[int, Answer]] = ()  # (request id, answer) the driver polled at `now`


class ReplicatedInputs(LocalInputs):
    """A replica's step inputs, all the driver's: the step's time and the tool answers the driver
    polled at it (one message before the step), and the tokens the driver sampled (one broadcast).

    The driver's messages also carry `events()` (the adds and cancels the workers replay before
    the step: `TensorParallelEngine` keeps them); a worker takes each message with `receive()`
    and steps on the last one. `after_step` runs on every rank after each step that completes
    (the replica check)."""

    def __init__(self, group: TPGroup, clock: ReplicatedClock, events: Callable[[], list[tuple]],
                 after_step: Callable[[], None] | None = None) -> None:
        self.group = group
        self.clock = clock
        self.events = events
        self.after_step = after_step
        self._received: StepMessage | None = None
        self._answers: Sequence[tuple[int, Answer]] = ()

    def send(self, command: str, paused: PausedCalls | None = None) -> StepMessage:
        """On the driver: broadcast `command` with the events since the last message; a "step"
        carries its time and the `(request id, answer)` pairs of the tools that answered by it."""
        message = StepMessage(command, self.events())
        if command == "step":
            now = self.clock()
            message = message._replace(now=now, answers=[(req.request_id, answer)
                                                         for req, answer in super().answers(paused, now)])
        return self.group.broadcast_object(message)

    def receive(self) -> StepMessage:
        """On a worker: the driver's next message (a step's is kept for the step that follows)."""
        self._received = self.group.broadcast_object(None)
        return self._received

    @contextmanager
    def step(self, paused: PausedCalls) -> Iterator[None]:
        if self.group.is_driver:
            message = self.send("step", paused)
        else:
            message, self._received = self._received, None
            if message is None or message.command != "step":
                raise RuntimeError("on a worker rank call run(): it mirrors every step the driver takes")
        self._answers = message.answers
        with self.clock.synced(message.now):
            yield
        if self.after_step is not None:
            self.after_step()

    def run_ended(self) -> None:
        """The driver's `run()` returns: so do the workers'."""
        if self.group.is_driver:
            self.send("return")

    def answers(self, paused: PausedCalls, now: float) -> list[tuple[Request, Answer]]:
        answers, self._answers = self._answers, ()
        if not self.group.is_driver:
            paused.may_answer(now)  # take the calls due off the heap, as the driver's poll did
        return [(paused.request(rid), answer) for rid, answer in answers]

    def tokens(self, requests: Sequence[Request], logits: torch.Tensor) -> list[int | RequestFault]:
        """The driver samples (only its requests hold their real samplers); every rank appends its
        tokens, and fails the requests whose sampling failed on the driver (sent as -1)."""
        mine = super().tokens(requests, logits) if self.group.is_driver else [0] * len(requests)
        sent = torch.tensor([-1 if isinstance(t, RequestFault) else t for t in mine], dtype=torch.long)
        tokens = self.group.broadcast(sent).tolist()
        if self.group.is_driver:
            return mine
        return [SamplingError("sampling failed on the driver rank") if t < 0 else t for t in tokens]


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


class ReplicaToolPool(ToolPool):
    """A worker's tool pool: hands out stand-ins, runs nothing (the driver's pool runs the calls)."""

    def submit(self, tool: Tool, call: ToolCall) -> ReplicaCall:
        return ReplicaCall(tool, call)

    def close(self) -> None:
        pass


class VerifiedRunner:
    """Checks that the replicas agree on the batch before the forward: a diverged plan must not
    reach the model's collectives."""

    def __init__(self, inner: ModelRunner, verify: Callable[[list[Chunk]], None]) -> None:
        self.inner = inner
        self.verify = verify

    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        self.verify(chunks)
        return self.inner.forward(chunks)
