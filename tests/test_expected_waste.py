"""Expected waste over a pause's duration distribution, checked against figures computed by hand."""
from __future__ import annotations

import pytest

from infercept_hf.expected_waste import best_ttl, expected_figures, ttl_waste
from infercept_hf.policy import CostModel, PausedView, waste_figures

# outcomes 1, 2, 10 s, equally likely; 100 bytes kept; a discard wastes 500 B*s
OUTCOMES = [1.0, 2.0, 10.0]


@pytest.mark.parametrize("ttl, expected", [
    (0.5, 100 * 0.5 + 500),  # every outcome outlives it: held 0.5 s, then discarded
    (1.0, 100 * (1 + 1 + 1) / 3 + 500 * 2 / 3),  # 433.33
    (2.0, 100 * (1 + 2 + 2) / 3 + 500 * 1 / 3),  # 333.33
    (10.0, 100 * (1 + 2 + 10) / 3),  # kept to the end: the mean's preserve figure, 433.33
])
def test_ttl_waste(ttl, expected):
    assert ttl_waste(OUTCOMES, ttl, 100.0, 500.0) == pytest.approx(expected)


def test_best_ttl_picks_the_least_waste():
    tau, waste = best_ttl(OUTCOMES, 100.0, 500.0, min_ttl_s=0.5)
    assert tau == 2.0
    assert waste == pytest.approx(1000 / 3)
    # the scan agrees with the direct formula at every candidate
    for ttl in (0.5, 1.0, 2.0, 10.0):
        assert ttl_waste(OUTCOMES, ttl, 100.0, 500.0) >= waste - 1e-9


def test_short_but_sometimes_long_is_kept_where_its_mean_would_discard():
    # mean 25.75 s: keeping for the mean costs 2575 B*s against a 500 B*s discard; keeping for 1 s
    # and discarding if still paused costs 100 * 1 + 1/4 * 500 = 225 B*s
    outcomes = [1.0, 1.0, 1.0, 100.0]
    assert ttl_waste(outcomes, 100.0, 100.0, 500.0) == pytest.approx(2575.0)
    assert best_ttl(outcomes, 100.0, 500.0, min_ttl_s=0.1) == (1.0, pytest.approx(225.0))


def test_certainly_long_is_discarded_at_once():
    # any keep of at least 0.5 s costs >= 50 + 500: discarding now (500) is cheaper
    assert best_ttl([100.0, 100.0], 100.0, 500.0, min_ttl_s=0.5) == (0.5, pytest.approx(550.0))


def test_best_ttl_refuses_bad_outcomes():
    with pytest.raises(ValueError, match="no outcomes"):
        best_ttl([], 1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="ascending"):
        best_ttl([2.0, 1.0], 1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="finite and >= 0"):
        ttl_waste([-1.0], 1.0, 1.0, 1.0)


def test_expected_figures_against_the_mean():
    cost = CostModel(fwd_per_token_s=0.01, fwd_fixed_s=0.0, swap_bytes_per_s=1.0, kv_bytes_per_token=1,
                     saturation_tokens=64)
    outcomes = [0.01, 0.01, 0.01, 1.0]  # mean 0.2575 s
    view = PausedView(request_id=0, context_tokens=10, device_tokens=10, host_tokens=0, paused_for_s=0.0,
                      expected_remaining_s=sum(outcomes) / 4, arrival_time=0.0)
    # discard: T_fwd(10) * 10 tokens * 1 B = 0.1 * 10 = 1.0; preserve at the mean: 0.2575 * 10 = 2.575
    mean = waste_figures(view, other_tokens=0, cost=cost, chunk_tokens=None)
    assert (mean.discard, mean.preserve, mean.best) == (pytest.approx(1.0), pytest.approx(2.575), "discard")
    # keep 0.01 s, then discard: 10 * 0.01 + 1/4 * 1.0 = 0.35
    figs = expected_figures(view, outcomes, other_tokens=0, cost=cost, chunk_tokens=None, step_s=0.005)
    assert (figs.discard, figs.preserve, figs.best) == (pytest.approx(1.0), pytest.approx(0.35), "preserve")
    assert figs.swap == mean.swap
