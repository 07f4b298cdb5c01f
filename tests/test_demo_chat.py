"""The bundled demo model speaks the chat tool-call protocol: a plain function as its tool."""
from __future__ import annotations

import pytest
import torch

import infercept_hf as ih
from infercept_hf.demo import calculator, demo_model, demo_prompt
from infercept_hf.demo.evaluate import chat_arithmetic_score
from conftest import TEST_COST
from infercept_hf.demo.tools import demo_functions, demo_tools

FAST = dict(lookup_seconds=0.0, game_seconds=0.0, image_seconds=0.0, tts_seconds=0.0)


@pytest.fixture(scope="module")
def demo():
    model, tok, _ = demo_model()
    tok.padding_side = "left"  # generation pads on the left, as with model.generate
    return model, tok


def test_heldout_arithmetic_through_a_plain_function_in_chat(demo):
    model, tok = demo
    score = chat_arithmetic_score(model, tok, n=50)
    print(f"\ndemo model arithmetic via ih.chat: {score.correct}/{score.total} (gate 90%)")
    assert score.accuracy >= 0.9, score.failures


@pytest.mark.parametrize("policy", ["min-waste", "discard"])
def test_function_tools_give_the_tokens_of_the_trigger_tools(demo, policy):
    """The chat template renders each function's result exactly as the trigger tool's answer, so
    the two paths (and through the trigger path, the reference loop) agree token for token, for
    all six tools (the game's state is per request: `current_call().request_id`)."""
    model, tok = demo
    questions = ["What is 123 * 45?", "What is the capital of Peru?", "Read this aloud: dinner is ready",
                 "Fetch the lamp."]
    enc = tok.apply_chat_template([[{"role": "user", "content": q}] for q in questions], tools=[calculator],
                                  add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True)
    assert tok.decode(enc.input_ids[0][enc.attention_mask[0].bool()]) == demo_prompt(questions[0])
    kwargs = dict(tokenizer=tok, policy=policy, max_new_tokens=48, cost_model=TEST_COST)
    by_function = ih.generate(model, **enc, tools=demo_functions(**FAST), **kwargs)
    by_trigger = ih.generate(model, **enc, tools=demo_tools(**FAST), **kwargs)
    assert torch.equal(by_function, by_trigger)
    assert "<r>5535</r>The answer is 5535." in tok.decode(by_function[0])


def test_chat_returns_the_pipeline_shape_with_tool_messages(demo):
    model, tok = demo
    conv = [{"role": "user", "content": "What is 123 * 45?"}]
    [out] = ih.chat(model, tok, conv, tools=[calculator], max_new_tokens=48)
    assert out["generated_text"] == conv + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call00000", "type": "function",
             "function": {"name": "calculator", "arguments": {"expression": "123*45"}}}]},
        {"role": "tool", "tool_call_id": "call00000", "name": "calculator", "content": "5535"},
        {"role": "assistant", "content": "The answer is 5535."},
    ]
    # the completed transcript renders to exactly the context the model ran on
    rendered = tok.apply_chat_template(out["generated_text"], tools=[calculator], tokenize=False)
    assert rendered == demo_prompt(conv[0]["content"]) + "<calculator expression>123*45</calculator><r>5535</r>" \
        "The answer is 5535.<eos>"


def test_two_rounds_of_calls_render_back_to_the_context_the_model_ran_on(demo):
    model, tok = demo
    conv = [{"role": "user", "content": "A shop has 12 boxes with 5 pens each. It sells 7 pens. How many pens are left?"}]
    [out] = ih.chat(model, tok, conv, tools=[calculator], max_new_tokens=80)
    messages = out["generated_text"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert messages[4]["content"] == calculator(**messages[3]["tool_calls"][0]["function"]["arguments"])
    enc = tok.apply_chat_template(conv, tools=[calculator], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    ids = ih.generate(model, **enc, tokenizer=tok, tools=[calculator], max_new_tokens=80)
    assert tok.decode(ids[0]) == tok.apply_chat_template(messages, tools=[calculator], tokenize=False)
