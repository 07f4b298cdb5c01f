"""Held sessions: which one a new prompt takes, and where a turn ends."""
from __future__ import annotations

import pytest

from infercept_hf.held import AwaitingCaller
from infercept_hf.outputs import RequestEvent
from infercept_hf.serve.sessions import MIN_SHARED, REPLY, SessionStore, TurnSpec


def _store(*contexts: tuple[list[int], str | None], max_held: int = 8) -> tuple[SessionStore, list]:
    evicted: list = []
    store = SessionStore(max_held, on_evict=evicted.append)
    sessions = []
    for i, (tokens, key) in enumerate(contexts):
        session = store.new(key)
        session.request_id, session.tokens, session.held_at = i, tokens, float(i)
        store.hold(session)
        sessions.append(session)
    return store, sessions + [evicted]


def test_the_longest_common_prefix_wins_and_is_taken_out():
    store, (a, b, _) = _store(([1, 2, 3, 4], None), ([1, 2, 9, 9, 9], None))
    assert store.claim([1, 2, 3, 4, 5, 6], None) == (a, 4)
    assert len(store) == 1
    assert 2 < MIN_SHARED * 5
    assert store.claim([1, 2, 3, 7], None) is None  # 2 of b's 5 tokens: too little of another's context
    assert store.claim([1, 2, 9, 9, 0], None) == (b, 4)


def test_ties_go_to_the_session_key_then_the_latest():
    store, (a, b, c, _) = _store(([1, 2, 3], "alice"), ([1, 2, 3], "bob"), ([1, 2, 3], None))
    assert store.claim([1, 2, 3, 4], "alice") == (a, 3)
    assert store.claim([1, 2, 3, 4], None) == (c, 3)  # no key: the latest held
    assert store.claim([1, 2, 3, 4], None) == (b, 3)


def test_a_session_key_takes_its_own_context_on_any_shared_prefix():
    store, (a, _) = _store(([1, 2, 3, 4, 5, 6, 7, 8], "k"))
    assert store.claim([1, 9], None) is None  # 1 of 8 tokens: not someone else's to take
    assert store.claim([1, 9], "k") == (a, 1)  # its own session: the client re-rendered early on


def test_past_the_bound_the_oldest_is_evicted():
    store, (a, b, c, evicted) = _store(([1], None), ([2], None), ([3], None), max_held=2)
    assert evicted == [a] and len(store) == 2
    store.forget(b)
    assert store.all() == [c]


class _Tok:
    def decode(self, ids):
        return "".join(chr(96 + i) for i in ids)


@pytest.mark.parametrize(("tokens", "at_eos", "reason"), [
    ([1, 2], True, "stop"),  # the end of turn
    ([1, 19, 20, 15, 16], False, "stop"),  # "stop" is a stop string: the text now ends with it
    ([1, 2, 3, 4], False, "length"),  # max_tokens reached
    ([1, 2, 3], False, None),
])
def test_where_a_turn_without_tools_ends(tokens, at_eos, reason):
    store, _ = _store()
    session = store.new(None)
    session.begin([5, 5], TurnSpec(_Tok(), 4 if len(tokens) <= 4 else 9, ("stop",), None, frozenset(), 30.0),
                  lambda ev, why: None)
    pending = session.pause([5, 5, *tokens], 2, at_eos, 10.0, 0, None, None)
    if reason is None:
        assert pending is None and session.end_reason is None
    else:
        assert isinstance(pending, AwaitingCaller) and pending.tool_name == REPLY and pending.deadline == 40.0
        assert session.end_reason == reason


def test_a_server_tool_answer_does_not_count_against_max_tokens():
    store, _ = _store()
    session = store.new(None)
    session.begin([5], TurnSpec(_Tok(), 4, (), None, frozenset(), 30.0), lambda ev, why: None)
    assert session.pause([5, 1, 2], 1, False, 0.0, 0, None, None) is None  # 2 generated
    # a tool's answer (ids 7, 7, 7) was appended at 3..5; the model goes on from 6
    assert session.pause([5, 1, 2, 7, 7, 7, 3], 6, False, 0.0, 0, None, None) is None  # 3 generated
    assert session.pause([5, 1, 2, 7, 7, 7, 3, 4], 6, False, 0.0, 0, None, None) is not None  # 4
    assert session.end_reason == "length"


def test_the_command_line_loads_server_tools_and_refuses_bad_ones():
    from infercept_hf.serve.cli import load_tools, parse_args

    (tool,) = load_tools("infercept_hf.demo.tools:calculator")
    assert tool.name == "calculator"
    with pytest.raises(SystemExit, match="not of the form pkg.module:function"):
        load_tools("calculator")
    with pytest.raises(SystemExit, match="cannot load 'infercept_hf.demo.tools:nothing'"):
        load_tools("infercept_hf.demo.tools:nothing")
    args = parse_args(["--policy", "swap", "--max-queue", "3"])
    assert (args.model, args.host, args.port, args.policy, args.max_queue) == (None, "127.0.0.1", 8000, "swap", 3)


def test_a_continued_session_mirrors_the_token_log_once():
    """Continuing a held session first brings the new prompt's rest as an answer event: it is
    already in the prompt `begin` recorded, so the mirrored log must not take it twice."""
    store, _ = _store()
    session = store.new(None)
    session.begin([5, 1, 2, 7, 7], TurnSpec(_Tok(), 4, (), None, frozenset(), 30.0), lambda ev, why: None)
    session.hear(RequestEvent(0, "tool_answer", (7, 7)))  # the rest past the kept prefix [5, 1, 2]
    session.hear(RequestEvent(0, "token", (3,)))
    session.hear(RequestEvent(0, "tool_answer", (8, 8)))  # a server tool's answer, later in the turn
    assert session.tokens == [5, 1, 2, 7, 7, 3, 8, 8]


def test_a_discarded_context_read_back_from_the_prefix_index_counts_as_cached():
    """Under `discard` the held context's KV is dropped at the turn's end, but its full blocks stay
    named in the prefix index: the follow-up reads them back, and `cached_tokens` says so."""
    from serve_helpers import serving

    messages = [{"role": "user", "content": "What is 12 * 12? Think about it step by step, please."}]
    with serving(policy="discard") as (service, _, client):
        first = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
        messages += [first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "and 13?"}]
        second = client.chat.completions.create(model="m", messages=messages, max_tokens=4, temperature=0)
        recomputed = service.engine.stats()["recomputed_tokens"]
    block = service.engine.cache.block_size
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens // block * block > 0
    assert cached % block == 0 and recomputed < block  # whole blocks read back; only a partial one computed again
