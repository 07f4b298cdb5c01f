"""Fault isolation, one regression test per failure seen: a fault while the engine works for one
request ends that request (finish_reason "error", a message naming the cause, blocks freed);
the other requests of the same step finish exactly as plain transformers would."""
from __future__ import annotations

import asyncio
import math
import re

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import infercept_hf as ih
from conftest import left_pad, prompts_for, reference_scripted
from infercept_hf.triggers import TriggerMatcher
from reliability_helpers import CharTokenizer, Gate, ManualClock, drive, make_engine, reference_tool

TOK = CharTokenizer()


class Utf8Tokenizer(CharTokenizer):
    """Encodes as UTF-8 bytes, as byte-level tokenizers do: a lone surrogate cannot be encoded."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [min(b, 127) for b in text.encode("utf-8")]


class RaisingDecode(CharTokenizer):
    """decode raises once armed."""

    armed = False

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if self.armed:
            raise ValueError("cannot decode")
        return super().decode(ids, skip_special_tokens)


class FlakyRunner:
    def __init__(self, inner) -> None:
        self.inner, self.fail_at, self.calls = inner, set(), 0

    def forward(self, chunks):
        self.calls += 1
        if self.calls in self.fail_at:
            raise RuntimeError("transient device error")
        return self.inner.forward(chunks)


@pytest.fixture(scope="module")
def setup(llama):
    prompt, other = prompts_for(41, [9, 7])
    return prompt, other, reference_scripted(llama, prompt, None, 12), reference_scripted(llama, other, None, 12)


def _bystander_ok(results, rid, expected):
    assert results[rid].finish_reason == "length" and results[rid].token_ids == expected


def test_an_answer_the_tokenizer_cannot_encode_fails_its_request_only(llama, setup):
    prompt, other, free, other_free = setup
    engine = make_engine(llama, "swap", tokenizer=Utf8Tokenizer())
    rid = engine.add_request(prompt, max_new_tokens=12, tools=[ih.Tool("t", end=[free[3]], fn=lambda c: "\ud800")])
    bystander = engine.add_request(other, max_new_tokens=12)
    results = drive(engine)
    assert results[rid].finish_reason == "error"
    assert "could not encode its answer: UnicodeEncodeError" in results[rid].error
    assert results[rid].token_ids == free[:4]
    _bystander_ok(results, bystander, other_free)


def test_a_clock_stepping_back_during_a_tool_call_is_clamped(llama, setup):
    prompt, other, free, other_free = setup
    clock = ManualClock()
    clock.now = 100.0
    gate = Gate([40, 41])
    engine = make_engine(llama, "preserve", clock=clock)
    rid = engine.add_request(prompt, max_new_tokens=12, tools=[ih.Tool("t", end=[free[3]], fn=gate)])
    for _ in range(6):
        engine.step()
    clock.now = 10.0  # an NTP correction, mid-call
    gate.release_one()
    results = drive(engine)
    assert results[rid].token_ids == reference_tool(llama, prompt, free[3], [40, 41], 12)
    assert results[rid].tool_seconds >= 0 and results[rid].finish_time >= results[rid].arrival_time
    assert engine.stats()["duration_estimates"]["t"]["estimate_s"] == 0.0


class _BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def _raise_bad_str(call):
    raise _BadStr


@pytest.mark.parametrize("fn, on_error, match", [
    (_raise_bad_str, "fail", r"raised _BadStr: <_BadStr whose str\(\) raised>"),
    (lambda c: _BadRepr(), "answer", r"returned _BadRepr \(<_BadRepr whose repr\(\) raised>\)"),
])
def test_hostile_tool_outcomes_are_rendered_safely(llama, setup, fn, on_error, match):
    prompt, other, free, other_free = setup
    engine = make_engine(llama, "discard", tokenizer=TOK)
    rid = engine.add_request(prompt, max_new_tokens=12, tools=[ih.Tool("t", end=[free[3]], fn=fn, on_error=on_error)])
    bystander = engine.add_request(other, max_new_tokens=12)
    results = drive(engine)
    assert results[rid].finish_reason == "error"
    assert re.search(match, results[rid].error)
    _bystander_ok(results, bystander, other_free)


def test_a_text_answer_outside_the_vocabulary_is_refused(llama, setup):
    prompt, other, free, other_free = setup

    class Wide(CharTokenizer):
        def encode(self, text, add_special_tokens=False):
            return [ord(ch) for ch in text]

    engine = make_engine(llama, "preserve", tokenizer=Wide())
    rid = engine.add_request(prompt, max_new_tokens=12, tools=[ih.Tool("t", end=[free[3]], fn=lambda c: "\u00ff")])
    bystander = engine.add_request(other, max_new_tokens=12)
    results = drive(engine)
    assert results[rid].error == "tool 't' answered with token ids outside the vocabulary [0, 128): [255]"
    _bystander_ok(results, bystander, other_free)


def test_a_decode_failure_leaves_a_tool_free_request_of_the_same_batch_running(llama, setup):
    prompt, other, free, other_free = setup
    tok = RaisingDecode()
    engine = make_engine(llama, "min-waste", tokenizer=tok)
    rid = engine.add_request(prompt, max_new_tokens=12, tools=[ih.Tool("t", end="\x7f", fn=lambda c: "x")])
    bystander = engine.add_request(other, max_new_tokens=12)
    engine.step()
    tok.armed = True
    results = drive(engine)
    assert results[rid].finish_reason == "error"
    assert results[rid].error == "looking for a tool call (trigger matching) failed: ValueError: cannot decode"
    _bystander_ok(results, bystander, other_free)


def test_a_forward_that_raises_once_loses_nothing(llama, setup):
    prompt, other, free, other_free = setup
    engine = make_engine(llama, "swap")
    runner = engine.runner = FlakyRunner(engine.runner)
    keep = engine.add_request(prompt, max_new_tokens=12)
    dropped = engine.add_request(other, max_new_tokens=12)
    short = engine.add_request(other, max_new_tokens=3)
    engine.step()
    engine.cancel(dropped)
    runner.fail_at = {2, 5}
    with pytest.raises(RuntimeError, match="transient device error"):
        engine.step()
    engine.cache.check_integrity()
    assert engine.has_unfinished()
    assert [r.finish_reason for r in engine.step()] == ["cancelled"], "gathered before the raise, returned next"
    with pytest.raises(RuntimeError, match="transient device error"):
        engine.run()  # finishes `short` on forward 4, then raises on forward 5
    engine.cache.check_integrity()
    results = engine.run()
    assert results[short].token_ids == other_free[:3], "a raising run() keeps what it gathered for the next call"
    assert results[keep].token_ids == free and not engine.has_unfinished()
    assert engine.cache.is_empty()


def test_a_sampler_whose_scores_turn_nan_fails_its_request_only(llama, setup):
    prompt, other, free, other_free = setup
    engine = make_engine(llama, "preserve")
    nan = ih.Sampler(lambda ids, scores: scores * math.nan)
    rid = engine.add_request(prompt, max_new_tokens=12, sampler=nan)
    bystander = engine.add_request(other, max_new_tokens=12)
    results = drive(engine)
    assert results[rid].error == "sampling failed: the scores are NaN after the logits processors"
    assert results[rid].token_ids == []
    _bystander_ok(results, bystander, other_free)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(sampler="greedy"), TypeError, "sampler must be an infercept_hf.Sampler"),
    (dict(eos_token_id=-1), ValueError, r"eos_token_id must hold token ids >= 0, got \[-1\]"),
    (dict(eos_token_id=[3, -2]), ValueError, r"eos_token_id must hold token ids >= 0, got \[-2\]"),
    (dict(eos_token_id="</s>"), TypeError, "eos_token_id must be a sequence of int token ids"),
    (dict(eos_token_id=[1.5]), TypeError, "eos_token_id must be a sequence of int token ids"),
    (dict(arrival_time=math.nan), ValueError, "arrival_time must be finite"),
    (dict(arrival_time="now"), TypeError, "arrival_time must be a number of seconds"),
    (dict(tools=ih.Tool("t", end=[1], fn=str)), TypeError, "tools must be a list of infercept_hf.Tool objects"),
])
def test_per_request_arguments_are_checked_at_the_boundary(llama, kwargs, exc, match):
    engine = make_engine(llama)
    with pytest.raises(exc, match=match):
        engine.add_request([1, 2, 3], **kwargs)
    assert not engine.has_unfinished()


@pytest.mark.parametrize("kwargs, match", [
    (dict(processors="topk"), "processors must be callable"),
    (dict(do_sample=1), "do_sample must be a bool"),
    (dict(do_sample=True, seed=1.5), "seed must be an int"),
])
def test_bad_samplers_are_refused(kwargs, match):
    with pytest.raises(TypeError, match=match):
        ih.Sampler(**kwargs)


def test_tool_timeout_counts_running_time_not_the_wait_for_a_worker(llama, setup):
    prompt, other, free, other_free = setup
    clock = ManualClock()
    gate = Gate([40])
    engine = make_engine(llama, "swap", clock=clock, max_tool_workers=1)
    slow = engine.add_request(prompt, max_new_tokens=12, tools=[ih.Tool("slow", end=[free[3]], fn=gate)])
    quick = engine.add_request(prompt, max_new_tokens=12,
                               tools=[ih.Tool("quick", end=[free[3]], fn=lambda c: [41], timeout=1.0)])
    for _ in range(6):
        engine.step()
    assert len(engine.scheduler.paused) == 2 and engine.executor.busy == 1, "quick waits for the one worker"
    clock.advance(5.0)  # far past quick's timeout, all of it spent waiting
    engine.step()
    assert len(engine.scheduler.paused) == 2, "a queued call does not time out"
    gate.release_one()
    results = drive(engine)
    assert results[slow].error is None and results[quick].error is None
    assert results[quick].token_ids == reference_tool(engine.model, prompt, free[3], [41], 12)


def test_a_long_end_string_is_found_whatever_its_length_in_tokens():
    class Bytes(CharTokenizer):
        def encode(self, text, add_special_tokens=False):
            return list(text.encode("utf-8"))

        def decode(self, ids, skip_special_tokens=False):
            return bytes(ids).decode("utf-8", errors="replace")

    end = "\U0001F600" * 5  # 5 characters, 20 bytes: 20 tokens in a byte-level tokenizer
    tok = Bytes()
    matcher = TriggerMatcher([ih.Tool("t", start="<c>", end=end, fn=str)], tok)
    tool, text = matcher.match(tok.encode("say <c>2+2" + end))
    assert tool.name == "t" and text == "2+2"
    assert matcher.match(tok.encode("say <c>2+2" + end[:-1])) is None


def test_async_a_failing_request_fails_its_own_stream_only(llama, setup):
    prompt, other, free, other_free = setup
    engine = make_engine(llama, "swap", tokenizer=Utf8Tokenizer())
    runner = engine.runner = FlakyRunner(engine.runner)
    runner.fail_at = {3}  # and one transient forward failure on the way: retried, nobody fails

    async def main():
        async with ih.AsyncInterceptEngine(engine) as aengine:
            bad = aengine.generate(prompt, max_new_tokens=12,
                                   tools=[ih.Tool("t", end=[free[3]], fn=lambda c: "\ud800")])
            good = aengine.generate(other, max_new_tokens=12)
            return await asyncio.wait_for(asyncio.gather(bad, good), timeout=30)

    bad, good = asyncio.run(main())
    assert bad.finish_reason == "error" and "could not encode its answer" in bad.error
    assert good.finish_reason == "length" and good.token_ids == other_free
    assert runner.calls > 3


# ------------------------------------------------------------------ generate() options
class StopAfter(StoppingCriteria):
    def __init__(self, n_total: int) -> None:
        self.n_total = n_total

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.n_total, dtype=torch.bool)


@pytest.mark.parametrize("kwargs", [
    dict(stopping_criteria=StoppingCriteriaList([StopAfter(15)])),
    dict(max_time=1e-9),
    dict(repetition_penalty=1.5),
    dict(min_new_tokens=4, eos_token_id=5),
])
def test_generate_honours_options_as_model_generate_does(llama, kwargs):
    ids, mask = left_pad(prompts_for(43, [5, 9, 7]))
    args = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, **kwargs)
    expected = llama.generate(ids, **args)
    got = ih.generate(llama, ids, policy="swap", **args)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("kwargs, match", [
    (dict(guidance_scale=2.0), "guidance_scale"),
    (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha"),
    (dict(token_type_ids=torch.zeros(1, 4, dtype=torch.long)), r"\['token_type_ids'\]"),
])
def test_generate_refuses_options_it_cannot_honour(llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ih.generate(llama, torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, **kwargs)


def test_async_a_step_that_keeps_raising_fails_every_stream(llama, setup):
    prompt, other, free, other_free = setup
    engine = make_engine(llama, "swap")
    runner = engine.runner = FlakyRunner(engine.runner)
    runner.fail_at = set(range(1, 10_000))  # the device is gone for good

    async def main():
        async with ih.AsyncInterceptEngine(engine) as aengine:
            with pytest.raises(RuntimeError, match="driver thread failed"):
                await asyncio.wait_for(aengine.generate(prompt, max_new_tokens=12), timeout=30)

    asyncio.run(main())
    assert runner.calls == ih.serving.MAX_STEP_FAILURES


class RaisingCriterion(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        raise KeyError("criterion")


class RaisingProcessor:
    def __call__(self, input_ids, scores):
        raise KeyError("processor")


@pytest.mark.parametrize("kwargs, match", [
    (dict(stopping_criteria=StoppingCriteriaList([RaisingCriterion()])), "a stopping criterion raised KeyError"),
    (dict(logits_processor=[RaisingProcessor()]), "generation failed for 2 row.*sampling raised KeyError"),
])
def test_generate_raises_what_model_generate_would_raise(llama, kwargs, match):
    ids, mask = left_pad(prompts_for(44, [5, 8]))
    with pytest.raises(RuntimeError, match=match):
        ih.generate(llama, ids, attention_mask=mask, max_new_tokens=4, **kwargs)
