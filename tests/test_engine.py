"""InterceptEngine: exact block accounting, strategies really happen, clear errors for bad input."""
from __future__ import annotations

import time

import pytest

import infercept_hf as ih
from conftest import TEST_COST, prompts_for, reference_scripted
from infercept_hf.request import TELEMETRY_KEYS
from reliability_helpers import ManualClock


def make_engine(model, policy="min-waste", **kw):
    kw.setdefault("num_blocks", 14)
    kw.setdefault("block_size", 4)
    kw.setdefault("host_pool_bytes", 16 * 4 * 512)
    return ih.InterceptEngine(model, policy=policy, cost_model=TEST_COST, **kw)


def run_checked(engine):
    """Drive to completion, checking the cache's integrity after every step."""
    results = {}
    while engine.has_unfinished():
        for r in engine.step():
            results[r.request_id] = r
        engine.cache.check_integrity()
        if not engine.scheduler.has_work():
            time.sleep(0.002)
    return results


TRACE = [
    ih.Scripted([(4, 0.05, [7, 8, 9, 10]), (5, 0.02, [11])]),
    ih.Scripted([(3, 0.08, [12, 13]), (2, 0.0, [14, 15, 16])]),
    ih.Scripted([(6, 0.03, [17])]),
    ih.Scripted([(2, 0.06, [18, 19, 20]), (3, 0.01, [21])]),
]


@pytest.mark.parametrize("policy", ih.POLICIES)
def test_every_block_is_returned_and_tokens_match(llama, policy):
    engine = make_engine(llama, policy)
    prompts = prompts_for(11, [9, 14, 7, 12])
    ids = [engine.add_request(p, max_new_tokens=14, interceptions=s) for p, s in zip(prompts, TRACE)]
    results = run_checked(engine)
    stats = engine.stats()
    assert stats["device_blocks_used"] == 0 and stats["host_blocks_used"] == 0
    assert engine.cache.free_device_blocks() == engine.cache.num_blocks
    assert engine.cache.free_host_blocks() == engine.cache.num_host_blocks
    for rid, p, s in zip(ids, prompts, TRACE):
        assert results[rid].token_ids == reference_scripted(llama, p, s, 14)
        assert results[rid].finish_reason == "length"
        assert [rec.answer_len for rec in results[rid].interceptions] == [len(g.answer_ids) for g in s.segments]


def test_fixed_policies_do_what_they_say(llama):
    prompts = prompts_for(12, [9, 14, 7, 12])
    seen = {}
    for policy in ("discard", "preserve", "swap"):
        # the policies' own mechanics: with prefix sharing a discarded request would find its full blocks cached
        engine = make_engine(llama, policy, num_blocks=64, host_pool_bytes=64 * 4 * 512, prefix_sharing=False)
        for p, s in zip(prompts, TRACE):
            engine.add_request(p, max_new_tokens=14, interceptions=s)
        results = run_checked(engine)
        seen[policy] = {rec.strategy for r in results.values() for rec in r.interceptions}
        stats = engine.stats()
        per_request = [r.telemetry for r in results.values()]
        assert all(set(t) == set(TELEMETRY_KEYS) for t in per_request)
        assert sum(t.get("recomputed_tokens", 0) for t in per_request) == stats["recomputed_tokens"]
        assert sum(t.get("swapped_bytes", 0) for t in per_request) == stats["swapped_bytes"]
        if policy == "discard":
            assert stats["recomputed_tokens"] > 0 and stats["swapped_bytes"] == 0
            assert all(t["waste_discard"] > 0 for t in per_request)
        if policy == "preserve":
            assert stats["recomputed_tokens"] == 0 and stats["swapped_bytes"] == 0
            assert stats["waste_by_cause"]["preserve"] > 0
            total = sum(t.get("waste_preserve", 0) for t in per_request)
            assert total == pytest.approx(stats["waste_by_cause"]["preserve"])
        if policy == "swap":
            assert stats["recomputed_tokens"] == 0 and stats["swapped_bytes"] > 0
    assert seen == {"discard": {"discard"}, "preserve": {"preserve"}, "swap": {"swap"}}


def test_tight_pool_queues_and_preempts_but_finishes(llama):
    engine = make_engine(llama, "preserve", num_blocks=9)
    prompts = prompts_for(13, [10, 10, 10, 10, 10])
    for p in prompts:
        engine.add_request(p, max_new_tokens=20, interceptions=ih.Scripted([(5, 0.02, [5, 6])]))
    results = run_checked(engine)
    assert len(results) == 5 and all(r.finish_reason == "length" for r in results.values())
    assert engine.stats()["device_blocks_used"] == 0


def test_token_id_tool_pauses_and_appends(llama):
    prompt = prompts_for(14, [8])[0]
    free_run = reference_scripted(llama, prompt, None, 12)
    end = free_run[4]
    calls = []

    def fn(call):
        calls.append(call)
        return [40, 41]

    engine = make_engine(llama, "swap")
    rid = engine.add_request(prompt, max_new_tokens=12, tools=[ih.Tool("t", end=[end], fn=fn)])
    res = run_checked(engine)[rid]
    cut = free_run.index(end) + 1
    assert res.token_ids[:cut + 2] == free_run[:cut] + [40, 41]
    assert len(calls) >= 1 and calls[0].generated_ids[-1] == end
    assert res.interceptions[0].tool == "t" and res.interceptions[0].returned_at is not None


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(policy="lru"), ValueError, "unknown policy 'lru'"),
        (dict(num_blocks=0), ValueError, "num_blocks"),
    ],
)
def test_bad_engine_arguments(llama, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ih.InterceptEngine(llama, cost_model=TEST_COST, **{"num_blocks": 8, **kwargs})


def test_bad_requests_fail_at_the_boundary(llama):
    engine = make_engine(llama)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], max_new_tokens=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([1, 999], max_new_tokens=4)
    with pytest.raises(ValueError, match="pool holds 56"):
        engine.add_request([1] * 50, max_new_tokens=10)
    with pytest.raises(ValueError, match="need a tokenizer"):
        engine.add_request([1, 2], tools=[ih.Tool("calc", end="</calc>", fn=str)])
    with pytest.raises(ValueError, match="n_tokens must be a positive integer"):
        ih.Scripted([(-1, 0.1, [1])])
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add_request([1, 2], max_new_tokens=0)


def test_generate_rejects_mismatched_interceptions(llama):
    import torch
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match="interceptions has 1 entries but the batch has 2 rows"):
        ih.generate(llama, ids, attention_mask=torch.ones_like(ids), interceptions=[ih.Scripted([(1, 0, [1])])],
                    max_new_tokens=3, cost_model=TEST_COST)
    with pytest.raises(ValueError, match="unknown policy"):
        ih.generate(llama, ids, policy="nope")
    with pytest.raises(ValueError, match="beam search"):
        ih.generate(llama, ids, num_beams=2, max_new_tokens=2, cost_model=TEST_COST)
    with pytest.raises(ValueError, match="left padding"):
        ih.generate(llama, ids, attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]), max_new_tokens=2,
                    cost_model=TEST_COST)


def test_pause_placements_and_owed_recompute_are_live(llama):
    """The live view a UI polls: where a paused request's KV lies, and the recomputation still owed."""
    clock = ManualClock()
    # prefix sharing off: a discarded request would find its full blocks cached and owe no recompute
    engine = make_engine(llama, "discard", num_blocks=64, clock=clock, prefix_sharing=False)
    rid = engine.add_request(prompts_for(13, [10])[0], max_new_tokens=6, interceptions=ih.Scripted([(3, 1.0, [5])]))
    assert engine.pause_placements() == {}
    while not engine.pause_placements():
        engine.step()
    strategy, waste = engine.pause_placements()[rid]
    assert strategy == "discard" and set(waste) == {"preserve", "discard", "swap"}
    # prompt (10) + 2 generated tokens had KV; the 3rd was sampled but never fed back
    assert engine.stats()["recompute_owed_tokens"] == 12
    clock.advance(1.0)
    results = run_checked(engine)
    assert results[rid].finish_reason == "length"
    assert engine.pause_placements() == {} and engine.stats()["recompute_owed_tokens"] == 0
    assert engine.stats()["recomputed_tokens"] == 12
