"""The agent-mix benchmark: sessions that share a prefix, and its computed-prompt-token count."""
from __future__ import annotations

import time

import pytest

from conftest import TEST_COST
from infercept_hf.bench.agents import agent_jobs, main, run_contender
from infercept_hf.bench.jobs import EngineSettings


def test_sessions_share_the_prefix_and_nothing_else():
    jobs = agent_jobs(sessions=3, prefix_len=20, turns=2, user_len=4, answer_len=5, decode_len=3, pause_s=0.1,
                      gap_s=0.5, vocab_size=100)
    assert [j.prompt[:20] for j in jobs] == [jobs[0].prompt[:20]] * 3
    assert len({tuple(j.prompt[20:]) for j in jobs}) == 3 and all(len(j.prompt) == 24 for j in jobs)
    assert [j.request.arrival_s for j in jobs] == [0.0, 0.5, 1.0]
    # two turns: decode 3, tool answer of 5 + next user message of 4; then a final decode of 3
    assert [(s.n_tokens, len(s.answer_ids)) for s in jobs[0].scripted.segments] == [(3, 9), (3, 9)]
    assert jobs[0].max_new_tokens == 9


def test_without_sharing_every_prompt_and_answer_token_is_computed(llama):
    jobs = agent_jobs(sessions=3, prefix_len=24, turns=2, user_len=4, answer_len=4, decode_len=3, pause_s=0.01,
                      gap_s=0.05, vocab_size=128)
    settings = EngineSettings(num_blocks=64, block_size=4, max_batch_tokens=64, cost_model=TEST_COST)
    t0 = time.perf_counter()
    off = run_contender("sharing-off", llama, jobs, settings, "min-waste")
    on = run_contender("sharing-on", llama, jobs, settings, "min-waste")
    assert time.perf_counter() - t0 < 120
    assert off["completed"] == on["completed"] == 3
    assert off["computed_prompt_tokens"] == 3 * (28 + 2 * 8) and off["cached_tokens"] == 0
    assert on["computed_prompt_tokens"] == off["computed_prompt_tokens"] - on["cached_tokens"]


def test_an_unknown_contender_is_refused_before_anything_loads(capsys):
    with pytest.raises(SystemExit):
        main(["--contenders", "sharing-on,vllm"])
    assert "unknown contender(s) vllm" in capsys.readouterr().err
