"""The bundled demo model: loads from its assets, its tools are exact, and it really uses them.

The accuracy gate runs the trained weights through the plain reference tool loop on
held-out questions (disjoint from training by construction), then checks that
`infercept_hf.generate` returns the very same tokens.
"""
from __future__ import annotations

import random
import time

import pytest
import torch

import infercept_hf
from infercept_hf.demo import demo_model, demo_prompt, demo_tools, run_with_tools
from infercept_hf.demo.chat_format import TOOL_TAGS, call_text, wrap_answer
from infercept_hf.demo.data import arithmetic_item, dialogues, is_heldout, qa_facts, split_expression
from infercept_hf.demo.evaluate import arithmetic_score, ask, fast_tools
from infercept_hf.demo.game import ALL_ITEMS, ITEM_ROOM, ROOMS, GameSessions, TextGame, next_action
from infercept_hf.demo.knowledge import KNOWLEDGE, lookup
from infercept_hf.demo.tools import calculate, image_file, scripted_reply, speech_file
from infercept_hf.tools import ToolCall

ARITHMETIC_GATE = 0.90


@pytest.fixture(scope="module")
def demo():
    return demo_model(image_seconds=0.0, tts_seconds=0.0, lookup_seconds=0.0, game_seconds=0.0)


def _call(name: str, text: str, request_id: int = 0) -> ToolCall:
    return ToolCall(name, text, request_id, (), time.monotonic())


def _tool(tools, name: str):
    return next(t for t in tools if t.name == name)


def test_demo_model_loads_as_a_plain_transformers_checkpoint(demo):
    model, tok, tools = demo
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.vocab_size == len(tok)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert model.generation_config.eos_token_id == tok.eos_token_id
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == demo_prompt("What is 2 + 2?")
    assert {t.name: (t.start, t.end) for t in tools} == TOOL_TAGS


def test_tool_answer_tokenizes_the_same_alone_and_in_context(demo):
    _, tok, _ = demo
    context = demo_prompt("What is 123 * 45?") + "".join(TOOL_TAGS["calculator"]).replace("><", ">123*45<")
    answer = wrap_answer("5535")
    alone = tok.encode(answer, add_special_tokens=False)
    assert tok.encode(context + answer, add_special_tokens=False) == tok.encode(context, add_special_tokens=False) + alone
    assert len(alone) == 6  # <r> 5 5 3 5 </r>: tags are one token, digits one each


@pytest.mark.parametrize("expression, expected", [
    ("123*45", "5535"), ("9999*9999", "99980001"), ("345-789", "-444"), ("5535/45", "123"), ("7/4", "1.75"),
    ("1/3", "0.3333"), ("(12+7)*3", "57"), (" 12 + 7 ", "19"), ("5/0", "error: division by zero"),
])
def test_calculator_is_exact(expression, expected):
    assert calculate(expression) == expected


@pytest.mark.parametrize("expression", ["__import__('os')", "2**10", "abc", "1+"])
def test_calculator_refuses_anything_but_arithmetic(expression):
    assert calculate(expression).startswith("error:")


def test_lookup_finds_every_knowledge_base_entry():
    for key, value in KNOWLEDGE.items():
        assert lookup(key) == value
    assert lookup("capital of France") == "Paris"
    assert lookup("The Capital of  the United Kingdom?") == "London"
    assert lookup("currency of Japan") == "yen"
    assert lookup("capital of Atlantis") == "not found"


def test_game_policy_reaches_every_item_from_every_room():
    for item in ALL_ITEMS:
        for room in ROOMS:
            game = TextGame(room)
            for _ in range(8):
                if item in game.inventory:
                    break
                game.step(next_action(game.room, item))
            assert item in game.inventory and game.room == ITEM_ROOM[item]


def test_game_sessions_are_per_request_and_reproducible():
    a, b = GameSessions(seed=3), GameSessions(seed=3)
    assert a.act(0, "start") == b.act(0, "start")
    assert a.act(0, "start lamp").endswith("goal: lamp")
    assert a.act(1, "look").startswith("No game is running")
    assert a.act(0, "go nowhere").startswith("You cannot go")


def test_tools_wrap_answers_and_honour_their_latency():
    tools = demo_tools(image_seconds=0.2, tts_seconds=0.0, lookup_seconds=0.0, game_seconds=0.0)
    started = time.perf_counter()
    assert _tool(tools, "image").fn(_call("image", "a red cat")) == wrap_answer(image_file("a red cat"))
    assert time.perf_counter() - started >= 0.2
    assert _tool(tools, "image").expected_duration == 0.2
    assert _tool(tools, "tts").fn(_call("tts", "hi there")) == "<r>[audio saved: hi_there.wav]</r>"
    assert speech_file("hi there") == "[audio saved: hi_there.wav]"
    assert _tool(tools, "calculator").fn(_call("calculator", "12+7")) == "<r>19</r>"
    assert _tool(tools, "lookup").fn(_call("lookup", "capital of Peru")) == "<r>Lima</r>"
    assert _tool(tools, "chat").fn(_call("chat", "What is your name?")) == wrap_answer(scripted_reply("What is your name?"))
    human = demo_tools(chat_reply=lambda question: "Oslo")
    assert _tool(human, "chat").fn(_call("chat", "Where do you want to go?")) == "<r>Oslo</r>"
    assert _tool(human, "chat").expected_duration >= 10


def test_heldout_questions_never_appear_in_training():
    rng = random.Random(0)
    assert all(is_heldout(*split_expression(arithmetic_item(rng, heldout=True).expression)) for _ in range(200))
    heldout_facts = {call_text("lookup", f"{rel} of {country}") for rel, country in qa_facts(heldout=True)}
    calls = 0
    start, end = TOOL_TAGS["calculator"]
    for dialogue in dialogues(seed=0, n=2000):
        for text, trained in dialogue:
            if trained and text.startswith(start):
                assert not is_heldout(*split_expression(text[len(start):-len(end)])), text
                calls += 1
            assert text not in heldout_facts
    assert calls > 500


def test_arithmetic_accuracy_on_50_heldout_questions(demo):
    model, tok, _ = demo
    score = arithmetic_score(model, tok, n=50)
    print(f"\ndemo model arithmetic: {score.correct}/{score.total} = {100 * score.accuracy:.0f}% (gate 90%)")
    assert score.accuracy >= ARITHMETIC_GATE, score.failures


def test_a_qa_question_calls_the_lookup(demo):
    model, tok, tools = demo
    relation, country = qa_facts(heldout=True)[0]
    t = ask(model, tok, tools, f"What is the {relation} of {country}?")
    assert [(c.tool, c.text) for c in t.calls] == [("lookup", f"{relation} of {country}")]
    assert lookup(f"{relation} of {country}") in tok.decode(t.reply_ids, skip_special_tokens=True)
    assert t.finish_reason == "stop"


def test_a_game_episode_calls_the_game_until_the_item_is_taken(demo):
    model, tok, _ = demo
    t = ask(model, tok, fast_tools(game_seed=1), "Fetch the lamp.", max_new_tokens=100)
    actions = [c.text for c in t.calls if c.tool == "game"]
    assert actions[0] == "start lamp" and actions[-1] == "take lamp", actions
    assert "I got the lamp." in tok.decode(t.reply_ids, skip_special_tokens=True)


def test_engine_generate_matches_the_reference_loop(demo):
    model, tok, _ = demo
    rng = random.Random(7)
    questions = [arithmetic_item(rng, heldout=True).question for _ in range(4)]
    questions += ["What is the capital of Peru?", "Draw a red cat on a sofa.", "Say 'dinner is ready' out loud.",
                  "I want to book a trip."]
    enc = tok([demo_prompt(q) for q in questions], return_tensors="pt", padding=True, padding_side="left")
    out = infercept_hf.generate(model, enc.input_ids, attention_mask=enc.attention_mask, tokenizer=tok,
                                tools=fast_tools(), max_new_tokens=80, do_sample=False)
    width = enc.input_ids.shape[1]
    for row, question in zip(out.tolist(), questions):
        prompt = tok.encode(demo_prompt(question), add_special_tokens=False)
        reference = run_with_tools(model, tok, fast_tools(), prompt, 80).ids[len(prompt):]
        assert row[width:width + len(reference)] == reference, question
        assert all(t == tok.pad_token_id for t in row[width + len(reference):]), question

    prompt = tok.encode(demo_prompt("Fetch the book."), add_special_tokens=False)
    ids = torch.tensor([prompt])
    game = infercept_hf.generate(model, ids, attention_mask=torch.ones_like(ids), tokenizer=tok,
                                 tools=fast_tools(game_seed=5), max_new_tokens=100, do_sample=False)
    assert game[0].tolist() == run_with_tools(model, tok, fast_tools(game_seed=5), prompt, 100).ids
