"""Python functions as tools, called through three chat formats (Hermes/Qwen, Llama 3.1 JSON,
Mistral): the function gets the right arguments, the context at resume is the chat template's
rendering of the whole transcript, and the tokens equal plain transformers' from that context,
under every policy, with one and two parallel calls, in a batch with a request that calls nothing."""
from __future__ import annotations

import asyncio
import functools
import json
import threading
import time

import pytest
import torch
from transformers import LogitsProcessorList
from transformers.cli.serving.utils import get_response_template

import infercept_hf as ih
from chat_formats import FORMATS, ForceText, format_model, format_tokenizer
from conftest import TEST_COST

CALLS: list[tuple[str, dict]] = []


def weather(city: str) -> str:
    """Weather now.

    Args:
        city: A city.
    """
    CALLS.append(("weather", {"city": city}))
    time.sleep(0.02)
    return f"sunny in {city}"


def add(a: int, b: int) -> int:
    """Sum.

    Args:
        a: A number.
        b: A number.
    """
    CALLS.append(("add", {"a": a, "b": b}))
    return a + b


FUNCTIONS = {"weather": weather, "add": add}
ONE_CALL = (("weather", '{"city": "Rome"}'),)
TWO_CALLS = (("weather", '{"city": "Rome"}'), ("add", '{"a": 2, "b": 40}'))
RESULTS = {"weather": "sunny in Rome", "add": "42"}
MAX_NEW = 3  # free tokens after the forced ones


def setup(name: str):
    fmt = FORMATS[name]
    tok = format_tokenizer(fmt)
    return fmt, tok, format_model(fmt, tok)


def prompt_ids(tok, question: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": question}], tools=list(FUNCTIONS.values()),
                                   add_generation_prompt=True, return_dict=False)


@functools.cache
def case(name: str, calls: tuple[tuple[str, str], ...]):
    """The format's tokenizer and model, two prompts (one forced to call, one to answer "Hi!"), what
    is forced, and the reference loop's ids and renders for each (computed once per case)."""
    fmt, tok, model = setup(name)
    questions = ["Rome?", "Say hi."]
    forced = [tok.encode(fmt.call_text(list(calls)), add_special_tokens=False), tok.encode("Hi!", add_special_tokens=False)]
    max_new = len(forced[0]) + MAX_NEW
    refs = [reference(model, tok, q, f, max_new) for q, f in zip(questions, forced)]
    assert CALLS == [(n, json.loads(a)) for n, a in calls]
    CALLS.clear()
    return tok, model, [prompt_ids(tok, q) for q in questions], forced, max_new, refs


@torch.no_grad()
def reference(model, tok, question: str, forced: list[int], max_new: int) -> tuple[list[int], list[str]]:
    """Plain transformers: generate to EOS, parse the calls with transformers' parser, run them,
    render the transcript with the chat template and generate again from it. Returns the final
    ids and the rendered transcript at each resume (checked to be what the context decodes to)."""
    messages = [{"role": "user", "content": question}]
    tools = list(FUNCTIONS.values())
    ctx = prompt_ids(tok, question)
    proc = LogitsProcessorList([ForceText([(ctx, forced)])])
    template = get_response_template(tok, model)
    eos, generated, renders, n = tok.eos_token_id, 0, [], 0
    while True:
        ids = torch.tensor([ctx])
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new - generated,
                             logits_processor=proc, do_sample=False, eos_token_id=eos,
                             pad_token_id=tok.pad_token_id)[0, len(ctx):].tolist()
        before, ctx, generated = ctx, ctx + new, generated + len(new)
        if generated >= max_new or new[-1] != eos:
            return ctx, renders
        parsed = tok.parse_response(new, template, prefix=before, tools=tools)
        if not parsed.get("tool_calls"):
            return ctx, renders
        calls = [{"id": c.get("id", f"call{n + i:05d}"), "type": "function", "function": c["function"]}
                 for i, c in enumerate(parsed["tool_calls"])]
        n += len(calls)
        results = [FUNCTIONS[c["function"]["name"]](**c["function"]["arguments"]) for c in calls]
        messages += [{"role": "assistant", "content": parsed.get("content", ""), "tool_calls": calls}]
        messages += [{"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"], "content": str(r)}
                     for c, r in zip(calls, results)]
        rendered = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        have = tok.decode(ctx)
        assert rendered.startswith(have), (rendered, have)
        ctx = ctx + tok.encode(rendered[len(have):], add_special_tokens=False)
        assert tok.decode(ctx) == rendered
        renders.append(rendered)


CASES = [("hermes", ONE_CALL), ("hermes", TWO_CALLS), ("llama", ONE_CALL), ("mistral", ONE_CALL),
         ("mistral", TWO_CALLS)]


@pytest.mark.parametrize("policy", ih.POLICIES)
@pytest.mark.parametrize("name, calls", CASES, ids=[f"{n}-{len(c)}call" for n, c in CASES])
def test_forced_calls_match_the_plain_transformers_loop(name, calls, policy):
    tok, model, prompts, forced, max_new, refs = case(name, calls)

    contexts: dict[int, list[int]] = {0: list(prompts[0]), 1: list(prompts[1])}
    resumed: dict[int, list[str]] = {0: [], 1: []}

    def on_event(ev: ih.RequestEvent) -> None:
        if ev.kind == "tool_answer":
            contexts[ev.request_id] += ev.token_ids
            resumed[ev.request_id].append(tok.decode(contexts[ev.request_id]))
        elif ev.kind == "token":
            contexts[ev.request_id] += ev.token_ids

    proc = LogitsProcessorList([ForceText(list(zip(prompts, forced)))])
    with ih.InterceptEngine(model, tokenizer=tok, policy=policy, num_blocks=160, block_size=8,
                            cost_model=TEST_COST) as engine:
        rids = [engine.add_request(p, max_new_tokens=max_new, tools=[weather, add], on_event=on_event,
                                   sampler=ih.Sampler(proc)) for p in prompts]
        results = engine.run()
        engine.cache.check_integrity()
    expected = [(n, json.loads(a)) for n, a in calls]
    assert sorted(CALLS, key=str) == sorted(expected, key=str)  # each function ran once, with these arguments
    for rid, prompt, (ref_ids, renders) in zip(rids, prompts, refs):
        assert prompt + results[rid].token_ids == ref_ids
        assert resumed[rid] == renders  # the context at each resume is the template's rendering
    record = results[rids[0]].interceptions[0]
    assert [(c.name, c.arguments) for c in record.calls] == expected
    assert [c.result for c in record.calls] == [RESULTS[n] for n, _ in calls]
    assert all(c.seconds >= 0 and c.error is None for c in record.calls)
    assert results[rids[1]].interceptions == []
    CALLS.clear()


def run_forced(name: str, text: str, tools, max_new_extra: int = 2) -> tuple[ih.RequestResult, str]:
    """One request forced to write `text`; its result and its decoded context."""
    fmt, tok, model = setup(name)
    prompt = prompt_ids(tok, "Rome?")
    forced = tok.encode(text, add_special_tokens=False)
    proc = LogitsProcessorList([ForceText([(prompt, forced)])])
    with ih.InterceptEngine(model, tokenizer=tok, num_blocks=128, block_size=8, cost_model=TEST_COST) as engine:
        rid = engine.add_request(prompt, max_new_tokens=len(forced) + max_new_extra, tools=tools,
                                 sampler=ih.Sampler(proc))
        result = engine.run()[rid]
        engine.cache.check_integrity()
    return result, tok.decode(prompt + result.token_ids)


def refuse(a: int) -> int:
    """Always fails.

    Args:
        a: Anything.
    """
    raise RuntimeError("no way")


@pytest.mark.parametrize("text, error", [
    ('<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call><|im_end|>', "unknown tool 'nope'"),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1\n</tool_call><|im_end|>', "could not be parsed"),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call><|im_end|>', "missing 1 required"),
    ('<tool_call>\n{"name": "refuse", "arguments": {"a": 1}}\n</tool_call><|im_end|>', "RuntimeError: no way"),
])
def test_bad_calls_are_answered_to_the_model_as_errors(text, error):
    CALLS.clear()
    result, context = run_forced("hermes", text, [add, refuse])
    [record] = result.interceptions
    assert result.finish_reason == "length" and record.resumed_at is not None  # the model went on
    [call] = record.calls
    assert error in call.error and error in record.error
    assert f"<tool_response>\n[error: {call.error}]\n</tool_response><|im_end|>\n<|im_start|>assistant\n" in context


def test_on_error_fail_ends_the_request():
    result, _ = run_forced("hermes", '<tool_call>\n{"name": "refuse", "arguments": {"a": 1}}\n</tool_call><|im_end|>',
                           [ih.function_tool(refuse, on_error="fail")])
    assert result.finish_reason == "error" and "RuntimeError: no way" in result.error


def test_a_turn_without_calls_ends_at_eos():
    result, _ = run_forced("hermes", "Sunny.<|im_end|>", [weather], max_new_extra=5)
    assert result.finish_reason == "stop" and result.interceptions == []


def no_docstring(x: int) -> int:
    return x


def test_bad_tools_are_refused_at_the_boundary():
    fmt, tok, model = setup("hermes")
    with ih.InterceptEngine(model, tokenizer=tok, num_blocks=32, block_size=8, cost_model=TEST_COST) as engine:
        with pytest.raises(ValueError, match="'no_docstring' cannot be described as a JSON schema"):
            engine.add_request([1, 2], tools=[no_docstring])
        with pytest.raises(ValueError, match="two tools share the name 'add'"):
            engine.add_request([1, 2], tools=[add, ih.function_tool(add, timeout=1.0)])
        with pytest.raises(ValueError, match="two tools share the name 'weather'"):
            engine.add_request([1, 2], tools=[weather, ih.Tool("weather", end="</w>", fn=str)])
        with pytest.raises(TypeError, match="Tool objects or functions, got int"):
            engine.add_request([1, 2], tools=[3])
    bare = format_tokenizer(fmt)
    bare.chat_template = None
    with ih.InterceptEngine(model, tokenizer=bare, num_blocks=32, block_size=8, cost_model=TEST_COST) as engine:
        with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
            engine.add_request([1, 2], tools=[add])
    fmt, tok, model = setup("llama")
    tok.response_template = None  # a Llama has no transformers fallback
    with ih.InterceptEngine(model, tokenizer=tok, num_blocks=32, block_size=8, cost_model=TEST_COST) as engine:
        with pytest.raises(ValueError, match="no tool-call format for this model.*model_type 'llama'.*response_template="):
            engine.add_request([1, 2], tools=[add])
        engine.add_request([1, 2], tools=[add], response_template=FORMATS["llama"].response_template)  # passed: fine


def test_async_engine_streams_a_function_call():
    fmt, tok, model = setup("mistral")
    prompt = prompt_ids(tok, "Rome?")
    forced = tok.encode(fmt.call_text(list(ONE_CALL)), add_special_tokens=False)
    proc = LogitsProcessorList([ForceText([(prompt, forced)])])

    async def main() -> list[ih.RequestEvent]:
        engine = ih.InterceptEngine(model, tokenizer=tok, num_blocks=64, block_size=8, cost_model=TEST_COST)
        async with ih.AsyncInterceptEngine(engine) as aengine:
            return [ev async for ev in aengine.stream(prompt, max_new_tokens=len(forced) + 2, tools=[weather],
                                                      sampler=ih.Sampler(proc))]

    events = asyncio.run(asyncio.wait_for(main(), 60))
    kinds = [e.kind for e in events if e.kind != "token"]
    assert kinds == ["tool_call", "tool_answer", "finish"]
    answer = tok.decode(next(e for e in events if e.kind == "tool_answer").token_ids)
    assert answer == '[TOOL_RESULTS]{"content": "sunny in Rome", "call_id": "call00000"}[/TOOL_RESULTS]'


BARRIER = threading.Barrier(2, timeout=10)


def meet(name: str) -> str:
    """Waits until the other call is running too.

    Args:
        name: Who arrives.
    """
    BARRIER.wait()  # raises BrokenBarrierError if the calls ran one after the other
    return f"{name} met"


def test_parallel_calls_run_concurrently_and_answer_in_call_order():
    BARRIER.reset()
    calls = "\n".join(f'<tool_call>\n{{"name": "meet", "arguments": {{"name": "{n}"}}}}\n</tool_call>' for n in "ab")
    result, context = run_forced("hermes", calls + "<|im_end|>", [meet])
    [record] = result.interceptions
    assert [(c.arguments, c.result, c.error) for c in record.calls] == [({"name": "a"}, "a met", None),
                                                                       ({"name": "b"}, "b met", None)]
    assert "<tool_response>\na met\n</tool_response>\n<tool_response>\nb met\n</tool_response><|im_end|>" in context
