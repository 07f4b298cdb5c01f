"""The Gradio demo, driven as a client would: `gradio_client` against the app on loopback."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from demo_helpers import (  # skips this module without gradio
    ANSWER,
    GRADIO_WARNINGS,
    QUESTION,
    ROOT,
    chat_model,
    demo_app,
    one_torch_thread,
    running_app,
    text_of,
    tool_messages,
)

pytestmark = GRADIO_WARNINGS
gradio_client = pytest.importorskip("gradio_client", reason="the demo tests need `pip install gradio_client`")

import infercept_hf as ih  # noqa: E402
from infercept_hf.demo.tokenizer import build_tokenizer  # noqa: E402
from infercept_hf.outputs import InterceptionRecord, RequestEvent, RequestResult  # noqa: E402
from load_test import REAL  # noqa: E402
from panels import MemoryMonitor  # noqa: E402
from transcript import ToolStep, Turn  # noqa: E402

STRATEGIES = ("preserve", "swap", "partial-swap", "discard")


@pytest.fixture(scope="module")
def chat():
    return chat_model()


@pytest.fixture(scope="module")
def client(chat):
    with one_torch_thread(), running_app(chat) as url:
        yield gradio_client.Client(url, verbose=False)


def _ask(client, question: str) -> tuple[list[dict], str]:
    messages, notice, _ = client.predict(question, [], api_name="/chat")
    return messages, notice


def test_arithmetic_question_shows_the_calculator_call_and_the_answer(client, chat):
    messages, notice = _ask(client, QUESTION)
    assert notice == ""
    calls = tool_messages(messages, "calculator")
    assert calls, f"no calculator panel in {messages}"
    panel = text_of(calls[0])
    assert ANSWER in panel and "answer spliced in" in panel
    assert calls[0]["metadata"]["log"] in STRATEGIES  # the strategy, beside the panel's title
    assert "pause handled by" in panel and "waste if" in panel and "B·s" in panel
    assert calls[0]["metadata"]["duration"] >= 0
    if chat.bundled:  # the trained model calls with the expression and copies the result into its reply
        assert "123" in calls[0]["metadata"]["title"] and "45" in calls[0]["metadata"]["title"]
        reply = [text_of(m) for m in messages if m["role"] == "assistant" and not m.get("metadata")]
        assert any(ANSWER in r for r in reply), messages


def test_empty_message_gets_a_clear_message(client):
    messages, notice = _ask(client, "   ")
    assert messages == []
    assert notice == demo_app.EMPTY_MESSAGE


def test_missing_model_path_gets_a_clear_message_and_keeps_the_model(client):
    notice, model = client.predict("/no/such/model-dir", "min-waste", api_name="/load_model")
    assert notice.startswith("Error: No model at `/no/such/model-dir`") and "does not exist" in notice
    assert model == "bundled"
    assert tool_messages(_ask(client, QUESTION)[0], "calculator")  # still serving


def test_model_without_chat_template_gets_a_clear_message(client, chat, tmp_path):
    tok = build_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    chat.model.save_pretrained(tmp_path)
    notice, _ = client.predict(str(tmp_path), "min-waste", api_name="/load_model")
    assert "has no chat template" in notice and "Traceback" not in notice


def test_switching_policy_changes_the_strategy_shown(client):
    notice, _ = client.predict("bundled", "discard", api_name="/load_model")
    assert "under policy **discard**" in notice
    try:
        calls = tool_messages(_ask(client, QUESTION)[0], "calculator")
        assert calls[0]["metadata"]["log"] == "discard"
        assert "fixed by policy `discard`" in text_of(calls[0])
    finally:
        client.predict("bundled", "min-waste", api_name="/load_model")


def test_memory_panel_reports_the_pools(client):
    _ask(client, QUESTION)
    blocks, tokens, figures = client.predict(api_name="/memory")
    assert blocks["columns"] == ["t", "series", "blocks"] and blocks["data"]
    assert {row[1] for row in blocks["data"]} == {"device: running", "device: preserved (paused)", "host: swapped out"}
    assert tokens["columns"] == ["t", "series", "tokens"]
    assert "device blocks used" in figures and "/ 64" in figures


def test_load_test_compares_policies_side_by_side(client):
    notice, table, rps, latency = client.predict(3, 50.0, "arithmetic", ["min-waste", "discard"], REAL,
                                                 api_name="/load_test")
    assert notice.startswith("Done:"), notice
    assert [row[0] for row in table["data"]] == ["discard", "min-waste"]  # the engine's order
    assert all(row[1] > 0 for row in table["data"])  # completed requests/s
    for chart in (rps, latency):  # a bar per policy, the axis ending above the tallest one
        bars = chart["value"]["data"]
        assert [row[0] for row in bars] == ["discard", "min-waste"]
        assert chart["y_lim"][1] > max(value for _, value in bars)


def test_load_test_bad_input_gets_a_clear_message(client):
    notice, table, _, _ = client.predict(3, 2.0, "mix", [], REAL, api_name="/load_test")
    assert notice == "Error: Pick at least one policy." and table["data"] == []


def test_cli_with_a_missing_model_exits_with_a_message_not_a_trace():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.run([sys.executable, str(ROOT / "demos" / "app.py"), "--model", "./no/such/model"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "error: No model at `./no/such/model`" in proc.stderr and "Traceback" not in proc.stderr


def test_turn_moves_the_call_into_its_panel_and_settles_the_strategy():
    tok = build_tokenizer()
    tools = [ih.Tool(name="calculator", start="<calc>", end="</calc>", fn=lambda call: "")]
    turn = Turn(tok, tools, "min-waste", clock=iter([10.0, 10.5]).__next__)

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tok.encode(text, add_special_tokens=False))

    for t in ids("Let me see.<calc>12*3</calc>"):
        turn.apply(RequestEvent(0, "token", token_ids=(t,)))
    turn.apply(RequestEvent(0, "tool_call", tool="calculator", text="12*3"))
    assert turn.messages()[1]["metadata"]["status"] == "pending"
    turn.apply(RequestEvent(0, "tool_answer", token_ids=ids("<r>36</r>"), tool="calculator"))
    for t in ids("It is 36."):
        turn.apply(RequestEvent(0, "token", token_ids=(t,)))
    record = InterceptionRecord("calculator", "12*3", 1.0, 1.25, 1.3, "swap", 6,
                                {"preserve": 2e6, "swap": 1e3, "discard": 5e6})
    result = RequestResult(0, 5, [], 20, "stop", None, 0.0, 0.1, 2.0, [], [record])
    turn.apply(RequestEvent(0, "finish", result=result))
    first, panel, reply = turn.messages()
    assert first == {"role": "assistant", "content": "Let me see."}
    assert panel["metadata"] == {"title": "tool call · calculator: 12*3", "log": "swap", "duration": 0.25}
    assert "`<r>36</r>`" in panel["content"] and "**swap 1 kB·s**" in panel["content"]
    assert "preserve 2 MB·s" in panel["content"] and "discard 5 MB·s" in panel["content"]
    assert reply == {"role": "assistant", "content": "It is 36."}


def test_a_pause_answered_before_min_waste_decided_says_so():
    step = ToolStep("calculator", "1+1", 0.0, answer="<r>2</r>", strategies=["preserve"],
                    waste={"preserve": 50.0, "swap": 0.0, "discard": 20.0})
    assert "answered before the next engine step" in step.message("min-waste")["content"]
    step.strategies = ["preserve", "swap"]
    assert "policy `min-waste`: least waste" in step.message("min-waste")["content"]
    assert "fixed by policy `preserve`" in step.message("preserve")["content"]


def test_memory_chart_is_never_empty_and_drops_to_zero_when_idle():
    now = time.monotonic()
    sample = {"running": 3, "preserved": 1, "swapped_host": 2}
    timeline: list[dict] = []
    engine = SimpleNamespace(timeline=lambda: list(timeline))
    monitor = MemoryMonitor(lambda: None)
    try:
        empty = monitor.block_frame(engine)
        assert len(empty) == 3 and set(empty["blocks"]) == {0.0}  # a first frame with no rows draws no lines later
        timeline += [{"t": now - 5, **sample}, {"t": now - 1, **sample}]
        frame = monitor.block_frame(engine)
        assert list(frame["blocks"]) == [3, 1, 2, 0, 0, 0, 3, 1, 2]  # idle gap: zero, not a slope
    finally:
        monitor.close()
