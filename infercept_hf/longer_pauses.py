"""The paused requests holding host KV, per tool in order of their pause start.

When the host pool runs short, min-waste drops the host KV of requests expected to pause longer
than the one it wants to swap, longest first. Asking the estimator about every swapped request
made that search grow with the paused set on every step the host was full. Within one tool the
estimate depends on the pause's start alone, and monotonically on each side of the tool's
estimate (`DurationEstimator.past_estimate`): past it the online rule expects the oldest call to
last longest, within it the newest. So each tool gives two walks, from the oldest start and from
the newest, each yielding requests longest-remaining first until one no longer outlasts the
threshold; merged, they give the victims in order, and a step views only the ones it takes.
"""
from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterable, Iterator

from .estimator import DurationEstimator
from .policy import PausedView, victim_key
from .request import Request

UNKNOWN_TOOL = "unknown"  # a paused request with no pending call (priced as a tool never seen)


def pending_tool(req: Request) -> str:
    """The tool whose estimate prices `req`'s pause."""
    return req.pending.tool_name if req.pending else UNKNOWN_TOOL


class LongerPauses:
    """Paused requests by tool, each tool's sorted by (pause start, id)."""

    def __init__(self) -> None:
        self._by_tool: dict[str, list[tuple[float, int, Request]]] = {}
        self._entry: dict[str, tuple[str, float, int]] = {}  # rid -> (tool, start, id): removal after `pending` is gone

    def add(self, req: Request) -> None:
        if req.rid in self._entry:
            return
        tool = pending_tool(req)
        self._entry[req.rid] = (tool, req.paused_at, req.request_id)
        bisect.insort(self._by_tool.setdefault(tool, []), (req.paused_at, req.request_id, req))

    def remove(self, req: Request) -> None:
        entry = self._entry.pop(req.rid, None)
        if entry is None:
            return
        tool, start, request_id = entry
        members = self._by_tool[tool]
        del members[bisect.bisect_left(members, (start, request_id))]
        if not members:
            del self._by_tool[tool]

    def outlasting(self, estimator: DurationEstimator, seconds: float, now: float,
                   view: Callable[[Request], PausedView], skip: Callable[[Request], bool]) -> Iterator[PausedView]:
        """The views of the requests (but those `skip` names) expected to pause longer than
        `seconds` at `now`, in `victim_key` order, computed as they are taken."""
        if estimator.oracle:  # each call's own duration decides: no order by start time
            views = (view(req) for members in self._by_tool.values() for _, _, req in members if not skip(req))
            return iter(sorted((v for v in views if v.expected_remaining_s > seconds), key=victim_key))
        walks = []
        for tool, members in self._by_tool.items():
            oldest_first = (req for _, _, req in members)
            newest_first = (req for _, _, req in reversed(members))
            walks.append(_walk(oldest_first, lambda r, t=tool: estimator.past_estimate(t, now - r.paused_at),
                               seconds, view, skip))
            walks.append(_walk(newest_first, lambda r, t=tool: not estimator.past_estimate(t, now - r.paused_at),
                               seconds, view, skip))
        return heapq.merge(*walks, key=victim_key)


def _walk(requests: Iterable[Request], on_side: Callable[[Request], bool], seconds: float,
          view: Callable[[Request], PausedView], skip: Callable[[Request], bool]) -> Iterator[PausedView]:
    """Views along `requests` (their remaining pause never rising along the way) while they stay
    on their side of the estimate and outlast `seconds`; equal estimates in `victim_key` order."""
    run: list[PausedView] = []
    for req in requests:
        if not on_side(req):
            break
        if skip(req):
            continue
        v = view(req)
        if not v.expected_remaining_s > seconds:
            break
        if run and v.expected_remaining_s != run[0].expected_remaining_s:
            yield from sorted(run, key=victim_key)
            run = []
        run.append(v)
    yield from sorted(run, key=victim_key)
