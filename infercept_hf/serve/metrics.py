"""`GET /metrics`: the server's counters and the engine's state in Prometheus' text format.

Counters and histograms are kept here as requests end; gauges (requests by state, KV blocks,
tokens recomputed and swapped) are read from `InterceptEngine.stats()` at scrape time, so
each figure has one owner.
"""
from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from typing import Any

PREFIX = "infercept"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        return [*out, f"{name}_sum {self.sum}", f"{name}_count {cumulative}"]


class ServerMetrics:
    """What the server counts itself: requests by outcome, prompt tokens cached or computed, latencies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)

    def request_done(self, endpoint: str, outcome: str) -> None:
        with self._lock:
            self.requests[endpoint, outcome] = self.requests.get((endpoint, outcome), 0) + 1

    def turn_done(self, prompt_tokens: int, cached_tokens: int, ttft: float | None,
                  token_times: Sequence[float]) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.cached_tokens += cached_tokens
            if ttft is not None:
                self.ttft.observe(ttft)
            for a, b in zip(token_times, token_times[1:]):
                self.itl.observe(b - a)

    def render(self, stats: dict[str, Any], held_sessions: int, kv_bytes_per_token: int) -> str:
        p = PREFIX
        lines = [f"# TYPE {p}_requests_total counter"]
        with self._lock:
            lines += [f'{p}_requests_total{{endpoint="{e}",outcome="{o}"}} {n}'
                      for (e, o), n in sorted(self.requests.items())]
            lines += [
                f"# TYPE {p}_prompt_tokens_total counter", f"{p}_prompt_tokens_total {self.prompt_tokens}",
                f"# TYPE {p}_cached_tokens_total counter", f"{p}_cached_tokens_total {self.cached_tokens}",
                f"# TYPE {p}_time_to_first_token_seconds histogram",
                *self.ttft.lines(f"{p}_time_to_first_token_seconds"),
                f"# TYPE {p}_inter_token_latency_seconds histogram",
                *self.itl.lines(f"{p}_inter_token_latency_seconds"),
            ]
        lines += [f"# TYPE {p}_requests gauge"]
        lines += [f'{p}_requests{{state="{s}"}} {stats[s]}' for s in ("running", "paused", "waiting")]
        lines += [
            f"# TYPE {p}_held_sessions gauge", f"{p}_held_sessions {held_sessions}",
            f"# TYPE {p}_kv_blocks_in_use gauge",
            f'{p}_kv_blocks_in_use{{pool="device"}} {stats["device_blocks_used"]}',
            f'{p}_kv_blocks_in_use{{pool="host"}} {stats["host_blocks_used"]}',
            f"# TYPE {p}_kv_blocks gauge",
            f'{p}_kv_blocks{{pool="device"}} {stats["device_blocks_total"]}',
            f'{p}_kv_blocks{{pool="host"}} {stats["host_blocks_total"]}',
            f"# TYPE {p}_recomputed_tokens_total counter", f"{p}_recomputed_tokens_total {stats['recomputed_tokens']}",
            f"# TYPE {p}_swapped_tokens_total counter",
            f"{p}_swapped_tokens_total {stats['swapped_bytes'] // max(1, kv_bytes_per_token)}",
        ]
        return "\n".join(lines) + "\n"
