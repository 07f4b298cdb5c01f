"""Metrics on hand-built results with hand-computed answers; plots and the report render."""
from __future__ import annotations

import pytest

from infercept_hf.bench.metrics import IN_FLIGHT, clip_to_window, merge_engine_stats, results_json, summarize, tool_excluded_itls
from infercept_hf.bench.plots import plot_latency_vs_rate, plot_memory_timeline
from infercept_hf.bench.report import markdown_summary
from infercept_hf.outputs import InterceptionRecord, RequestResult


def result(rid, arrival, times, reason="length", interceptions=(), prompt_len=10):
    return RequestResult(
        request_id=rid, prompt_len=prompt_len, token_ids=[5] * len(times), num_generated=len(times),
        finish_reason=reason, error=None, arrival_time=arrival, first_token_time=times[0] if times else None,
        finish_time=times[-1] if times else arrival, token_times=list(times), interceptions=list(interceptions),
    )


# A: first token at 1.0 s, pauses after its third token (1.2 s) for a 2 s tool call, resumes at 3.3 s.
PAUSE = InterceptionRecord("scripted", "", paused_at=1.2, returned_at=3.2, resumed_at=3.3, strategy="preserve",
                           answer_len=2, waste={})
A = result(0, 0.0, [1.0, 1.1, 1.2, 3.3, 3.4, 3.5], interceptions=[PAUSE])
# B: no tool; arrives at 0.5 s, four tokens 0.1 s apart from 0.7 s.
B = result(1, 0.5, [0.7, 0.8, 0.9, 1.0], reason="stop")
C = result(2, 0.0, [2.0, 2.1], reason="cancelled")
D = result(3, 0.0, [], reason="error")
RUN = [A, B, C, D]


def test_counts_rates_and_the_papers_normalized_latency():
    s = summarize(RUN, duration_s=10.0)
    assert (s["completed"], s["failed"], s["cancelled"], s["requests"]) == (2, 1, 1, 4)
    assert s["completed_rps"] == s["request_throughput"] == pytest.approx(0.2)
    # A: (3.5 s - 2 s in the tool) / 6 tokens; B: 0.5 s / 4 tokens.
    assert s["normalized_latency_mean_s"] == pytest.approx((0.25 + 0.125) / 2)
    assert s["normalized_latency_p99_s"] == pytest.approx(0.125 + 0.99 * 0.125)
    assert s["throughput_tok_s"] == pytest.approx((6 + 4 + 2) / 10)
    assert s["output_throughput"] == pytest.approx((6 + 4) / 10)
    assert s["total_token_throughput"] == pytest.approx((6 + 4 + 20) / 10)
    assert s["interceptions"] == 1 and s["tool_s_total"] == pytest.approx(2.0)


def test_vllm_latencies_with_and_without_tool_time():
    s = summarize(RUN, duration_s=10.0)
    assert s["mean_ttft_ms"] == pytest.approx((1000 + 200) / 2)
    assert s["median_ttft_ms"] == pytest.approx(600)
    # TPOT = (E2E - TTFT) / (tokens - 1): A 2.5 s / 5 raw, (2.5 - 2) s / 5 without the tool; B 0.3 s / 3.
    assert s["mean_tpot_ms"] == pytest.approx((500 + 100) / 2)
    assert s["mean_tpot_excl_tool_ms"] == pytest.approx(100)
    assert s["mean_e2el_ms"] == pytest.approx((3500 + 500) / 2)
    assert s["mean_e2el_excl_tool_ms"] == pytest.approx((1500 + 500) / 2)
    assert s["p99_e2el_ms"] == pytest.approx(500 + 0.99 * 3000)


def test_itl_leaves_out_the_gap_that_spans_a_pause():
    assert tool_excluded_itls(A) == pytest.approx([0.1, 0.1, 0.1, 0.1])
    s = summarize(RUN, duration_s=10.0)
    assert s["mean_itl_ms"] == pytest.approx(100)
    assert s["p99_itl_ms"] == pytest.approx(100)


def test_resume_latency_is_answer_in_to_next_token_out():
    s = summarize(RUN, duration_s=10.0)
    assert s["mean_resume_latency_ms"] == pytest.approx(100)
    assert s["p99_resume_latency_ms"] == pytest.approx(100)


@pytest.mark.parametrize(
    "slo, good",
    [
        ({"ttft_ms": 1500, "tpot_ms": 150}, 2),
        ({"ttft_ms": 500}, 1),
        ({"tpot_ms": 50}, 0),
        ({"e2el_ms": 1000}, 1),
    ],
)
def test_goodput_counts_completed_requests_meeting_every_slo(slo, good):
    s = summarize(RUN, duration_s=10.0, slo=slo)
    assert s["goodput"] == pytest.approx(good / 10)
    assert s["slo"] == slo


def test_empty_statistics_are_none_and_bad_input_is_refused():
    s = summarize([C, D], duration_s=5.0)
    assert s["completed"] == 0 and s["normalized_latency_mean_s"] is None and s["p99_itl_ms"] is None
    assert "ttft_ms" in s["slo"]
    with pytest.raises(ValueError, match="measured duration must be > 0"):
        summarize(RUN, duration_s=0)
    with pytest.raises(ValueError, match="unknown SLO keys"):
        summarize(RUN, duration_s=1.0, slo={"ttft": 1.0})


def test_merge_engine_stats_copies_known_keys_and_shares_recompute_by_tokens():
    base = summarize(RUN, duration_s=10.0)
    stats = {"recompute_share": 0.3, "waste_by_cause": {"preserve": 5.0, "discard": 1.0}, "swapped_bytes": 4096,
             "swap_gbps": 2.5, "recomputed_tokens": 70, "forward_tokens": 280, "device_blocks_used": 0}
    merged = merge_engine_stats(base, stats)
    assert merged["recompute_share"] == 0.25  # by tokens, as for the peers
    assert merged["recompute_time_share"] == 0.3  # the engine's own figure, by forward seconds
    assert merged["waste_by_cause"] == {"preserve": 5.0, "swap": 0.0, "discard": 1.0}
    assert (merged["swapped_bytes"], merged["swap_gbps"], merged["recomputed_tokens"]) == (4096, 2.5, 70)
    assert "device_blocks_used" not in merged and "recompute_share" not in base
    peer = merge_engine_stats(base, {"forward_s": 4.0, "forward_tokens": 200, "recomputed_tokens": 50})
    assert peer["recompute_share"] == 0.25 and "recompute_time_share" not in peer


def test_window_counts_requests_in_flight_as_the_reference_does():
    # E arrives at 1.0 s, tokens at 2.0, 2.5, 3.5 (after a pause from 2.5 s to 3.4 s): at the window's end
    # (3.0 s) it has 2 tokens and 0.5 s of tool time, so (3.0 - 1.0 - 0.5) / 2 = 0.75 s/token
    pause = InterceptionRecord("scripted", "", paused_at=2.5, returned_at=3.4, resumed_at=3.45, strategy="swap",
                               answer_len=1, waste={})
    e = result(4, 1.0, [2.0, 2.5, 3.5], interceptions=[pause])
    late = result(5, 2.9, [3.2, 3.3])  # no token by 3.0 s: left out, as the reference leaves it out
    early = result(6, 0.2, [0.3, 0.4])  # arrived before the window opened: rates count it, latencies do not
    clipped = clip_to_window([A, B, e, late, early], 0.4, 3.0)
    assert [r.request_id for r in clipped] == [1, 4]  # A arrived at 0 s, before the window
    assert clipped[0] is B  # finished inside the window: kept whole
    cut = clipped[1]
    assert (cut.finish_reason, cut.finish_time, cut.num_generated) == (IN_FLIGHT, 3.0, 2)
    assert cut.interceptions[0].returned_at == 3.0 and cut.interceptions[0].resumed_at is None
    assert cut.normalized_latency == pytest.approx(0.75)
    s = summarize([A, B, e, late, early], duration_s=99.0, window=(0.4, 3.0))
    assert (s["duration_s"], s["completed"], s["in_flight"]) == (pytest.approx(2.6), 1, 1)
    assert s["completed_rps"] == pytest.approx(2 / 2.6)  # B (1.0 s) and `early` (0.4 s) finished inside it
    assert s["normalized_latency_mean_s"] == pytest.approx((0.5 / 4 + 0.75) / 2)  # B and E


def test_results_json_fills_the_keys_every_run_must_have():
    out = results_json([{"policy": "min-waste", "qps": 2.0, "completed_rps": 1.5}])
    (run,) = out["runs"]
    assert run["completed_rps"] == 1.5 and run["recompute_share"] is None and run["waste_by_cause"] is None
    with pytest.raises(ValueError, match="'policy'"):
        results_json([{"qps": 1.0}])


RUNS = [
    {"policy": p, "qps": q, "completed_rps": q * 0.9, "normalized_latency_mean_s": v, "normalized_latency_p99_s": v,
     "throughput_tok_s": 50.0, "recompute_share": 0.1, "waste_by_cause": {"preserve": 2e9, "swap": 0.0, "discard": 1e9}}
    for p, pts in {"discard": [(1.0, 0.2), (2.0, 0.5)], "min-waste": [(1.0, 0.1), (2.0, None)]}.items()
    for q, v in pts
]


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png_files(tmp_path):
    plot_latency_vs_rate(RUNS, tmp_path / "latency.png", slo=0.3)
    plot_latency_vs_rate([r for r in RUNS if r["qps"] == 1.0], tmp_path / "bars.png", slo=0.3)  # one rate: bars
    samples = [{"t": 10 + i * 0.1, "running": i % 5, "preserved": 2, "swapped_host": i % 3, "free": 10 - i % 5}
               for i in range(50)]
    plot_memory_timeline(samples, tmp_path / "memory.png", policy="swap", x_max=8.0)
    assert all(_is_png(tmp_path / f) for f in ("latency.png", "bars.png", "memory.png"))


def test_markdown_summary_has_a_table_per_rate_with_rows_in_the_order_given():
    md = markdown_summary(RUNS)
    assert [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| discard") or
            line.startswith("| min-waste")] == ["| discard", "| min-waste"] * 2
    reordered = markdown_summary([r for r in RUNS if r["policy"] == "min-waste"] + [r for r in RUNS if r["policy"] == "discard"])
    assert reordered.index("| min-waste") < reordered.index("| discard")
    assert md.index("### 1 requests/s") < md.index("### 2 requests/s")
    assert md.count("| policy |") == 2
    rows = [line for line in md.splitlines() if line.startswith("| min-waste")]
    assert rows[0].split(" | ")[2] == "0.1000" and rows[1].split(" | ")[2] == "-"
    assert "2 / 0 / 1" in rows[0]
