"""Prefix sharing: requests read the full KV blocks of equal prefixes (tool answers included)
instead of computing them again; tokens never change, block accounting stays exact."""
from __future__ import annotations

import functools
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import infercept_hf as ih
from conftest import TEST_COST, prompts_for, reference_scripted, tiny_model
from infercept_hf.patches import paged_pool as pp
from infercept_hf.policy import PausedView, discard_waste, preserve_waste, swap_waste, waste_figures
from infercept_hf.prefix_index import SLIDING_REASON
from reliability_helpers import ManualClock

SHARED = prompts_for(51, [13])[0]
TAILS = prompts_for(52, [2, 5, 3, 7])
SCRIPT = ih.Scripted([(3, 0.5, [7, 8, 9, 10, 11]), (2, 1.0, [12])])
MAX_NEW = 9


@functools.cache
def model(arch: str):
    return tiny_model(arch)


@functools.cache
def reference(arch: str, prompt: tuple[int, ...]) -> list[int]:
    return reference_scripted(model(arch), list(prompt), SCRIPT, MAX_NEW)


def answered_prompt(arch: str) -> list[int]:
    """A prompt that continues the first request's context past its first tool answer: its
    shared prefix holds generated tokens and an answer."""
    first = SHARED + TAILS[0]
    out = reference(arch, tuple(first))
    return first + out[: 3 + len(SCRIPT.segments[0].answer_ids)] + [5, 6]


def run_staggered(arch: str, policy: str, sharing: bool, num_blocks: int = 40, host_blocks: int = 16, gap: int = 3):
    """Add the requests `gap` steps apart (so later ones find earlier ones' blocks), checking the
    accounting after every step; returns (engine stats, {prompt: result})."""
    clock = ManualClock()
    engine = ih.InterceptEngine(model(arch), policy=policy, num_blocks=num_blocks, block_size=4,
                                host_pool_bytes=host_blocks * 4 * 512, cost_model=TEST_COST, clock=clock,
                                prefix_sharing=sharing)
    prompts = [SHARED + t for t in TAILS] + [answered_prompt(arch)]
    ids: dict[int, list[int]] = {}
    results = {}
    step = 0
    while len(results) < len(prompts):
        if step % gap == 0 and len(ids) < len(prompts):
            p = prompts[len(ids)]
            ids[engine.add_request(p, max_new_tokens=MAX_NEW, interceptions=SCRIPT)] = p
        for r in engine.step():
            results[r.request_id] = r
        engine.cache.check_integrity()
        engine.scheduler._recount_paused_shares()  # what the next step does first
        held = engine.scheduler.paused_blocks  # its preserve waste counts exactly the blocks held alone
        assert held.total == sum(engine.cache.exclusive_blocks(rid) for rid in held.holders)
        clock.advance(0.25)
        step += 1
        assert step < 2000, "requests never ended"
    stats = engine.stats()
    cache = engine.cache
    assert cache.is_empty() and cache.free_device_blocks() == cache.num_blocks
    engine.close()
    return stats, {tuple(ids[rid]): r for rid, r in results.items()}


@pytest.mark.parametrize("policy", ih.POLICIES)
def test_tokens_identical_with_sharing_on_and_off_under_every_policy(policy):
    outputs = {}
    for sharing in (True, False):
        stats, results = run_staggered("llama", policy, sharing, num_blocks=24)
        for prompt, r in results.items():
            assert r.finish_reason == "length"
            assert r.token_ids == reference("llama", prompt), f"sharing={sharing}"
        outputs[sharing] = (stats, results)
    on, off = outputs[True][0], outputs[False][0]
    assert on["prefix_hit_tokens"] > 0 and off["prefix_hit_tokens"] == 0
    assert sum(r.cached_tokens for r in outputs[True][1].values()) == on["prefix_hit_tokens"]
    assert all(r.cached_tokens == 0 for r in outputs[False][1].values())
    assert on["forward_tokens"] < off["forward_tokens"]


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "gpt_neox", "gptj"])
def test_tokens_identical_on_other_architectures(arch):
    stats, results = run_staggered(arch, "min-waste", True, num_blocks=24)
    assert stats["prefix_hit_tokens"] > 0
    for prompt, r in results.items():
        assert r.token_ids == reference(arch, prompt)


def test_sliding_window_models_do_not_share_and_say_why():
    engine = ih.InterceptEngine(model("mistral"), num_blocks=24, block_size=4, cost_model=TEST_COST)
    assert not engine.cache.prefix.enabled and engine.cache.prefix.off_reason == SLIDING_REASON
    assert engine.stats()["prefix_sharing"] is False
    engine.close()
    off = ih.InterceptEngine(model("llama"), num_blocks=24, block_size=4, cost_model=TEST_COST, prefix_sharing=False)
    assert off.cache.prefix.off_reason == "prefix_sharing=False"
    off.close()


def test_a_hit_skips_exactly_the_shared_full_blocks(llama):
    """Second request, same 13-token prefix + its own tail, blocks of 4: 3 full blocks (12 tokens) reused."""
    engine = ih.InterceptEngine(llama, num_blocks=32, block_size=4, cost_model=TEST_COST)
    a = engine.add_request(SHARED + TAILS[0], max_new_tokens=3)
    first = engine.run()
    b = engine.add_request(SHARED + TAILS[1], max_new_tokens=3)
    second = engine.run()
    assert first[a].cached_tokens == 0 and second[b].cached_tokens == 12
    stats = engine.stats()
    assert stats["prefix_hit_tokens"] == 12
    # 15 + 3 and 18 + 3 tokens; the forwards fed 15 + 2 and (18 - 12) + 2
    assert stats["forward_tokens"] == (15 + 2) + (18 - 12 + 2)
    assert second[b].token_ids == reference_scripted(llama, SHARED + TAILS[1], None, 3)
    engine.close()


def test_finished_blocks_stay_cached_count_as_free_and_are_evicted_oldest_first(llama):
    engine = ih.InterceptEngine(llama, num_blocks=8, block_size=4, cost_model=TEST_COST)
    cache = engine.cache
    engine.add_request(SHARED, max_new_tokens=3)  # 16 tokens of KV: 3 full named blocks... and a 4th
    engine.run()
    cached = engine.stats()["prefix_cached_blocks"]
    assert cached == 3 and cache.free_device_blocks() == cache.num_blocks and cache.used_device_blocks() == 0
    alloc = cache.allocators["full_attention"]
    names = [pp.block_hash(alloc, b) for b in pp.cached_block_ids(alloc)]  # least recently released first
    other = prompts_for(53, [25])[0]  # 26 tokens of KV, 7 blocks: 5 are free, 2 come out of the cache
    rid = engine.add_request(other, max_new_tokens=2)
    results = engine.run()
    assert results[rid].token_ids == reference_scripted(llama, other, None, 2)
    left = {pp.block_hash(alloc, b) for b in pp.cached_block_ids(alloc)}
    assert names[2] in left and names[0] not in left and names[1] not in left
    cache.check_integrity()
    engine.close()


def test_pauses_never_free_or_move_a_block_another_request_reads(llama):
    """Two requests share 3 blocks; the paused one is discarded, then swapped: the running one's
    blocks stay, and both produce the reference tokens."""
    engine = ih.InterceptEngine(llama, policy="preserve", num_blocks=32, block_size=4,
                                host_pool_bytes=16 * 4 * 512, cost_model=TEST_COST, clock=ManualClock())
    cache = engine.cache
    a = engine.add_request(SHARED + TAILS[0], max_new_tokens=MAX_NEW, interceptions=SCRIPT)
    engine.step()
    b = engine.add_request(SHARED + TAILS[1], max_new_tokens=MAX_NEW)
    engine.step()
    ra, rb = engine._requests[a], engine._requests[b]
    while ra.status is not ih.request.Status.PAUSED:
        engine.step()
    shared = cache.prefix.shared_blocks(ra.rid)
    assert shared == 3 and cache.exclusive_blocks(ra.rid) == cache.device_blocks(ra.rid) - 3
    before = list(pp.block_tables(cache.allocators["full_attention"])[rb.rid][:3])
    free_before = cache.free_device_blocks()
    cache.swap_out(ra.rid, cache.exclusive_blocks(ra.rid))
    assert cache.free_device_blocks() > free_before
    cache.discard_host(ra.rid)
    cache.discard_device(ra.rid)
    cache.check_integrity()
    assert pp.block_tables(cache.allocators["full_attention"])[rb.rid][:3] == before
    assert all(pp.ref_count(cache.allocators["full_attention"], x) == 1 for x in before)
    results = {}
    while engine.has_unfinished():
        for r in engine.step():
            results[r.request_id] = r
        cache.check_integrity()
        engine.clock.advance(0.5)
    assert results[a].token_ids == reference_scripted(llama, SHARED + TAILS[0], SCRIPT, MAX_NEW)
    assert results[b].token_ids == reference_scripted(llama, SHARED + TAILS[1], None, MAX_NEW)
    assert results[a].cached_tokens >= 12  # its discarded prefix was still read by b: only the rest recomputed
    engine.close()


def test_check_integrity_catches_a_wrong_reference_count(llama):
    engine = ih.InterceptEngine(llama, num_blocks=32, block_size=4, cost_model=TEST_COST)
    engine.add_request(SHARED, max_new_tokens=2)
    engine.step()
    alloc = engine.cache.allocators["full_attention"]
    block = pp.block_tables(alloc)["0"][0]
    pp.acquire(alloc, block)  # a reference nobody holds
    with pytest.raises(AssertionError, match="reference counts"):
        engine.cache.check_integrity()
    engine.close()


# ------------------------------------------------------------------ the waste equations
def test_shared_blocks_cost_nothing_to_preserve_and_need_no_recompute():
    """C = 40 tokens cached, all on device, 16 of them shared; M = 512 B, 2 s left, C_other = 10."""
    view = PausedView(request_id=0, context_tokens=40, device_tokens=40, host_tokens=0, paused_for_s=0.0,
                      expected_remaining_s=2.0, arrival_time=0.0, shared_tokens=16)
    figs = waste_figures(view, 10, TEST_COST, None)
    assert figs.preserve == 2.0 * 24 * 512 == preserve_waste(24, 2.0, TEST_COST)
    # un-chunked recompute of the 24 own tokens: T_fwd(24) * (24 + 10) * M, T_fwd(24) = 24e-4 + 1e-3
    assert figs.discard == pytest.approx((24e-4 + 1e-3) * 34 * 512) and figs.discard == discard_waste(24, 10, TEST_COST)
    # out and back in, each copy stalling the batch: 2 * (24 * 512 / 1e9) * 10 * 512
    assert figs.swap == pytest.approx(2 * 24 * 512 / 1e9 * 10 * 512) and figs.swap == swap_waste(24, 10, TEST_COST)
    alone = waste_figures(view.__class__(**{**view.__dict__, "shared_tokens": 0}), 10, TEST_COST, None)
    assert alone.preserve == 2.0 * 40 * 512


def test_shared_tokens_cannot_exceed_device_tokens():
    with pytest.raises(ValueError, match="shared_tokens .* exceeds device_tokens"):
        PausedView(0, 10, 8, 0, 0.0, 1.0, 0.0, shared_tokens=12)


def test_min_waste_swaps_only_what_a_pause_holds_alone(llama):
    """The swap budget and the moves count exclusive blocks: the shared head stays on the device."""
    engine = ih.InterceptEngine(llama, policy="swap", num_blocks=32, block_size=4, host_pool_bytes=16 * 4 * 512,
                                cost_model=TEST_COST, clock=ManualClock())
    cache = engine.cache
    a = engine.add_request(SHARED + TAILS[0], max_new_tokens=MAX_NEW)
    engine.step()
    b = engine.add_request(SHARED + TAILS[1], max_new_tokens=MAX_NEW, interceptions=SCRIPT)
    rb = engine._requests[b]
    while rb.status is not ih.request.Status.PAUSED:
        engine.step()
    assert cache.blocks_per_allocator(rb.rid)[0] == (cache.exclusive_blocks(rb.rid),)
    view = engine.scheduler._view(rb, engine.clock())
    assert view.shared_tokens == min(view.device_tokens, 12)
    engine.close()
    assert a == 0


# ------------------------------------------------------------------ interleavings with heavy sharing
H_PROMPTS = [SHARED + t for t in TAILS] + [SHARED[:8], SHARED + TAILS[0] + [7, 8, 9, 10, 11]]
H_SCRIPTS = [None, ih.Scripted([(2, 1.0, [7, 8, 9, 10, 11])]), ih.Scripted([(1, 0.5, [12]), (2, 2.0, [5, 6, 7])])]


@functools.cache
def h_reference(prompt_idx: int, kind: int, max_new: int) -> tuple[int, ...]:
    return tuple(reference_scripted(model("llama"), H_PROMPTS[prompt_idx], H_SCRIPTS[kind], max_new))


@pytest.mark.parametrize("policy", ["min-waste", "discard", "swap"])
@settings(max_examples=8, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_blocks=st.integers(10, 28),
    host_blocks=st.integers(0, 10),
    max_batch_tokens=st.sampled_from([8, 64]),
    actions=st.lists(st.one_of(
        st.tuples(st.just("add"), st.integers(0, len(H_PROMPTS) - 1), st.integers(0, 2), st.integers(2, 8)),
        st.tuples(st.just("step"), st.integers(1, 4)),
        st.tuples(st.just("return"), st.sampled_from([0.5, 1.0, 2.0])),
        st.tuples(st.just("cancel"), st.integers(0, 20)),
    ), min_size=3, max_size=20),
)
def test_interleavings_with_heavy_sharing_keep_every_block_and_token(policy, num_blocks, host_blocks,
                                                                     max_batch_tokens, actions):
    clock = ManualClock()
    engine = ih.InterceptEngine(model("llama"), policy=policy, num_blocks=num_blocks, block_size=4,
                                host_pool_bytes=host_blocks * 4 * 256, max_batch_tokens=max_batch_tokens,
                                cost_model=TEST_COST, clock=clock)
    cache = engine.cache
    specs, live, results = {}, set(), {}

    def step():
        for r in engine.step():
            results[r.request_id] = r
            live.discard(r.request_id)
        cache.check_integrity()
        assert cache.request_ids() <= {str(r) for r in live}

    try:
        for action, *args in actions:
            if action == "add":
                idx, kind, max_new = args
                script = H_SCRIPTS[kind]
                answers = sum(len(s.answer_ids) for s in script.segments) if script else 0
                if not cache.fits(len(H_PROMPTS[idx]) + max_new + answers):
                    continue
                rid = engine.add_request(H_PROMPTS[idx], max_new_tokens=max_new, interceptions=script)
                specs[rid] = (idx, kind, max_new)
                live.add(rid)
            elif action == "step":
                for _ in range(args[0]):
                    step()
            elif action == "return":
                clock.advance(args[0])
            elif live:
                engine.cancel(sorted(live)[args[0] % len(live)])
                cache.check_integrity()
        for _ in range(600):
            if not engine.has_unfinished():
                break
            step()
            clock.advance(0.5)
        assert not engine.has_unfinished(), "requests never ended"
        assert cache.is_empty() and cache.free_device_blocks() == cache.num_blocks
    finally:
        engine.close()
    for rid, r in results.items():
        expected = list(h_reference(*specs[rid]))
        if r.finish_reason == "length":
            assert r.token_ids == expected
        else:
            assert r.finish_reason == "cancelled" and r.token_ids == expected[: len(r.token_ids)]


# ------------------------------------------------------------------ host copies
def _paused_and_swapped(llama):
    """Request a (13-token shared prefix + 2) swapped to host at its first pause, under `swap`."""
    clock = ManualClock()
    engine = ih.InterceptEngine(llama, policy="swap", num_blocks=32, block_size=4, host_pool_bytes=16 * 4 * 512,
                                cost_model=TEST_COST, clock=clock)
    a = engine.add_request(SHARED + TAILS[0], max_new_tokens=MAX_NEW, interceptions=SCRIPT)
    ra = engine._requests[a]
    while ra.status is not ih.request.Status.PAUSED:
        engine.step()
    engine.step()  # the swap-out's copies land after the next forward (or at once, on CPU)
    assert engine.cache.device_blocks(ra.rid) == 0 and engine.cache.host_blocks(ra.rid) == 5
    return engine, clock, a


def _drain(engine, clock):
    results = {}
    while engine.has_unfinished():
        for r in engine.step():
            results[r.request_id] = r
        engine.cache.check_integrity()
        clock.advance(0.5)
    return results


def test_a_hit_on_a_host_copy_swaps_it_in_instead_of_recomputing(llama):
    engine, clock, a = _paused_and_swapped(llama)
    cache = engine.cache
    alloc = cache.allocators["full_attention"]
    pp.evict_cached(cache, alloc, pp.count_cached(alloc))  # the device copies are gone: only the host has them
    b = engine.add_request(SHARED + TAILS[1], max_new_tokens=3)
    results = _drain(engine, clock)
    assert results[b].cached_tokens == 12 and engine.stats()["prefix_host_hit_tokens"] == 12
    assert results[b].token_ids == reference_scripted(llama, SHARED + TAILS[1], None, 3)
    assert results[a].token_ids == reference_scripted(llama, SHARED + TAILS[0], SCRIPT, MAX_NEW)
    engine.close()


def test_a_swap_in_reuses_device_blocks_still_cached_instead_of_copying(llama):
    engine, clock, a = _paused_and_swapped(llama)
    cache = engine.cache
    assert engine.stats()["prefix_cached_blocks"] == 4  # the swapped-out named blocks stay cached on device
    clock.advance(1.0)
    results = _drain(engine, clock)
    assert results[a].token_ids == reference_scripted(llama, SHARED + TAILS[0], SCRIPT, MAX_NEW)
    # the named blocks came back by reference: fewer bytes crossed the link inward than outward
    assert cache.swapped_in_bytes < cache.swapped_out_bytes
    engine.close()


def test_generate_takes_the_switch_and_returns_the_same_tokens(llama, monkeypatch):
    from conftest import left_pad

    prompts = [SHARED + t for t in TAILS]
    ids, mask = left_pad(prompts)
    seen = []
    original = ih.InterceptEngine.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs["prefix_sharing"])
        original(self, *args, **kwargs)

    monkeypatch.setattr(ih.InterceptEngine, "__init__", spy)
    outs = [ih.generate(llama, ids, mask, interceptions=[SCRIPT] * len(prompts), max_new_tokens=MAX_NEW,
                        do_sample=False, block_size=4, cost_model=TEST_COST, prefix_sharing=share)
            for share in (True, False)]
    assert seen == [True, False]
    assert outs[0].tolist() == outs[1].tolist()
    width = ids.shape[1]
    for row, p in zip(outs[0].tolist(), prompts):
        assert row[width:width + MAX_NEW + 6] == reference_scripted(llama, p, SCRIPT, MAX_NEW)


def test_check_integrity_catches_a_named_block_nobody_lists(llama):
    engine = ih.InterceptEngine(llama, num_blocks=32, block_size=4, cost_model=TEST_COST)
    engine.add_request(SHARED, max_new_tokens=2)
    engine.run()
    alloc = engine.cache.allocators["full_attention"]
    pp.acquire(alloc, pp.cached_block_ids(alloc)[0])  # taken out of the cache by a reference no table holds
    with pytest.raises(AssertionError, match="still named, listed nowhere"):
        engine.cache.check_integrity()
    engine.close()


def test_preserve_waste_counts_what_a_pause_holds_alone_as_others_take_and_drop_shares(llama):
    """A request pauses holding 3 full blocks of a prefix; a second request arrives, reads them and
    finishes while the first is still paused. The first's preserve waste counts those blocks only
    while nobody else reads them: byte-seconds exact over a manual clock."""
    clock = ManualClock()
    engine = ih.InterceptEngine(llama, policy="preserve", num_blocks=32, block_size=4,
                                cost_model=TEST_COST, clock=clock)
    cache, paused = engine.cache, engine.scheduler.paused_blocks
    long_pause = ih.Scripted([(1, 100.0, [7])])
    a = engine.add_request(SHARED + TAILS[0], max_new_tokens=3, interceptions=long_pause)
    while not engine.scheduler.paused:
        engine.step()
    ra = engine._requests[a]
    held = cache.device_blocks(ra.rid)
    assert paused.total == held  # alone: every block counts
    engine.add_request(SHARED + TAILS[1], max_new_tokens=6)
    engine.step()  # admits the second, which attaches the 3 shared blocks
    engine.step()  # the recount sees the new shares
    assert cache.prefix.shared_blocks(ra.rid) == 3 and paused.total == held - 3
    while engine.scheduler.running or engine.scheduler.waiting:
        engine.step()
    engine.step()  # the second's blocks were released: the recount sees the shares dropped
    assert paused.total == held
    before = ra.telemetry.get("waste_preserve", 0.0)
    clock.advance(2.0)
    paused.advance(2.0)
    engine.cancel(a)
    assert ra.telemetry["waste_preserve"] - before == pytest.approx(2.0 * held * cache.block_bytes)
    cache.check_integrity()
    engine.close()
