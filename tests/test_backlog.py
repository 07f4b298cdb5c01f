"""The backlog trend that tells a sustained load from the onset of overload, on hand-built series."""
from __future__ import annotations

import pytest

from infercept_hf.bench import policy_runs
from infercept_hf.bench.backlog import MAX_GROWTH_SHARE, backlog, in_system, is_stable
from infercept_hf.bench.__main__ import main
from infercept_hf.bench.metrics import summarize
from infercept_hf.outputs import RequestResult

import json

import numpy as np


def request(rid: int, arrival: float, finish: float, reason: str = "length") -> RequestResult:
    return RequestResult(
        request_id=rid, prompt_len=4, token_ids=[5], num_generated=1, finish_reason=reason, error=None,
        arrival_time=arrival, first_token_time=min(finish, arrival + 0.1), finish_time=finish,
        token_times=[min(finish, arrival + 0.1)], interceptions=[],
    )


def test_a_level_backlog_is_stable():
    # one arrival a second, each request in the system for 50 s: 50 in the system, level
    runs = [request(i, float(i), i + 50.0) for i in range(1000)]
    figures = backlog(runs, 100.0, 900.0)
    assert figures["backlog_mean"] == pytest.approx(50, abs=1)
    assert abs(figures["backlog_growth_share"]) < 0.01
    assert is_stable(figures)


def test_a_linearly_growing_queue_is_not():
    # one arrival a second, a server finishing one every 2 s in arrival order: the queue grows by 0.5/s
    runs = [request(i, float(i), 2.0 * i + 1.0) for i in range(1000)]
    figures = backlog(runs, 100.0, 900.0)
    assert figures["backlog_growth"] == pytest.approx(0.5 * 800, rel=0.02)  # over the window's 800 s
    assert figures["backlog_growth_share"] == pytest.approx(0.5, abs=0.01)
    assert not is_stable(figures)
    # a growth just past the bound fails too: a server at 94% of the arrival rate
    slow = [request(i, float(i), i / 0.94 + 1.0) for i in range(1000)]
    figures = backlog(slow, 100.0, 900.0)
    assert MAX_GROWTH_SHARE < figures["backlog_growth_share"] == pytest.approx(1 / 0.94 - 1, abs=0.01)
    assert not is_stable(figures)


def test_a_few_requests_wandering_by_a_few_is_noise_not_growth():
    # 30 arrivals in the window, 2 to 5 requests in the system: a growth of 4 is 13% of the
    # arrivals, but within 3 standard deviations of a Poisson count of that mean
    assert is_stable({"backlog_mean": 3.0, "backlog_growth": 4.0, "backlog_growth_share": 4 / 30})
    assert not is_stable({"backlog_mean": 3.0, "backlog_growth": 6.0, "backlog_growth_share": 6 / 30})


def test_a_request_cancelled_at_the_window_end_is_still_in_the_system():
    runs = [request(0, 0.0, 5.0), request(1, 1.0, 10.0, reason="cancelled"), request(2, 2.0, 3.0, reason="error")]
    assert in_system(runs, np.array([0.5, 2.5, 4.0, 6.0, 10.0])).tolist() == [1, 3, 2, 1, 1]


def test_summarize_reports_the_backlog_of_its_window_only():
    runs = [request(i, float(i), 2.0 * i + 1.0) for i in range(100)]
    assert "backlog_growth_share" not in summarize(runs, 200.0)  # no window: nothing to judge
    windowed = summarize(runs, 0.0, window=(10.0, 90.0))
    assert windowed["backlog_growth_share"] == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="must have a length"):
        backlog(runs, 5.0, 5.0)


def test_an_unstable_rate_fails_and_is_not_interpolated_to():
    slo = 0.1
    runs = [
        {"policy": "a", "qps": 1.0, "normalized_latency_mean_s": 0.05, "backlog_growth_share": 0.0},
        {"policy": "a", "qps": 2.0, "normalized_latency_mean_s": 0.07, "backlog_growth_share": 0.01},
        # its latency depends on the window's length: no crossing to interpolate
        {"policy": "a", "qps": 3.0, "normalized_latency_mean_s": 0.5, "backlog_growth_share": 0.2,
         "backlog_growth": 200, "backlog_mean": 100},
        # the latency passes, but completions fall behind arrivals: the onset of overload
        {"policy": "b", "qps": 1.0, "normalized_latency_mean_s": 0.05, "backlog_growth_share": 0.0},
        {"policy": "b", "qps": 2.0, "normalized_latency_mean_s": 0.06, "backlog_growth_share": 0.08,
         "backlog_growth": 80, "backlog_mean": 100},
        {"policy": "c", "qps": 1.0, "normalized_latency_mean_s": 0.05, "backlog_growth_share": 0.0},
        {"policy": "c", "qps": 2.0, "normalized_latency_mean_s": 0.15, "backlog_growth_share": 0.0},
        {"policy": "d", "qps": 1.0, "normalized_latency_mean_s": 0.05, "backlog_growth_share": 0.3,
         "backlog_growth": 300, "backlog_mean": 100},
    ]
    rates = policy_runs.sustainable_rates(runs, slo)
    assert rates["a"] == policy_runs.Sustainable(2.0, "unstable above")
    assert rates["b"] == policy_runs.Sustainable(1.0, "unstable above")
    assert rates["c"] == policy_runs.Sustainable(pytest.approx(1.5), "interpolated")  # stable at both ends
    assert rates["d"] == policy_runs.Sustainable(None, "")


def test_refine_picks_the_middle_of_the_first_pass_fail_bracket():
    runs = [
        {"policy": "a", "qps": 1.0, "normalized_latency_mean_s": 0.05},
        {"policy": "a", "qps": 2.0, "normalized_latency_mean_s": 0.06, "backlog_growth_share": 0.2,
         "backlog_growth": 200, "backlog_mean": 100},  # fails
        {"policy": "a", "qps": 4.0, "normalized_latency_mean_s": 0.5},
        {"policy": "b", "qps": 1.0, "normalized_latency_mean_s": 0.05},  # never fails: nothing to refine
        {"policy": "c", "qps": 1.0, "normalized_latency_mean_s": 0.5},  # never passes
        {"policy": "c", "qps": 2.0, "normalized_latency_mean_s": 0.6},
    ]
    assert policy_runs.refine_rate(runs, "a", 0.1) == 1.5
    assert policy_runs.refine_rate(runs, "b", 0.1) is None
    assert policy_runs.refine_rate(runs, "c", 0.1) is None


def test_cli_refines_the_grid_near_the_crossing(tmp_path):
    out = tmp_path / "sim"
    # 0.05 req/s passes; at 64 req/s every request arrives in the first second, before the window
    main(["--simulate", "vicuna-13b/a100-80g", "--num-requests", "60", "--qps", "0.05,64", "--policies", "min-waste",
          "--refine", "2", "--warmup", "300", "--window", "600", "--out", str(out)])
    data = json.loads((out / "results.json").read_text())
    rates = [r["qps"] for r in data["runs"]]
    assert rates == [0.05, 64.0, 32.025, 16.0375]  # two more, each halving the bracket it found
    assert data["runs"][0]["backlog_mean"] > 0
    assert "backlog growth / arrivals" in (out / "summary.md").read_text()


def test_an_unstable_runs_latency_does_not_make_the_curve_non_monotonic():
    grow = {"backlog_growth": 500, "backlog_mean": 400}
    runs = [
        {"policy": "a", "qps": 1.0, "normalized_latency_mean_s": 0.05, "backlog_growth_share": 0.0},
        {"policy": "a", "qps": 2.0, "normalized_latency_mean_s": 2.6, "backlog_growth_share": 0.3, **grow},
        # a shorter window at a higher rate reads a lower latency: it says how long the window ran
        {"policy": "a", "qps": 3.0, "normalized_latency_mean_s": 2.4, "backlog_growth_share": 0.4, **grow},
    ]
    assert policy_runs.sustainable_rates(runs, 0.1)["a"] == policy_runs.Sustainable(1.0, "unstable above")
