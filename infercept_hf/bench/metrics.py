"""Serving metrics of one run: the paper's, vLLM's under vLLM's names, and interception-specific ones.

Time inside tools is not the engine's to answer for: the paper's normalized latency removes
it, inter-token gaps that span a pause are left out of ITL, and TPOT/E2EL come twice, as vLLM
computes them (`*_tpot_ms`, `*_e2el_ms`, tool time included, as a client would see it) and
with tool time removed (`*_tpot_excl_tool_ms`, `*_e2el_excl_tool_ms`). Goodput judges the
tool-excluded figures. Statistics of an empty set are None (vLLM reports 0, which reads as a
perfect latency). Definitions: docs/WORKLOADS.md.

Steady state, as the INFERCEPT reference measures it: given a window `(start, end)`, rates
count what happened inside it, and latencies cover the requests that arrived inside it,
those still in flight at its end included, judged on what they had by then (the reference's
normalized latency of an unfinished request: time so far, less tool time so far, per token
so far). A request with no token by the end is left out, as the reference leaves it out.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..outputs import RequestResult
from .backlog import backlog

COMPLETED = ("length", "stop")
IN_FLIGHT = "in-flight"  # the finish reason of a request clipped at the end of the window
DEFAULT_SLO: dict[str, float] = {"ttft_ms": 2000.0, "tpot_ms": 100.0}
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")
ENGINE_KEYS = ("recomputed_tokens", "swapped_bytes", "swap_gbps", "strategies", "preemptions", "moves",
               "prefix_hit_tokens", "predictive")
WASTE_CAUSES = ("preserve", "swap", "discard")
RUN_KEYS = (
    "policy", "qps", "completed_rps", "normalized_latency_mean_s", "normalized_latency_p99_s",
    "throughput_tok_s", "recompute_share", "waste_by_cause",
)


def _stat(values: Sequence[float], q: float | str, scale: float = 1.0) -> float | None:
    """Mean (`q="mean"`) or percentile `q` (linear interpolation, as numpy and vLLM), times `scale`."""
    if not values:
        return None
    return float((np.mean(values) if q == "mean" else np.percentile(values, q)) * scale)


def _spread(name: str, values: Sequence[float], scale: float = 1000.0) -> dict[str, float | None]:
    return {
        f"mean_{name}": _stat(values, "mean", scale),
        f"median_{name}": _stat(values, 50, scale),
        f"p99_{name}": _stat(values, 99, scale),
    }


def tool_excluded_itls(result: RequestResult) -> list[float]:
    """Gaps between consecutive generated tokens, leaving out each gap in which a pause began.

    The engine stamps `paused_at` with the time of the token that triggered the call, so the
    gap from that token to the next one holds the tool's time and the resumption, which are
    reported as tool time and resume latency instead.
    """
    starts = sorted(rec.paused_at for rec in result.interceptions)
    times = result.token_times
    gaps = []
    k = 0
    for prev, cur in zip(times, times[1:]):
        while k < len(starts) and starts[k] < prev:
            k += 1
        if k < len(starts) and starts[k] < cur:
            continue
        gaps.append(cur - prev)
    return gaps


def _tpot(result: RequestResult, exclude_tool: bool) -> float | None:
    """vLLM's time per output token after the first; None for a single-token output."""
    if result.first_token_time is None or result.num_generated < 2:
        return None
    span = result.finish_time - result.first_token_time - (result.tool_seconds if exclude_tool else 0.0)
    return span / (result.num_generated - 1)


def _good(ttft_s: float, tpot_excl_s: float | None, e2el_excl_s: float, slo: Mapping[str, float]) -> bool:
    """Every SLO holds on one request's reported figures (vLLM's rule: a single-token output,
    `tpot_excl_s` None, counts as TPOT 0)."""
    measured = {"ttft_ms": ttft_s * 1000.0, "tpot_ms": (tpot_excl_s or 0.0) * 1000.0, "e2el_ms": e2el_excl_s * 1000.0}
    return all(measured[k] <= limit for k, limit in slo.items())


def clip_to_window(results: Sequence[RequestResult], start: float, end: float) -> list[RequestResult]:
    """The requests that arrived in `[start, end)`, as they stood at `end`: one finished by then
    is kept whole; one still running is cut there (its tokens, pauses and time up to `end`,
    finish reason `IN_FLIGHT`); one with no token by then is dropped."""
    out = []
    for r in results:
        if not start <= r.arrival_time < end:
            continue
        if r.finish_time <= end and r.finish_reason != "cancelled":
            out.append(r)
            continue
        times = [t for t in r.token_times if t <= end]
        if not times:
            continue
        records = [
            rec._replace(returned_at=min(end, rec.returned_at if rec.returned_at is not None else end),
                         resumed_at=rec.resumed_at if rec.resumed_at is not None and rec.resumed_at <= end else None)
            for rec in r.interceptions if rec.paused_at < end
        ]
        out.append(r._replace(num_generated=len(times), finish_reason=IN_FLIGHT, error=None, finish_time=end,
                              token_times=times, interceptions=records))
    return out


def summarize(
    results: Sequence[RequestResult], duration_s: float, slo: Mapping[str, float] | None = None,
    window: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Metrics of one run: over its whole length `duration_s`, or over `window` (start and end
    on the results' clock; `duration_s` is then ignored)."""
    everything = results
    if window is not None:
        start, end = window
        duration_s = end - start
        results = clip_to_window(results, start, end)
    if not duration_s > 0:
        raise ValueError(f"the measured duration must be > 0, got {duration_s}")
    slo = dict(DEFAULT_SLO if slo is None else slo)
    bad = sorted(set(slo) - set(SLO_KEYS))
    if bad:
        raise ValueError(f"unknown SLO keys {bad}; allowed: {list(SLO_KEYS)}")
    done = [r for r in results if r.finish_reason in COMPLETED and r.first_token_time is not None]
    reasons = [r.finish_reason for r in results]
    ttfts = [r.first_token_time - r.arrival_time for r in done]
    e2els = [r.finish_time - r.arrival_time for r in done]
    e2els_excl = [e - r.tool_seconds for e, r in zip(e2els, done)]
    tpots = [t for t in (_tpot(r, exclude_tool=False) for r in done) if t is not None]
    tpots_excl_each = [_tpot(r, exclude_tool=True) for r in done]  # None for a single-token output
    tpots_excl = [t for t in tpots_excl_each if t is not None]
    itls = [gap for r in done for gap in tool_excluded_itls(r)]
    in_flight = [r for r in results if r.finish_reason == IN_FLIGHT]
    normalized = [r.normalized_latency for r in (*done, *in_flight)]
    records = [rec for r in results for rec in r.interceptions]
    resumes = [
        rec.resumed_at - rec.returned_at
        for rec in records
        if rec.resumed_at is not None and rec.returned_at is not None
    ]
    output_tokens = sum(r.num_generated for r in done)
    if window is None:
        completed_rps = len(done) / duration_s
        generated = sum(r.num_generated for r in results)
    else:  # whatever finished or was generated inside the window, whenever it arrived
        finished = [r for r in everything if r.finish_reason in COMPLETED and start <= r.finish_time <= end]
        completed_rps = len(finished) / duration_s
        generated = sum(start <= t <= end for r in everything for t in r.token_times)
    out: dict[str, Any] = {
        "duration_s": duration_s,
        "requests": len(results),
        "completed": len(done),
        "in_flight": len(in_flight),
        "failed": reasons.count("error"),
        "cancelled": reasons.count("cancelled"),
        "completed_rps": completed_rps,
        "normalized_latency_mean_s": _stat(normalized, "mean"),
        "normalized_latency_p99_s": _stat(normalized, 99),
        # the window's second half alone: a load whose latency is still climbing there is not
        # sustained, however good the mean over the whole window looks
        "normalized_latency_late_mean_s": None if window is None else _stat(
            [r.normalized_latency for r in (*done, *in_flight) if r.arrival_time >= (start + end) / 2], "mean"),
        "throughput_tok_s": generated / duration_s,
        "request_throughput": completed_rps,  # vLLM's name for it
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (output_tokens + sum(r.prompt_len for r in done)) / duration_s,
        "total_output_tokens": output_tokens,
        "goodput": sum(_good(*figures, slo) for figures in zip(ttfts, tpots_excl_each, e2els_excl)) / duration_s,
        "slo": slo,
        "interceptions": len(records),
        "tool_s_total": sum(rec.tool_seconds for rec in records),
    }
    if window is not None:  # whether the window's load was sustained (bench/backlog.py)
        out.update(backlog(everything, start, end))
    out.update(_spread("ttft_ms", ttfts))
    out.update(_spread("tpot_ms", tpots))
    out.update(_spread("tpot_excl_tool_ms", tpots_excl))
    out.update(_spread("itl_ms", itls))
    out.update(_spread("e2el_ms", e2els))
    out.update(_spread("e2el_excl_tool_ms", e2els_excl))
    out.update(_spread("resume_latency_ms", resumes))
    return out


def merge_engine_stats(summary: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, Any]:
    """The summary plus the engine-side figures of `InterceptEngine.stats()` (or a peer's) that it holds.

    `recompute_share` is by tokens for every contender (tokens computed again / all tokens
    the forwards processed); the engine, which times its forwards per chunk, also reports the
    share of forward seconds as `recompute_time_share`.
    """
    out = dict(summary)
    if stats.get("forward_tokens") and "recomputed_tokens" in stats:
        out["recompute_share"] = stats["recomputed_tokens"] / stats["forward_tokens"]
    if "recompute_share" in stats:  # the engine's own figure is by forward time
        out["recompute_time_share"] = stats["recompute_share"]
    if "waste_by_cause" in stats:
        waste = stats["waste_by_cause"]
        out["waste_by_cause"] = {cause: float(waste.get(cause, 0.0)) for cause in WASTE_CAUSES}
    for key in ENGINE_KEYS:
        if key in stats:
            out[key] = stats[key]
    return out


def results_json(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """`{"runs": [...]}` with every run carrying the keys plots and reports read (None when unknown)."""
    out = []
    for i, run in enumerate(runs):
        for key in ("policy", "qps"):
            if key not in run:
                raise ValueError(f"run {i} has no {key!r}; the runner must set it")
        out.append({**{key: None for key in RUN_KEYS}, **run})
    return {"runs": out}
