"""Where a step's outside inputs come from: the tool answers it resumes with and the tokens it appends.

On one process both are local: the pending calls that may have answered are polled, each request's
sampler draws its token. Under tensor parallelism every rank must take the driver's instead
(`tp_replica.ReplicatedInputs`); the engine asks this one object for both, and brackets each
step and the end of each `run()` with it (`step`, `run_ended`), so a replica is an ordinary
engine given another source, not an engine with its step overridden.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from .faults import RequestFault, describe
from .paused_calls import PausedCalls
from .request import Request
from .sampling import sample_batch
from .tools import Answer


class LocalInputs:
    """The inputs of a step on one process."""

    @contextmanager
    def step(self, paused: PausedCalls) -> Iterator[None]:
        """Around one step, before its clock is first read: where a source that is not local
        fixes the step's time and answers (`paused` are the requests that may resume in it)."""
        yield

    def run_ended(self) -> None:
        """`run()` is about to return with the engine still open: nothing to tell on one process."""

    def answers(self, paused: PausedCalls, now: float) -> list[tuple[Request, Answer]]:
        """The paused requests whose tool answered by `now`, with their answers, in pause order. A
        poll that raises is that request's failure: it comes back as an answer that fails it."""
        out = []
        for req in paused.may_answer(now):
            try:
                answer = req.pending.poll(now)
            except Exception as exc:  # noqa: BLE001 - one request's fault must not stop the others
                what = f"collecting the outcome of tool {req.pending.tool_name!r} failed: {describe(exc)}"
                answer = Answer("", error=what, fail=True)
            if answer is not None:
                out.append((req, answer))
            else:
                paused.still_waiting(req, now)
        return out

    def tokens(self, requests: Sequence[Request], logits: torch.Tensor) -> list[int | RequestFault]:
        """One token per row of `logits`, drawn by each request's sampler, or the fault that ends
        that request."""
        return sample_batch([r.sampler for r in requests], [r.tokens for r in requests], logits)
