"""Bounded soak: thousands of requests with faults injected, and nothing may be lost.

- 2,000 requests through the simulator's executor under min-waste and 400 under each other policy
  (meta-device GPT-J 6B on a virtual clock, pools cut small so memory runs out constantly): scripted pauses, real tools that
  answer, raise, fail, return the wrong type or hang past their timeout, and random cancels.
- 200 requests through a tiny real Llama, 40 per policy, with the same faults in real time.

Every request must end as finished, cancelled or failed with its reason; no block may leak; the
figures are printed (`pytest -s`). `INFERCEPT_SOAK_SCALE=5` runs five times as many.
"""
from __future__ import annotations

import collections
import os
import random
import threading
import time
from dataclasses import dataclass, field

import pytest

import infercept_hf as ih
from conftest import TEST_COST, VOCAB, prompts_for, reference_scripted
from infercept_hf.bench.presets import A100_80G, gpt_j_6b
from infercept_hf.bench.simulator import HardwareModel, meta_model, sim_engine
from reliability_helpers import CharTokenizer

SCALE = int(os.environ.get("INFERCEPT_SOAK_SCALE", "1"))
FAULTS = ("ok", "raise", "raise-fail", "wrong-type", "out-of-vocab", "hang-timeout", "hang-timeout-fail")
CLEAN = ("scripted", "ok")
HANG = threading.Event()  # hanging tools wait on this; set when a soak ends so their threads exit


def fault_tool(kind: str, end: list[int], name: str, answer: list[int]) -> ih.Tool:
    """A tool that misbehaves as `kind` says, every time it is called."""
    def ok(call):
        return list(answer)

    def raises(call):
        raise ConnectionError("upstream unavailable")

    def hangs(call):
        HANG.wait(60)
        return list(answer)

    fn = {"ok": ok, "raise": raises, "raise-fail": raises, "wrong-type": lambda c: {"oops": 1},
          "out-of-vocab": lambda c: [10**9], "hang-timeout": hangs, "hang-timeout-fail": hangs}[kind]
    timeout = 0.05 if kind.startswith("hang") else None
    on_error = "fail" if kind.endswith("-fail") else "answer"
    return ih.Tool(name, end=end, fn=fn, timeout=timeout, on_error=on_error)


def close_releasing_hangs(engine: ih.InterceptEngine) -> None:
    """Close a soak's engine, letting its hanging tools' threads exit; the next soak's tools hang again."""
    HANG.set()
    engine.close()
    HANG.clear()


@dataclass
class Tally:
    """What a soak saw, for the assertions and the printed figures."""

    kinds: dict[int, str] = field(default_factory=dict)
    results: dict[int, ih.RequestResult] = field(default_factory=dict)
    cancel_calls: int = 0

    def add(self, results: list[ih.RequestResult]) -> None:
        for r in results:
            assert r.request_id not in self.results, "a result handed out twice"
            self.results[r.request_id] = r

    def check(self, engine: ih.InterceptEngine) -> None:
        assert set(self.results) == set(self.kinds), "every request ends"
        engine.cache.check_integrity()
        assert engine.cache.is_empty() and engine.cache.free_device_blocks() == engine.cache.num_blocks
        assert engine.cache.free_host_blocks() == engine.cache.num_host_blocks
        for rid, r in self.results.items():
            assert r.finish_reason in ("length", "cancelled", "error"), r
            if r.finish_reason == "error":
                assert any(k in r.error for k in FAILURES), f"a failed request says why: {r.error!r}"
                assert self.kinds[rid] not in CLEAN or "exceeds" in r.error, (self.kinds[rid], r.error)


FAILURES = {"raised": "raised", "timed out": "timed out", "returned": "wrong type", "outside the vocabulary": "bad ids",
            "exceeds": "too long"}


def report(title: str, tally: Tally, engine: ih.InterceptEngine, wall_s: float, **extra: object) -> None:
    """One paragraph of figures per soak: how requests ended, why they failed, what memory did."""
    stats = engine.stats()
    reasons = collections.Counter(r.finish_reason for r in tally.results.values())
    why = collections.Counter(next((v for k, v in FAILURES.items() if k in r.error), "other")
                              for r in tally.results.values() if r.finish_reason == "error")
    answered = sum(1 for r in tally.results.values() for rec in r.interceptions if rec.error and rec.answer_len)
    print(f"\n{title}: {len(tally.results)} requests, {wall_s:.1f} s wall, {stats['steps']} forward steps"
          + "".join(f", {k} {v}" for k, v in extra.items())
          + f"\n    finished {reasons['length'] + reasons['stop']}, cancelled {reasons['cancelled']} "
          f"({tally.cancel_calls} cancel calls), failed {reasons['error']} {dict(why)}; "
          f"tool errors answered as text {answered}"
          f"\n    preemptions {stats['preemptions']}, recomputed tokens {stats['recomputed_tokens']}, "
          f"swapped {stats['swapped_bytes'] / 1e6:,.1f} MB, strategies {stats['strategies']}, leaked blocks 0")


# ------------------------------------------------------------------ the simulator
SIM_END = [0] * 6  # the simulator's logits always pick token 0: a tool call every six tokens


def sim_expected(kind: str, script: ih.Scripted | None, max_new: int, answer: list[int]) -> list[int]:
    """The simulator generates only zeros: a clean request's tokens follow from its script."""
    out, generated = [], 0
    steps = [(s.n_tokens, list(s.answer_ids)) for s in script.segments] if script else []
    if kind == "ok":
        steps = [(len(SIM_END), answer)] * max_new
    for n, ids in steps:
        n = min(n, max_new - generated)
        out += [0] * n
        generated += n
        if generated == max_new:
            return out
        out += ids
    return out + [0] * (max_new - generated)


@pytest.mark.parametrize("policy", ih.POLICIES)
def test_simulator_soak(policy):
    n = (2000 if policy == "min-waste" else 400) * SCALE
    rng = random.Random(f"sim-{policy}")
    model = meta_model(gpt_j_6b())
    hardware = HardwareModel.for_model(model, A100_80G)
    engine, clock = sim_engine(
        model, hardware, policy, num_blocks=160, block_size=16, max_batch_tokens=512,
        host_pool_bytes=48 * 16 * hardware.kv_bytes_per_token,
    )
    engine.tokenizer = CharTokenizer()  # error answers are text
    tally = Tally()
    jobs, expected = [], {}
    t = 0.0
    for i in range(n):
        t += rng.expovariate(40.0)
        kind = "scripted" if rng.random() < 0.6 else rng.choice(FAULTS)
        prompt = [rng.randrange(1, 50400) for _ in range(rng.randint(16, 400))]
        max_new = rng.randint(4, 64)
        script = tools = None
        answer = [rng.randrange(1, 50400) for _ in range(rng.randint(1, 24))]
        if kind == "scripted":
            script = ih.Scripted([(rng.randint(1, 24), rng.choice([0.01, 0.1, 0.5, 2.0]), answer)
                                  for _ in range(rng.randint(0, 3))])
        else:
            tools = [fault_tool(kind, SIM_END, "t", answer)]
        cancel_at = t + rng.uniform(0.0, 1.5) if rng.random() < 0.08 else None
        jobs.append((t, kind, prompt, max_new, script, tools, cancel_at, answer))
    cancels: list[tuple[float, int]] = []
    wall = time.perf_counter()
    try:
        i = 0
        while i < len(jobs) or engine.has_unfinished():
            while i < len(jobs) and jobs[i][0] <= clock():
                arrival, kind, prompt, max_new, script, tools, cancel_at, answer = jobs[i]
                rid = engine.add_request(prompt, max_new_tokens=max_new, interceptions=script, tools=tools,
                                         arrival_time=arrival)
                tally.kinds[rid] = kind
                expected[rid] = sim_expected(kind, script, max_new, answer)
                if cancel_at is not None:
                    cancels.append((cancel_at, rid))
                i += 1
            for at, rid in [c for c in cancels if c[0] <= clock()]:
                cancels.remove((at, rid))
                tally.cancel_calls += engine.cancel(rid)
            steps = engine.stats_.steps
            tally.add(engine.step())
            if steps % 64 == 0:
                engine.cache.check_integrity()
            if engine.stats_.steps == steps:  # nothing ran: jump to the next event, or wait for a tool thread
                now = clock()
                due = [r.pending.next_check(now) for r in engine.scheduler.paused]
                due = [d for d in due if d is not None] + [c[0] for c in cancels]
                if i < len(jobs):
                    due.append(jobs[i][0])
                if due and min(due) > now:
                    clock.advance_to(min(due))
                else:
                    engine.wait_for_work(0.005)
        tally.check(engine)
    finally:
        close_releasing_hangs(engine)
    for rid, r in tally.results.items():
        if tally.kinds[rid] in CLEAN and r.finish_reason == "length":
            assert r.token_ids == expected[rid], f"request {rid} ({tally.kinds[rid]})"
    failed = [tally.kinds[r.request_id] for r in tally.results.values() if r.finish_reason == "error"]
    assert {"raise-fail", "hang-timeout-fail", "wrong-type", "out-of-vocab"} <= set(failed)
    report(f"simulator soak [{policy}]", tally, engine, time.perf_counter() - wall, virtual_s=round(clock(), 1))


# ------------------------------------------------------------------ a tiny real model
@pytest.fixture(scope="module")
def frequent_tokens(llama) -> list[int]:
    """Tokens the tiny model emits often: one-token tool triggers that actually fire."""
    counts = collections.Counter()
    for p in prompts_for(51, [4, 9, 13, 17, 6, 11]):
        counts.update(reference_scripted(llama, p, None, 16))
    return [t for t, _ in counts.most_common(12)]


def real_soak(llama, policy: str, frequent_tokens: list[int], n: int) -> Tally:
    """`n` requests on one engine: 30% scripted, the rest with three fault tools each (the fault
    kinds taken in turn, so each one is tried), 10% cancelled a few steps after they arrive."""
    rng = random.Random(f"real-{policy}")
    engine = ih.InterceptEngine(llama, tokenizer=CharTokenizer(), policy=policy, num_blocks=64, block_size=4,
                                host_pool_bytes=16 * 4 * 256, max_batch_tokens=64, cost_model=TEST_COST)
    tally = Tally()
    scripted: dict[int, tuple[list[int], ih.Scripted, int]] = {}
    wall = time.perf_counter()
    try:
        for i in range(n):
            prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 20))]
            max_new = rng.randint(4, 16)
            if rng.random() < 0.3:
                kind, script = "scripted", ih.Scripted([(rng.randint(1, 6), rng.choice([0.0, 0.01, 0.05]),
                                                         [rng.randrange(3, VOCAB) for _ in range(3)])])
                rid = engine.add_request(prompt, max_new_tokens=max_new, interceptions=script)
                scripted[rid] = (prompt, script, max_new)
            else:
                kinds = [FAULTS[(i + j) % len(FAULTS)] for j in range(3)]
                ends = rng.sample(frequent_tokens, 3)
                tools = [fault_tool(k, [e], k, [rng.randrange(3, VOCAB)]) for k, e in zip(kinds, ends)]
                kind = "+".join(kinds)
                rid = engine.add_request(prompt, max_new_tokens=max_new, tools=tools)
            tally.kinds[rid] = kind
            if rng.random() < 0.1:
                for _ in range(rng.randint(0, 6)):
                    tally.add(engine.step())
                tally.cancel_calls += engine.cancel(rid)
            if rng.random() < 0.5:
                tally.add(engine.step())
                engine.cache.check_integrity()
        while engine.has_unfinished():
            tally.add(engine.step())
            engine.wait_for_work(0.01)
        tally.check(engine)
    finally:
        close_releasing_hangs(engine)
    for rid, (prompt, script, max_new) in list(scripted.items())[:4]:
        if tally.results[rid].finish_reason == "length":
            assert tally.results[rid].token_ids == reference_scripted(llama, prompt, script, max_new)
    report(f"real-model soak [{policy}]", tally, engine, time.perf_counter() - wall)
    return tally


def test_real_model_soak(llama, frequent_tokens):
    """200 requests, 40 per policy; across them every kind of fault must have fired."""
    errors = []
    for policy in ih.POLICIES:
        tally = real_soak(llama, policy, frequent_tokens, 40 * SCALE)
        errors += [r.error for r in tally.results.values() if r.error]
        errors += [rec.error for r in tally.results.values() for rec in r.interceptions if rec.error]
    for fault in ("raised ConnectionError", "timed out", "returned dict", "outside the vocabulary"):
        assert any(fault in e for e in errors), f"no {fault!r} fault fired: the soak did not test it"
