"""What the demo app tests share: the model to chat with, and the app running on loopback.

The bundled demo model is used when its weights are installed. Without them a tiny random
Llama stands in, with a stand-in calculator that fires on the first token the model
generates and answers 5535: the app's plumbing (events, panels, strategies) is still
exercised end to end, only the model's arithmetic is not.

Importing this module skips the importing test module where gradio is not installed.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import infercept_hf as ih
from conftest import TEST_COST

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is first imported
pytest.importorskip("gradio", reason="the demo needs gradio: pip install -e '.[demo]'")
# For a test module's `pytestmark`: gradio's own pandas use warns.
GRADIO_WARNINGS = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "demos"))

import app as demo_app  # noqa: E402
from chat_session import BUNDLED, LoadedModel, ModelLoadError, load_bundled, prompt_ids  # noqa: E402

QUESTION = "What is 123 * 45?"
ANSWER = "5535"


@dataclass(frozen=True)
class ChatModel:
    model: torch.nn.Module
    tokenizer: Any
    tools: list[ih.Tool]
    bundled: bool


def _stand_in() -> ChatModel:
    from infercept_hf.demo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    loaded = LoadedModel(BUNDLED, model, tok, [])
    ids = torch.tensor([prompt_ids(loaded, QUESTION)])
    first = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)[0, -1]
    calc = ih.Tool(name="calculator", end=[int(first)], fn=lambda call: f"<r>{ANSWER}</r>", expected_duration=0.0)
    return ChatModel(model, tok, [calc], bundled=False)


def chat_model() -> ChatModel:
    """The bundled model with its tools (slow tools at zero latency), else the stand-in."""
    try:
        loaded = load_bundled()
    except ModelLoadError:
        return _stand_in()
    from infercept_hf.demo import demo_functions

    tools = demo_functions(image_seconds=0.0, tts_seconds=0.0, lookup_seconds=0.0, game_seconds=0.0)
    return ChatModel(loaded.model, loaded.tokenizer, tools, bundled=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Small models run many times faster on one thread when the machine is shared (the app's default)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def running_app(chat: ChatModel, policy: str = "min-waste") -> Iterator[str]:
    """The app on 127.0.0.1 (a free port) in this process; yields its URL."""
    app = demo_app.build_app(chat.model, chat.tokenizer, chat.tools, policy, cost_model=TEST_COST)
    try:
        app.queue()
        _, url, _ = app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                               quiet=True)
        yield url
    finally:
        app.close()
        app.shutdown()


def tool_messages(messages: list[dict], tool: str) -> list[dict]:
    return [m for m in messages if (m.get("metadata") or {}).get("title", "").startswith(f"tool call · {tool}")]


def text_of(message: dict) -> str:
    """A chat message's text, whether gradio handed it back as a string or as content parts."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
