"""The share of contexts kept at their pause that an eviction reached before they resumed, and
min-waste's first decision read from it."""
from __future__ import annotations

import pytest

from infercept_hf.pause_outcomes import PauseOutcomes
from infercept_hf.policy import swap_at_pause


def test_share_is_a_weighted_mean_of_outcomes():
    o = PauseOutcomes(alpha=0.5)
    for rid in "abc":
        o.kept(rid)
    assert o.evicted("a") and o.evicted_share == 0.5  # 0 + 0.5 * (1 - 0)
    assert not o.evicted("a")  # counted once
    o.resumed("b")
    assert o.evicted_share == 0.25  # 0.5 + 0.5 * (0 - 0.5)
    o.forget("c")
    o.resumed("c")  # cancelled while paused: no outcome
    assert o.evicted_share == 0.25


def test_only_kept_contexts_count():
    o = PauseOutcomes()
    assert not o.evicted("never-kept")
    o.resumed("never-kept")
    assert o.evicted_share == 0.0


def test_bad_alpha_is_refused():
    with pytest.raises(ValueError, match="alpha must be in"):
        PauseOutcomes(alpha=0.0)


def test_swap_at_pause_needs_evidence_of_evictions():
    assert swap_at_pause(0.75)
    assert not swap_at_pause(0.5)  # half evicted: keeping is no worse
    assert not swap_at_pause(0.0)  # nothing kept was evicted: nobody wanted the blocks
    with pytest.raises(ValueError, match="evicted_share must be >= 0"):
        swap_at_pause(float("nan"))


def test_a_context_copied_out_at_its_pause_counts_as_evicted_when_its_blocks_were_reused():
    outcomes = PauseOutcomes()
    outcomes.evicted_share = 1.0
    outcomes.swapped("a")
    outcomes.swapped("b")
    outcomes.swapped_back("a", copied=False)  # its device blocks were still there: keeping was enough
    assert outcomes.evicted_share == pytest.approx(0.75)
    outcomes.swapped_back("b", copied=True)
    assert outcomes.evicted_share == pytest.approx(0.8125)
    outcomes.swapped_back("b", copied=True)  # counted once
    assert outcomes.evicted_share == pytest.approx(0.8125)
