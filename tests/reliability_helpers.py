"""Shared by the reliability, property and soak tests: a tokenizer, a hand-driven clock, a
tool-aware reference, and tools that fail on purpose."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import infercept_hf as ih
from conftest import TEST_COST, greedy


class CharTokenizer:
    """One token per ASCII character: the tiny models' 128-token vocabulary decodes to text."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [min(ord(ch), 127) for ch in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


class ManualClock:
    """The engine's clock, moved only by the test: scripted pauses end when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Gate:
    """A tool function that blocks until the test lets one call (or all calls) through."""

    def __init__(self, answer: list[int]) -> None:
        self.answer = answer
        self.tickets = threading.Semaphore(0)
        self.open = threading.Event()

    def __call__(self, call: ih.ToolCall) -> list[int]:
        while not self.open.is_set():
            if self.tickets.acquire(timeout=0.01):
                break
        return list(self.answer)

    def release_one(self) -> None:
        self.tickets.release()


def reference_tool(model, prompt: list[int], end_tok: int, answer: list[int], max_new_tokens: int) -> list[int]:
    """Plain transformers with a one-token tool trigger: generate, cut at the trigger, append the
    answer, re-run `generate` on the whole context. The engine must produce exactly this."""
    ctx = list(prompt)
    left = max_new_tokens
    while left > 0:
        out = greedy(model, ctx, left)
        cut = out.index(end_tok) + 1 if end_tok in out else len(out)
        ctx += out[:cut]
        left -= cut
        if left > 0:  # stopped at the trigger, with tokens still to generate
            ctx += answer
    return ctx[len(prompt):]


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for something another thread does; fail (rather than hang) if it never happens."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for another thread"
        time.sleep(0.005)


async def eventually_async(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the engine"
        await asyncio.sleep(0.005)


def make_engine(model, policy="min-waste", **kw):
    kw.setdefault("num_blocks", 64)
    kw.setdefault("block_size", 4)
    kw.setdefault("host_pool_bytes", 16 * 4 * 512)
    return ih.InterceptEngine(model, policy=policy, cost_model=TEST_COST, **kw)


def drive(engine, clock: ManualClock | None = None, max_steps: int = 500) -> dict[int, ih.RequestResult]:
    """Step to the end, checking block accounting after every step; a bounded loop, so a deadlock fails."""
    results = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for r in engine.step():
            results[r.request_id] = r
        engine.cache.check_integrity()
        if not engine.scheduler.has_work():
            if clock is not None:
                clock.advance(0.25)
            else:
                engine.wait_for_work(0.01)
    assert not engine.has_unfinished(), "requests left after the step bound: deadlock or livelock"
    assert engine.cache.is_empty() and engine.cache.free_device_blocks() == engine.cache.num_blocks
    assert engine.cache.free_host_blocks() == engine.cache.num_host_blocks
    return results
