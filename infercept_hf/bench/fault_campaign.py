"""Fault-injection campaign: the engine under hostile tokenizers, tools, samplers and devices.

    python -m infercept_hf.bench.fault_campaign --cases 200 --seed 0

Each case serves a few tool-calling requests on a tiny random model while faults fire: one
request's tool value whose `repr()` raises or exception whose `str()` raises, a text answer
outside the vocabulary, a logits processor that raises or turns the scores NaN; and, at random
steps, the next `tokenizer.encode` or `tokenizer.decode` raising and the forward raising once.
After every step the cache's block accounting is checked. At the end every request must have
ended; a failed one with an error naming its fault, and its tokens a prefix of the plain
transformers reference; a completed one equal to that reference. Prints the figures: requests,
faults fired by kind, requests ended by reason, leaked blocks and problems found.
"""
from __future__ import annotations

import argparse
import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig

from ..demo.reference_loop import run_with_tools
from ..engine import InterceptEngine
from ..outputs import RequestResult
from ..policy import CostModel
from ..sampling import Sampler
from ..scheduler import POLICIES
from ..tools import Tool, ToolCall

VOCAB = 128
# Faults carried by one request from its start, and the error each must end it with.
REQUEST_FAULTS = {
    "render_repr": r"whose repr\(\) raised",
    "render_str": r"whose str\(\) raised",
    "answer_vocab": r"outside the vocabulary",
    "sampler": r"sampling failed: sampling raised ValueError: injected",
    "nan": r"sampling failed: the scores are NaN",
}
# Faults armed at a step: whichever request next needs the tokenizer takes it.
ARMED_FAULTS = {
    "tokenize": r"could not encode its answer: UnicodeError: injected",
    "decode": r"trigger matching\) failed: UnicodeError: injected",
}
FORWARD = "forward"  # the forward raises once: no request's fault, the step is retried
COST = CostModel(fwd_per_token_s=1e-4, fwd_fixed_s=1e-3, swap_bytes_per_s=1e9, kv_bytes_per_token=512,
                 saturation_tokens=64)


class InjectedFault(RuntimeError):
    """A forward failure injected by the campaign (a transient device error)."""


class CampaignTokenizer:
    """One token per character, not clamped (a character past the vocabulary encodes past it);
    `arm("encode" | "decode")` makes the next such call raise, once."""

    def __init__(self) -> None:
        self.armed: set[str] = set()
        self.fired: Counter[str] = Counter()

    def arm(self, what: str) -> None:
        self.armed.add(what)

    def _maybe_raise(self, what: str) -> None:
        if what in self.armed:
            self.armed.discard(what)
            self.fired["tokenize" if what == "encode" else "decode"] += 1
            raise UnicodeError("injected")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self._maybe_raise("encode")
        return [ord(ch) for ch in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        self._maybe_raise("decode")
        return "".join(chr(i) for i in ids)


class FlakyRunner:
    """The engine's runner, raising once when armed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.armed = False
        self.fired = 0

    def forward(self, chunks: list) -> torch.Tensor:
        if self.armed:
            self.armed = False
            self.fired += 1
            raise InjectedFault("injected device error")
        return self.inner.forward(chunks)


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr")


class _BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str")


class _Processor:
    """Leaves the scores alone (so greedy decoding is unchanged) until its `fail_at`-th call."""

    def __init__(self, fault: str, fail_at: int) -> None:
        self.fault = fault
        self.fail_at = fail_at
        self.calls = 0

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls < self.fail_at:
            return scores
        if self.fault == "sampler":
            raise ValueError("injected")
        return scores * float("nan")


@dataclass(frozen=True)
class RequestSpec:
    prompt: tuple[int, ...]
    max_new_tokens: int
    end: str | None  # the tool's end marker (one character); None: a request without tools
    answer: str
    fault: str | None = None  # a REQUEST_FAULTS key
    fail_at: int = 1  # sampler faults: the call that fails


@dataclass
class CaseOutcome:
    specs: list[RequestSpec]
    results: dict[int, RequestResult]
    references: list[list[int]]
    fired: Counter = field(default_factory=Counter)
    leaked_blocks: int = 0
    integrity_errors: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Every way this case broke the rule (empty when it held)."""
        out = list(self.integrity_errors)
        if self.leaked_blocks:
            out.append(f"{self.leaked_blocks} blocks leaked")
        if len(self.results) != len(self.specs):
            out.append(f"{len(self.specs) - len(self.results)} requests never ended")
        armed_hits = Counter()
        for rid, spec in enumerate(self.specs):
            r = self.results.get(rid)
            if r is None:
                continue
            ref = self.references[rid]
            if r.finish_reason == "length":
                if r.token_ids != ref:
                    out.append(f"request {rid} completed but differs from the reference")
            elif r.finish_reason == "error":
                if r.token_ids != ref[: len(r.token_ids)]:
                    out.append(f"request {rid} failed with tokens that are not a prefix of the reference")
                causes = [k for k, pat in ARMED_FAULTS.items() if re.search(pat, r.error or "")]
                if causes:
                    armed_hits[causes[0]] += 1
                elif spec.fault is None or not re.search(REQUEST_FAULTS[spec.fault], r.error or ""):
                    out.append(f"request {rid} (fault {spec.fault}) failed with an unexpected error: {r.error}")
            else:
                out.append(f"request {rid} ended with {r.finish_reason!r}")
        for kind in ARMED_FAULTS:
            if armed_hits[kind] != self.fired[kind]:
                out.append(f"{self.fired[kind]} {kind} faults fired but {armed_hits[kind]} requests failed of them")
        return out


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def reference(model: torch.nn.Module, spec: RequestSpec) -> list[int]:
    """Plain transformers with the fault-free tool: what the engine must produce."""
    tools = [] if spec.end is None else [Tool("t", end=spec.end, fn=lambda _c: spec.answer)]
    out = run_with_tools(model, CampaignTokenizer(), tools, list(spec.prompt), spec.max_new_tokens)
    return out.ids[len(spec.prompt):]


def _tool_fn(spec: RequestSpec):
    def fn(_call: ToolCall) -> Any:
        if spec.fault == "render_repr":
            return _BadRepr()
        if spec.fault == "render_str":
            raise _BadStr()
        if spec.fault == "answer_vocab":
            return "\u00ff\u0100"
        return spec.answer
    return fn


def run_case(model: torch.nn.Module, specs: list[RequestSpec], policy: str, armed: dict[int, list[str]],
             references: list[list[int]], num_blocks: int = 48, max_steps: int = 2000) -> CaseOutcome:
    """Serve `specs` with faults armed at the steps `armed` names; check the cache after every step."""
    tok = CampaignTokenizer()
    engine = InterceptEngine(model, tokenizer=tok, policy=policy, num_blocks=num_blocks, block_size=4,
                             host_pool_bytes=16 * 4 * 512, cost_model=COST, max_batch_tokens=64)
    runner = FlakyRunner(engine.runner)
    engine.runner = runner
    outcome = CaseOutcome(specs, {}, references)
    with engine:
        for spec in specs:
            tools = [] if spec.end is None else [
                Tool("t", end=spec.end, fn=_tool_fn(spec), on_error="fail" if spec.fault == "render_str" else "answer")
            ]
            sampler = Sampler(_Processor(spec.fault, spec.fail_at)) if spec.fault in ("sampler", "nan") else None
            engine.add_request(list(spec.prompt), max_new_tokens=spec.max_new_tokens, tools=tools, sampler=sampler)
        for step in range(max_steps):
            if not engine.has_unfinished():
                break
            for kind in armed.get(step, ()):
                if kind == FORWARD:
                    runner.armed = True
                else:
                    tok.arm("encode" if kind == "tokenize" else "decode")
            try:
                outcome.results.update((r.request_id, r) for r in engine.step())
            except InjectedFault:
                pass
            try:
                engine.cache.check_integrity()
            except AssertionError as exc:
                outcome.integrity_errors.append(f"step {step}: {exc}")
            engine.wait_for_work(0.01)
        cache = engine.cache
        outcome.leaked_blocks = (cache.num_blocks - cache.free_device_blocks()) + (
            cache.num_host_blocks - cache.free_host_blocks())
    outcome.fired = tok.fired + Counter({FORWARD: runner.fired})
    return outcome


def random_case(rng: random.Random, model: torch.nn.Module, free_runs: dict) -> tuple[list[RequestSpec], dict]:
    """A few requests (some without tools, some carrying a fault) and faults armed at random steps."""
    specs = []
    for _ in range(rng.randint(2, 5)):
        prompt = tuple(rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 12)))
        max_new = rng.randint(6, 16)
        if prompt not in free_runs:
            free_runs[prompt] = reference(model, RequestSpec(prompt, 16, None, ""))
        free = free_runs[prompt]
        end = chr(free[rng.randrange(0, max_new - 1)]) if rng.random() < 0.8 else None
        answer = "".join(chr(rng.randrange(32, VOCAB)) for _ in range(rng.randint(1, 4)))
        # tool faults need a tool; a request without one may still carry a sampler fault
        fault = rng.choice([None] * 4 + [*REQUEST_FAULTS] if end is not None else [None, None, "sampler", "nan"])
        specs.append(RequestSpec(prompt, max_new, end, answer, fault, rng.randint(1, max_new)))
    armed: dict[int, list[str]] = {}
    for kind in [*ARMED_FAULTS, FORWARD]:
        if rng.random() < 0.7:
            armed.setdefault(rng.randrange(0, 30), []).append(kind)
    return specs, armed


def campaign(cases: int, seed: int, progress: bool = True) -> dict[str, Any]:
    rng = random.Random(seed)
    model = tiny_model()
    free_runs: dict = {}
    refs: dict[RequestSpec, list[int]] = {}
    fired: Counter = Counter()
    reasons: Counter = Counter()
    leaked = 0
    problems: list[str] = []
    requests = 0
    for case in tqdm(range(cases), desc="cases", disable=not progress):
        specs, armed = random_case(rng, model, free_runs)
        for s in specs:
            if s not in refs:
                refs[s] = reference(model, s)
        outcome = run_case(model, specs, rng.choice(POLICIES), armed, [refs[s] for s in specs])
        requests += len(specs)
        fired += outcome.fired
        reasons.update(r.finish_reason for r in outcome.results.values())
        reasons["never ended"] += len(specs) - len(outcome.results)
        leaked += outcome.leaked_blocks
        problems += [f"case {case}: {p}" for p in outcome.problems()]
        for rid, s in enumerate(specs):  # a request's own fault fired if it ended the request
            r = outcome.results.get(rid)
            if s.fault is not None and r is not None and re.search(REQUEST_FAULTS[s.fault], r.error or ""):
                fired[s.fault] += 1
    return {"cases": cases, "requests": requests, "faults": dict(fired), "ended": dict(reasons),
            "leaked_blocks": leaked, "problems": problems}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.getLogger("infercept_hf").setLevel(logging.ERROR)  # each injected fault logs a warning: thousands
    figures = campaign(args.cases, args.seed)
    print(f"cases {figures['cases']}, requests {figures['requests']}")
    print("faults fired by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(figures["faults"].items())))
    print("requests ended by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(figures["ended"].items())))
    print(f"leaked blocks: {figures['leaked_blocks']}")
    print(f"problems: {len(figures['problems'])}")
    for p in figures["problems"][:20]:
        print("  " + p)


if __name__ == "__main__":
    main()
