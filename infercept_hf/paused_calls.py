"""The paused requests' outstanding tool calls, kept so that a step reads only those that may answer.

A step polls a call only when something may have changed for it: a scripted call at its
deadline (a heap keyed by that time), a call on a worker thread when its thread tells
(`PendingCall.on_change`: the answer is in, or a worker took it up) and at its timeout, which
counts on the engine's clock from the step that saw it start. Thousands of requests paused at
long calls leave a step as cheap as a few. Every call is polled once at the first step after
its pause, so one that is already answered or running needs no signal.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque

from .request import Request
from .tools import PendingCall, ScriptedCall


class PausedCalls:
    """Each paused request's pending call, from its pause until `forget` (answered, failed, cancelled)."""

    def __init__(self) -> None:
        self._order = itertools.count()  # pause order: the order answers are taken in
        self._calls: dict[int, tuple[int, Request, PendingCall]] = {}  # request id -> (order, request, call)
        self._deadlines: list[tuple[float, int, int]] = []  # (time to poll, order, request id)
        # (order, request id) of calls whose poll may give something new; appended from tool threads
        self._signalled: deque[tuple[int, int]] = deque()

    def __len__(self) -> int:
        return len(self._calls)

    def add(self, req: Request) -> None:
        """`req` paused at `req.pending`."""
        order = next(self._order)
        self._calls[req.request_id] = (order, req, req.pending)
        if isinstance(req.pending, ScriptedCall):
            heapq.heappush(self._deadlines, (req.pending.deadline, order, req.request_id))
            return
        entry = (order, req.request_id)
        self._signalled.append(entry)  # the first poll
        req.pending.on_change(lambda: self._signalled.append(entry))

    def forget(self, req: Request) -> None:
        """`req` no longer waits for its call; its entries are dropped when they come up."""
        self._calls.pop(req.request_id, None)

    def still_waiting(self, req: Request, now: float) -> None:
        """`req`'s call was polled at `now` and had no answer: poll it again at its next check."""
        entry = self._calls.get(req.request_id)
        if entry is None:
            return
        due = entry[2].next_check(now)
        if due is not None:
            heapq.heappush(self._deadlines, (due, entry[0], req.request_id))

    def request(self, request_id: int) -> Request:
        return self._calls[request_id][1]

    def _live(self, order: int, request_id: int) -> bool:
        entry = self._calls.get(request_id)
        return entry is not None and entry[0] == order

    def _drop_stale_top(self) -> None:
        while self._deadlines and not self._live(self._deadlines[0][1], self._deadlines[0][2]):
            heapq.heappop(self._deadlines)

    def may_answer(self, now: float) -> list[Request]:
        """The requests whose call may have answered by `now`, in pause order, each once: the calls
        due by then and the signalled ones, taken off their queues (`still_waiting` puts back one
        that had no answer)."""
        due: dict[int, int] = {}
        self._drop_stale_top()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, order, request_id = heapq.heappop(self._deadlines)
            if self._live(order, request_id):
                due[request_id] = order
            self._drop_stale_top()
        while self._signalled:
            order, request_id = self._signalled.popleft()
            if self._live(order, request_id):
                due[request_id] = order
        return [self._calls[i][1] for i, _ in sorted(due.items(), key=lambda item: item[1])]

    def next_check(self, now: float) -> float | None:
        """The earliest engine time at which a call may answer (None: only when a tool wakes the engine)."""
        if any(self._live(order, request_id) for order, request_id in list(self._signalled)):
            return now
        self._drop_stale_top()
        return self._deadlines[0][0] if self._deadlines else None
