"""A step reads only the paused calls that may have answered: scripted ones come off a deadline
heap at their deadline, in pause order; answered, failed or re-paused requests' old entries never
come back; other calls are offered every step."""
from __future__ import annotations

from infercept_hf.paused_calls import PausedCalls
from infercept_hf.request import Request
from infercept_hf.tools import Answer, PendingCall, ScriptedCall, Segment


class NeverCall(PendingCall):
    """A call with no deadline: only polling can find its answer."""

    def __init__(self) -> None:
        super().__init__("never", "", 0.0, None)

    def poll(self, now: float) -> Answer | None:
        return None

    def next_check(self, now: float) -> float | None:
        return None


def paused(request_id: int, pending: PendingCall) -> Request:
    req = Request(request_id, [1, 2], 2, 4, 0.0)
    req.pending = pending
    return req


def scripted(pause_s: float) -> ScriptedCall:
    return ScriptedCall(Segment(1, pause_s, (7,)), started_at=0.0)


def test_due_calls_come_in_pause_order_and_stale_entries_never_return():
    calls = PausedCalls()
    late, tool, early, forgotten = paused(0, scripted(3.0)), paused(1, NeverCall()), paused(2, scripted(1.0)), \
        paused(3, scripted(0.5))
    for req in (late, tool, early, forgotten):
        calls.add(req)
    calls.forget(forgotten)
    assert len(calls) == 3
    assert calls.next_check(0.0) == 1.0
    assert calls.may_answer(0.9) == [tool]
    assert calls.may_answer(1.0) == [tool, early]
    assert calls.may_answer(1.5) == [tool]  # taken off the heap once
    calls.forget(late)
    late.pending = scripted(5.0)  # paused again: the old deadline is stale
    calls.add(late)
    assert calls.may_answer(4.0) == [tool]
    assert calls.next_check(4.0) == 5.0
    assert calls.may_answer(5.0) == [tool, late]  # pause order: the tool paused before the re-pause
    assert calls.request(1) is tool
