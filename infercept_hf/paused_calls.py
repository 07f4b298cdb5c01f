"""The paused requests' outstanding tool calls, kept so that a step reads only those that may answer.

A scripted call answers exactly at its deadline, so it waits in a heap keyed by that time and
costs a step nothing until then; thousands of requests paused at long calls leave a step as
cheap as a few. Any other call (a tool on a worker thread, a chat turn's calls) may finish
whenever its thread does and keeps its timeout on the engine's clock from the step that sees it
start, so it is polled every step, as a pause always was; those are the calls the tool workers
run, not every paused request.
"""
from __future__ import annotations

import heapq
import itertools

from .request import Request
from .tools import PendingCall, ScriptedCall


class PausedCalls:
    """Each paused request's pending call, from its pause until `forget` (answered, failed, cancelled)."""

    def __init__(self) -> None:
        self._order = itertools.count()  # pause order: the order answers are taken in
        self._calls: dict[int, tuple[int, Request, PendingCall]] = {}  # request id -> (order, request, call)
        self._deadlines: list[tuple[float, int, int]] = []  # (deadline, order, request id) of scripted calls
        self._polled: dict[int, None] = {}  # request ids whose call is polled every step, in pause order

    def __len__(self) -> int:
        return len(self._calls)

    def add(self, req: Request) -> None:
        """`req` paused at `req.pending`."""
        order = next(self._order)
        self._calls[req.request_id] = (order, req, req.pending)
        if isinstance(req.pending, ScriptedCall):
            heapq.heappush(self._deadlines, (req.pending.deadline, order, req.request_id))
        else:
            self._polled[req.request_id] = None

    def forget(self, req: Request) -> None:
        """`req` no longer waits for its call; its heap entry is dropped when it comes up."""
        if self._calls.pop(req.request_id, None) is not None:
            self._polled.pop(req.request_id, None)

    def request(self, request_id: int) -> Request:
        return self._calls[request_id][1]

    def _live(self, order: int, request_id: int) -> bool:
        entry = self._calls.get(request_id)
        return entry is not None and entry[0] == order

    def _drop_stale_top(self) -> None:
        while self._deadlines and not self._live(self._deadlines[0][1], self._deadlines[0][2]):
            heapq.heappop(self._deadlines)

    def may_answer(self, now: float) -> list[Request]:
        """The requests whose call may have answered by `now`, in pause order: the scripted calls
        due by then (taken off the heap: they answer when polled) and every polled one."""
        due = []
        self._drop_stale_top()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, order, request_id = heapq.heappop(self._deadlines)
            if self._live(order, request_id):
                due.append((order, request_id))
            self._drop_stale_top()
        due += [(self._calls[i][0], i) for i in self._polled]
        due.sort()
        return [self._calls[i][1] for _, i in due]

    def next_check(self, now: float) -> float | None:
        """The earliest engine time at which a call may answer (None: only when a tool wakes the engine)."""
        self._drop_stale_top()
        due = [self._deadlines[0][0]] if self._deadlines else []
        due += [t for i in self._polled if (t := self._calls[i][2].next_check(now)) is not None]
        return min(due, default=None)
