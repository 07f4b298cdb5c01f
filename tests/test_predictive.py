"""`predictive`: prefetch accounting block for block, exact tokens, ranking by work with aging."""
from __future__ import annotations

import pytest

import infercept_hf as ih
from infercept_hf.offload import SwapPipeline
from infercept_hf.policy import CostModel
from infercept_hf.prefetch import DEFAULT_MAX_HELD_FRACTION
from infercept_hf.ranking import predicted_work, rank_key, starvation_bound_s
from infercept_hf.request import Request
from conftest import prompts_for, reference_scripted
from reliability_helpers import ManualClock

M = 256  # KV bytes per token of the tiny Llama
# saturation above the batch: a newcomer's prompt is prefilled in one chunk, so it claims its blocks at once
FAST_LINK = CostModel(fwd_per_token_s=1e-4, fwd_fixed_s=1e-3, swap_bytes_per_s=1e12, kv_bytes_per_token=M,
                      saturation_tokens=512)
TOKENS = 12
PAUSE = ih.Scripted([(3, 1.0, [5, 6])])  # decode 3 tokens, pause 1 s, answer 2 tokens


def _start(model, history: list[float], seed: int, pause: ih.Scripted = PAUSE, pipeline: str = "sync",
           cost: CostModel = FAST_LINK):
    """A predictive engine whose estimator has seen `history`, with one 40-token request that pauses.
    `pipeline="lazy"` defers every copy to the last moment the swap pipeline allows. Prefix sharing
    is off so that a swap-in copies every block back (none is found still named on the device)."""
    clock = ManualClock()
    engine = ih.InterceptEngine(model, policy="predictive", num_blocks=64, block_size=4, host_pool_bytes=1 << 20,
                                cost_model=cost, clock=clock, prefix_sharing=False)
    engine.cache.pipeline = SwapPipeline(pipeline)
    engine.scheduler.predictor.max_held_blocks = 32  # the default reserve (10%: 6 blocks) holds no 11-block context
    for seconds in history:
        engine.estimator.observe("scripted", seconds)
    prompt = prompts_for(seed, [40])[0]
    rid = engine.add_request(prompt, max_new_tokens=TOKENS, interceptions=pause)
    return engine, clock, prompt, rid


def _step(engine, clock, until, results, dt=0.01, limit=400) -> None:
    """Step (the clock moving `dt` per step) until `until()`; every step's block accounting is checked."""
    for _ in range(limit):
        if until():
            return
        for r in engine.step():
            results[r.request_id] = r
        engine.cache.check_integrity()
        clock.advance(dt)
    raise AssertionError("the engine did not get there")


def _prefetch_stats(engine) -> dict:
    return engine.stats()["predictive"]["prefetch"]


# 5% quantile of one 0.5 s call and nineteen 1 s calls: position 0.95, 0.5 + 0.95 * 0.5 = 0.975 s
HISTORY = [0.5] + [1.0] * 19


@pytest.mark.parametrize("pipeline", ["sync", "lazy"])
def test_prefetch_brings_the_kv_back_before_the_answer(llama, pipeline):
    engine, clock, prompt, rid = _start(llama, HISTORY, seed=5, pipeline=pipeline)
    results: dict = {}
    paused = engine.scheduler.paused
    # the answer is 1 s away: min-waste spends the free link on it, the whole context goes to host
    _step(engine, clock, lambda: paused and engine.cache.host_blocks(paused[0].rid) and
          not engine.cache.device_blocks(paused[0].rid), results)
    blocks = engine.cache.host_blocks(paused[0].rid)
    answer_at = paused[0].paused_at + 1.0
    assert _prefetch_stats(engine)["started"] == 0
    # once the call has run 0.975 s less the copy and one iteration, the KV comes back, before the answer
    _step(engine, clock, lambda: _prefetch_stats(engine)["started"] == 1, results)
    started_at = clock.now - 0.01  # the step that prefetched (the clock moved on after it)
    assert answer_at - 0.025 - 0.01 < started_at < answer_at
    assert engine.cache.host_blocks(paused[0].rid) == 0 and engine.cache.device_blocks(paused[0].rid) == blocks
    assert paused[0].strategy == "preserve"
    _step(engine, clock, lambda: not engine.has_unfinished(), results)
    assert results[rid].token_ids == reference_scripted(llama, prompt, PAUSE, TOKENS)
    stats = engine.stats()
    block_bytes = engine.cache.block_bytes
    assert stats["swapped_out_bytes"] == stats["swapped_in_bytes"] == blocks * block_bytes
    assert _prefetch_stats(engine) == {
        "started": 1, "on_time": 1, "late": 0, "late_hidden": 0, "wasted": 0, "early": 0, "held": 0,
        "bytes_early": blocks * block_bytes, "held_early_s": pytest.approx(answer_at - started_at, abs=1e-9),
        "no_wait_share": 1.0, "no_wait_or_hidden_share": 1.0,
    }
    assert engine.cache.is_empty()


# a link that moves 4 + 0.4 * B tokens of KV behind a forward of B tokens
SLOW_LINK = CostModel(fwd_per_token_s=1e-4, fwd_fixed_s=1e-3, swap_bytes_per_s=10 * M / 2.5e-3,
                      kv_bytes_per_token=M, saturation_tokens=512)


@pytest.mark.parametrize("cost,hidden", [(FAST_LINK, 1), (SLOW_LINK, 0)])
def test_an_answer_before_the_prediction_is_late(llama, cost, hidden):
    pause = ih.Scripted([(3, 0.3, [5, 6])])
    # the tool usually takes 5 s; this call 0.3 s
    engine, clock, prompt, rid = _start(llama, [5.0] * 20, seed=6, pause=pause, cost=cost)
    results: dict = {}
    _step(engine, clock, lambda: not engine.has_unfinished(), results)
    assert results[rid].token_ids == reference_scripted(llama, prompt, pause, TOKENS)
    stats = _prefetch_stats(engine)
    assert (stats["started"], stats["on_time"], stats["late"], stats["wasted"]) == (0, 0, 1, 0)
    assert stats["no_wait_share"] == 0.0
    assert engine.stats()["swapped_in_bytes"] > 0  # the copy back waited for the answer
    # it resumed in the iteration that collected the answer: behind that iteration's forward the fast link
    # copies the whole 43-token context back; the slow one, with a batch of a few tokens, copies far less
    assert stats["late_hidden"] == hidden and stats["no_wait_or_hidden_share"] == hidden


def test_a_prefetch_evicted_for_a_newcomer_is_wasted(llama):
    engine, clock, prompt, rid = _start(llama, HISTORY, seed=7)
    results: dict = {}
    _step(engine, clock, lambda: _prefetch_stats(engine)["started"] == 1, results)
    # a newcomer needs two blocks more than are free: the prefetched KV gives its tail back to host
    crowd_len = (engine.cache.free_device_blocks() + 2) * engine.cache.block_size
    crowd_prompt = prompts_for(8, [crowd_len])[0]
    crowd = engine.add_request(crowd_prompt, max_new_tokens=2)
    _step(engine, clock, lambda: not engine.has_unfinished(), results)
    assert results[rid].token_ids == reference_scripted(llama, prompt, PAUSE, TOKENS)
    assert results[crowd].token_ids == reference_scripted(llama, crowd_prompt, None, 2)
    stats = _prefetch_stats(engine)
    assert (stats["started"], stats["on_time"], stats["late"], stats["wasted"]) == (1, 0, 1, 1)


def test_predicted_work_and_its_aging():
    assert predicted_work(10, 4) == (10 + 2) * 4
    assert predicted_work(10, 0) == 1.0  # at least 1: every request is some work
    assert rank_key(48.0, waited_s=2.0, aging_s=2.0) == 24.0
    assert rank_key(48.0, waited_s=-1.0, aging_s=2.0) == 48.0  # a clock step back is no wait
    assert starvation_bound_s(101.0, aging_s=2.0) == 200.0
    with pytest.raises(ValueError, match="aging_s must be > 0"):
        rank_key(1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="token counts must be >= 0"):
        predicted_work(-1, 3)


def _admit_until_long_runs(predictor, horizon: int) -> int | None:
    """Each second a short request arrives and the queue admits its first: when does the long one run?"""
    long = Request(request_id=0, tokens=[1] * 100, prompt_len=100, max_new_tokens=100, arrival_time=0.0)
    waiting = [long]
    for t in range(1, horizon):
        waiting.append(Request(request_id=t, tokens=[1] * 10, prompt_len=10, max_new_tokens=10, arrival_time=t))
        first = min(waiting, key=predictor.queue_key(float(t)))
        if first is long:
            return t
        waiting.remove(first)
    return None


def test_aging_prevents_starvation(llama):
    predictor = ih.InterceptEngine(llama, policy="predictive", num_blocks=16, block_size=4,
                                   cost_model=FAST_LINK).scheduler.predictor
    # work 15000 against each newcomer's 150: the long request's key 15000 / (1 + t/2) reaches 150 at
    # t = 198 s, where the tie goes to the earlier arrival
    assert predictor.aging_s == 2.0
    assert _admit_until_long_runs(predictor, 400) == 198
    predictor.aging_s = 1e12  # (almost) no aging: shortest first starves it
    assert _admit_until_long_runs(predictor, 400) is None


def test_ranking_admits_the_least_work_first(llama):
    clock = ManualClock()
    clock.now = 2.0
    engine = ih.InterceptEngine(llama, policy="predictive", num_blocks=64, block_size=4, cost_model=FAST_LINK,
                                max_batch_tokens=8, clock=clock)
    batches = []
    forward = engine.runner.forward
    engine.runner.forward = lambda chunks: batches.append([c.request.request_id for c in chunks]) or forward(chunks)
    long_prompt, short_prompt = prompts_for(9, [40, 8])
    long = engine.add_request(long_prompt, max_new_tokens=20, arrival_time=0.0)  # work (40 + 10) * 20 = 1000
    short = engine.add_request(short_prompt, max_new_tokens=4, arrival_time=1.0)  # work (8 + 2) * 4 = 40
    results = engine.run()
    assert batches[0] == [short]  # the later arrival with less work goes first; its 8 tokens fill the batch
    assert engine.stats()["predictive"]["ranking"] == {"reordered_iterations": 1, "overtakes": 1}
    assert results[short].token_ids == reference_scripted(llama, short_prompt, None, 4)
    assert results[long].token_ids == reference_scripted(llama, long_prompt, None, 20)


def test_a_prefetch_stays_within_the_reserve(llama):
    engine, clock, prompt, rid = _start(llama, HISTORY, seed=5)
    predictor = engine.scheduler.predictor
    predictor.max_held_blocks = int(DEFAULT_MAX_HELD_FRACTION * engine.cache.num_blocks)  # the default reserve
    assert predictor.max_held_blocks == 6
    results: dict = {}
    _step(engine, clock, lambda: not engine.has_unfinished(), results)
    assert results[rid].token_ids == reference_scripted(llama, prompt, PAUSE, TOKENS)
    stats = _prefetch_stats(engine)  # the 11-block context never fitted: it came back on its answer
    assert (stats["started"], stats["on_time"], stats["late"]) == (0, 0, 1)


def test_a_request_resuming_after_a_tool_goes_first(llama):
    predictor = ih.InterceptEngine(llama, policy="predictive", num_blocks=16, block_size=4,
                                   cost_model=FAST_LINK).scheduler.predictor
    resumed = Request(request_id=0, tokens=[1] * 100, prompt_len=90, max_new_tokens=100, arrival_time=0.0)
    resumed.num_generated = 10
    resumed.resume_pending_since = 5.0  # its answer came in at 5 s: work (100 + 45) * 90 = 13050
    short = Request(request_id=1, tokens=[1] * 10, prompt_len=10, max_new_tokens=10, arrival_time=4.0)  # work 150
    key = predictor.queue_key(5.0)
    assert sorted([short, resumed], key=key) == [resumed, short]
    resumed.resume_pending_since = None  # the same request, not resuming (preempted): least work first
    assert sorted([short, resumed], key=predictor.queue_key(5.0)) == [short, resumed]


def test_predictor_settings_are_checked_and_only_for_predictive(llama):
    with pytest.raises(ValueError, match="prefetch_quantile must be in"):
        ih.PredictorSettings(prefetch_quantile=0.0)
    with pytest.raises(ValueError, match="max_held_fraction must be in"):
        ih.PredictorSettings(max_held_fraction=-0.1)
    with pytest.raises(ValueError, match="aging_s must be > 0"):
        ih.PredictorSettings(aging_s=0.0)
    with pytest.raises(ValueError, match="predictor_settings are for policy='predictive'"):
        ih.InterceptEngine(llama, policy="min-waste", num_blocks=16, block_size=4, cost_model=FAST_LINK,
                           predictor_settings=ih.PredictorSettings())
    engine = ih.InterceptEngine(llama, policy="predictive", num_blocks=40, block_size=4, cost_model=FAST_LINK,
                                predictor_settings=ih.PredictorSettings(max_held_fraction=0.5, prefetch_quantile=0.3))
    assert engine.scheduler.predictor.max_held_blocks == 20
    assert engine.scheduler.predictor.prefetch_quantile == 0.3
