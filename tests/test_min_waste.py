"""min-waste makes the choice the waste equations call for, and never overspends its swap budget."""
from __future__ import annotations

import dataclasses

import pytest

import infercept_hf as ih
from infercept_hf.policy import CostModel
from conftest import prompts_for, reference_scripted
from reliability_helpers import ManualClock

M = 256  # kv bytes per token of the tiny Llama: 2 layers x 2 kv heads x 8 dims x (K, V) x 4 bytes


def _step_until(engine, done, clock=None, limit=600) -> dict:
    """Step until `done()`; `clock`, when given, moves 10 ms per step (otherwise time stands still)."""
    results = {}
    for _ in range(limit):
        if done():
            return results
        for r in engine.step():
            results[r.request_id] = r
        engine.cache.check_integrity()
        if clock is not None:
            clock.advance(0.01)
    raise AssertionError("the engine did not get there")


def _crowd(engine, short_blocks: int = 2) -> int:
    """Add a request whose prompt needs `short_blocks` blocks more than are free (memory pressure), or,
    where paused KV has already left the device, as much of the pool as it can take."""
    blocks = min(engine.cache.free_device_blocks() + short_blocks, engine.cache.num_blocks - 1)
    length = blocks * engine.cache.block_size
    return engine.add_request(prompts_for(77, [length])[0], max_new_tokens=2)


def _run(model, cost, pause_s, expected_s, prompt_len=40, host_bytes=1 << 20, n_requests=1, tokens=12):
    """`n_requests` pause at once (the engine's clock stands still), then a crowd arrives that needs
    their memory: min-waste decides under pressure; then the clock runs on to the end."""
    clock = ManualClock()
    engine = ih.InterceptEngine(model, policy="min-waste", num_blocks=64, block_size=4, host_pool_bytes=host_bytes,
                                cost_model=cost, clock=clock)
    engine.estimator.seed("scripted", expected_s)
    prompts = prompts_for(31, [prompt_len] * n_requests)
    trace = ih.Scripted([(3, pause_s, [5, 6])])
    ids = [engine.add_request(p, max_new_tokens=tokens, interceptions=trace) for p in prompts]
    _step_until(engine, lambda: len(engine.scheduler.paused) == n_requests)
    assert not any(r.strategy == "discard" for r in engine.scheduler.paused)  # no pressure yet: nothing to gain
    crowd = _crowd(engine)
    results = _step_until(engine, lambda: not engine.has_unfinished(), clock)
    for rid, p in zip(ids, prompts):
        assert results[rid].token_ids == reference_scripted(model, p, trace, tokens)
    assert results[crowd].finish_reason == "length"
    return engine, [results[rid] for rid in ids]


NO_LINK = CostModel(fwd_per_token_s=1e-2, fwd_fixed_s=1e-3, swap_bytes_per_s=1.0, kv_bytes_per_token=M,
                    saturation_tokens=64)  # the swap budget rounds to zero tokens: swapping is never free


def test_short_pause_long_context_is_preserved(llama):
    # preserve: <= 0.02 s * 43 tok * M ~ 0.22 MB*s; discard: T_fwd(43) = 0.431 s * 43 tok * M ~ 4.7 MB*s
    engine, [res] = _run(llama, NO_LINK, pause_s=0.02, expected_s=0.02)
    assert res.interceptions[0].strategy == "preserve"
    waste = res.interceptions[0].waste
    assert waste["preserve"] < waste["discard"]
    assert res.telemetry["recomputed_tokens"] == 0


def test_long_pause_short_context_is_discarded(llama):
    # preserve: ~100 s * 11 tok * M ~ 282 MB*s; discard: T_fwd(11) = 0.111 s * 11 tok * M ~ 0.3 MB*s.
    # Kept while the pool has room (`_run` checks), discarded once the crowd needs the memory.
    engine, [res] = _run(llama, NO_LINK, pause_s=0.05, expected_s=100.0, prompt_len=8)
    assert res.interceptions[0].strategy == "discard"
    assert res.telemetry["recomputed_tokens"] > 0


def test_free_link_swaps_the_most_wasteful(llama):
    fast = CostModel(fwd_per_token_s=1e-4, fwd_fixed_s=1e-3, swap_bytes_per_s=1e12, kv_bytes_per_token=M,
                     saturation_tokens=64)
    engine, [res] = _run(llama, fast, pause_s=0.05, expected_s=1.0)
    assert res.interceptions[0].strategy == "swap"
    stats = engine.stats()
    assert stats["swapped_out_bytes"] > 0 and res.telemetry["recomputed_tokens"] == 0


def test_swap_budget_is_never_exceeded(llama):
    # Budget: T_fwd(B) * bw / M tokens; with B ~ 4 decodes this is ~2 blocks an iteration, so a
    # 43-token context moves out over several iterations, its tail first.
    tight = CostModel(fwd_per_token_s=1e-4, fwd_fixed_s=1e-3, swap_bytes_per_s=M * 9000, kv_bytes_per_token=M,
                      saturation_tokens=64)
    engine, results = _run(llama, tight, pause_s=0.15, expected_s=5.0, n_requests=4)
    log = engine.scheduler.swap_log
    assert any(it.swapped_out for it in log)
    for it in log:
        assert it.swapped_out + min(it.swapped_in, it.budget) <= it.budget, it
    assert any(rec.strategy in ("swap", "partial-swap") for r in results for rec in r.interceptions)


def test_full_host_gives_way_to_a_more_wasteful_request(llama):
    fast = CostModel(fwd_per_token_s=1e-4, fwd_fixed_s=1e-3, swap_bytes_per_s=1e12, kv_bytes_per_token=M,
                     saturation_tokens=64)
    # Host room for one request's 11 blocks only. Under pressure the first to pause is swapped; the
    # second pauses with a shorter remaining pause, so the first (longer remaining pause) loses its
    # host copy. Oracle durations, a clock that stands still until both have paused.
    clock = ManualClock()
    engine = ih.InterceptEngine(llama, policy="min-waste", num_blocks=64, block_size=4,
                                host_pool_bytes=12 * 4 * M, cost_model=fast, clock=clock)
    engine.estimator.oracle = True
    p1, p2 = prompts_for(32, [40, 40])
    a = engine.add_request(p1, max_new_tokens=8, interceptions=ih.Scripted([(2, 0.5, [5])]))
    b = engine.add_request(p2, max_new_tokens=8, interceptions=ih.Scripted([(4, 0.1, [6])]))
    _step_until(engine, lambda: engine.scheduler.paused)
    crowd = _crowd(engine, short_blocks=20)
    _step_until(engine, lambda: engine.cache.host_blocks(engine._requests[a].rid))
    results = _step_until(engine, lambda: not engine.has_unfinished(), clock)
    assert results[a].token_ids == reference_scripted(llama, p1, ih.Scripted([(2, 0.5, [5])]), 8)
    assert results[b].token_ids == reference_scripted(llama, p2, ih.Scripted([(4, 0.1, [6])]), 8)
    assert results[crowd].finish_reason == "length"
    assert results[b].interceptions[0].strategy == "swap"
    assert results[a].interceptions[0].strategy in ("discard", "preserve", "partial-swap")
    assert results[a].telemetry["recomputed_tokens"] > 0


def _prefill_next_to_decodes(model, cost: CostModel) -> tuple[list[int], int]:
    """Two requests decoding, then a 100-token prompt: the chunk sizes of its prefill, and the
    iterations min-waste counted as chunked."""
    engine = ih.InterceptEngine(model, policy="min-waste", num_blocks=64, block_size=4, max_batch_tokens=128,
                                cost_model=cost)
    decoders = [engine.add_request(p, max_new_tokens=40) for p in prompts_for(3, [8, 8])]
    _step_until(engine, lambda: all(engine._requests[i].num_generated > 0 for i in decoders))
    late = engine.add_request(prompts_for(5, [100])[0], max_new_tokens=2)
    chunks = []
    while engine._requests[late].num_generated == 0:
        before = engine._requests[late].num_cached
        engine.step()
        chunks.append(engine._requests[late].num_cached - before)
    engine.cache.check_integrity()
    return chunks, engine.stats()["moves"].get("chunked_iterations", 0)


def test_min_waste_chunks_a_prefill_only_where_chunks_ride_free_beside_the_decodes(llama):
    # a GPU's shape: about flat up to S = 32 tokens, then a line
    roofline = CostModel(fwd_per_token_s=1e-3, fwd_fixed_s=1e-3, swap_bytes_per_s=1e9, kv_bytes_per_token=M,
                         saturation_tokens=32, fwd_points=((8, 0.010), (32, 0.0105), (64, 0.020), (128, 0.040)))
    chunks, chunked = _prefill_next_to_decodes(llama, roofline)
    # S minus the two decodes, beside them, while chunks ride free; the last 40 cost less whole than in two more steps
    assert chunks == [30, 30, 40] and chunked == 2
    line = CostModel(fwd_per_token_s=1e-3, fwd_fixed_s=1e-3, swap_bytes_per_s=1e9, kv_bytes_per_token=M,
                     saturation_tokens=32)  # a CPU's shape: each chunk would add an iteration to the late one's wait
    chunks, chunked = _prefill_next_to_decodes(llama, line)
    assert chunks == [100] and chunked == 0
    flat = CostModel(fwd_per_token_s=0.0, fwd_fixed_s=1e-2, swap_bytes_per_s=1e9, kv_bytes_per_token=M,
                     saturation_tokens=32)  # every batch costs the same: a chunk saves the decodes nothing
    chunks, chunked = _prefill_next_to_decodes(llama, flat)
    assert chunks == [100] and chunked == 0


def _pause_two(model, cost: CostModel, crowded: bool, evicted_share: float = 1.0
               ) -> tuple[ih.InterceptEngine, list[int], list[list[int]], ih.Scripted]:
    """Two 40-token prompts that pause together after 3 tokens (43 tokens of context, 11 blocks of 4
    each), stepped until the step in which they paused has ended: what min-waste did at the pause.
    `crowded`: a 30-block pool and a 60-token prompt waiting behind them that cannot fit beside
    their 22 blocks, so memory is short when they pause; else 64 blocks and nobody waiting.
    `evicted_share`: the share of contexts kept at their pause that were evicted before they
    resumed, as if learnt from earlier pauses (above one half: swap at the pause when memory is short)."""
    clock = ManualClock()
    engine = ih.InterceptEngine(model, policy="min-waste", num_blocks=30 if crowded else 64, block_size=4,
                                cost_model=cost, clock=clock)
    engine.estimator.seed("scripted", 5.0)
    engine.scheduler.pause_outcomes.evicted_share = evicted_share
    prompts = prompts_for(41, [40, 40])
    trace = ih.Scripted([(3, 0.5, [5, 6])])
    ids = [engine.add_request(p, max_new_tokens=6, interceptions=trace) for p in prompts]
    if crowded:
        crowd = engine.add_request(prompts_for(42, [60])[0], max_new_tokens=2)
    _step_until(engine, lambda: len(engine.scheduler.paused) == 2)
    if crowded:
        assert engine._requests[crowd].num_cached == 0  # still waiting: memory was short at the pause
    return engine, ids, prompts, trace


def _finish(engine, ids, prompts, trace) -> None:
    results = _step_until(engine, lambda: not engine.has_unfinished(), engine.clock)
    for rid, p in zip(ids, prompts):
        assert results[rid].token_ids == reference_scripted(engine.model, p, trace, 6)


def _placed(engine, req) -> tuple[int, int, str]:
    """Where a paused request's KV lies: device blocks, host blocks, and its placement."""
    return engine.cache.device_blocks(req.rid), engine.cache.host_blocks(req.rid), req.strategy


FAST = CostModel(fwd_per_token_s=1e-4, fwd_fixed_s=1e-3, swap_bytes_per_s=1e12, kv_bytes_per_token=M,
                 saturation_tokens=128)  # the smallest forward's swap budget, 1.1e-3 s * 1e12 / M tokens, holds both


def test_paused_contexts_leave_whole_at_their_pause_once_kept_ones_were_evicted(llama):
    # kept contexts were evicted before (share 1.0): both leave whole within the smallest forward's
    # budget, whether or not memory is short at the pause itself (the evictions come later)
    for crowded in (True, False):
        engine, ids, prompts, trace = _pause_two(llama, FAST, crowded=crowded)
        assert all(_placed(engine, req) == (0, 11, "swap") for req in engine.scheduler.paused)
        assert engine.scheduler.moves["swap_out_paused"] == engine.scheduler.moves["swapped_at_pause"] == 2
        _finish(engine, ids, prompts, trace)
        # crowded, the waiting prompt reused their device blocks: all 11 of each came back over the link,
        # as they would have had they stayed; else only each one's unnamed last block did, and keeping
        # would have been enough: two outcomes of 0 from a share of 1
        copied_blocks = 22 if crowded else 2
        assert engine.stats()["swapped_in_bytes"] == copied_blocks * 4 * M
        assert engine.scheduler.pause_outcomes.evicted_share == pytest.approx(1.0 if crowded else 0.75 ** 2)


def test_a_paused_context_stays_until_kept_ones_are_seen_evicted(llama):
    # no evidence yet that kept contexts get evicted: both stay, though memory is short; at the next
    # admission the waiting prompt takes 15 - 8 = 7 blocks from the first (to host), which counts:
    # share 0 + 0.25 * (1 - 0); the rest of both leaves within that iteration's swap budget
    engine, ids, prompts, trace = _pause_two(llama, FAST, crowded=True, evicted_share=0.0)
    first, second = engine.scheduler.paused
    assert _placed(engine, first) == _placed(engine, second) == (11, 0, "preserve")
    engine.step()
    engine.cache.check_integrity()
    assert engine.cache.host_blocks(first.rid) == 11
    assert engine.scheduler.moves["kept_at_pause_evicted"] == 1
    assert engine.scheduler.pause_outcomes.evicted_share == pytest.approx(0.25)
    _finish(engine, ids, prompts, trace)


def test_pauses_share_the_next_iterations_budget(llama):
    # T_fwd(1) * bw / M = 1.1e-3 s * 8000 tokens/s = 8.8: 8 tokens, 2 blocks of 4, for every pause of
    # one step together: the first to pause takes them, the second keeps its KV for `_min_waste`
    tight = CostModel(fwd_per_token_s=1e-4, fwd_fixed_s=1e-3, swap_bytes_per_s=M * 8000, kv_bytes_per_token=M,
                      saturation_tokens=128)
    engine, ids, prompts, trace = _pause_two(llama, tight, crowded=True)
    first, second = engine.scheduler.paused
    assert _placed(engine, first) == (9, 2, "partial-swap") and _placed(engine, second) == (11, 0, "preserve")
    engine.step()  # the next iteration's log counts the pause's 8 tokens against its own budget
    it = engine.scheduler.swap_log[-1]
    assert it.swapped_out + it.swapped_in <= it.budget and it.swapped_out >= 8
    _finish(engine, ids, prompts, trace)


@pytest.mark.parametrize("overlap", [True, False])
def test_spare_memory_spends_the_swap_budget_only_where_copies_hide_behind_the_forward(llama, overlap):
    # memory spare, no evidence that kept contexts get evicted: both stay at their pause; the next
    # iteration copies them out within its budget where copies overlap the forward (a GPU), and
    # leaves them where every copy would hold up the step (a CPU)
    cost = dataclasses.replace(FAST, copies_overlap=overlap)
    engine, ids, prompts, trace = _pause_two(llama, cost, crowded=False, evicted_share=0.0)
    assert all(_placed(engine, req) == (11, 0, "preserve") for req in engine.scheduler.paused)
    engine.step()
    engine.cache.check_integrity()
    placed = (0, 11, "swap") if overlap else (11, 0, "preserve")
    assert all(_placed(engine, req) == placed for req in engine.scheduler.paused)
    assert engine.scheduler.moves.get("swap_out_paused", 0) == (2 if overlap else 0)
    assert ("moves_waiting_for_pressure" in engine.scheduler.moves) is not overlap
    _finish(engine, ids, prompts, trace)
