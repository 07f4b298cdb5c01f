"""A step reads only the paused calls that may have answered: scripted ones come off a deadline
heap at their deadline, in pause order; answered, failed or re-paused requests' old entries never
come back; other calls at their first poll, when their thread signals, and at their next check."""
from __future__ import annotations

from infercept_hf.paused_calls import PausedCalls
from infercept_hf.request import Request
from infercept_hf.tools import Answer, PendingCall, ScriptedCall, Segment


class NeverCall(PendingCall):
    """A call with no deadline: only a signal (or its first poll) brings it up."""

    def __init__(self, timeout_at: float | None = None) -> None:
        super().__init__("never", "", 0.0, None)
        self.timeout_at = timeout_at
        self.callbacks: list = []

    def poll(self, now: float) -> Answer | None:
        return None

    def next_check(self, now: float) -> float | None:
        return self.timeout_at

    def on_change(self, callback) -> None:
        self.callbacks.append(callback)

    def signal(self) -> None:
        for callback in self.callbacks:
            callback()


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
    assert calls.next_check(0.0) == 0.0  # the tool's first poll is due at once
    assert calls.may_answer(0.9) == [tool]  # its first poll
    assert calls.next_check(0.9) == 1.0
    assert calls.may_answer(1.0) == [early]  # the tool said nothing since: not polled
    assert calls.may_answer(1.5) == []  # taken off the heap once
    calls.forget(late)
    late.pending = scripted(5.0)  # paused again: the old deadline is stale
    calls.add(late)
    assert calls.may_answer(4.0) == []
    assert calls.next_check(4.0) == 5.0
    tool.pending.signal()  # its answer came in (a tool thread tells)
    assert calls.next_check(4.5) == 4.5
    assert calls.may_answer(5.0) == [tool, late]  # pause order: the tool paused before the re-pause
    assert calls.request(1) is tool


def test_a_call_polled_without_an_answer_comes_back_at_its_next_check_and_each_signal():
    calls = PausedCalls()
    req = paused(0, NeverCall(timeout_at=3.0))
    calls.add(req)
    assert calls.may_answer(0.0) == [req]
    calls.still_waiting(req, 0.0)  # no answer yet: its timeout is due at 3 s
    assert calls.next_check(1.0) == 3.0 and calls.may_answer(2.9) == []
    req.pending.signal()
    req.pending.signal()
    assert calls.may_answer(2.95) == [req]  # once, however many signals
    assert calls.may_answer(3.0) == [req]  # the timeout
    calls.forget(req)
    req.pending.signal()  # a late signal of a forgotten call is dropped
    assert calls.may_answer(9.0) == [] and calls.next_check(9.0) is None
