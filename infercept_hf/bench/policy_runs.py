"""Replay a trace against the engine, the simulator or a peer, and gather one run's figures.

Requests enter when the clock passes their arrival (`add_request(..., arrival_time=...)`)
and the loop calls `engine.step()`; when a step runs no forward (everything is paused or
not yet arrived) it waits for the next event: the next arrival or scripted tool return.
On the real clock that is a sleep; on the simulator's virtual clock, a jump.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..distributed import build_engine
from ..engine import InterceptEngine
from ..estimator import DurationEstimator
from ..outputs import RequestResult
from ..predictive import PredictorSettings
from . import hf_peer
from .jobs import ORACLES, PEERS, EngineSettings, Job, Run
from .backlog import is_stable
from .metrics import merge_engine_stats, summarize
from .presets import Preset
from .simulator import VirtualClock, preset_engine

REAL_IDLE_POLL_S = 0.001  # real clock, nothing due: how long to sleep before looking again


def _next_event(engine: InterceptEngine, arrival: float | None) -> float | None:
    due = [t for t in (engine.next_answer_due(), arrival) if t is not None]
    return min(due) if due else None


def replay(
    engine: InterceptEngine,
    jobs: Sequence[Job],
    clock: Callable[[], float],
    wait_until: Callable[[float | None], None],
    progress: tqdm | None = None,
    until_s: float | None = None,
) -> tuple[list[RequestResult], float, float]:
    """Drive `engine` through `jobs`; returns the results, the clock at the trace's time 0 and
    the run's length. With `until_s` the run stops that long after time 0 (the end of the
    measurement window): requests still in flight are cancelled, and their results, with the
    tokens they had by then, come back with the rest."""
    t0 = clock()
    results: list[RequestResult] = []
    added: list[int] = []
    i = 0
    while i < len(jobs) or engine.has_unfinished():
        now = clock()
        if until_s is not None and now >= t0 + until_s:
            for rid in added:
                engine.cancel(rid)
            results.extend(engine.step())
            break
        while i < len(jobs) and t0 + jobs[i].request.arrival_s <= now:
            job = jobs[i]
            added.append(engine.add_request(
                job.prompt, max_new_tokens=job.max_new_tokens, interceptions=job.scripted, eos_token_id=[],
                arrival_time=t0 + job.request.arrival_s,
            ))
            i += 1
        steps = engine.steps
        finished = engine.step()
        results.extend(finished)
        if progress is not None and finished:
            progress.update(len(finished))
        if engine.steps == steps:
            upcoming = t0 + jobs[i].request.arrival_s if i < len(jobs) else None
            if until_s is not None:
                upcoming = min(t for t in (upcoming, t0 + until_s) if t is not None)
            wait_until(_next_event(engine, upcoming))
    return results, t0, clock() - t0


def sleep_until(t: float | None) -> None:
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


def _oracle_estimator(policy: str) -> DurationEstimator | None:
    """For an oracle: its engine policy told every pause's true duration (the scheduler passes the
    scripted pause to it)."""
    return DurationEstimator(oracle=True) if policy in ORACLES else None


def _engine_policy(policy: str) -> str:
    return ORACLES.get(policy, policy)


def _predictor_option(policy: str, predictor: PredictorSettings | None) -> dict[str, PredictorSettings]:
    """The engine keyword for `predictor`, for the contenders it tunes (the others refuse it)."""
    return {"predictor_settings": predictor} if predictor is not None and _engine_policy(policy) == "predictive" else {}


def _finish_engine_run(engine: InterceptEngine, results: list[RequestResult], start: float, duration: float) -> Run:
    stats = engine.stats()
    timeline = engine.timeline()
    engine.cache.check_integrity()
    if not engine.cache.is_empty():  # every request finished or was cancelled: nothing may hold a block
        raise AssertionError("blocks left in the pools after the run")
    engine.close()
    return Run(sorted(results, key=lambda r: r.request_id), start, duration, stats, timeline)


def run_real(model: torch.nn.Module, policy: str, jobs: Sequence[Job], settings: EngineSettings,
             progress: tqdm | None = None, until_s: float | None = None,
             predictor: PredictorSettings | None = None) -> Run | None:
    """One policy on the real model in real time (peers included), the engine stopped `until_s`
    after time 0 if given (the peers run every request out: their results are clipped to the
    window after). `predictor` tunes the predictive contenders. None on a tensor-parallel worker
    rank: the driver (rank 0) holds the results."""
    if policy == "hf-cb":
        return Run(*hf_peer.run_hf_cb(model, jobs, settings, progress))
    if policy == "hf-generate":
        return Run(*hf_peer.run_hf_generate(model, jobs, progress))
    oracle = {"estimator": _oracle_estimator(policy)} if policy in ORACLES else {}
    # under torchrun a TensorParallelEngine on every rank: the driver replays, the others mirror it
    engine = build_engine(
        model, policy=_engine_policy(policy), num_blocks=settings.num_blocks, block_size=settings.block_size,
        host_pool_bytes=settings.host_pool_bytes, max_batch_tokens=settings.max_batch_tokens,
        cost_model=settings.cost_model, clock=time.perf_counter, **oracle, **_predictor_option(policy, predictor),
    )
    if not getattr(engine, "is_driver", True):
        engine.run()  # mirrors every step until the driver closes its engine
        return None
    results, start, duration = replay(engine, jobs, time.perf_counter, sleep_until, progress, until_s)
    return _finish_engine_run(engine, results, start, duration)


def run_simulated(preset: Preset, model: torch.nn.Module, policy: str, jobs: Sequence[Job],
                  progress: tqdm | None = None, until_s: float | None = None,
                  predictor: PredictorSettings | None = None) -> Run:
    """One engine policy on the preset's simulated hardware (no peers: they cannot be simulated),
    stopped `until_s` after time 0 if given; `predictor` tunes the predictive contenders."""
    if policy in PEERS:
        raise ValueError(f"{policy} runs a real model and cannot be simulated")
    engine, clock = preset_engine(preset, _engine_policy(policy), model, _oracle_estimator(policy),
                                  **_predictor_option(policy, predictor))
    results, start, duration = replay(engine, jobs, clock, virtual_wait(clock), progress, until_s)
    return _finish_engine_run(engine, results, start, duration)


def summarize_run(policy: str, qps: float, run: Run, slo: Mapping[str, float] | None = None,
                  window: tuple[float, float] | None = None, **labels: Any) -> dict[str, Any]:
    """One entry of results.json: the metrics module's figures plus the run's labels. `window`:
    the measurement window in seconds from the trace's time 0 (None: the whole run)."""
    absolute = None if window is None else (run.start + window[0], run.start + window[1])
    summary = merge_engine_stats(summarize(run.results, run.duration_s, slo, absolute), run.stats)
    return {"policy": policy, "qps": qps, **labels, **summary}


LATE = {"normalized_latency_mean_s": "normalized_latency_late_mean_s"}  # a metric's figure over the late window


def _worst(value: float | None, late: float | None) -> float | None:
    """The larger of a latency over the window and over its second half (None if either is unknown
    but the other is: a half with no request says nothing)."""
    return value if late is None else late if value is None else max(value, late)


@dataclass(frozen=True)
class Sustainable:
    """A policy's sustainable rate: `rate` (None: even the lowest rate fails) and a note:
    "interpolated" (between the last passing and the first failing rate), "unstable above" (the
    first failing rate's backlog grows, so its latency depends on how long the window ran and
    says nothing about where the SLO is crossed: the last passing rate is given as measured),
    "not broken" (every rate measured passes: the rate is at least the highest), "non-monotonic"
    (latency falls somewhere among the stable runs as the rate rises: noise or a burst; the last
    passing rate before the first failure is given), "transient" (every run's window was shorter than its warm-up:
    the trace is too short to tell) or "" (no passing rate).
    Runs marked `transient` are left out. A run passes when the SLO holds over its window and
    over the window's second half (a latency still climbing at the end is not sustained) and
    its count of requests in the system does not grow (`backlog.is_stable`)."""

    rate: float | None
    note: str


def _points(runs: Sequence[Mapping[str, Any]], policy: str, slo_s: float,
            metric: str) -> list[tuple[float, float | None, bool, bool]]:
    """(rate, worst latency of window and second half, stable, passes) of the policy's steady runs, by rate."""
    points = []
    for r in runs:
        if str(r["policy"]) == policy and not r.get("transient"):
            value, stable = _worst(r.get(metric), r.get(LATE.get(metric, ""))), is_stable(r)
            points.append((r["qps"], value, stable, stable and value is not None and value <= slo_s))
    return sorted(points)


def sustainable_rates(runs: Sequence[Mapping[str, Any]], slo_s: float,
                      metric: str = "normalized_latency_mean_s") -> dict[str, Sustainable]:
    """Per policy, the highest request rate whose `metric` stays within `slo_s` at a stable
    backlog (see `Sustainable`)."""
    out: dict[str, Sustainable] = {}
    for policy in dict.fromkeys(str(r["policy"]) for r in runs):
        points = _points(runs, policy, slo_s, metric)
        if not points:
            out[policy] = Sustainable(None, "transient")
            continue
        # judged among stable runs: an unstable run's latency only says how long its window ran
        values = [math.inf if v is None else v for _, v, stable, _ in points if stable]
        monotonic = all(a <= b for a, b in zip(values, values[1:]))
        best: float | None = None
        last: tuple[float, float] | None = None
        note = "not broken"
        for qps, value, stable, passed in points:
            if passed:
                best, last = qps, (qps, value)
                continue
            note = ("non-monotonic" if last is not None and not monotonic
                    else "unstable above" if last is not None and not stable else "")
            if monotonic and last is not None and value is not None and stable:
                (q0, v0), (q1, v1) = last, (qps, value)
                best, note = q0 + (q1 - q0) * (slo_s - v0) / (v1 - v0), "interpolated"
            break
        if not monotonic and note != "not broken":  # the crossing is in question, not a curve below the SLO
            note = "non-monotonic"
        out[policy] = Sustainable(best, note)
    return out


def refine_rate(runs: Sequence[Mapping[str, Any]], policy: str, slo_s: float,
                metric: str = "normalized_latency_mean_s") -> float | None:
    """The rate halfway between the policy's last passing rate and the first failing one above
    it (the next point of a finer grid near the crossing), or None when there is no such pair."""
    points = _points(runs, policy, slo_s, metric)
    for (q0, _, _, passed0), (q1, _, _, passed1) in zip(points, points[1:]):
        if passed0 and not passed1:
            return round((q0 + q1) / 2, 4)
        if not passed0:
            return None
    return None
