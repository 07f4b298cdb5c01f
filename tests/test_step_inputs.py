"""The engine takes a step's outside inputs and its tool pool from what it is given, not from overrides.

Tensor-parallel replicas rely on it (tests/test_tensor_parallel.py runs them); here one process
checks the contract they use: every step is bracketed by `step_inputs.step(paused)`,
`run_ended()` comes once as `run()` returns, and tool calls go to `tool_pool`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import infercept_hf as ih
from infercept_hf.request import Request
from infercept_hf.step_inputs import LocalInputs
from infercept_hf.tool_pool import ToolPool
from infercept_hf.tools import Tool, ToolCall
from conftest import TEST_COST, greedy, prompts_for, reference_scripted


class RecordingInputs(LocalInputs):
    def __init__(self) -> None:
        self.log: list[str] = []

    @contextmanager
    def step(self, paused: Sequence[Request]) -> Iterator[None]:
        self.log.append(f"step paused={len(paused)}")
        yield
        self.log.append("stepped")

    def run_ended(self) -> None:
        self.log.append("run ended")


class RecordingPool(ToolPool):
    def __init__(self) -> None:
        super().__init__(1)
        self.calls: list[str] = []

    def submit(self, tool: Tool, call: ToolCall):
        self.calls.append(tool.name)
        return super().submit(tool, call)


def test_steps_are_bracketed_by_the_given_inputs_and_tools_run_on_the_given_pool(llama):
    inputs, pool = RecordingInputs(), RecordingPool()
    engine = ih.InterceptEngine(llama, num_blocks=16, block_size=4, host_pool_bytes=0, cost_model=TEST_COST,
                                step_inputs=inputs, tool_pool=pool)
    scripted_prompt, tool_prompt = prompts_for(31, [7, 6])
    script = ih.Scripted([(3, 0.0, [9, 10])])
    scripted_id = engine.add_request(scripted_prompt, max_new_tokens=6, interceptions=script, eos_token_id=[])
    tool = ih.Tool(name="echo", end=[greedy(llama, tool_prompt, 2)[1]], fn=lambda call: [21, 22])
    tool_id = engine.add_request(tool_prompt, max_new_tokens=6, tools=[tool], eos_token_id=[])
    results = engine.run()
    steps = engine.stats()["steps"]
    engine.close()

    assert results[scripted_id].token_ids == reference_scripted(llama, scripted_prompt, script, 6)
    assert results[tool_id].token_ids[:2] == greedy(llama, tool_prompt, 2)
    assert pool.calls == ["echo"]
    assert inputs.log[-1] == "run ended" and inputs.log.count("run ended") == 1
    brackets = inputs.log[:-1]
    assert len(brackets) == 2 * steps
    assert all(a.startswith("step") and b == "stepped" for a, b in zip(brackets[::2], brackets[1::2]))
    assert any(entry != "step paused=0" for entry in brackets[::2])  # a paused request was offered to resume
