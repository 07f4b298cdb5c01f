"""`tool_choice` and `parallel_tool_calls` on infercept-serve's chat endpoint: a forced call is the
model's own continuation of the template's call opening (tokens equal plain transformers on that
prompt), bad choices are refused naming `tool_choice`, and `parallel_tool_calls=false` ends the
turn at the first call's close."""
from __future__ import annotations

import json
import re

import openai
import pytest
import torch

from chat_formats import FORMATS, format_tokenizer
from infercept_hf.chat_tools import ChatFormat
from infercept_hf.serve.forced_call import forced_call
from infercept_hf.serve.sessions import ClientTool, HeldSession, SessionStore, TurnSpec
from serve_helpers import CALCULATOR_SCHEMA, bundled, reference, serving

GREETING = [{"role": "user", "content": "hello there"}]  # unforced, the model calls a tool it knows, not calculator
LOOKUP_SCHEMA = {"type": "function", "function": {
    "name": "lookup", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server():
    with serving() as running:
        yield running


def _forced_reference(opening: str) -> tuple[list[int], str]:
    """Plain transformers on the rendered prompt plus the call's opening: the call's tokens (through
    its close) and its argument text."""
    _, tok = bundled()
    prompt = list(tok.apply_chat_template(GREETING, tools=[CALCULATOR_SCHEMA], add_generation_prompt=True,
                                          tokenize=True, return_dict=False))
    ids = reference(prompt + tok.encode(opening, add_special_tokens=False), MAX_TOKENS)
    close = ids.index(tok.convert_tokens_to_ids("</calculator>"))
    return ids[:close + 1], tok.decode(ids[:close])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "calculator"}}])
def test_a_forced_call_continues_the_templates_opening_as_transformers_does(server, choice):
    _, _, client = server
    plain = client.chat.completions.create(model="m", messages=GREETING, tools=[CALCULATOR_SCHEMA],
                                           max_tokens=MAX_TOKENS, temperature=0)
    assert [c.function.name for c in plain.choices[0].message.tool_calls] == ["game"]
    out = client.chat.completions.create(model="m", messages=GREETING, tools=[CALCULATOR_SCHEMA], tool_choice=choice,
                                         max_tokens=MAX_TOKENS, temperature=0)
    ids, expression = _forced_reference("<calculator expression>")
    assert out.choices[0].finish_reason == "tool_calls"
    (call,) = out.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("calculator", {"expression": expression})
    assert out.usage.completion_tokens == len(ids)
    # the held context (the opening included) is what the client's next turn renders: all of it reused
    transcript = [*GREETING, out.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "4"}]
    second = client.chat.completions.create(model="m", messages=transcript, tools=[CALCULATOR_SCHEMA],
                                            max_tokens=4, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= out.usage.prompt_tokens + len(ids) - 1


def test_a_streamed_forced_call_comes_as_a_delta(server):
    _, _, client = server
    chunks = list(client.chat.completions.create(model="m", messages=GREETING, tools=[CALCULATOR_SCHEMA],
                                                 tool_choice="required", max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True))
    _, expression = _forced_reference("<calculator expression>")
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == \
        [("calculator", {"expression": expression})]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_required_with_tools_whose_calls_open_differently_constrains_the_first_token_as_transformers_does(server):
    """The demo format opens each call with its own token: "required" lets the model choose the tool,
    not whether to call one (unforced, it calls `game`, which is not offered)."""
    _, _, client = server
    model, tok = bundled()
    tools = [CALCULATOR_SCHEMA, LOOKUP_SCHEMA]
    out = client.chat.completions.create(model="m", messages=GREETING, tools=tools, tool_choice="required",
                                         max_tokens=MAX_TOKENS, temperature=0)
    prompt = list(tok.apply_chat_template(GREETING, tools=tools, add_generation_prompt=True, tokenize=True,
                                          return_dict=False))
    openers = {tok.convert_tokens_to_ids(t): name for t, name in (("<calculator expression>", "calculator"),
                                                                   ("<lookup query>", "lookup"))}
    ids = torch.tensor([prompt])
    everything = list(range(model.config.vocab_size))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                         prefix_allowed_tokens_fn=lambda _, s: list(openers) if len(s) == len(prompt) else everything)
    ref = ref[0, len(prompt):].tolist()
    name = openers[ref[0]]
    close = ref.index(tok.convert_tokens_to_ids(f"</{name}>"))
    assert out.choices[0].finish_reason == "tool_calls"
    (call,) = out.choices[0].message.tool_calls
    argument = next(iter(json.loads(call.function.arguments).values()))
    assert (call.function.name, argument) == (name, tok.decode(ref[1:close]))
    assert out.usage.completion_tokens == close + 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_holds_when_sampling(server, seed):
    _, _, client = server
    out = client.chat.completions.create(model="m", messages=GREETING, tools=[CALCULATOR_SCHEMA, LOOKUP_SCHEMA],
                                         tool_choice="required", max_tokens=MAX_TOKENS, temperature=1.5, seed=seed)
    assert out.choices[0].finish_reason == "tool_calls"  # with these seeds each call closes within MAX_TOKENS
    assert out.choices[0].message.content is None
    assert [c.function.name for c in out.choices[0].message.tool_calls] in (["calculator"], ["lookup"])


def test_the_opener_constraint_masks_all_but_the_openings_until_one_is_whole():
    """Hermes: the openings share `<tool_call>` through `{"name": "`; the constraint then allows only
    the next token of each name (`weather` is one token here, `wiki` four), and nothing once a whole
    opening is written."""
    tok = format_tokenizer(FORMATS["hermes"])
    schemas = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {}}}}
               for n in ("weather", "wiki")]
    fmt = ChatFormat(tok, [ClientTool(s) for s in schemas], [tok.convert_tokens_to_ids("<|im_end|>")], "qwen2")
    forced = forced_call(fmt, None)
    assert tok.decode(forced.opener).endswith('{"name": "')
    weather, wiki = sorted(forced.rests, key=len)
    assert (tok.decode(list(weather)).split('"')[0], tok.decode(list(wiki)).split('"')[0]) == ("weather", "wiki")
    prompt = [1, 2, 3, *forced.opener]
    constraint = forced.sampler(None, len(prompt)).processors[0]
    scores = torch.zeros(1, len(tok))

    def allowed(generated: tuple[int, ...]) -> set[int]:
        masked = constraint(torch.tensor([prompt + list(generated)]), scores.clone())[0]
        return set(torch.nonzero(masked == 0).flatten().tolist())

    assert allowed(()) == {weather[0], wiki[0]}
    assert allowed(wiki[:2]) == {wiki[2]}
    assert allowed(wiki) == allowed(weather) == allowed((wiki[0], weather[0])) == set(range(len(tok)))
    assert forced_call(fmt, "wiki").rests == ()


@pytest.mark.parametrize("tools, choice, match", [
    ([CALCULATOR_SCHEMA], {"type": "function", "function": {"name": "lookup"}},
     r"names the function 'lookup', which is not among the tools \['calculator'\]"),
    ([], "required", "offers no tools"),
    ([CALCULATOR_SCHEMA], {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}},
     "'allowed_tools' is not supported"),
])
def test_a_choice_that_cannot_be_honoured_is_refused_naming_tool_choice(server, tools, choice, match):
    _, _, client = server
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=GREETING, tools=tools or openai.NOT_GIVEN,
                                       tool_choice=choice, max_tokens=4)
    assert info.value.body["param"] == "tool_choice"
    assert re.search(match, info.value.body["message"])


def _turn_end(parallel_calls: bool) -> tuple[str, str | None]:
    """A Hermes-format turn (calls end at EOS) writing two calls, asked after each token whether it
    ends there: the text up to where it ended, and why."""
    fmt_spec = FORMATS["hermes"]
    tok = format_tokenizer(fmt_spec)
    schema = {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    fmt = ChatFormat(tok, [ClientTool(schema)], [tok.convert_tokens_to_ids("<|im_end|>")], "qwen2")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Rome?"}], tools=[schema],
                                     add_generation_prompt=True, return_dict=False)
    text = fmt_spec.call_text([("weather", '{"city": "Rome"}'), ("weather", '{"city": "Oslo"}')])
    turn = tok.encode(text, add_special_tokens=False)
    session = HeldSession(SessionStore(4, on_evict=lambda s: None), None)
    session.begin(prompt, TurnSpec(tok, 100, (), fmt, frozenset(), 60.0, parallel_calls=parallel_calls),
                  lambda e, r: None)
    for n in range(1, len(turn) + 1):
        if session.pause(prompt + turn[:n], len(prompt), n == len(turn), 0.0, 0, None, lambda: None) is not None:
            return tok.decode(turn[:n]), session.end_reason
    return tok.decode(turn), None


def test_parallel_tool_calls_false_ends_the_turn_at_the_first_calls_close():
    assert _turn_end(parallel_calls=True) == (FORMATS["hermes"].call_text(
        [("weather", '{"city": "Rome"}'), ("weather", '{"city": "Oslo"}')]), "tool_calls")
    assert _turn_end(parallel_calls=False) == ('<tool_call>\n{"name": "weather", "arguments": {"city": "Rome"}}\n'
                                               "</tool_call>", "tool_calls")


def test_a_forced_call_to_a_server_tool_runs_inside_the_server():
    queries = []

    def lookup(query: str) -> str:
        """Look a fact up.

        Args:
            query: What to look up.
        """
        queries.append(query)
        return "Lima"

    with serving(server_tools=[lookup]) as (_, _, client):
        out = client.chat.completions.create(model="m", messages=GREETING, max_tokens=MAX_TOKENS, temperature=0,
                                             tool_choice={"type": "function", "function": {"name": "lookup"}})
    _, tok = bundled()
    prompt = list(tok.apply_chat_template(GREETING, tools=[LOOKUP_SCHEMA], add_generation_prompt=True, tokenize=True,
                                          return_dict=False))
    ids = reference(prompt + tok.encode("<lookup query>", add_special_tokens=False), MAX_TOKENS)
    query = tok.decode(ids[:ids.index(tok.convert_tokens_to_ids("</lookup>"))])
    assert queries == [query]  # parsed with its forced opening, run by the server, not returned
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason != "tool_calls"
