"""How much longer will a paused request wait for its tool?

min-waste prices preserving a paused KV by the *remaining* pause, so it needs an estimate
every iteration. Three sources, best first:

- oracle (benchmarks only): the caller passes each call's true duration;
- a per-tool running estimate of observed durations, seeded by `Tool(expected_duration=...)`
  or a scripted pause;
- INFERCEPT's online rule when the tool tells us nothing (never seen, or this call has
  already outlived the estimate): a call that has run for `t` is expected to run about
  `t` more (heavy-tailed durations: the longer it has lasted, the longer it will last).
  The paper reports 93% of the oracle's performance with this rule alone.

With no information at all a call that just started gets `floor_s`: it will not return
before the next iteration at the earliest, and the estimate then grows with the elapsed
time, so short calls stay preserved and long ones soon become worth moving.

Besides the running mean, each tool keeps its recent durations (`duration_sketch.py`, bounded
memory), which the `predictive` policy reads as a distribution: quantiles to time a prefetch,
and the durations a pause may still resemble to weigh its waste. Whoever learns how long a
call took, the engine for the tools it runs or a server for calls its clients answer, reports
it with `observe(tool_name, seconds)`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from .duration_sketch import DEFAULT_CAPACITY, DurationSketch

DEFAULT_ALPHA = 0.2
DEFAULT_FLOOR_S = 1e-3


def _check_duration(name: str, seconds: float) -> float:
    """A duration given by the caller (a hint): refused when it makes no sense."""
    if not 0 <= seconds < float("inf"):  # also rejects NaN
        raise ValueError(f"{name} must be a finite number >= 0, got {seconds!r}")
    return float(seconds)


def _measured(name: str, seconds: float) -> float:
    """A duration measured as the difference of two clock reads: clamped at zero, since no
    clock is trusted to be monotonic (an NTP step back must not fail a request). A NaN or an
    infinity is still a bug upstream and is refused."""
    if not -float("inf") < seconds < float("inf"):
        raise ValueError(f"{name} must be a finite number, got {seconds!r}")
    return max(float(seconds), 0.0)


def _outlived(estimate: float | None, elapsed_s: float) -> bool:
    """The online rule applies: no estimate, or the call has lasted longer than it."""
    return estimate is None or elapsed_s > estimate


@dataclass
class _ToolEstimate:
    estimate_s: float
    sketch: DurationSketch
    observations: int = 0
    seed_s: float | None = None


class DurationEstimator:
    """Per-tool expected pause durations, safe to update from tool threads.

    The running estimate is an exponentially weighted mean with weight
    `max(alpha, 1/(k+1))` for the k-th observation (k = 1, 2, ...) after a seed and
    `max(alpha, 1/k)` without one: the plain mean of the first samples (a seed counts as
    one sample, so real measurements outvote a wrong hint quickly), then a mean over
    roughly the last `2/alpha` calls, which follows a tool whose latency drifts with load
    in O(1) memory.
    """

    def __init__(self, alpha: float = DEFAULT_ALPHA, floor_s: float = DEFAULT_FLOOR_S, oracle: bool = False,
                 sketch_capacity: int = DEFAULT_CAPACITY) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        DurationSketch(sketch_capacity)  # refuses a bad capacity here, not at the first observation
        self.alpha = alpha
        self.sketch_capacity = sketch_capacity
        self.floor_s = _check_duration("floor_s", floor_s)
        self.oracle = oracle
        self._tools: dict[str, _ToolEstimate] = {}
        self._lock = threading.Lock()

    def seed(self, tool: str, seconds: float) -> None:
        """A caller's expected duration. It stands in until the tool has been observed, and
        never overrides measurements."""
        seconds = _check_duration("seconds", seconds)
        with self._lock:
            entry = self._tools.get(tool)
            if entry is None:
                self._tools[tool] = _ToolEstimate(seconds, DurationSketch(self.sketch_capacity), seed_s=seconds)
            elif entry.observations == 0:
                entry.estimate_s = entry.seed_s = seconds

    def observe(self, tool: str, seconds: float) -> None:
        """A call of `tool` returned after `seconds` (a negative measurement counts as 0). The one
        entry point for measurements: the engine calls it for every answer it collects, and a server
        whose clients answer tool calls calls it with the time each answer took. Thread-safe."""
        seconds = _measured("seconds", seconds)
        with self._lock:
            entry = self._tools.get(tool)
            if entry is None:
                entry = self._tools[tool] = _ToolEstimate(seconds, DurationSketch(self.sketch_capacity))
            entry.sketch.add(seconds)
            entry.observations += 1
            samples = entry.observations + (entry.seed_s is not None)
            weight = max(self.alpha, 1 / samples)
            entry.estimate_s += weight * (seconds - entry.estimate_s)

    def estimate(self, tool: str) -> float | None:
        """Expected total duration of a call of `tool`, or None if nothing is known."""
        with self._lock:
            entry = self._tools.get(tool)
            return None if entry is None else entry.estimate_s

    def remaining(self, tool: str, elapsed_s: float, true_duration: float | None = None) -> float:
        """Expected rest of a pause that has lasted `elapsed_s`.

        Oracle mode: `true_duration - elapsed_s` (at least 0), and `true_duration` is required.
        Otherwise `max(estimate - elapsed_s, floor_s)` while the call is within its tool's
        estimate, and the online rule `max(elapsed_s, floor_s)` when there is no estimate or
        the call has outlived it (the estimate was evidently wrong for this call).
        """
        elapsed_s = _measured("elapsed_s", elapsed_s)
        if self.oracle:
            if true_duration is None:
                raise ValueError("oracle mode needs the call's true_duration")
            return max(_check_duration("true_duration", true_duration) - elapsed_s, 0.0)
        estimate = self.estimate(tool)
        if _outlived(estimate, elapsed_s):
            return max(elapsed_s, self.floor_s)
        return max(estimate - elapsed_s, self.floor_s)

    def past_estimate(self, tool: str, elapsed_s: float) -> bool:
        """Whether `remaining` prices a call of `tool` by the online rule (no estimate, or the call
        has outlived it): the remaining time then grows with the elapsed time, otherwise it
        shrinks, so paused calls of one tool can be ordered by their start times alone."""
        return _outlived(self.estimate(tool), _measured("elapsed_s", elapsed_s))

    def remaining_distribution(self, tool: str, elapsed_s: float, true_duration: float | None = None) -> list[float]:
        """The rest of a pause that has lasted `elapsed_s`, as equally likely outcomes, ascending:
        `d - elapsed_s` for each kept duration `d` of `tool` longer than `elapsed_s` (this call has
        outlived the others). Empty when no kept call lasted that long (callers fall back to
        `remaining`). Oracle mode: the one true outcome."""
        elapsed_s = _measured("elapsed_s", elapsed_s)
        if self.oracle:
            return [self.remaining(tool, elapsed_s, true_duration)]
        with self._lock:
            entry = self._tools.get(tool)
            longer = entry.sketch.outliving(elapsed_s) if entry is not None else []
        return [d - elapsed_s for d in longer]

    def duration_quantile(self, tool: str, q: float, true_duration: float | None = None) -> float | None:
        """The `q` quantile of `tool`'s kept durations (None: none observed yet); oracle mode: the
        true duration."""
        if self.oracle:
            return self.remaining(tool, 0.0, true_duration)
        with self._lock:
            entry = self._tools.get(tool)
            return entry.sketch.quantile(q) if entry is not None and len(entry.sketch) else None

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per tool: current estimate, observation count, seed and the kept durations' quartiles,
        for `engine.stats()`."""
        with self._lock:
            return {
                tool: {"estimate_s": e.estimate_s, "observations": e.observations, "seed_s": e.seed_s,
                       "quartiles_s": [e.sketch.quantile(q) for q in (0.25, 0.5, 0.75)] if len(e.sketch) else None}
                for tool, e in sorted(self._tools.items())
            }
