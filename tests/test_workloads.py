"""Synthetic workloads and trace files: deterministic, shaped as documented, exact on disk."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from infercept_hf.bench.traces import (
    from_reference,
    load_jsonl,
    load_reference,
    save_jsonl,
    save_reference,
    to_reference,
)
from infercept_hf.bench.workloads import KINDS, MIN_PROMPT, WORKLOADS, TraceRequest, generate_trace, to_scripted


def test_same_seed_same_trace_and_longer_traces_extend_shorter_ones():
    a = generate_trace("mix", 120, 2.0, seed=7)
    assert a == generate_trace("mix", 120, 2.0, seed=7)
    assert a != generate_trace("mix", 120, 2.0, seed=8)
    assert generate_trace("mix", 40, 2.0, seed=7) == a[:40]
    assert {r.kind for r in a} == set(KINDS)
    assert [r.request_id for r in a] == list(range(120))


def test_arrivals_are_poisson_at_the_rate_and_only_stretch_with_it():
    fast = generate_trace("qa", 4000, 4.0, seed=3)
    gaps = np.diff([0.0] + [r.arrival_s for r in fast])
    assert abs(gaps.mean() - 0.25) < 0.25 * 0.05
    assert abs(gaps.std() - 0.25) < 0.25 * 0.08  # exponential: std == mean
    slow = generate_trace("qa", 4000, 2.0, seed=3)
    assert np.allclose([r.arrival_s for r in slow], [2 * r.arrival_s for r in fast])
    assert [r.segments for r in slow] == [r.segments for r in fast]
    assert all(r.arrival_s == 0.0 for r in generate_trace("qa", 5, math.inf, seed=3))


@pytest.mark.parametrize("kind", KINDS)
def test_per_type_means_match_the_documented_table(kind):
    spec = WORKLOADS[kind]
    trace = generate_trace(kind, 3000, 1.0, seed=11)
    calls = [len(r.segments) for r in trace]
    pauses = [p for r in trace for _, p, _ in r.segments]
    context = [r.total_tokens for r in trace]
    assert min(calls) >= 1
    assert np.mean(calls) == pytest.approx(spec.calls_mean, rel=0.05)
    assert np.std(calls) == pytest.approx(spec.calls_std, rel=0.1)
    assert np.mean(pauses) == pytest.approx(spec.pause_mean_s, rel=0.05)
    assert np.std(pauses) == pytest.approx(spec.pause_std_s, rel=0.1)
    assert np.mean(context) == pytest.approx(spec.context_mean, rel=0.05)
    assert np.std(context) == pytest.approx(spec.context_std, rel=0.1)
    assert min(r.prompt_len for r in trace) >= MIN_PROMPT


@pytest.mark.parametrize("kind", ["arithmetic", "qa", "virtual_env"])
def test_answer_and_decode_lengths_match_where_the_context_leaves_room(kind):
    spec = WORKLOADS[kind]
    trace = generate_trace(kind, 2000, 1.0, seed=5)
    answers = [a for r in trace for _, _, a in r.segments]
    decodes = [n for r in trace for n, _, _ in r.segments] + [r.final_tokens for r in trace]
    assert np.mean(answers) == pytest.approx(spec.answer_mean, rel=0.05)
    assert np.mean(decodes) == pytest.approx(spec.decode_mean, rel=0.05)


def test_calculator_answers_are_short_and_chat_answers_are_tens_of_tokens():
    calc = [a for r in generate_trace("arithmetic", 500, 1.0, seed=1) for _, _, a in r.segments]
    chat = [a for r in generate_trace("chatbot", 500, 1.0, seed=1) for _, _, a in r.segments]
    assert np.mean(calc) < 5 < 10 < np.mean(chat)


def test_scales_multiply_pauses_and_token_lengths():
    base = generate_trace("mix", 100, 1.0, seed=2)
    scaled = generate_trace("mix", 100, 1.0, seed=2, time_scale=0.5, context_scale=0.25)

    def tokens(n):
        return max(1, round(n * 0.25))

    for b, s in zip(base, scaled):
        assert s.arrival_s == b.arrival_s and s.kind == b.kind
        assert s.prompt_len == tokens(b.prompt_len)
        assert s.final_tokens == tokens(b.final_tokens)
        assert s.segments == [(tokens(n), p * 0.5, tokens(a)) for n, p, a in b.segments]


def test_max_context_caps_every_request_and_keeps_those_that_fit():
    base = generate_trace("mix", 300, 1.0, seed=4, context_scale=0.05)
    capped = generate_trace("mix", 300, 1.0, seed=4, context_scale=0.05, max_context=96)
    assert all(r.total_tokens <= 96 for r in capped)
    for b, c in zip(base, capped):
        if b.total_tokens <= 96:
            assert c == b
        else:
            assert c.prompt_len == min(b.prompt_len, 48) and c.segments == b.segments[: len(c.segments)]
    assert sum(len(r.segments) for r in capped) > 300


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown workload"):
        generate_trace("search", 3, 1.0, seed=0)
    with pytest.raises(ValueError, match="qps"):
        generate_trace("qa", 3, 0.0, seed=0)
    with pytest.raises(ValueError, match="max_context"):
        generate_trace("qa", 3, 1.0, seed=0, max_context=1)


def test_to_scripted_gives_deterministic_dummy_ids_above_the_floor():
    req = generate_trace("image", 1, 1.0, seed=9, context_scale=0.1)[0]
    prompt, scripted, max_new = to_scripted(req, vocab_size=50, seed=1, min_token_id=3)
    assert len(prompt) == req.prompt_len
    assert max_new == sum(n for n, _, _ in req.segments) + req.final_tokens == req.max_new_tokens
    assert [(s.n_tokens, s.pause_s, len(s.answer_ids)) for s in scripted.segments] == req.segments
    every_id = prompt + [t for s in scripted.segments for t in s.answer_ids]
    assert min(every_id) >= 3 and max(every_id) < 50
    again = to_scripted(req, vocab_size=50, seed=1, min_token_id=3)
    assert again[0] == prompt and repr(again[1]) == repr(scripted)
    with pytest.raises(ValueError, match="min_token_id"):
        to_scripted(req, vocab_size=50, seed=1, min_token_id=0)


def test_jsonl_round_trip_is_exact(tmp_path):
    trace = generate_trace("mix", 60, 3.0, seed=6, time_scale=0.1)
    path = tmp_path / "trace.jsonl"
    save_jsonl(path, trace)
    assert load_jsonl(path) == trace


def _write_lines(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))


GOOD = {"request_id": 0, "arrival_s": 0.5, "kind": "qa", "prompt_len": 12, "segments": [[4, 0.7, 9]], "final_tokens": 3}


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"segments": [[4, -1.0, 9]]}, "segments[0][1]"),
        ({"segments": [[0, 0.7, 9]]}, "segments[0][0]"),
        ({"segments": [[4, 0.7]]}, "segments[0]"),
        ({"prompt_len": "12"}, "prompt_len"),
        ({"final_tokens": 0}, "final_tokens"),
        ({"arrival_s": True}, "arrival_s"),
        ({"kind": None}, "kind"),
        ({"extra": 1}, "extra"),
    ],
)
def test_bad_jsonl_names_the_line_and_the_field(tmp_path, bad, field):
    path = tmp_path / "bad.jsonl"
    _write_lines(path, [GOOD, {**GOOD, "request_id": 1, **bad}])
    with pytest.raises(ValueError, match=rf"line 2: field '{field}'".replace("[", r"\[").replace("]", r"\]")):
        load_jsonl(path)


def test_bad_jsonl_missing_field_bad_json_and_repeated_ids(tmp_path):
    path = tmp_path / "bad.jsonl"
    _write_lines(path, [{k: v for k, v in GOOD.items() if k != "final_tokens"}])
    with pytest.raises(ValueError, match="line 1: field 'final_tokens' is missing"):
        load_jsonl(path)
    _write_lines(path, [GOOD, "", "{not json"])
    with pytest.raises(ValueError, match="line 3: not valid JSON"):
        load_jsonl(path)
    _write_lines(path, [GOOD, GOOD])
    with pytest.raises(ValueError, match="line 2: field 'request_id' repeats 0"):
        load_jsonl(path)


def test_reference_form_round_trips_both_ways(tmp_path):
    trace = generate_trace("mix", 40, 1.0, seed=8)
    ref = to_reference(trace)
    back = from_reference(ref, qps=1.0, seed=8)
    assert [(r.prompt_len, r.segments, r.final_tokens) for r in back] == [
        (r.prompt_len, r.segments, r.final_tokens) for r in trace
    ]
    assert [r.arrival_s for r in back] == [r.arrival_s for r in trace]
    assert to_reference(back) == ref
    path = tmp_path / "ref.json"
    save_reference(path, trace)
    assert load_reference(path, qps=1.0, seed=8) == back


def test_reference_segments_map_as_the_reference_benchmark_reads_them():
    req = TraceRequest(0, 0.0, "qa", 100, [(10, 0.5, 20), (5, 1.5, 7)], 8)
    assert to_reference([req])["0"] == [
        {"prompt_tokens": 100, "completion_tokens": 10, "api_time": 0.5, "api_token_length": 20},
        {"prompt_tokens": 130, "completion_tokens": 5, "api_time": 1.5, "api_token_length": 7},
        {"prompt_tokens": 142, "completion_tokens": 8},
    ]
    data = {
        "a": [
            {"prompt_tokens": 50, "completion_tokens": 6, "api_time": 0, "api_token_length": 0},
            {"prompt_tokens": 999, "completion_tokens": 4, "api_time": 2.0, "api_token_length": 3},
            {"prompt_tokens": 999, "completion_tokens": 0, "api_time": 1.0, "api_token_length": 5},
        ]
    }
    (got,) = from_reference(data, qps=1.0, seed=0, kind="chatbot")
    assert (got.prompt_len, got.segments, got.final_tokens, got.kind) == (50, [(10, 2.0, 3), (1, 1.0, 5)], 1, "chatbot")
    half_call = {"b": [{"prompt_tokens": 5, "completion_tokens": 2}, {"completion_tokens": 2, "api_time": 1.0}]}
    with pytest.raises(ValueError, match="request 'b' segment 1: fields 'api_time' and 'api_token_length' come together"):
        from_reference(half_call, 1.0, 0)
    with pytest.raises(ValueError, match="request 'c' segment 0: field 'prompt_tokens' is missing"):
        from_reference({"c": [{"prompt": "hello", "completion_tokens": 2}]}, 1.0, 0)
