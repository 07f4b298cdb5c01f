"""Where a step's outside inputs come from: the tool answers it resumes with and the tokens it appends.

On one process both are local: each paused request's pending call is polled, each request's
sampler draws its token. Under tensor parallelism every rank must take the driver's instead
(`tp_replica.ReplicatedInputs`); the engine asks this one object for both, so a replica is an
ordinary engine given another source, not an engine with its step overridden.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .request import Request
from .sampling import sample_batch
from .tools import Answer


class LocalInputs:
    """The inputs of a step on one process."""

    def answers(self, paused: Sequence[Request], now: float) -> list[tuple[Request, Answer]]:
        """The paused requests whose tool answered by `now`, with their answers, in pause order."""
        return [(req, answer) for req in list(paused) if (answer := req.pending.poll(now)) is not None]

    def tokens(self, requests: Sequence[Request], logits: torch.Tensor) -> list[int]:
        """One token per row of `logits`, drawn by each request's sampler."""
        return sample_batch([r.sampler for r in requests], [r.tokens for r in requests], logits)
