"""Fault-injection property: whatever fails for one request ends that request only.

Random requests (some without tools), some carrying a fault (a tool value whose repr raises, an
exception whose str raises, a text answer outside the vocabulary, a processor that raises or
turns NaN), and at random steps the next tokenize or decode raising and the forward raising once.
After every step the block accounting is exact; at the end every request has ended, each failed
one with the error of its fault and the tokens of the reference up to it, each completed one
equal to plain transformers. (`python -m infercept_hf.bench.fault_campaign` runs a larger one.)
"""
from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import infercept_hf as ih
from infercept_hf.bench.fault_campaign import FORWARD, random_case, reference, run_case

_free_runs: dict = {}
_references: dict = {}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), policy=st.sampled_from(ih.POLICIES), forward_step=st.integers(0, 6))
def test_one_requests_fault_never_reaches_the_others(llama, seed, policy, forward_step):
    specs, armed = random_case(random.Random(seed), llama, _free_runs)
    armed.setdefault(forward_step, []).append(FORWARD)  # and one forward failure early in every example
    for s in specs:
        if s not in _references:
            _references[s] = reference(llama, s)
    outcome = run_case(llama, specs, policy, armed, [_references[s] for s in specs])
    assert outcome.problems() == []
    assert outcome.leaked_blocks == 0 and not outcome.integrity_errors
    assert sorted(outcome.results) == list(range(len(specs)))
    # each armed forward fault fires once, unless every request had ended before its step
    assert outcome.fired[FORWARD] <= sum(kinds.count(FORWARD) for kinds in armed.values())
    for rid, r in outcome.results.items():
        assert r.finish_reason in ("length", "error")
        assert (r.error is not None) == (r.finish_reason == "error")
