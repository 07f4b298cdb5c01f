"""infercept-serve driven by the official `openai` client on loopback, with the bundled model."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json

import httpx
import openai
import pytest

from infercept_hf.demo import calculator
from serve_helpers import (CALCULATOR_SCHEMA, TIMEOUT_S, bundled, idle_and_empty, lookup, reference, serving,
                           wait_until)

QUESTION = [{"role": "user", "content": "What is 123 * 45?"}]
SLOW = {"model": "m", "messages": [{"role": "user", "content": "What is the capital of Peru?"}], "max_tokens": 40,
        "stream": True}  # the model calls `lookup`, which the server runs for SLOW_TOOL_S


def _render(messages, tools=None) -> list[int]:
    """The transcript as the chat template renders it (calls' arguments as dicts, as templates take them)."""
    _, tok = bundled()
    def as_dict(call):
        return {**call, "function": {**call["function"], "arguments": json.loads(call["function"]["arguments"])}}

    messages = [{**m, "tool_calls": [as_dict(c) for c in m["tool_calls"]]} if m.get("tool_calls") else m
                for m in messages]
    return list(tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                        return_dict=False))


def _text(ids: list[int]) -> str:
    """The model's text as the server returns it: markers kept, the end of turn dropped."""
    _, tok = bundled()
    return tok.decode([i for i in ids if i != tok.eos_token_id])


@pytest.fixture(scope="module")
def server():
    with serving() as running:
        yield running


def test_models_health_and_a_completion_equal_to_transformers(server):
    service, srv, client = server
    assert [m.id for m in client.models.list().data] == ["infercept-demo"]
    assert httpx.get(srv.base_url[:-3] + "/health").json() == {"status": "ok"}
    prompt = "<user>What is 6 * 7?<assistant>"
    out = client.completions.create(model="infercept-demo", prompt=prompt, max_tokens=12, temperature=0)
    _, tok = bundled()
    ids = tok(prompt).input_ids
    ref = reference(ids, 12)
    assert out.choices[0].text == _text(ref)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(ref)
    assert out.choices[0].finish_reason == ("stop" if ref[-1] == tok.eos_token_id else "length")


def test_a_stream_carries_the_same_text_and_its_usage(server):
    _, _, client = server
    messages = [{"role": "user", "content": "Hello, who are you?"}]
    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    ref = reference(_render(messages), 16)
    assert whole.usage.completion_tokens == len(ref)


def test_client_tool_round_trip_reuses_the_paused_context(server):
    service, _, client = server
    first = client.chat.completions.create(model="m", messages=QUESTION, tools=[CALCULATOR_SCHEMA], max_tokens=32,
                                           temperature=0, prompt_cache_key="round-trip")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("calculator", {"expression": "123*45"})
    assert service.engine.stats()["paused"] >= 1  # the context waits, paused, for the client's answer
    transcript = [*QUESTION, choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "5535"}]
    second = client.chat.completions.create(model="m", messages=transcript, tools=[CALCULATOR_SCHEMA],
                                            max_tokens=32, temperature=0, prompt_cache_key="round-trip")
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    full = _render(transcript, [CALCULATOR_SCHEMA])
    assert second.usage.prompt_tokens == len(full)
    ref = reference(full, 32)  # plain transformers on the whole transcript
    assert second.usage.completion_tokens == len(ref)
    assert second.choices[0].message.content == _text(ref)
    assert second.choices[0].message.content == "The answer is 5535."
    # the client's gap was learned as the pause of its tool, for min-waste's next placement
    assert service.engine.stats()["duration_estimates"]["client:calculator"]["observations"] >= 1


def test_a_streamed_tool_call_comes_as_a_delta(server):
    _, _, client = server
    chunks = list(client.chat.completions.create(model="m", messages=QUESTION, tools=[CALCULATOR_SCHEMA],
                                                 max_tokens=32, temperature=0, stream=True))
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == \
        [(0, "calculator", {"expression": "123*45"})]
    assert calls[0].id.startswith("call_")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_server_side_tool_runs_inside_the_server():
    with serving(server_tools=[calculator]) as (service, _, client):
        out = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=40, temperature=0)
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "stop" and message.content == "The answer is 5535."
        (done,) = message.model_extra["server_tool_calls"]
        assert (done["name"], json.loads(done["arguments"]), done["result"]) == \
            ("calculator", {"expression": "123*45"}, "5535")
        chunks = list(client.chat.completions.create(model="m", messages=QUESTION, max_tokens=40, temperature=0,
                                                     stream=True))
        shown = [c.choices[0].delta.model_extra.get("server_tool_call") for c in chunks if c.choices]
        shown = [s for s in shown if s]
        assert [s.get("result") for s in shown] == [None, "5535"]  # the call as it happens, then its result
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "The answer is 5535."


def test_bad_input_is_answered_openai_style_and_the_server_goes_on(server):
    service, srv, client = server
    url = srv.base_url + "/chat/completions"
    ok = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=2,
                                        extra_body={"cache_salt": "x", "some_vendor_field": {"a": 1}})
    assert ok.choices[0].message is not None  # unknown fields are ignored
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=TIMEOUT_S)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="messages.0 is malformed"):
        client.chat.completions.create(model="m", messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        client.chat.completions.create(model="m", messages=QUESTION, n=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens: Input should be a valid integer"):
        client.chat.completions.create(model="m", messages=QUESTION, extra_body={"max_tokens": "many"})
    limit = min(512, service.engine.cache.capacity_tokens)
    with pytest.raises(openai.BadRequestError, match=f"context limit is {limit} tokens") as err:
        client.chat.completions.create(model="m", messages=QUESTION, max_tokens=5000)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="chat template cannot render"):  # the demo knows six tools only
        client.chat.completions.create(model="m", messages=QUESTION, tools=[
            {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}])
    assert client.chat.completions.create(model="m", messages=QUESTION, max_tokens=2).choices


def test_a_full_queue_answers_429_with_retry_after():
    with serving(max_queue=1, server_tools=[lookup]) as (service, srv, client):
        with httpx.stream("POST", srv.base_url + "/chat/completions", json=SLOW, timeout=TIMEOUT_S) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)
            r = httpx.post(srv.base_url + "/chat/completions", json={**SLOW, "stream": False}, timeout=TIMEOUT_S)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        assert wait_until(lambda: service._in_flight == 0)
        assert client.chat.completions.create(model="m", messages=QUESTION, max_tokens=2).choices


def test_api_key_is_required_except_for_health():
    with serving(api_key="sk-test") as (_, srv, client):
        assert client.chat.completions.create(model="m", messages=QUESTION, max_tokens=2).choices
        wrong = openai.OpenAI(base_url=srv.base_url, api_key="sk-wrong", max_retries=0, timeout=TIMEOUT_S)
        with pytest.raises(openai.AuthenticationError, match="valid API key"):
            wrong.models.list()
        assert httpx.get(srv.base_url + "/models", timeout=TIMEOUT_S).status_code == 401
        assert httpx.get(srv.base_url[:-3] + "/health", timeout=TIMEOUT_S).status_code == 200


def test_a_client_that_disconnects_mid_stream_frees_every_block():
    with serving(server_tools=[lookup]) as (service, srv, _):
        with httpx.stream("POST", srv.base_url + "/chat/completions", json=SLOW, timeout=TIMEOUT_S) as r:
            lines = (line for line in r.iter_lines() if line)
            assert "server_tool_call" in next(lines) + next(lines)  # paused inside the server, at its tool
            assert service.engine.stats()["paused"] == 1
        assert wait_until(lambda: idle_and_empty(service))
        assert service.engine.stats()["finished"].get("cancelled") == 1


def test_sixteen_concurrent_sessions_each_reuse_their_own_context():
    with serving(num_blocks=128) as (service, _, client):
        def session(i: int) -> tuple[int, int]:
            messages = [{"role": "user", "content": f"What is {i + 2} * 7?"}]
            first = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0,
                                                   extra_headers={"X-Session-ID": f"s{i}"})
            messages += [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "And plus one?"}]
            second = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0,
                                                    extra_headers={"X-Session-ID": f"s{i}"})
            ref = reference(_render(messages), 8)
            assert second.choices[0].message.content == _text(ref)
            return first.usage.prompt_tokens, second.usage.prompt_tokens_details.cached_tokens

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            turns = list(pool.map(session, range(16), timeout=TIMEOUT_S * 2))
        assert all(cached >= prompt for prompt, cached in turns)
        assert len(service.store) == 16  # each conversation held, paused, for its next turn
        with service.engine._lock:
            service.engine.cache.check_integrity()


def test_held_sessions_past_the_bound_are_dropped_oldest_first():
    with serving(max_sessions=1) as (service, _, client):
        for i in range(2):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"Hi {i}"}], max_tokens=4)
        assert wait_until(lambda: service.engine.stats()["paused"] == 1 and len(service.store) == 1)
        assert service.engine.stats()["finished"].get("cancelled") == 1


def test_metrics_scrape(server):
    service, srv, client = server
    out = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=4, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=QUESTION, n=3)
    text = httpx.get(srv.base_url[:-3] + "/metrics", timeout=TIMEOUT_S).text
    series = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert int(series['infercept_requests_total{endpoint="chat",outcome="length"}']) >= 1
    assert int(series['infercept_requests_total{endpoint="chat",outcome="rejected"}']) >= 1
    assert int(series["infercept_prompt_tokens_total"]) >= out.usage.prompt_tokens
    assert int(series["infercept_cached_tokens_total"]) == service.metrics.cached_tokens
    assert int(series['infercept_requests{state="paused"}']) == service.engine.stats()["paused"]
    assert int(series['infercept_kv_blocks_in_use{pool="device"}']) >= 0
    assert int(series["infercept_time_to_first_token_seconds_count"]) >= 1
    for name in ("infercept_recomputed_tokens_total", "infercept_swapped_tokens_total",
                 'infercept_kv_blocks_in_use{pool="host"}', 'infercept_requests{state="waiting"}'):
        assert name in series


def test_bench_client_mode_replays_sessions_and_sees_them_cached(server):
    from infercept_hf.bench.client import replay, summarize
    from infercept_hf.bench.workloads import generate_trace

    _, srv, _ = server
    trace = generate_trace("qa", 2, 100.0, seed=0, time_scale=0.01, context_scale=0.02)
    sessions, wall = asyncio.run(replay(srv.base_url, trace, turns=3, turn_tokens=4, timeout_s=TIMEOUT_S))
    summary = summarize(sessions, wall)
    assert (summary["sessions_completed"], summary["turns"], summary["turn_errors"]) == (2, 6, 0)
    for session in sessions:
        for before, after in zip(session.turns, session.turns[1:]):
            # the whole previous context but its last token (which has no KV yet) was reused
            assert after.cached_tokens == before.prompt_tokens + before.completion_tokens - 1
    later = [t for s in sessions for t in s.turns[1:]]
    assert summary["cached_share_later"] == sum(t.cached_tokens for t in later) / sum(t.prompt_tokens for t in later)


def test_a_new_session_reports_the_prefix_another_session_computed():
    """Nothing held to continue (no session is kept): the second prompt's shared head still comes
    from the blocks the first one left cached, and its usage says so."""
    head = "<user>" + "Tell me about the weather in Lima and in Quito, please. " * 3
    _, tok = bundled()
    with serving(max_sessions=0) as (service, _, client):
        texts = []
        for tail in ("Lima?<assistant>", "Quito?<assistant>"):
            out = client.completions.create(model="infercept-demo", prompt=head + tail, max_tokens=4, temperature=0)
            texts.append((tail, out))
    first_ids, second_ids = (tok(head + tail).input_ids for tail, _ in texts)
    common = next((i for i, (a, b) in enumerate(zip(first_ids, second_ids)) if a != b), len(first_ids))
    assert texts[0][1].usage.prompt_tokens_details.cached_tokens == 0
    assert texts[1][1].usage.prompt_tokens_details.cached_tokens == common // 8 * 8 > 0
    assert texts[1][1].choices[0].text == _text(reference(second_ids, 4))
