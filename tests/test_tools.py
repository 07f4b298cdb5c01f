"""tools, tool_pool and triggers on their own: argument checks, tool outcomes (raise, time out,
wrong type), the worker slots an abandoned call gives back, and trigger matching. No model needed."""
from __future__ import annotations

import math
import threading
import time

import pytest

import infercept_hf as ih
from infercept_hf.checks import as_token_ids
from infercept_hf.tool_pool import ToolPool
from infercept_hf.tools import ScriptedCall
from infercept_hf.triggers import TriggerMatcher
from reliability_helpers import CharTokenizer, eventually


def call(text: str = "2+2") -> ih.ToolCall:
    return ih.ToolCall("t", text, 0, (1, 2), 0.0)


def outcome(fn, **tool_kwargs) -> ih.tools.Answer:
    """Run one call to completion and poll its answer."""
    executor = ToolPool(2)
    pending = executor.submit(ih.Tool("t", end=[1], fn=fn, **tool_kwargs), call())
    pending.future.exception(timeout=5)
    return pending.poll(time.monotonic())


# ------------------------------------------------------------------ argument checks
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(name=""), ValueError, "non-empty str name"),
        (dict(end=[]), ValueError, "end must not be empty"),
        (dict(end=""), ValueError, "end must not be empty"),
        (dict(end=[1.5]), TypeError, "int token ids"),
        (dict(end=[True]), TypeError, "int token ids"),
        (dict(fn="not callable"), TypeError, "fn must be callable"),
        (dict(start="<c>"), TypeError, "both be strings or both token ids"),
        (dict(on_error="ignore"), ValueError, "on_error must be one of"),
        (dict(timeout=0), ValueError, "timeout must be a finite number > 0"),
        (dict(timeout=math.inf), ValueError, "timeout must be a finite number > 0"),
        (dict(expected_duration=-1), ValueError, "expected_duration must be a finite number >= 0"),
        (dict(expected_duration=math.nan), ValueError, "expected_duration"),
    ],
)
def test_bad_tools_are_refused(kwargs, exc, match):
    args = {"name": "t", "end": [1], "fn": str, **kwargs}
    with pytest.raises(exc, match=match):
        ih.Tool(**args)


@pytest.mark.parametrize(
    "segments, exc, match",
    [
        ([(-1, 0.1, [1])], ValueError, "segment 0: n_tokens must be a positive integer, got -1"),
        ([(0, 0.1, [1])], ValueError, "n_tokens must be a positive integer"),
        ([(2.5, 0.1, [1])], ValueError, "n_tokens must be a positive integer"),
        ([(True, 0.1, [1])], ValueError, "n_tokens must be a positive integer"),
        ([(3, 0.1, [1]), (2, -0.5, [1])], ValueError, "segment 1: pause_s must be a finite number >= 0"),
        ([(3, math.nan, [1])], ValueError, "pause_s must be a finite number"),
        ([(3, math.inf, [1])], ValueError, "pause_s must be a finite number"),
        ([(3, 0.1, [-4])], ValueError, "answer ids must be >= 0"),
        ([(3, 0.1, [1.0])], TypeError, "answer_ids must be a sequence of int token ids"),
        ([(3, 0.1, "abc")], TypeError, "answer_ids must be a sequence of int token ids"),
        ([(3, 0.1)], TypeError, "must be \\(n_tokens, pause_s, answer_ids\\)"),
    ],
)
def test_bad_scripts_are_refused(segments, exc, match):
    with pytest.raises(exc, match=match):
        ih.Scripted(segments)


def test_token_ids_accept_ints_of_any_kind_and_nothing_else():
    import numpy as np
    import torch

    assert as_token_ids([1, np.int64(2), torch.tensor(3)], "ids") == [1, 2, 3]
    for bad in ([1.0], ["1"], [None], "12", [False]):
        with pytest.raises(TypeError, match="ids must be a sequence of int token ids"):
            as_token_ids(bad, "ids")


# ------------------------------------------------------------------ outcomes
def test_a_raising_tool_answers_with_its_error_by_default():
    def boom(c):
        raise ZeroDivisionError("division by zero")

    answer = outcome(boom)
    assert answer.error == "tool 't' raised ZeroDivisionError: division by zero"
    assert answer.value == f"[error: {answer.error}]" and not answer.fail
    assert outcome(boom, on_error="fail").fail


@pytest.mark.parametrize("value", [{"a": 1}, None, 3, [1, "2"], [1.5], b"bytes"])
def test_a_wrong_return_type_always_fails_naming_the_tool(value):
    answer = outcome(lambda c: value)
    assert answer.fail and answer.error.startswith("tool 't' returned ")
    assert "expected str or list[int]" in answer.error


def test_text_and_id_answers_pass_through():
    assert outcome(lambda c: "4").value == "4"
    assert outcome(lambda c: (5, 6)).value == [5, 6]
    assert outcome(lambda c: []).value == []


def test_a_timed_out_call_is_abandoned_and_frees_its_slot():
    release = threading.Event()
    late = []

    def hangs(c):
        release.wait(5)
        late.append(c.text)
        return [9]

    executor = ToolPool(1)
    slow = ih.Tool("slow", end=[1], fn=hangs, timeout=0.5)
    t0 = time.monotonic()
    first = executor.submit(slow, ih.ToolCall("slow", "a", 0, (), t0))
    queued = executor.submit(ih.Tool("fast", end=[1], fn=lambda c: [7]), ih.ToolCall("fast", "b", 1, (), t0))
    assert first.poll(t0 + 0.1) is None and first.next_check(t0) == t0 + 0.5
    assert not queued.future.done(), "one worker slot: the second call waits for the first"
    answer = first.poll(t0 + 0.5)
    assert answer.error == "tool 'slow' timed out after 0.5 s" and not answer.fail
    assert queued.future.result(timeout=5) == [7], "the abandoned call handed its slot on"
    release.set()
    eventually(lambda: late == ["a"])
    assert executor.busy == 0, "the late answer came in, and nobody holds a slot"


def test_timeout_can_fail_the_request_instead():
    executor = ToolPool(1)
    gate = threading.Event()
    pending = executor.submit(ih.Tool("slow", end=[1], fn=lambda c: gate.wait(5), timeout=1, on_error="fail"), call())
    answer = pending.poll(call().started_at + 1.0)
    gate.set()
    assert answer.fail and "timed out after 1 s" in answer.error


def test_close_abandons_queued_calls_before_they_start():
    started = []
    gate = threading.Event()
    executor = ToolPool(1)
    executor.submit(ih.Tool("a", end=[1], fn=lambda c: gate.wait(5)), call())
    queued = executor.submit(ih.Tool("b", end=[1], fn=lambda c: started.append(c) or [1]), call())
    executor.close()
    gate.set()
    time.sleep(0.05)
    assert started == [] and queued.future.cancelled()
    with pytest.raises(RuntimeError, match="closed"):
        executor.submit(ih.Tool("c", end=[1], fn=str), call())


def test_scripted_call_is_due_at_its_deadline():
    pending = ScriptedCall(ih.Scripted([(2, 0.25, [4])]).segments[0], started_at=1.0)
    assert pending.next_check(1.0) == 1.25 and pending.poll(1.2) is None
    assert pending.poll(1.25).value == [4]


# ------------------------------------------------------------------ triggers
def test_string_trigger_takes_the_text_after_the_last_start():
    tok = CharTokenizer()
    matcher = TriggerMatcher([ih.Tool("calc", start="<c>", end="</c>", fn=str)], tok)
    assert matcher.match(tok.encode("x <c>1 y <c>2+")) is None
    tool, text = matcher.match(tok.encode("x <c>1 y <c> 2+3 </c>"))
    assert tool.name == "calc" and text == "2+3"


def test_a_trigger_that_never_completes_never_matches():
    tok = CharTokenizer()
    matcher = TriggerMatcher([ih.Tool("calc", start="<c>", end="</c>", fn=str)], tok)
    text = "<c>" + "1+" * 200
    assert all(matcher.match(tok.encode(text[:n])) is None for n in range(1, len(text) + 1))


def test_token_trigger_and_duplicate_names():
    matcher = TriggerMatcher([ih.Tool("t", start=[5], end=[6, 7], fn=str)])
    assert matcher.match([1, 5, 2, 3, 6]) is None
    tool, text = matcher.match([1, 5, 2, 3, 6, 7])
    assert text == "2 3"
    with pytest.raises(ValueError, match="tool names must be unique"):
        TriggerMatcher([ih.Tool("t", end=[1], fn=str), ih.Tool("t", end=[2], fn=str)])
