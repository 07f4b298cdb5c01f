"""The benchmark runner: the CLI end to end, the peers, and the sustainable-rate reading."""
from __future__ import annotations

import json

import pytest
import torch

import subprocess
import sys

from infercept_hf.bench import policy_runs
from infercept_hf.bench.__main__ import build_parser, default_warmup, main, measurement_window
from infercept_hf.bench.jobs import EngineSettings, check_policies, make_jobs
from infercept_hf.bench.metrics import RUN_KEYS
from infercept_hf.bench.workloads import generate_trace

from conftest import TEST_COST, VOCAB, tiny_model

VLLM_KEYS = ("mean_ttft_ms", "p99_tpot_ms", "median_itl_ms", "p99_e2el_ms", "request_throughput",
             "output_throughput", "goodput")


def test_cli_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERCEPT_CACHE_DIR", str(tmp_path / "profiles"))
    out = tmp_path / "bench"
    threads = torch.get_num_threads()
    try:
        main(["--model", "tiny", "--num-requests", "4", "--qps", "8,16", "--policies", "discard,min-waste",
              "--num-blocks", "48", "--time-scale", "0.005", "--context-scale", "0.05", "--out", str(out),
              "--warmup", "0", "--window", "60"])  # a window past the run's end: every request completes
    finally:
        torch.set_num_threads(threads)  # main() sets its own; leave the session's as it was
    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]
    assert [(r["policy"], r["qps"]) for r in runs] == [
        ("discard", 8.0), ("min-waste", 8.0), ("discard", 16.0), ("min-waste", 16.0)
    ]
    for run in runs:
        for key in (*RUN_KEYS, *VLLM_KEYS):
            assert run[key] is not None, key
        assert run["completed"] == 4
        assert set(run["waste_by_cause"]) == {"preserve", "swap", "discard"}
        assert 0 <= run["recompute_share"] <= 1
    assert runs[0]["recompute_share"] > 0  # discard recomputes every resumed context
    assert set(data["sustainable_rate"]) == set(data["sustainable_rate_note"]) == {"discard", "min-waste"}
    for name in ("latency_vs_rate.png", "memory_discard.png", "memory_min-waste.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    summary = (out / "summary.md").read_text()
    assert "| min-waste |" in summary and "Sustainable rate" in summary


def test_every_contender_produces_the_same_tokens():
    """Greedy float32: the policies and both transformers peers differ in cost, never in output."""
    model = tiny_model("llama")
    trace = generate_trace("mix", 3, 20.0, 1, time_scale=0.002, context_scale=0.04, max_context=96)
    jobs = make_jobs(trace, VOCAB, seed=1)
    settings = EngineSettings(num_blocks=32, block_size=8, max_batch_tokens=64, cost_model=TEST_COST)
    tokens = {}
    for policy in ("discard", "oracle", "hf-cb", "hf-generate"):
        run = policy_runs.run_real(model, policy, jobs, settings)
        assert [r.finish_reason for r in run.results] == ["length"] * 3, policy
        assert [len(r.interceptions) for r in run.results] == [len(j.scripted) for j in jobs]
        tokens[policy] = [r.token_ids for r in run.results]
        for r, job in zip(run.results, jobs):  # a scripted tool returns at its deadline, whoever runs it
            for rec, seg in zip(r.interceptions, job.scripted.segments):
                assert rec.returned_at - rec.paused_at == pytest.approx(seg.pause_s, abs=1e-9), policy
        summary = policy_runs.summarize_run(policy, 20.0, run)
        assert summary["completed"] == 3
        if policy.startswith("hf-"):
            assert summary["recomputed_tokens"] > 0  # every resubmission re-reads some context
    assert tokens["oracle"] == tokens["discard"] == tokens["hf-cb"] == tokens["hf-generate"]


def test_sustainable_rate_interpolates_the_slo_crossing_and_flags_a_non_monotonic_curve():
    runs = [
        {"policy": "a", "qps": 1.0, "normalized_latency_mean_s": 0.05},
        {"policy": "a", "qps": 2.0, "normalized_latency_mean_s": 0.08},
        {"policy": "a", "qps": 3.0, "normalized_latency_mean_s": 0.12},
        {"policy": "b", "qps": 1.0, "normalized_latency_mean_s": 0.5},
        {"policy": "c", "qps": 1.0, "normalized_latency_mean_s": 0.01},
        {"policy": "c", "qps": 2.0, "normalized_latency_mean_s": 0.02},
        {"policy": "d", "qps": 1.0, "normalized_latency_mean_s": 0.05},
        {"policy": "d", "qps": 2.0, "normalized_latency_mean_s": 0.12},
        {"policy": "d", "qps": 3.0, "normalized_latency_mean_s": 0.09},  # falls again: a burst or noise
    ]
    rates = policy_runs.sustainable_rates(runs, 0.1)
    assert rates["a"] == policy_runs.Sustainable(pytest.approx(2.5), "interpolated")
    assert rates["b"] == policy_runs.Sustainable(None, "")
    assert rates["c"] == policy_runs.Sustainable(2.0, "not broken")
    assert rates["d"] == policy_runs.Sustainable(1.0, "non-monotonic")  # the last pass before the break, as measured


def test_sustainable_rate_needs_the_slo_kept_to_the_end_of_a_steady_window():
    late = "normalized_latency_late_mean_s"
    runs = [
        {"policy": "a", "qps": 1.0, "normalized_latency_mean_s": 0.05, late: 0.06},
        # the mean passes, but latency climbs past the SLO in the window's second half: not sustained
        {"policy": "a", "qps": 2.0, "normalized_latency_mean_s": 0.08, late: 0.14},
        {"policy": "b", "qps": 1.0, "normalized_latency_mean_s": 0.05, "transient": True},
        {"policy": "c", "qps": 1.0, "normalized_latency_mean_s": 0.05},
        {"policy": "c", "qps": 2.0, "normalized_latency_mean_s": 0.5, "transient": True},  # left out
    ]
    rates = policy_runs.sustainable_rates(runs, 0.1)
    assert rates["a"] == policy_runs.Sustainable(pytest.approx(1.5), "interpolated")  # 0.06 -> 0.14 crosses at 1.5
    assert rates["b"] == policy_runs.Sustainable(None, "transient")
    assert rates["c"] == policy_runs.Sustainable(1.0, "not broken")


def test_default_warmup_outlasts_the_long_tool_calls_and_a_short_trace_is_transient():
    args = build_parser().parse_args([])
    trace = generate_trace("mix", 400, 0.5, 0, 1.0, 1.0, 2048)
    tool = sorted(r.tool_seconds for r in trace)
    span = max(r.arrival_s for r in trace)
    warmup = default_warmup(trace)
    assert warmup >= tool[int(0.99 * (len(tool) - 1))] > 0.1 * span
    assert span > 2 * warmup and measurement_window(trace, args) == (warmup, span, False)
    short = generate_trace("mix", 400, 8.0, 0, 1.0, 1.0, 2048)  # the same requests in a quarter of the time
    start, end, transient = measurement_window(short, args)
    assert transient and start == end / 2  # the warm-up cut at half the span, the window too short to tell


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown policies"):
        check_policies(["min-waste", "fastest"])


@pytest.mark.parametrize("argv, message", [
    (["--simulate", "no-such/gpu"], "argument --simulate: invalid choice"),
    (["--qps", "1,x"], "--qps takes comma-separated numbers"),
    (["--num-requests", "0"], "--num-requests must be > 0"),
    (["--trace", "/no/such/trace.jsonl"], "no such file"),
    (["--policies", "min-waste,fastest"], "unknown policies"),
    (["--simulate", "gpt-j-6b/a100-80g", "--policies", "hf-cb"], "cannot be simulated"),
    (["--policies", "min-waste", "--prefetch-reserve", "0.2"], "neither is in --policies"),
    (["--policies", "predictive", "--prefetch-quantile", "0"], "--prefetch-quantile must be in (0, 1]"),
    (["--policies", "predictive-oracle", "--prefetch-reserve", "1.5"], "--prefetch-reserve must be in [0, 1]"),
])
def test_bad_flags_end_in_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_bad_trace_content_ends_in_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"request_id": 0}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["--trace", str(bad), "--simulate", "gpt-j-6b/a100-80g", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 1" in err[0] and "is missing" in err[0]


def test_help_and_flag_checks_load_neither_torch_nor_transformers():
    code = ("import sys; from infercept_hf.bench.__main__ import build_parser, parse_args; "
            "build_parser().format_help(); parse_args(['--qps', '1,2']); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_prefetch_flags_reach_the_predictive_engines_only(monkeypatch):
    from infercept_hf.bench import policy_runs
    from infercept_hf.bench.__main__ import parse_args, predictor_settings
    from infercept_hf.bench.presets import get_preset
    from infercept_hf.bench.simulator import meta_model

    args = parse_args(["--simulate", "vicuna-13b/a100-80g", "--policies", "min-waste,predictive-oracle",
                       "--prefetch-reserve", "0.25"])
    settings = predictor_settings(args)
    assert (settings.max_held_fraction, settings.prefetch_quantile) == (0.25, 0.05)  # the quantile left at its default
    assert predictor_settings(parse_args(["--policies", "predictive"])) is None
    built = {}
    real_preset_engine = policy_runs.preset_engine

    def spy(preset, policy, *rest, **options):
        engine, clock = real_preset_engine(preset, policy, *rest, **options)
        built[policy] = engine.scheduler.predictor
        return engine, clock

    monkeypatch.setattr(policy_runs, "preset_engine", spy)
    preset = get_preset("vicuna-13b/a100-80g")
    model = meta_model(preset.make_config())
    for policy in ("min-waste", "predictive-oracle"):
        policy_runs.run_simulated(preset, model, policy, [], predictor=settings)
    assert built["min-waste"] is None
    predictor = built["predictive"]
    assert predictor.max_held_blocks == int(0.25 * predictor.cache.num_blocks) > 0
