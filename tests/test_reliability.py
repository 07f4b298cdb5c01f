"""Reliability: tool faults, timeouts, cancellation in every state, exhausted pools, bad input,
shutdown with tools in flight, other threads, and the asyncio front end. Nothing may leak a block."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

import infercept_hf as ih
from conftest import prompts_for, reference_scripted, tiny_model
from infercept_hf.request import Status
from reliability_helpers import (
    CharTokenizer,
    Gate,
    ManualClock,
    drive,
    eventually,
    eventually_async,
    make_engine,
    reference_tool,
)

TOK = CharTokenizer()


def assert_holds_nothing(engine, rid: int) -> None:
    assert engine.cache.device_blocks(str(rid)) == 0 and engine.cache.host_blocks(str(rid)) == 0
    engine.cache.check_integrity()


@pytest.fixture(scope="module")
def prompt_and_free_run(llama):
    prompt = prompts_for(31, [9])[0]
    return prompt, reference_scripted(llama, prompt, None, 12)


# ------------------------------------------------------------------ tool faults
def test_tool_faults_stay_with_their_request(llama, prompt_and_free_run):
    """One engine, one fault per request: each ends as configured and the others never notice."""
    prompt, free = prompt_and_free_run
    end = free[3]

    def raises(call):
        raise ZeroDivisionError("division by zero")

    faults = {
        "raises": ih.Tool("calc", end=[end], fn=raises),
        "raises-fail": ih.Tool("calc", end=[end], fn=raises, on_error="fail"),
        "wrong-type": ih.Tool("calc", end=[end], fn=lambda c: {"answer": 4}),
        "out-of-vocab": ih.Tool("calc", end=[end], fn=lambda c: [5, 500]),
    }
    engine = make_engine(llama, "swap", tokenizer=TOK)
    rids = {name: engine.add_request(prompt, max_new_tokens=12, tools=[tool]) for name, tool in faults.items()}
    other_prompt = prompts_for(32, [7])[0]
    other = engine.add_request(other_prompt, max_new_tokens=12)
    results = drive(engine)
    cut = free.index(end) + 1
    error = "tool 'calc' raised ZeroDivisionError: division by zero"

    r = results[rids["raises"]]
    assert r.finish_reason == "length" and r.interceptions[0].error == error
    assert r.token_ids == reference_tool(llama, prompt, end, TOK.encode(f"[error: {error}]"), 12)
    r = results[rids["raises-fail"]]
    assert (r.finish_reason, r.error, r.token_ids) == ("error", error, free[:cut])
    r = results[rids["wrong-type"]]
    assert r.finish_reason == "error" and r.error.startswith("tool 'calc' returned dict")
    r = results[rids["out-of-vocab"]]
    assert r.finish_reason == "error" and "tool 'calc' answered with token ids outside the vocabulary" in r.error
    assert results[other].finish_reason == "length"
    assert results[other].token_ids == reference_scripted(llama, other_prompt, None, 12)
    assert engine.stats()["finished"] == {"length": 2, "error": 3}


def test_text_answers_without_a_tokenizer_fail_the_request_not_the_engine(llama, prompt_and_free_run):
    prompt, free = prompt_and_free_run
    engine = make_engine(llama)
    raises = engine.add_request(prompt, max_new_tokens=12, tools=[ih.Tool("t", end=[free[3]], fn=lambda c: 1 / 0)])
    text = engine.add_request(prompt, max_new_tokens=12, tools=[ih.Tool("t", end=[free[3]], fn=lambda c: "4")])
    results = drive(engine)
    assert "raised ZeroDivisionError" in results[raises].error and "no tokenizer" in results[raises].error
    assert results[text].error.startswith("tool 't' answered with text; the engine has no tokenizer")


@pytest.mark.parametrize("on_error", ["answer", "fail"])
def test_a_tool_past_its_timeout_is_abandoned_and_its_late_answer_ignored(llama, prompt_and_free_run, on_error):
    prompt, free = prompt_and_free_run
    end = free[3]
    release = threading.Event()
    late = []

    def hangs(call):
        release.wait(10)
        late.append(call)
        return [99, 98]

    engine = make_engine(llama, "preserve", tokenizer=TOK)
    tool = ih.Tool("slow", end=[end], fn=hangs, timeout=0.1, on_error=on_error)
    rid = engine.add_request(prompt, max_new_tokens=12, tools=[tool])
    r = drive(engine)[rid]
    error = "tool 'slow' timed out after 0.1 s"
    # the timeout's answer is due at its deadline, which is when the pause is recorded as ending
    assert r.interceptions[0].error == error and r.interceptions[0].tool_seconds == pytest.approx(0.1)
    if on_error == "fail":
        assert (r.finish_reason, r.error) == ("error", error)
    else:
        assert r.finish_reason == "length"
        assert r.token_ids == reference_tool(llama, prompt, end, TOK.encode(f"[error: {error}]"), 12)
    release.set()
    eventually(lambda: len(late) == len(r.interceptions))
    assert engine.executor.busy == 0 and 99 not in r.token_ids


def test_a_trigger_that_never_completes_runs_to_max_new_tokens(llama, prompt_and_free_run):
    prompt, free = prompt_and_free_run
    engine = make_engine(llama, tokenizer=TOK)
    calls = []
    rid = engine.add_request(prompt, max_new_tokens=12,
                             tools=[ih.Tool("calc", start="<calc>", end="</calc>", fn=calls.append)])
    r = drive(engine)[rid]
    assert (r.finish_reason, r.token_ids, r.interceptions, calls) == ("length", free, [], [])


# ------------------------------------------------------------------ cancellation
VICTIM = ih.Scripted([(2, 1.0, [5, 6])])
BYSTANDER = ih.Scripted([(3, 0.5, [7])])


def _reach(engine, clock, rid, state: str) -> None:
    req = engine._requests[rid]
    if state == "waiting":
        return
    if state == "running":
        engine.step()
        assert req.status == Status.RUNNING
        return
    for _ in range(20):
        if req.status == Status.PAUSED:
            break
        engine.step()
    assert req.status == Status.PAUSED
    if state == "resuming":  # the answer is in; recomputing the discarded context takes several steps
        clock.advance(1.0)
        engine.step()
        assert req.status == Status.RUNNING and req.resume_pending_since is not None and req.uncached > 1
        return
    placement = {"preserved": "preserve", "swapped": "swap", "discarded": "discard"}[state]
    assert req.strategy == placement


@pytest.mark.parametrize(
    "state, policy",
    [("waiting", "min-waste"), ("running", "min-waste"), ("preserved", "preserve"), ("swapped", "swap"),
     ("discarded", "discard"), ("resuming", "discard")],
)
def test_cancel_in_any_state_frees_everything(llama, state, policy):
    clock = ManualClock()
    # "resuming" needs a recompute spanning steps: with prefix sharing the discarded full blocks come back at once
    engine = make_engine(llama, policy, clock=clock, max_batch_tokens=6, prefix_sharing=state != "resuming")
    prompts = prompts_for(33, [10, 6])
    victim = engine.add_request(prompts[0], max_new_tokens=8, interceptions=VICTIM)
    bystander = engine.add_request(prompts[1], max_new_tokens=8, interceptions=BYSTANDER)
    _reach(engine, clock, victim, state)
    held = engine.cache.device_blocks(str(victim)) + engine.cache.host_blocks(str(victim))
    assert held > 0 or state in ("waiting", "discarded")
    assert engine.cancel(victim) and not engine.cancel(victim)
    assert_holds_nothing(engine, victim)
    results = drive(engine, clock)
    cancelled = results[victim]
    assert cancelled.finish_reason == "cancelled"
    assert reference_scripted(llama, prompts[0], VICTIM, 8)[: len(cancelled.token_ids)] == cancelled.token_ids
    assert results[bystander].token_ids == reference_scripted(llama, prompts[1], BYSTANDER, 8)
    assert not engine.cancel(victim) and not engine.cancel(12345)


def test_cancel_while_its_tool_runs_abandons_the_call(llama, prompt_and_free_run):
    prompt, free = prompt_and_free_run
    gate = Gate([40])
    engine = make_engine(llama, "swap", max_tool_workers=1)
    rid = engine.add_request(prompt, max_new_tokens=12, tools=[ih.Tool("t", end=[free[3]], fn=gate)])
    for _ in range(12):
        engine.step()
    assert engine._requests[rid].status == Status.PAUSED and engine.executor.busy == 1
    assert engine.cancel(rid)
    assert engine.executor.busy == 0, "the abandoned call no longer holds the only worker slot"
    assert drive(engine)[rid].finish_reason == "cancelled"
    gate.open.set()


# ------------------------------------------------------------------ exhaustion
@pytest.fixture(scope="module")
def tight_workload(llama):
    prompts = prompts_for(34, [10, 7, 12, 9, 8, 11])
    trace = [ih.Scripted([(3, 0.5, [5, 6])]), ih.Scripted([(2, 0.25, [7]), (2, 1.0, [8, 9])])] * 3
    return prompts, trace, [reference_scripted(llama, p, s, 10) for p, s in zip(prompts, trace)]


@pytest.mark.parametrize("policy", ih.POLICIES)
def test_tight_device_and_no_host_pool_still_finish_exactly(llama, tight_workload, policy):
    """Six requests, room for about two, no host memory: queueing, preemption and discard, never a crash."""
    clock = ManualClock()
    engine = make_engine(llama, policy, num_blocks=9, host_pool_bytes=0, clock=clock)
    prompts, trace, expected = tight_workload
    ids = [engine.add_request(p, max_new_tokens=10, interceptions=s) for p, s in zip(prompts, trace)]
    results = drive(engine, clock)
    assert [results[rid].token_ids for rid in ids] == expected
    assert engine.stats()["swapped_bytes"] == 0


def test_requests_that_can_never_fit_are_refused(llama):
    engine = make_engine(llama, num_blocks=6)
    with pytest.raises(ValueError, match=r"needs up to 25 tokens of KV .* pool holds 24 \(6 blocks of 4\)"):
        engine.add_request([1] * 20, max_new_tokens=5)
    with pytest.raises(ValueError, match="answers 3"):
        engine.add_request([1] * 18, max_new_tokens=4, interceptions=ih.Scripted([(2, 0, [1, 2, 3])]))
    engine.add_request([1] * 20, max_new_tokens=4)


def test_sliding_window_footprint_is_bounded():
    """Mistral keeps a 12-token window: 3 blocks of 4 hold a request of any length, 2 never do."""
    mistral = tiny_model("mistral")
    prompt = prompts_for(35, [30])[0]
    script = ih.Scripted([(5, 0.0, [9, 10])])
    engine = make_engine(mistral, "swap", num_blocks=3)
    rid = engine.add_request(prompt, max_new_tokens=20, interceptions=script)
    assert drive(engine)[rid].token_ids == reference_scripted(mistral, prompt, script, 20)
    with pytest.raises(ValueError, match="pool holds 8"):
        make_engine(mistral, num_blocks=2).add_request(prompt, max_new_tokens=20)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "prompt, kwargs, exc, match",
    [
        ([], {}, ValueError, "prompt_ids is empty"),
        (torch.tensor([], dtype=torch.long), {}, ValueError, "prompt_ids is empty"),
        ([1, 128], {}, ValueError, r"outside the vocabulary \[0, 128\): \[128\]"),
        ([1, -3], {}, ValueError, "outside the vocabulary"),
        ([1.0, 2.0], {}, TypeError, "prompt_ids must be a sequence of int token ids"),
        ("hello", {}, TypeError, "prompt_ids must be a sequence of int token ids, got str"),
        (torch.tensor([1.0, 2.0]), {}, TypeError, "integer token ids, got a torch.float32 tensor"),
        (torch.ones(2, 3, dtype=torch.long), {}, ValueError, "must be 1-D"),
        ([1] * 512, {}, ValueError, "prompt has 512 tokens but the model supports 512 positions"),
        ([1] * 500, {"max_new_tokens": 20}, ValueError, "needs up to 520 positions .* supports 512"),
        ([1, 2], {"max_new_tokens": 0}, ValueError, "max_new_tokens must be a positive integer"),
        ([1, 2], {"max_new_tokens": 2.5}, ValueError, "max_new_tokens must be a positive integer"),
        ([1, 2], {"tools": ["calc"]}, TypeError, "tools must be infercept_hf.Tool objects or functions, got str"),
        ([1, 2], {"interceptions": [(1, 0, [1])]}, TypeError, "interceptions must be an infercept_hf.Scripted"),
        ([1, 2], {"interceptions": ih.Scripted([(1, 0, [1, 200])])}, ValueError,
         r"Scripted segment 0: answer ids outside the vocabulary \[0, 128\): \[200\]"),
        ([1, 2], {"tools": [ih.Tool("c", end="</c>", fn=str)]}, ValueError, "need a tokenizer"),
        ([1, 2], {"on_event": "print"}, TypeError, "on_event must be callable"),
    ],
)
def test_bad_input_is_refused_at_the_boundary(llama, prompt, kwargs, exc, match):
    engine = make_engine(llama, num_blocks=160)
    with pytest.raises(exc, match=match):
        engine.add_request(prompt, **kwargs)
    assert not engine.has_unfinished() and engine.cache.is_empty()


# ------------------------------------------------------------------ shutdown
def test_close_with_tools_in_flight_frees_everything_and_refuses_later_calls(llama, prompt_and_free_run):
    prompt, free = prompt_and_free_run
    gate = Gate([40])
    started = []
    engine = make_engine(llama, "swap", max_tool_workers=1)
    tools = [ih.Tool("t", end=[free[3]], fn=lambda c: started.append(c) or gate(c))]
    for _ in range(3):
        engine.add_request(prompt, max_new_tokens=12, tools=tools)
    engine.add_request(prompts_for(36, [5])[0], max_new_tokens=12)
    for _ in range(8):
        engine.step()
    eventually(lambda: len(started) == 1)
    assert engine.executor.busy == 1, "one call runs, the others queue for the one slot"
    driver_results = []
    driver = threading.Thread(target=lambda: driver_results.append(engine.run()))
    steps = engine.stats_.steps
    driver.start()
    eventually(lambda: engine.stats_.steps > steps)  # run() is driving
    engine.close()
    driver.join(5)
    assert not driver.is_alive() and len(driver_results) == 1, "close() ends a run() on another thread"
    assert engine.cache.is_empty() and engine.cache.free_device_blocks() == engine.cache.num_blocks
    assert engine.cache.free_host_blocks() == engine.cache.num_host_blocks and engine.executor.busy == 0
    for call in (lambda: engine.add_request(prompt), lambda: engine.step(), engine.run, lambda: engine.cancel(0)):
        with pytest.raises(RuntimeError, match="InterceptEngine is closed"):
            call()
    assert engine.stats()["device_blocks_used"] == 0
    engine.close()
    gate.open.set()
    time.sleep(0.05)
    assert len(started) == 1, "queued calls never start after close"


def test_context_manager_closes(llama):
    with make_engine(llama) as engine:
        engine.add_request([1, 2, 3], max_new_tokens=30)
        engine.step()
    assert engine.closed and engine.cache.is_empty()


# ------------------------------------------------------------------ events and threads
def test_events_arrive_in_order_and_rebuild_the_result(llama, prompt_and_free_run):
    prompt, free = prompt_and_free_run
    events = []
    engine = make_engine(llama, "discard")
    rid = engine.add_request(prompt, max_new_tokens=12, tools=[ih.Tool("t", end=[free[3]], fn=lambda c: [40, 41])],
                             on_event=events.append)
    result = drive(engine)[rid]
    kinds = [e.kind for e in events]
    assert kinds[-1] == "finish" and kinds.count("finish") == 1 and events[-1].result == result
    assert "tool_call" in kinds and kinds.index("tool_call") < kinds.index("tool_answer")
    assert [t for e in events for t in e.token_ids] == result.token_ids
    assert sum(e.kind == "token" for e in events) == result.num_generated == 12


def test_a_callback_may_raise_or_cancel_its_own_request(llama, caplog):
    engine = make_engine(llama)
    seen = []

    def stop_after_three(event):
        seen.append(event.kind)
        if len(seen) == 3:
            engine.cancel(event.request_id)

    def raises(event):
        raise RuntimeError("listener bug")

    prompts = prompts_for(37, [6, 6])
    stopped = engine.add_request(prompts[0], max_new_tokens=10, on_event=stop_after_three)
    noisy = engine.add_request(prompts[1], max_new_tokens=10, on_event=raises)
    results = drive(engine)
    assert results[stopped].finish_reason == "cancelled" and seen[:3] == ["token"] * 3 and seen[-1] == "finish"
    assert results[noisy].token_ids == reference_scripted(llama, prompts[1], None, 10)
    assert "listener bug" in caplog.text


def test_add_and_cancel_from_other_threads_while_run_drives(llama, prompt_and_free_run):
    prompt, free = prompt_and_free_run
    anchor_gate = Gate([40])
    engine = make_engine(llama, "min-waste", num_blocks=40)
    anchor = engine.add_request(prompt, max_new_tokens=12, tools=[ih.Tool("t", end=[free[3]], fn=anchor_gate)])
    results: dict[int, ih.RequestResult] = {}
    driver = threading.Thread(target=lambda: results.update(engine.run()))
    driver.start()
    prompts = prompts_for(38, [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10])
    trace = ih.Scripted([(2, 0.01, [7, 8])])
    added: dict[int, list[int]] = {}
    cancelled: dict[int, bool] = {}
    lock = threading.Lock()

    def client(k: int) -> None:
        for j, p in enumerate(prompts[k::4]):
            rid = engine.add_request(p, max_new_tokens=6, interceptions=trace)
            with lock:
                added[rid] = p
            if j == 1:
                time.sleep(0.01)
                with lock:
                    cancelled[rid] = engine.cancel(rid)

    clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(30)
    anchor_gate.open.set()
    driver.join(60)
    assert not driver.is_alive() and set(results) == {anchor, *added}
    for rid, p in added.items():
        r = results[rid]
        expected = reference_scripted(llama, p, trace, 6)
        if cancelled.get(rid):
            assert r.finish_reason == "cancelled" and expected[: len(r.token_ids)] == r.token_ids
        else:
            assert r.finish_reason == "length" and r.token_ids == expected
    assert engine.cache.is_empty()
    engine.cache.check_integrity()


# ------------------------------------------------------------------ asyncio
def test_async_stream_generate_and_consumers_that_leave(llama, prompt_and_free_run):
    prompt, free = prompt_and_free_run
    engine = make_engine(llama, "swap", tokenizer=TOK)
    gate = Gate([40])

    async def main():
        async with ih.AsyncInterceptEngine(engine) as aengine:
            tool = ih.Tool("t", end=[free[3]], fn=lambda c: [40, 41])
            streamed = [e async for e in aengine.stream(prompt, max_new_tokens=12, tools=[tool])]
            other = prompts_for(39, [7])[0]
            generated = await aengine.generate(other, max_new_tokens=8)

            async for event in aengine.stream(prompt, max_new_tokens=12):
                break  # the client went away after one token
            task = asyncio.create_task(
                aengine.generate(prompt, max_new_tokens=12, tools=[ih.Tool("t", end=[free[3]], fn=gate)]))
            await eventually_async(lambda: engine.executor.busy == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(ValueError, match="outside the vocabulary"):
                await aengine.generate([1, 999])
            await eventually_async(lambda: not engine.has_unfinished())
            assert engine.cache.is_empty() and engine.executor.busy == 0

            hanging = aengine.stream(prompt, max_new_tokens=12, tools=[ih.Tool("t", end=[free[3]], fn=gate)])
            first = await hanging.__anext__()
        assert first.kind == "token"
        rest = [e async for e in hanging]
        return streamed, other, generated, event, rest

    streamed, other, generated, first_event, rest = asyncio.run(main())
    gate.open.set()
    result = streamed[-1].result
    assert result.token_ids == [t for e in streamed for t in e.token_ids]
    assert result.token_ids == reference_tool(llama, prompt, free[3], [40, 41], 12)
    assert generated.token_ids == reference_scripted(llama, other, None, 8)
    assert first_event.kind == "token"
    assert rest[-1].result.finish_reason == "cancelled", "closing ends open streams with a cancelled result"
    assert engine.closed and engine.cache.is_empty()
