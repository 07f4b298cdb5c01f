"""`predictive` finds the swapped calls whose prefetch is due, and the next one to fall due, from its
index (`prefetch_due.py`) exactly as viewing every paused request would, step after step, while
calls pause, swap out in parts, come back early, get prefetched, outlive their quantile and return;
and every request's tokens stay those of plain transformers."""
from __future__ import annotations

import pytest

import infercept_hf as ih
from infercept_hf.estimator import DurationEstimator
from infercept_hf.policy import CostModel
from infercept_hf.prefetch import prefetch_start
from conftest import prompts_for, reference_scripted
from reliability_helpers import ManualClock

# about 8 tokens of KV cross the link behind a forward: swaps go out a few blocks at a time
SLOW_LINK = CostModel(fwd_per_token_s=1e-4, fwd_fixed_s=1e-3, swap_bytes_per_s=1e6, kv_bytes_per_token=256,
                      saturation_tokens=64)
HISTORY = {"search": [0.05, 0.1, 0.15, 0.2, 0.4], "shell": [0.1, 0.3, 0.3, 0.6, 0.9]}
TOKENS = 14
STEP_S = 0.01


def _requests() -> list[tuple[list[int], ih.Scripted]]:
    lengths = [30, 12, 22, 40, 17, 26, 35, 9, 28, 20]
    out = []
    for i, prompt in enumerate(prompts_for(21, lengths)):
        first, second = 0.04 + 0.07 * i, 0.5 - 0.04 * i
        tool = "search" if i % 3 else "shell"
        out.append((prompt, ih.Scripted([(2 + i % 3, first, [7, 8]), (4, max(second, 0.02), [9])], name=tool)))
    return out


def _brute_force(engine, now: float) -> tuple[dict[int, float], float | None]:
    """Every paused request viewed: the due calls' starts, and the earliest start after `now`."""
    scheduler, predictor = engine.scheduler, engine.scheduler.predictor
    starts = {}
    for req in scheduler.paused:
        host = engine.cache.host_blocks(req.rid)
        if not host or req.request_id in predictor.ledger or not predictor.may_prefetch(req):
            continue
        tool, truth = scheduler._call(req)
        at = engine.estimator.duration_quantile(tool, predictor.prefetch_quantile, truth)
        if at is not None:
            lead = scheduler.cost.t_swap(host * engine.cache.block_size) + predictor.step_period(scheduler._step_s)
            starts[req.request_id] = prefetch_start(req.paused_at, at, lead)
    later = [s for s in starts.values() if s > now]
    return {rid: s for rid, s in starts.items() if s <= now}, min(later, default=None)


@pytest.mark.parametrize("oracle,overdue_quantile", [(False, 1.0), (False, 0.5), (True, 1.0)])
def test_the_index_matches_viewing_every_paused_request(llama, oracle, overdue_quantile):
    clock = ManualClock()
    estimator = DurationEstimator(oracle=oracle)
    for tool, seconds in HISTORY.items():
        for s in seconds:
            estimator.observe(tool, s)
    engine = ih.InterceptEngine(llama, policy="predictive", num_blocks=48, block_size=4, host_pool_bytes=1 << 20,
                                cost_model=SLOW_LINK, clock=clock, estimator=estimator)
    predictor = engine.scheduler.predictor
    predictor.overdue_quantile = overdue_quantile
    predictor.max_held_blocks = 24  # half the pool: most calls can be prefetched, not only the smallest
    requests = _requests()
    ids = {engine.add_request(prompt, max_new_tokens=TOKENS, interceptions=calls): (prompt, calls)
           for prompt, calls in requests}
    results: dict = {}
    seen_due = seen_next = seen_overdue = 0
    for _ in range(600):
        if not engine.has_unfinished():
            break
        for r in engine.step():
            results[r.request_id] = r
        engine.cache.check_integrity()
        clock.advance(STEP_S)
        want_due, want_next = _brute_force(engine, clock.now)
        step_s = predictor.step_period(engine.scheduler._step_s)
        assert predictor.next_due(clock.now, step_s) == want_next
        assert {r.request_id: s for s, r, _ in predictor.due_now(clock.now, step_s)} == want_due
        seen_due += bool(want_due)
        seen_next += want_next is not None
        seen_overdue += any(not predictor.may_prefetch(r) for r in engine.scheduler.paused)
    assert not engine.has_unfinished()
    assert seen_due and seen_next  # the comparison saw calls due and calls not yet due
    assert seen_overdue or oracle  # and calls that outlived the overdue quantile (an oracle call never does)
    assert predictor.ledger.counts["started"] > 0
    for rid, (prompt, calls) in ids.items():
        assert results[rid].token_ids == reference_scripted(llama, prompt, calls, TOKENS)
    assert len(predictor.due) == 0 and engine.cache.is_empty()
