"""Replay a trace against the engine, the simulator or a peer, and gather one run's figures.

Requests enter when the clock passes their arrival (`add_request(..., arrival_time=...)`)
and the loop calls `engine.step()`; when a step runs no forward (everything is paused or
not yet arrived) it waits for the next event: the next arrival or scripted tool return.
On the real clock that is a sleep; on the simulator's virtual clock, a jump.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..distributed import build_engine
from ..engine import InterceptEngine
from ..estimator import DurationEstimator
from ..outputs import RequestResult
from ..policy import CostModel
from ..scheduler import POLICIES
from ..tools import Scripted, ScriptedCall
from . import hf_peer
from .metrics import merge_engine_stats, summarize
from .presets import Preset
from .simulator import VirtualClock, preset_engine
from .workloads import TraceRequest, to_scripted

ORACLE = "oracle"
PEERS = ("hf-cb", "hf-generate")
ALL_POLICIES = (*POLICIES, ORACLE, *PEERS)
REAL_IDLE_POLL_S = 0.001  # real clock, nothing due: how long to sleep before looking again


@dataclass(frozen=True)
class Job:
    """A trace request made concrete: dummy prompt and answer ids, as the reference benchmark feeds."""

    request: TraceRequest
    prompt: list[int]
    scripted: Scripted
    max_new_tokens: int


@dataclass
class Run:
    """What one policy did with one trace."""

    results: list[RequestResult]
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


def _next_event(engine: InterceptEngine, arrival: float | None) -> float | None:
    deadlines = [r.pending.deadline for r in engine.scheduler.paused if isinstance(r.pending, ScriptedCall)]
    if arrival is not None:
        deadlines.append(arrival)
    return min(deadlines) if deadlines else None


def replay(
    engine: InterceptEngine,
    jobs: Sequence[Job],
    clock: Callable[[], float],
    wait_until: Callable[[float | None], None],
    progress: tqdm | None = None,
) -> tuple[list[RequestResult], float]:
    """Drive `engine` through `jobs`; returns the results and the run's length on `clock`."""
    t0 = clock()
    results: list[RequestResult] = []
    i = 0
    while i < len(jobs) or engine.has_unfinished():
        now = clock()
        while i < len(jobs) and t0 + jobs[i].request.arrival_s <= now:
            job = jobs[i]
            engine.add_request(
                job.prompt, max_new_tokens=job.max_new_tokens, interceptions=job.scripted, eos_token_id=[],
                arrival_time=t0 + job.request.arrival_s,
            )
            i += 1
        steps = engine.stats_.steps
        finished = engine.step()
        results.extend(finished)
        if progress is not None and finished:
            progress.update(len(finished))
        if engine.stats_.steps == steps:
            wait_until(_next_event(engine, t0 + jobs[i].request.arrival_s if i < len(jobs) else None))
    return results, clock() - t0


def _sleep_until(t: float | None) -> None:
    """Real clock: sleep toward the next event, at most 50 ms at a time (tools may answer early)."""
    delay = REAL_IDLE_POLL_S if t is None else t - time.perf_counter()
    time.sleep(min(max(delay, 0.0), 0.05))


def virtual_wait(clock: VirtualClock) -> Callable[[float | None], None]:
    """Virtual clock: jump to the next event; with none ahead nothing can ever run again."""
    def wait_until(t: float | None) -> None:
        if t is None or t <= clock():
            raise RuntimeError(f"simulation stalled at t={clock():.3f}s: nothing runnable and no event ahead")
        clock.advance_to(t)

    return wait_until


def _use_oracle(engine: InterceptEngine) -> None:
    """min-waste told every pause's true duration (the scheduler passes the scripted pause to it)."""
    engine.estimator = engine.scheduler.estimator = DurationEstimator(oracle=True)


def _engine_policy(policy: str) -> str:
    return "min-waste" if policy == ORACLE else policy


def _finish_engine_run(engine: InterceptEngine, results: list[RequestResult], duration: float) -> Run:
    stats = engine.stats()
    timeline = list(engine.stats_.timeline)
    engine.cache.check_integrity()
    engine.close()
    return Run(sorted(results, key=lambda r: r.request_id), duration, stats, timeline)


def run_real(model: torch.nn.Module, policy: str, jobs: Sequence[Job], settings: EngineSettings,
             progress: tqdm | None = None) -> Run | None:
    """One policy on the real model in real time (peers included). None on a tensor-parallel
    worker rank: the driver (rank 0) holds the results."""
    if policy == "hf-cb":
        return Run(*hf_peer.run_hf_cb(model, jobs, settings, progress))
    if policy == "hf-generate":
        return Run(*hf_peer.run_hf_generate(model, jobs, progress))
    # under torchrun a TensorParallelEngine on every rank: the driver replays, the others mirror it
    engine = build_engine(
        model, policy=_engine_policy(policy), num_blocks=settings.num_blocks, block_size=settings.block_size,
        host_pool_bytes=settings.host_pool_bytes, max_batch_tokens=settings.max_batch_tokens,
        cost_model=settings.cost_model, clock=time.perf_counter,
    )
    if policy == ORACLE:
        _use_oracle(engine)
    if not getattr(engine, "is_driver", True):
        engine.run()  # mirrors every step until the driver closes its engine
        engine.cache.check_integrity()
        return None
    results, duration = replay(engine, jobs, time.perf_counter, _sleep_until, progress)
    return _finish_engine_run(engine, results, duration)


def run_simulated(preset: Preset, model: torch.nn.Module, policy: str, jobs: Sequence[Job],
                  progress: tqdm | None = None) -> Run:
    """One engine policy on the preset's simulated hardware (no peers: they cannot be simulated)."""
    if policy in PEERS:
        raise ValueError(f"{policy} runs a real model and cannot be simulated")
    engine, clock = preset_engine(preset, _engine_policy(policy), model)
    if policy == ORACLE:
        _use_oracle(engine)
    results, duration = replay(engine, jobs, clock, virtual_wait(clock), progress)
    if not engine.cache.is_empty():
        raise AssertionError("blocks left in the pools after every request finished")
    return _finish_engine_run(engine, results, duration)


def summarize_run(policy: str, qps: float, run: Run, slo: Mapping[str, float] | None = None,
                  **labels: Any) -> dict[str, Any]:
    """One entry of results.json: the metrics module's figures plus the run's labels."""
    summary = merge_engine_stats(summarize(run.results, run.duration_s, slo), run.stats)
    return {"policy": policy, "qps": qps, **labels, **summary}


def sustainable_rates(runs: Sequence[Mapping[str, Any]], slo_s: float,
                      metric: str = "normalized_latency_mean_s") -> dict[str, float | None]:
    """Per policy, the highest request rate whose `metric` stays within `slo_s`.

    Rates are taken in increasing order up to the first one that breaks the SLO; between the
    last passing and the first failing rate the crossing is interpolated linearly. None when
    even the lowest rate fails.
    """
    out: dict[str, float | None] = {}
    for policy in dict.fromkeys(str(r["policy"]) for r in runs):
        points = sorted((r["qps"], r.get(metric)) for r in runs if str(r["policy"]) == policy)
        best: float | None = None
        last: tuple[float, float] | None = None
        for qps, value in points:
            if value is not None and value <= slo_s:
                best, last = qps, (qps, value)
                continue
            if last is not None and value is not None:
                (q0, v0), (q1, v1) = last, (qps, value)
                best = q0 + (q1 - q0) * (slo_s - v0) / (v1 - v0)
            break
        out[policy] = best
    return out
