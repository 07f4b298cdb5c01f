"""The victims of a host-room search, found from pause starts per tool, are exactly the paused
requests the estimator expects to outlast the threshold, in `victim_key` order: the same list as
viewing every paused request and sorting them, under every mix of tools seen, never seen and
outlived estimates, equal starts and the estimator's floor."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from infercept_hf.estimator import DurationEstimator
from infercept_hf.longer_pauses import LongerPauses
from infercept_hf.policy import PausedView, victim_key
from infercept_hf.request import Request
from infercept_hf.tools import PendingCall

TOOLS = ("search", "shell", "never-seen")


class Call(PendingCall):
    def __init__(self, tool: str) -> None:
        super().__init__(tool, "", 0.0, None)


def _paused(request_id: int, tool: str, start: float, arrival: float) -> Request:
    req = Request(request_id, [1, 2], 2, 4, arrival)
    req.pending = Call(tool)
    req.paused_at = start
    return req


def _view(estimator: DurationEstimator, req: Request, now: float) -> PausedView:
    remaining = estimator.remaining(req.pending.tool_name, now - req.paused_at)
    return PausedView(req.request_id, 2, 0, 2, now - req.paused_at, remaining, req.arrival_time)


@settings(max_examples=150, deadline=None)
@given(
    starts=st.lists(st.tuples(st.sampled_from(TOOLS), st.sampled_from([0.0, 1.0, 2.5, 4.0, 7.0, 9.999]),
                              st.integers(0, 3)), min_size=0, max_size=25),
    estimates=st.tuples(st.sampled_from([0.5, 3.0, 8.0]), st.sampled_from([1.0, 5.0])),
    threshold=st.sampled_from([0.0, 0.0005, 0.5, 1.0, 3.0, 5.5, 20.0]),
    removed=st.sets(st.integers(0, 24)),
)
def test_outlasting_matches_viewing_everyone(starts, estimates, threshold, removed):
    estimator = DurationEstimator()
    estimator.seed("search", estimates[0])
    estimator.seed("shell", estimates[1])
    now = 10.0
    index = LongerPauses()
    requests = [_paused(i, tool, start, float(arrival)) for i, (tool, start, arrival) in enumerate(starts)]
    for req in requests:
        index.add(req)
    kept = [r for r in requests if r.request_id not in removed]
    for req in requests:
        if req.request_id in removed:
            req.pending = None  # a request leaves after its answer came in
            index.remove(req)
    skipped = {r.request_id for r in kept[::4]}
    got = index.outlasting(estimator, threshold, now, lambda r: _view(estimator, r, now),
                           lambda r: r.request_id in skipped)
    everyone = [_view(estimator, r, now) for r in kept if r.request_id not in skipped]
    want = sorted((v for v in everyone if v.expected_remaining_s > threshold), key=victim_key)
    assert list(got) == want
