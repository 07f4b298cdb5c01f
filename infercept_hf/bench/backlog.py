"""Whether a run kept up with its load: the requests in the system over the measurement window.

A load the system sustains leaves the number of requests in it (arrived and not yet finished:
waiting, running, or paused at a tool) level, whatever its latency; a load past its capacity
makes that number grow for as long as arrivals go on, by the rate at which arrivals outpace
completions (Little's law: a growing count at a steady arrival rate is a growing time in the
system). A latency mean averages over the onset of overload, and how much of it a window sees
depends on the window's length; the count's trend does not. The trend is the slope of a
least-squares line through the count sampled evenly over the window, read as a share of the
window's arrival rate: a run whose completions fall behind its arrivals by more than
`MAX_GROWTH_SHARE` did not sustain its load (`policy_runs.sustainable_rates`), unless the
growth over the whole window is within the count's own spread (`NOISE_SIGMAS` standard
deviations of a Poisson count of the window's mean): a handful of requests in the system
wanders by a few either way.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..outputs import RequestResult

SAMPLES = 200  # evenly spaced readings of the count over the window
# Completions may fall behind arrivals by at most this share of the arrival rate. A level
# count's fitted slope is noise: a few tenths of a percent of the arrival rate over the
# simulator's windows (hundreds of seconds, a hundred or more requests in the system).
MAX_GROWTH_SHARE = 0.05
NOISE_SIGMAS = 3.0


def in_system(results: Sequence[RequestResult], times: np.ndarray) -> np.ndarray:
    """The number of requests arrived by each of `times` and not finished by then (a request
    cancelled at the window's end counts as still in the system)."""
    arrivals = np.sort([r.arrival_time for r in results])
    leaves = np.sort([r.finish_time for r in results if r.finish_reason != "cancelled"])
    return np.searchsorted(arrivals, times, side="right") - np.searchsorted(leaves, times, side="right")


def backlog(results: Sequence[RequestResult], start: float, end: float) -> dict[str, float | None]:
    """The window's count of requests in the system: its mean (`backlog_mean`), its trend over
    the whole window in requests (`backlog_growth`: the fitted slope times the window's length)
    and as a share of the window's arrivals (`backlog_growth_share`: the slope over the arrival
    rate; None when nothing arrived in the window)."""
    if not end > start:
        raise ValueError(f"the window must have a length, got [{start}, {end}]")
    times = np.linspace(start, end, SAMPLES)
    count = in_system(results, times)
    growth = float(np.polyfit(times, count, 1)[0]) * (end - start)
    arrivals = sum(start <= r.arrival_time < end for r in results)
    return {
        "backlog_mean": float(count.mean()),
        "backlog_growth": growth,
        "backlog_growth_share": growth / arrivals if arrivals else None,
    }


def is_stable(run: Mapping[str, Any]) -> bool:
    """The run's count of requests in the system did not grow past `MAX_GROWTH_SHARE` of its
    arrivals, or by no more than its own noise (a run without the figures, measured over no
    window, is not judged)."""
    share = run.get("backlog_growth_share")
    if share is None or share <= MAX_GROWTH_SHARE:
        return True
    return run["backlog_growth"] <= NOISE_SIGMAS * math.sqrt(max(run["backlog_mean"], 1.0))
