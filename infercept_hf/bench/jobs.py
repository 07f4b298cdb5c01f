"""What the replay loops and the peers share, and nothing else: jobs, runs, settings, contenders.

A leaf module (it imports no other benchmark module that runs anything), so `policy_runs.py` and
`hf_peer.py` both build on it without importing each other.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..outputs import RequestResult
from ..policy import CostModel
from ..policy import POLICIES
from ..tools import Scripted
from .workloads import TraceRequest, to_scripted

# contenders told every pause's true duration, by the engine policy they run
ORACLES = {"oracle": "min-waste", "predictive-oracle": "predictive"}
PEERS = ("hf-cb", "hf-generate")
ALL_POLICIES = (*POLICIES, *ORACLES, *PEERS)


@dataclass(frozen=True)
class Job:
    """A trace request made concrete: dummy prompt and answer ids, as the reference benchmark feeds."""

    request: TraceRequest
    prompt: list[int]
    scripted: Scripted
    max_new_tokens: int


@dataclass
class Run:
    """What one contender did with one trace; `start` is the clock reading at the trace's time 0,
    so the measurement window (relative to the trace) can be placed on the results' clock."""

    results: list[RequestResult]
    start: float
    duration_s: float
    stats: dict[str, Any]
    timeline: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class EngineSettings:
    """Pool and batch sizes shared by the engine and the hf-cb peer, so they compete on equal memory."""

    num_blocks: int | None = None
    block_size: int = 16
    max_batch_tokens: int = 256
    host_pool_bytes: int | None = None
    cost_model: CostModel | None = None


def make_jobs(trace: Sequence[TraceRequest], vocab_size: int, seed: int, min_token_id: int = 1) -> list[Job]:
    """Jobs in arrival order."""
    jobs = [Job(req, *to_scripted(req, vocab_size, seed, min_token_id)) for req in trace]
    return sorted(jobs, key=lambda j: (j.request.arrival_s, j.request.request_id))


def check_policies(names: Sequence[str]) -> list[str]:
    bad = [n for n in names if n not in ALL_POLICIES]
    if bad:
        raise ValueError(f"unknown policies {bad}; choose from {', '.join(ALL_POLICIES)}")
    return list(names)
