"""Pause-duration estimates: the paper's online rule, per-tool running means, the oracle."""
from __future__ import annotations

import threading

import pytest

from infercept_hf.estimator import DEFAULT_FLOOR_S, DurationEstimator


def test_unknown_tool_follows_the_online_rule():
    est = DurationEstimator()
    assert est.estimate("search") is None
    assert est.remaining("search", 0.0) == DEFAULT_FLOOR_S  # just started: at least one iteration
    assert est.remaining("search", 2.5) == 2.5  # lasted 2.5 s: expect 2.5 s more


def test_seed_stands_in_until_observed():
    est = DurationEstimator()
    est.seed("calc", 10.0)
    assert est.remaining("calc", 4.0) == 6.0  # 10 - 4
    assert est.remaining("calc", 10.0) == DEFAULT_FLOOR_S  # due now: floor
    assert est.remaining("calc", 12.0) == 12.0  # overran the estimate: online rule
    est.seed("calc", 20.0)  # a newer hint replaces an unobserved one
    assert est.estimate("calc") == 20.0


def test_running_mean_then_exponential():
    est = DurationEstimator(alpha=0.2)
    for seconds, expected in [
        (4.0, 4.0),  # weight 1: the first sample
        (8.0, 6.0),  # weight 1/2: mean(4, 8)
        (12.0, 8.0),  # weight 1/3: mean(4, 8, 12)
        (16.0, 10.0),  # weight 1/4
        (20.0, 12.0),  # weight 1/5 = alpha: mean of all five
        (0.0, 9.6),  # weight max(0.2, 1/6) = 0.2: 12 + 0.2 * (0 - 12)
    ]:
        est.observe("tts", seconds)
        assert est.estimate("tts") == pytest.approx(expected)
    assert est.remaining("tts", 1.6) == pytest.approx(8.0)  # 9.6 - 1.6


def test_seed_counts_as_one_sample_and_never_overrides_measurements():
    est = DurationEstimator()
    est.seed("qa", 10.0)
    est.observe("qa", 2.0)
    assert est.estimate("qa") == 6.0  # mean(10, 2)
    est.observe("qa", 3.0)
    assert est.estimate("qa") == 5.0  # mean(10, 2, 3)
    est.seed("qa", 100.0)  # every new request re-seeds: measurements win
    assert est.estimate("qa") == 5.0


def test_floor_is_configurable():
    est = DurationEstimator(floor_s=0.0)
    assert est.remaining("x", 0.0) == 0.0
    est.seed("x", 1.0)
    assert est.remaining("x", 1.0) == 0.0


def test_oracle_uses_the_true_duration():
    est = DurationEstimator(oracle=True)
    est.seed("calc", 100.0)  # ignored: the oracle knows better
    assert est.remaining("calc", 3.0, true_duration=5.0) == 2.0
    assert est.remaining("calc", 6.0, true_duration=5.0) == 0.0  # late: never negative
    with pytest.raises(ValueError, match="true_duration"):
        est.remaining("calc", 3.0)


def test_online_mode_ignores_true_duration():
    est = DurationEstimator()
    assert est.remaining("calc", 3.0, true_duration=5.0) == 3.0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_rejects_bad_hints(bad):
    est = DurationEstimator()
    with pytest.raises(ValueError, match="seconds must be a finite number >= 0"):
        est.seed("t", bad)
    with pytest.raises(ValueError, match="true_duration"):
        DurationEstimator(oracle=True).remaining("t", 1.0, true_duration=bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rejects_measurements_that_are_not_numbers(bad):
    est = DurationEstimator()
    with pytest.raises(ValueError, match="must be a finite number"):
        est.observe("t", bad)
    with pytest.raises(ValueError, match="must be a finite number"):
        est.remaining("t", bad)


def test_a_clock_that_steps_back_measures_zero_not_an_error():
    """Measured durations are clock differences; a clock stepped back (NTP) yields a negative one."""
    est = DurationEstimator()
    est.observe("t", 2.0)
    est.observe("t", -5.0)
    assert est.estimate("t") == pytest.approx(1.0)  # the mean of 2 and 0
    assert est.remaining("t", -3.0) == pytest.approx(1.0)  # as if no time had passed


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError):
        DurationEstimator(alpha=alpha)


def test_snapshot():
    est = DurationEstimator()
    est.seed("b", 2.0)
    est.observe("a", 1.0)
    assert est.snapshot() == {
        "a": {"estimate_s": 1.0, "observations": 1, "seed_s": None, "quartiles_s": [1.0, 1.0, 1.0]},
        "b": {"estimate_s": 2.0, "observations": 0, "seed_s": 2.0, "quartiles_s": None},
    }


def test_concurrent_observations_are_all_counted():
    est = DurationEstimator()
    n_threads, n_each = 8, 500

    def report() -> None:
        for _ in range(n_each):
            est.observe("tool", 1.0)
            est.remaining("tool", 0.5)

    threads = [threading.Thread(target=report) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = est.snapshot()["tool"]
    assert snap["observations"] == n_threads * n_each
    assert snap["estimate_s"] == 1.0
