"""Waste equations and the min-waste decision, against hand-computed figures.

COST is chosen so every figure is exact in binary floating point:
T_fwd(n) = 0.5*n + 2, M = 4 bytes/token, T_swap(n) = 4*n/128 = n/32.
"""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infercept_hf.policy import (
    chunk_pays,
    POLICIES,
    POLICY_TRAITS,
    HostRoom,
    Move,
    PlannedMove,
    check_policy,
    movable_blocks,
    paused_move,
    plan_paused_moves,
    victim_key,
    CostModel,
    PausedView,
    WasteFigures,
    choose_preserve_or_discard,
    discard_waste,
    host_victims,
    preserve_waste,
    rank_by_waste,
    split_swap_budget,
    swap_budget_tokens,
    swap_waste,
)

COST_FIELDS = dict(fwd_per_token_s=0.5, fwd_fixed_s=2.0, swap_bytes_per_s=128.0, kv_bytes_per_token=4,
                   saturation_tokens=64)
COST = CostModel(**COST_FIELDS)
NO_FIXED = CostModel(**{**COST_FIELDS, "fwd_fixed_s": 0.0})


def view(rid: int, context: int, remaining: float, arrival: float = 0.0, device: int | None = None,
         host: int = 0) -> PausedView:
    return PausedView(request_id=rid, context_tokens=context, device_tokens=context if device is None else device,
                      host_tokens=host, paused_for_s=0.0, expected_remaining_s=remaining, arrival_time=arrival)


# ---------------------------------------------------------------- cost model
def test_cost_model_times():
    assert COST.t_fwd(0) == 0.0  # no tokens, no forward
    assert COST.t_fwd(10) == 7.0  # 0.5*10 + 2
    assert COST.t_swap(32) == 1.0  # 32*4 / 128
    assert COST.t_swap(0) == 0.0


@pytest.mark.parametrize("field", ["fwd_per_token_s", "fwd_fixed_s"])
def test_cost_model_rejects_negative_times(field):
    with pytest.raises(ValueError):
        CostModel(**{**COST_FIELDS, field: -1.0})


@pytest.mark.parametrize("field", ["swap_bytes_per_s", "kv_bytes_per_token", "saturation_tokens"])
def test_cost_model_rejects_zero_rates(field):
    with pytest.raises(ValueError):
        CostModel(**{**COST_FIELDS, field: 0})


def test_cost_model_rejects_negative_tokens():
    with pytest.raises(ValueError):
        COST.t_fwd(-1)
    with pytest.raises(ValueError):
        COST.t_swap(-1)


# ---------------------------------------------------------------- preserve
def test_preserve_waste():
    assert preserve_waste(100, 2.0, COST) == 800.0  # 2 s * 100 tok * 4 B
    assert preserve_waste(100, 0.0, COST) == 0.0  # zero-length pause
    assert preserve_waste(0, 2.0, COST) == 0.0  # zero context


def test_preserve_waste_needs_an_estimate():
    with pytest.raises(TypeError):
        preserve_waste(100, None, COST)
    with pytest.raises(ValueError):
        preserve_waste(100, -1.0, COST)
    with pytest.raises(ValueError):
        preserve_waste(-1, 1.0, COST)
    with pytest.raises(ValueError):
        preserve_waste(1, float("nan"), COST)


# ---------------------------------------------------------------- discard
def test_discard_waste_unchunked():
    # T_fwd(10) = 7; (10 own + 30 other) * 4 B = 160 -> 7 * 160
    assert discard_waste(10, 30, COST) == 1120.0
    # empty batch: only the own term, 7 * 10 * 4
    assert discard_waste(10, 0, COST) == 280.0
    assert discard_waste(0, 30, COST) == 0.0


def test_discard_waste_chunked():
    # c = 4, C = 10: chunks 4, 4, 2; resident after each 4, 8, 10; T_fwd(4) = 4, T_fwd(2) = 3
    # other = 30: 4*(4+30) + 4*(8+30) + 3*(10+30) = 136 + 152 + 120 = 408 -> * 4 B
    assert discard_waste(10, 30, COST, chunk_tokens=4) == 1632.0
    # other = 0: 4*4 + 4*8 + 3*10 = 78 -> * 4 B
    assert discard_waste(10, 0, COST, chunk_tokens=4) == 312.0


def test_discard_chunk_larger_than_context_is_unchunked():
    assert discard_waste(10, 30, COST, chunk_tokens=10) == discard_waste(10, 30, COST)
    assert discard_waste(10, 30, COST, chunk_tokens=500) == 1120.0
    assert discard_waste(0, 30, COST, chunk_tokens=4) == 0.0


def test_chunking_about_halves_the_own_term():
    # b = 0, C = 10: un-chunked 0.5*10 * 10 * 4 = 200;
    # chunks of 1: sum_k 0.5*1 * k for k = 1..10 = 0.5 * 55 = 27.5 -> * 4 = 110, i.e. C(C+1)/2 not C^2
    assert discard_waste(10, 0, NO_FIXED) == 200.0
    assert discard_waste(10, 0, NO_FIXED, chunk_tokens=1) == 110.0


@given(st.integers(0, 3000), st.integers(0, 3000), st.integers(1, 500))
def test_discard_chunked_matches_the_per_chunk_sum(context, other, chunk):
    sizes = [min(chunk, context - start) for start in range(0, context, chunk)]
    resident = [sum(sizes[: k + 1]) for k in range(len(sizes))]
    expected = sum(COST.t_fwd(s) * (r + other) * 4 for s, r in zip(sizes, resident))
    assert discard_waste(context, other, COST, chunk_tokens=chunk) == pytest.approx(expected)


def test_discard_rejects_bad_input():
    with pytest.raises(ValueError):
        discard_waste(-1, 0, COST)
    with pytest.raises(ValueError):
        discard_waste(1, -1, COST)
    with pytest.raises(ValueError):
        discard_waste(10, 0, COST, chunk_tokens=0)


# ---------------------------------------------------------------- swap
def test_swap_waste():
    # 2 copies * T_swap(32) = 1 s * 10 batch tokens * 4 B
    assert swap_waste(32, 10, COST) == 80.0
    # budget 16: 16 tokens stall per direction, T_swap(16) = 0.5 -> 2 * 0.5 * 40
    assert swap_waste(32, 10, COST, budget_tokens=16) == 40.0
    assert swap_waste(32, 10, COST, budget_tokens=32) == 0.0  # hides entirely under compute
    assert swap_waste(32, 0, COST) == 0.0  # nothing to stall
    assert swap_waste(0, 10, COST) == 0.0


def test_swap_rejects_negative():
    with pytest.raises(ValueError):
        swap_waste(-1, 10, COST)
    with pytest.raises(ValueError):
        swap_waste(1, 10, COST, budget_tokens=-1)


def test_swap_budget_tokens():
    # T_fwd(10) = 7 s; 7 s * 128 B/s / 4 B = 224 tokens
    assert swap_budget_tokens(10, COST) == 224
    assert swap_budget_tokens(0, COST) == 0  # no forward, nothing to hide behind
    # the budget is exactly what T_swap(N) = T_fwd(B) allows
    assert COST.t_swap(swap_budget_tokens(10, COST)) == COST.t_fwd(10)
    with pytest.raises(ValueError):
        swap_budget_tokens(-1, COST)


# ---------------------------------------------------------------- split
@pytest.mark.parametrize(
    "args, expected",
    [
        # ample room: both wants fit the budget of 100
        ((100, 50, 30, 1000, 1000), (50, 30)),
        # tight budget: swap-in takes its 30 first, swap-out gets the remaining 10
        ((40, 50, 30, 1000, 1000), (10, 30)),
        # device full: the 30 swapped in need 30 swapped out; out still takes its full 50
        ((100, 50, 30, 1000, 0), (50, 30)),
        # device full and tight budget: in = out = (0 + 40) // 2 = 20
        ((40, 50, 30, 1000, 0), (20, 20)),
        # host full: out only into the room the 10 swapped in free
        ((100, 50, 10, 0, 1000), (10, 10)),
        # device full and nothing to swap out: nothing can come in
        ((100, 0, 30, 1000, 0), (0, 0)),
        ((0, 50, 30, 1000, 1000), (0, 0)),
    ],
)
def test_split_swap_budget(args, expected):
    assert split_swap_budget(*args) == expected


def test_split_swap_budget_rejects_negative():
    with pytest.raises(ValueError):
        split_swap_budget(-1, 0, 0, 0, 0)
    with pytest.raises(ValueError):
        split_swap_budget(10, 0, 0, 0, -1)


counts = st.integers(min_value=0, max_value=10_000)


@given(counts, counts, counts, counts, counts)
def test_split_swap_budget_respects_every_limit(budget, want_out, want_in, free_host, free_device):
    out, in_ = split_swap_budget(budget, want_out, want_in, free_host, free_device)
    assert 0 <= out <= want_out and 0 <= in_ <= want_in
    assert out + in_ <= budget
    assert out <= free_host + in_
    assert in_ <= free_device + out
    if free_device >= min(want_in, budget):  # swap-in is served first
        assert in_ == min(want_in, budget)


# ---------------------------------------------------------------- ranking and choice
def test_preserve_wins_short_pause_long_context():
    v = view(0, context=1000, remaining=0.01)
    # preserve: 0.01 * 1000 * 4 = 40; discard: T_fwd(1000) = 502 -> 502 * 1000 * 4 = 2_008_000
    assert choose_preserve_or_discard(v, 0, COST, None) == "preserve"
    assert choose_preserve_or_discard(v, 0, COST, 64) == "preserve"


def test_discard_wins_long_pause_short_context():
    v = view(0, context=2, remaining=100.0)
    # preserve: 100 * 2 * 4 = 800; discard: T_fwd(2) = 3 -> 3 * 2 * 4 = 24
    assert choose_preserve_or_discard(v, 0, COST, None) == "discard"
    # even with 30 others stalled: 3 * (2 + 30) * 4 = 384 < 800
    assert choose_preserve_or_discard(v, 30, COST, None) == "discard"


def test_tie_keeps_the_kv():
    assert WasteFigures(preserve=1.0, discard=1.0, swap=0.0).best == "preserve"
    # zero-length pause: preserve waste 0; zero context: both 0
    assert choose_preserve_or_discard(view(0, 10, 0.0), 0, COST, None) == "preserve"
    assert choose_preserve_or_discard(view(0, 0, 5.0), 0, COST, None) == "preserve"


def test_rank_by_waste_order_and_figures():
    a = view(0, context=10, remaining=1.0, arrival=0.0)  # preserve 40, discard 7*10*4 = 280 -> 40
    b = view(1, context=10, remaining=100.0, arrival=1.0)  # preserve 4000, discard 280 -> 280
    c = view(2, context=20, remaining=2.0, arrival=2.0)  # preserve 160, discard 12*20*4 = 960 -> 160
    ranked = rank_by_waste([a, b, c], 0, COST, None)
    assert [v.request_id for v, _ in ranked] == [1, 2, 0]
    figs = dict((v.request_id, f) for v, f in ranked)
    assert figs[1] == WasteFigures(preserve=4000.0, discard=280.0, swap=0.0)  # empty batch: swap stalls nobody
    assert figs[1].best == "discard" and figs[2].best == "preserve"


def test_rank_by_waste_ties_by_arrival():
    late = view(0, context=10, remaining=1.0, arrival=5.0)
    early = view(1, context=10, remaining=1.0, arrival=1.0)
    assert [v.request_id for v, _ in rank_by_waste([late, early], 0, COST, None)] == [1, 0]
    assert rank_by_waste([], 0, COST, None) == []


def test_partly_swapped_view_preserves_only_its_device_part():
    v = view(0, context=10, remaining=1.0, device=4, host=6)
    (_, figs), = rank_by_waste([v], 30, COST, None)
    assert figs.preserve == 16.0  # 1 s * 4 device tokens * 4 B
    assert figs.discard == 1120.0  # the whole context is rebuilt: 7 * (10 + 30) * 4
    assert figs.swap == 2 * COST.t_swap(4) * 30 * 4  # 2 * 0.125 * 120 = 30
    assert figs.swap == 30.0


def test_paused_view_rejects_negative():
    with pytest.raises(ValueError):
        view(0, context=-1, remaining=1.0)
    with pytest.raises(ValueError):
        view(0, context=1, remaining=-1.0)


# ---------------------------------------------------------------- host victims
def test_host_victims_longest_remaining_first():
    swapped = [
        view(0, 32, remaining=1.0, device=0, host=32),
        view(1, 16, remaining=9.0, device=0, host=16),
        view(2, 48, remaining=5.0, device=0, host=48),
        view(3, 64, remaining=20.0, device=64, host=0),  # nothing on host: never a victim
    ]
    assert host_victims(swapped, 10) == [1]  # 16 freed >= 10
    assert host_victims(swapped, 17) == [1, 2]  # 16 + 48
    assert host_victims(swapped, 1000) == [1, 2, 0]  # not enough: everything there is
    assert host_victims(swapped, 0) == []
    assert host_victims([], 5) == []


def test_host_victims_ties_drop_the_latest_arrival():
    swapped = [view(0, 8, 3.0, arrival=1.0, device=0, host=8), view(1, 8, 3.0, arrival=2.0, device=0, host=8)]
    assert host_victims(swapped, 8) == [1]
    with pytest.raises(ValueError):
        host_victims(swapped, -1)


# ---------------------------------------------------------------- policies as data
def test_discard_head_is_discard_that_keeps_its_queue_place():
    discard, head = POLICY_TRAITS["discard"], POLICY_TRAITS["discard-head"]
    assert discard.resume_at_back and not head.resume_at_back
    assert dataclasses.replace(discard, name="discard-head", resume_at_back=False) == head


def test_only_min_waste_and_predictive_revisit_placements():
    assert [p for p in POLICIES if POLICY_TRAITS[p].revisit_each_step] == ["min-waste", "predictive"]
    predictive = dataclasses.replace(POLICY_TRAITS["min-waste"], name="predictive", predictive=True, at_pause="keep")
    assert predictive == POLICY_TRAITS["predictive"]


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown policy 'lru'; choose one of discard, discard-head"):
        check_policy("lru")


def test_movable_blocks_takes_a_tail_only_where_partial_moves_are_allowed():
    assert movable_blocks(3, 5, supports_partial=True) == 3
    assert movable_blocks(3, 5, supports_partial=False) == 0
    assert movable_blocks(9, 5, supports_partial=False) == 5
    assert movable_blocks(0, 5, supports_partial=True) == 0
    assert movable_blocks(-2, 5, supports_partial=True) == 0


def test_paused_move_swaps_within_budget_else_discards_only_under_pressure():
    cheaper_to_discard = WasteFigures(preserve=2.0, discard=1.0, swap=0.0)
    cheaper_to_keep = WasteFigures(preserve=1.0, discard=2.0, swap=0.0)
    assert paused_move(2, cheaper_to_discard, memory_pressure=False) == Move("swap", 2)
    assert paused_move(0, cheaper_to_discard, memory_pressure=True) == Move("discard")
    assert paused_move(0, cheaper_to_discard, memory_pressure=False) == Move("keep")
    assert paused_move(0, cheaper_to_keep, memory_pressure=True) == Move("keep")


KEEP = WasteFigures(preserve=1.0, discard=2.0, swap=0.0)


def _paused(rid: int, remaining_s: float, host_tokens: int = 0) -> PausedView:
    return PausedView(request_id=rid, context_tokens=12, device_tokens=8, host_tokens=host_tokens, paused_for_s=1.0,
                      expected_remaining_s=remaining_s, arrival_time=float(rid))


def _longer(*views: PausedView):
    return lambda seconds: sorted((v for v in views if v.expected_remaining_s > seconds), key=victim_key)


def test_plan_makes_host_room_then_spends_the_budget_in_rank_order():
    a, b, c = _paused(1, 10.0), _paused(2, 200.0), _paused(3, 100.0, host_tokens=12)
    room = HostRoom(free=(1,), returning=(0,), device={1: (2,), 2: (3,)}, host={3: (3,)})
    plan = plan_paused_moves([(a, KEEP), (b, KEEP)], _longer(a, b, c), room, out_budget_tokens=16, block_size=4,
                             supports_partial=True, memory_pressure=False)
    # a's swap needs one more host block: c pauses longer, so its host KV goes; b takes the rest of the budget
    assert plan == [PlannedMove(3, Move("drop-host")), PlannedMove(1, Move("swap", 2)), PlannedMove(2, Move("swap", 2))]
    whole = plan_paused_moves([(a, KEEP), (b, KEEP)], _longer(a, b, c), room, 16, 4, supports_partial=False,
                              memory_pressure=False)
    assert whole[-1] == PlannedMove(2, Move("keep"))  # two blocks of budget left cannot take all three


def test_plan_counts_swap_ins_in_flight_and_each_allocator():
    a, c = _paused(1, 10.0), _paused(3, 100.0, host_tokens=4)
    room = HostRoom(free=(0,), returning=(2,), device={1: (2,)}, host={3: (1,)})
    plan = plan_paused_moves([(a, KEEP)], _longer(a, c), room, 8, 4, True, False)
    assert plan == [PlannedMove(3, Move("drop-host")), PlannedMove(1, Move("swap", 2))]  # 1 dropped + 2 returning
    # a sliding-window allocator holds fewer of the request's blocks; room is the least free over allocators
    short = HostRoom(free=(3, 1), returning=(0, 0), device={1: (2, 1)}, host={})
    assert plan_paused_moves([(a, KEEP)], _longer(a), short, 8, 4, False, False) == [PlannedMove(1, Move("keep"))]
    roomy = dataclasses.replace(short, free=(3, 2))
    assert plan_paused_moves([(a, KEEP)], _longer(a), roomy, 8, 4, False, False) == [PlannedMove(1, Move("swap", 2))]


# ---------------------------------------------------------------- the measured curve and chunking
ROOFLINE = dataclasses.replace(COST, fwd_points=((8, 10.0), (32, 10.5), (64, 20.0), (128, 40.0)))  # flat up to 32


def test_t_fwd_measured_reads_the_points_and_extends_the_end_segments():
    assert ROOFLINE.t_fwd_measured(32) == 10.5
    assert ROOFLINE.t_fwd_measured(48) == 15.25  # halfway between 32 and 64
    assert ROOFLINE.t_fwd_measured(256) == 80.0  # the last segment, extended
    assert ROOFLINE.t_fwd_measured(0) == 0.0  # no batch, no forward
    assert COST.t_fwd_measured(10) == COST.t_fwd(10)  # no points: the line


@pytest.mark.parametrize("points", [((8, 1.0), (8, 2.0)), ((16, 1.0), (8, 2.0)), ((0, 1.0), (8, 2.0)),
                                    ((8, float("nan")), (16, 1.0))])
def test_bad_forward_points_are_refused(points):
    with pytest.raises(ValueError, match="fwd_points must be"):
        dataclasses.replace(COST, fwd_points=points)


def test_chunks_pay_where_the_forward_is_flat_below_saturation():
    # 2 decodes, 100 to prefill in chunks of 30: whole, 2 * (T(102) - T(2)) + T(102);
    # chunked, three chunks of 30 and one of 10 at T(32) or T(12), nearly T(2) each
    assert chunk_pays(2, 100, 30, ROOFLINE)
    assert not chunk_pays(2, 30, 30, ROOFLINE)  # it fits whole: nothing to chunk
    assert not chunk_pays(0, 100, 30, ROOFLINE)  # nothing decoding: chunks only add iterations


def test_chunks_never_pay_on_a_line():
    # on T = a*n + b the decodes' delays sum to a*P either way; each extra chunk adds T(D) to the chunked one's wait
    for decodes in (1, 4, 16):
        assert not chunk_pays(decodes, 100, 30, COST)


def test_chunk_pays_refuses_a_chunk_below_one():
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunk_pays(1, 10, 0, COST)
