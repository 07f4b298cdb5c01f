"""A request paused at a turn's end goes on with the caller's next prompt, keeping the KV of the
longest common prefix and computing only the rest: tokens as if the prompt had been run afresh."""
from __future__ import annotations

import pytest

import infercept_hf as ih
from infercept_hf.engine import common_prefix_len
from infercept_hf.held import AwaitingCaller
from infercept_hf.kv_ledger import KVRecord

from conftest import TEST_COST, greedy, prompts_for


class PauseAfter:
    """Ends every turn after `n` generated tokens, awaiting the caller (a server's session does this)."""

    def __init__(self, n: int, ttl: float = 60.0) -> None:
        self.n, self.ttl = n, ttl

    def pause(self, context, turn_start, at_eos, now, request_id, executor, wake):
        if len(context) - turn_start < self.n:
            return None
        return AwaitingCaller("turn", now, now + self.ttl)


def test_truncate_frees_whole_blocks_past_the_kept_tokens_host_tail_first(llama):
    engine = ih.InterceptEngine(llama, policy="swap", num_blocks=16, block_size=4, host_pool_bytes=1 << 20,
                                cost_model=TEST_COST)
    cache = engine.cache
    record = KVRecord()
    cache.track("r", record)
    assert cache.allocate("r", 0, 14)  # 4 blocks
    cache.record_computed("r", 14)
    assert cache.swap_out("r", 2) == 2  # tokens 8..13 on host
    assert cache.truncate("r", 9) == 9  # blocks 0..2 stay: the device head and one host block
    assert (cache.device_blocks("r"), cache.host_blocks("r"), record.high_water) == (2, 1, 9)
    assert cache.truncate("r", 6) == 6  # the host tail goes before any device block
    assert (cache.device_blocks("r"), cache.host_blocks("r")) == (2, 0)
    assert cache.truncate("r", 12) == 6  # keeping more than is cached changes nothing
    assert cache.truncate("r", 0) == 0
    assert (cache.device_blocks("r"), cache.host_blocks("r"), cache.used_device_blocks()) == (0, 0, 0)
    cache.check_integrity()
    with pytest.raises(ValueError, match="cannot keep -1 tokens"):
        cache.truncate("r", -1)


@pytest.mark.parametrize("policy", ["preserve", "swap", "discard"])
@pytest.mark.parametrize("agree", [40, 25, 3])
def test_continue_reuses_the_common_prefix_and_matches_a_fresh_run(llama, policy, agree):
    prompt, other = prompts_for(7, [30, 40])
    engine = ih.InterceptEngine(llama, policy=policy, num_blocks=64, block_size=4, host_pool_bytes=1 << 20,
                                cost_model=TEST_COST)
    seen: list[str] = []
    rid = engine.add_request(prompt, max_new_tokens=11, chat_session=PauseAfter(10),
                             on_event=lambda ev: seen.append(ev.kind))
    while "tool_call" not in seen:
        engine.step()
    first = engine._requests[rid].tokens[len(prompt):]
    assert first == greedy(llama, prompt, 10)
    context = prompt + first
    follow_up = context[:agree] + other[:12]  # the transcript as the caller re-rendered it, then a new message
    reused = engine.continue_request(rid, follow_up, max_new_tokens=11)
    cached_before = {"preserve": 39, "swap": 39, "discard": 0}[policy]  # the last sampled token has no KV yet
    assert reused == min(agree, cached_before)
    seen.clear()
    while "tool_call" not in seen:
        engine.step()
    assert engine._requests[rid].tokens == follow_up + greedy(llama, follow_up, 10)
    engine.cache.check_integrity()
    engine.cancel(rid)
    engine.step()
    assert engine.cache.is_empty()


def test_continue_refuses_a_request_not_awaiting_its_caller(llama):
    engine = ih.InterceptEngine(llama, num_blocks=64, block_size=4, cost_model=TEST_COST)
    rid = engine.add_request([1, 2, 3], max_new_tokens=4)
    with pytest.raises(ValueError, match="not paused awaiting its caller"):
        engine.continue_request(rid, [1, 2, 3, 4], max_new_tokens=4)
    with pytest.raises(ValueError, match="function tools or chat_session"):
        engine.add_request([1, 2], chat_session=PauseAfter(1), tools=[ih.demo.calculator])


def test_a_caller_that_never_comes_back_frees_the_blocks_at_the_deadline(llama):
    clock = [0.0]
    engine = ih.InterceptEngine(llama, policy="preserve", num_blocks=64, block_size=4, cost_model=TEST_COST,
                                clock=lambda: clock[0])
    rid = engine.add_request([5, 6, 7, 8, 9], max_new_tokens=4, chat_session=PauseAfter(2, ttl=30.0))
    while not engine.pause_placements():
        engine.step()
    assert engine.cache.device_blocks(str(rid)) > 0
    clock[0] = 31.0
    (result,) = engine.step()
    assert result.finish_reason == "error" and "did not come back within 30 s" in result.error
    assert engine.cache.is_empty()


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert common_prefix_len([], [1]) == 0


@pytest.mark.parametrize("policy", ["min-waste", "discard"])
def test_a_continued_turn_runs_alone_in_the_next_step_ahead_of_the_decodes(llama, policy):
    """The caller waits on its first token: the new messages run in an iteration of their own, and the
    decodes come back in the one after (never two express iterations in a row)."""
    prompt, other, more, fresh = prompts_for(11, [20, 24, 9, 30])
    engine = ih.InterceptEngine(llama, policy=policy, num_blocks=64, block_size=4, host_pool_bytes=1 << 20,
                                cost_model=TEST_COST)
    forwarded: list[list[tuple[int, int]]] = []
    forward = engine.runner.forward
    engine.runner.forward = lambda chunks: (forwarded.append([(c.request.request_id, c.length) for c in chunks]),
                                            forward(chunks))[1]
    seen: list[str] = []
    held = engine.add_request(prompt, max_new_tokens=6, chat_session=PauseAfter(5),
                              on_event=lambda ev: seen.append(ev.kind))
    busy = engine.add_request(other, max_new_tokens=40)
    while "tool_call" not in seen:
        engine.step()
    follow_up = engine._requests[held].tokens + more
    engine.continue_request(held, follow_up, max_new_tokens=6)
    waiting = engine.add_request(fresh, max_new_tokens=4)  # arrived after: still everybody's iteration
    forwarded.clear()
    engine.step()
    engine.step()
    assert [rid for rid, _ in forwarded[0]] == [held]
    if policy == "min-waste":  # the new messages and the last token of the previous turn
        assert forwarded[0][0][1] == len(more) + 1
    assert {rid for rid, _ in forwarded[1]} == {held, busy, waiting}
    seen.clear()
    while "tool_call" not in seen:
        engine.step()
    assert engine._requests[held].tokens == follow_up + greedy(llama, follow_up, 5)
    engine.cache.check_integrity()
