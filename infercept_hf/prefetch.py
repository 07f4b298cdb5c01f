"""Bringing a swapped request's KV back before its tool answers, and what came of it.

When a call's answer arrives and its KV lies in the host pool, the request waits for the copy
back (and a copy larger than a forward pass stalls the batch). `predictive` starts that copy
ahead of the predicted return instead: once the call has run for as long as the
`prefetch_quantile` of its tool's durations, less the copy's own time and one iteration (as
far apart as recent iterations were: an iteration lasts longer than its forward), so that in
about `1 - prefetch_quantile` of returns the KV is back in time.

A prefetch is bounded three ways: it only takes device blocks nobody queued wants (it never
evicts), prefetched KV holds at most `max_held_fraction` of the device pool, and a call that
outlives the `overdue_quantile` of its tool gives its pin up (min-waste may move it again).
The reserve is small: a tool whose durations spread wide has its KV back long before most
answers, and in steady state those blocks are soon wanted by arrivals, so a larger reserve
pushes other paused KV out and costs more latency than the copies save (docs/BENCHMARK.md).
Outcomes, per return of a request whose KV had been in the host pool:
- on_time: every block was back on the device when the answer arrived;
- late: some still lay in the host pool (no prefetch yet, or it had been undone);
- late_hidden: of the late ones, those that resumed in the very iteration that collected the
  answer, with that iteration's swap-ins inside its swap budget: the copy back ran layer by
  layer behind the forward (`offload.py`), so the request ran no later than had its KV been
  on the device (a late return not admitted at once, or whose iteration's copies outlasted its
  forward, is not hidden);
- wasted: a prefetched KV left the device again before the answer (evicted or unpinned
  and swapped out), or its request ended without one: the copy bought nothing;
- early: an on-time prefetch whose KV waited on the device longer than `early_after_s`.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .request import Request

DEFAULT_PREFETCH_QUANTILE = 0.05
DEFAULT_OVERDUE_QUANTILE = 1.0
DEFAULT_MAX_HELD_FRACTION = 0.1
DEFAULT_EARLY_AFTER_S = 1.0


def prefetch_start(paused_at: float, quantile_s: float, lead_s: float) -> float:
    """When a copy that takes `lead_s` (its own time plus an iteration) must start to be done by
    the time a call paused at `paused_at` has run `quantile_s`."""
    return paused_at + quantile_s - lead_s


@dataclass
class _Held:
    request: Request
    started_at: float
    nbytes: int
    blocks: int


class PrefetchLedger:
    """The prefetched requests still waiting for their answer, and the outcome counts."""

    def __init__(self, early_after_s: float = DEFAULT_EARLY_AFTER_S) -> None:
        self.early_after_s = early_after_s
        self._held: dict[int, _Held] = {}
        self.held_blocks = 0  # device blocks the held requests' prefetches brought back, all together
        self.counts = {"started": 0, "on_time": 0, "late": 0, "late_hidden": 0, "wasted": 0, "early": 0}
        self._late_now: set[int] = set()  # late returns of this iteration, not yet admitted
        self.bytes_early = 0  # KV bytes copied back before their answer
        self.held_early_s = 0.0  # seconds prefetched KV waited on the device for its answer, all together

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._held

    def requests(self) -> Iterator[Request]:
        """The prefetched requests still waiting for their answer."""
        return (h.request for h in self._held.values())

    def start(self, req: Request, now: float, nbytes: int, blocks: int) -> None:
        self._held[req.request_id] = _Held(req, now, nbytes, blocks)
        self.held_blocks += blocks
        self.counts["started"] += 1
        self.bytes_early += nbytes

    def returned(self, request_id: int, now: float, host_blocks: int) -> None:
        """The answer arrived; `host_blocks`: the request's KV still in the host pool."""
        held = self._pop(request_id)
        if host_blocks:
            self.counts["late"] += 1
            self._late_now.add(request_id)
        elif held is not None:
            self.counts["on_time"] += 1
            self.held_early_s += now - held.started_at
            if now - held.started_at > self.early_after_s:
                self.counts["early"] += 1

    def admitted(self, request_ids: Iterable[int], swap_ins_hidden: bool) -> None:
        """The iteration that collected this iteration's answers admitted `request_ids`; its swap-ins
        fitted its swap budget when `swap_ins_hidden`. Late returns not among them waited."""
        if self._late_now:
            if swap_ins_hidden:
                self.counts["late_hidden"] += sum(1 for rid in request_ids if rid in self._late_now)
            self._late_now.clear()

    def undone(self, request_id: int) -> None:
        """A prefetched KV leaves the device before its answer (evicted, unpinned, or its request ended)."""
        if self._pop(request_id) is not None:
            self.counts["wasted"] += 1

    def _pop(self, request_id: int) -> _Held | None:
        held = self._held.pop(request_id, None)
        if held is not None:
            self.held_blocks -= held.blocks
        return held

    def snapshot(self) -> dict[str, float]:
        done = self.counts["on_time"] + self.counts["late"]
        return {
            **self.counts,
            "held": len(self._held),
            "bytes_early": self.bytes_early,
            "held_early_s": self.held_early_s,
            "no_wait_share": self.counts["on_time"] / done if done else 0.0,
            "no_wait_or_hidden_share": (self.counts["on_time"] + self.counts["late_hidden"]) / done if done else 0.0,
        }
