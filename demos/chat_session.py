"""The demo's serving side: which model the one shared engine serves, and how questions reach it.

Every chat in every browser tab goes through one `InterceptEngine`, driven by one
`AsyncInterceptEngine` thread, so concurrent users share its paged KV pool the way a
server's clients would: that sharing is what makes a pause's strategy matter.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from jinja2 import TemplateError

import infercept_hf as ih
from infercept_hf.demo import demo_functions, demo_model, demo_tools
from infercept_hf.demo.chat_format import CHAT_TEMPLATE, call_text
from infercept_hf.loading import load_causal_lm
from infercept_hf.outputs import RequestEvent
from infercept_hf.scheduler import check_policy

log = logging.getLogger("infercept_demo")
T = TypeVar("T")

BUNDLED = "bundled"
DEFAULT_NUM_BLOCKS = 64  # 1,024 tokens of KV: a few concurrent chats already compete for it
MAX_NEW_TOKENS = 128  # the demo model has 512 positions; tool answers (a game room: ~100) need room too
ANSWER_ROOM = 96  # positions kept free for tool answers when a long prompt shortens the reply
USER_REPLY_S = 5.0  # the simulated user's think time when the model asks a follow-up question
# How a model that was not trained on the demo's tool tags learns of them: from its chat turn.
TOOL_INSTRUCTIONS = (
    "You can use tools by writing a call and stopping; its answer appears after it inside <r>...</r>. "
    + " ".join(f"{label}: {call_text(tool, example)}." for tool, label, example in (
        ("calculator", "Calculator", "123*45"), ("lookup", "Knowledge lookup", "capital of France"),
        ("image", "Image", "a red cat"), ("tts", "Speech", "text"), ("chat", "Ask the user", "question")))
)


class ModelLoadError(Exception):
    """A model the demo cannot serve; the message is written for the person who asked for it."""


@dataclass(frozen=True)
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: Any
    tools: list[ih.Tool | ih.FunctionTool]

    @property
    def demo_format(self) -> bool:
        """Trained on the demo's format (the bundled model, a copy, a retrained one): asked as it was trained."""
        return getattr(self.tokenizer, "chat_template", None) == CHAT_TEMPLATE


def load_bundled() -> LoadedModel:
    """The project's own tool-calling model: the one place the demo is wired to it."""
    try:
        model, tokenizer, _ = demo_model()
    except FileNotFoundError as exc:
        raise ModelLoadError(f"The bundled demo model is not installed: {exc}") from None
    # its tools as plain functions, called through its chat and response templates like a real model's
    return LoadedModel(BUNDLED, model, tokenizer, demo_functions(chat_seconds=USER_REPLY_S))


def _looks_local(spec: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else that is not on disk is a missing path."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


def load_model(spec: str) -> LoadedModel:
    """The bundled model (`""` or `"bundled"`), or any transformers causal LM id, path or GGUF file."""
    spec = spec.strip()
    if spec in ("", BUNDLED):
        return load_bundled()
    path = Path(spec).expanduser()
    if not path.exists() and _looks_local(spec):
        raise ModelLoadError(f"No model at `{spec}`: that path does not exist.")
    where = str(path) if path.exists() else spec
    try:
        model, tokenizer = load_causal_lm(where)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; all mean "cannot load"
        log.info("loading %s failed", spec, exc_info=True)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "" if path.exists() else " (not a local directory, so it was looked up on the Hugging Face hub)"
        raise ModelLoadError(f"Could not load `{spec}`{hint}: {reason}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"`{spec}` has no chat template (its tokenizer's `chat_template` is empty), so the demo cannot "
            "format a conversation for it. Pick a chat/instruct model, or add a template to its tokenizer."
        )
    return LoadedModel(spec, model, tokenizer, demo_tools(chat_seconds=USER_REPLY_S))


def prompt_ids(loaded: LoadedModel, question: str) -> list[int]:
    """The question as one user turn in the model's chat template (the demo model was trained on
    single turns, so the demo asks each question afresh). Other models get the tool format spelled
    out, in a system turn where the template has one."""
    tok = loaded.tokenizer
    user = {"role": "user", "content": question}
    if loaded.demo_format:
        conversations = [[user]]
    else:
        system = {"role": "system", "content": TOOL_INSTRUCTIONS}
        conversations = [[system, user], [{"role": "user", "content": f"{TOOL_INSTRUCTIONS}\n\n{question}"}]]
    for messages in conversations:
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError:  # a template that refuses system turns: try the next form
            continue
        return tok.encode(text, add_special_tokens=False)
    raise ModelLoadError(f"The chat template of `{loaded.name}` refused a plain user message.")


class ChatSession:
    """One model, one engine, one driver thread; `configure` swaps model or policy in place.

    Requests in flight when the engine is swapped end as "cancelled": a demo trade-off that
    keeps a single pool (and a single memory chart) at all times.
    """

    def __init__(self, loaded: LoadedModel, policy: str, num_blocks: int = DEFAULT_NUM_BLOCKS,
                 cost_model: ih.CostModel | None = None) -> None:
        self._lock = threading.Lock()
        self.num_blocks = num_blocks
        self._fixed_cost = cost_model
        self.loaded = loaded
        self.policy = ""
        self.engine: ih.InterceptEngine | None = None
        self.driver: ih.AsyncInterceptEngine | None = None
        self.configure(loaded, policy)

    def configure(self, loaded: LoadedModel | None = None, policy: str | None = None) -> None:
        """Serve `loaded` (default: the current model) under `policy` (default: the current one)."""
        loaded = loaded or self.loaded
        policy = check_policy(policy or self.policy)
        same_model = self.engine is not None and loaded is self.loaded
        cost = self._fixed_cost or (self.engine.cost if same_model else None)  # None: measure (cached on disk)
        engine = ih.InterceptEngine(loaded.model, tokenizer=loaded.tokenizer, policy=policy,
                                    num_blocks=self.num_blocks, block_size=16, cost_model=cost)
        with self._lock:
            old = self.driver
            self.loaded, self.policy, self.engine = loaded, policy, engine
            self.driver = ih.AsyncInterceptEngine(engine)
        if old is not None:
            old.close()

    async def ask(self, question: str, max_new_tokens: int = MAX_NEW_TOKENS) -> AsyncIterator[RequestEvent]:
        """The request's events, as `AsyncInterceptEngine.stream` yields them."""
        loaded, driver = self.loaded, self.driver
        ids = prompt_ids(loaded, question)
        limit = driver.engine.max_positions
        if limit is not None:
            max_new_tokens = max(1, min(max_new_tokens, limit - len(ids) - ANSWER_ROOM))
        async for event in driver.stream(ids, max_new_tokens=max_new_tokens, tools=loaded.tools):
            yield event

    def close(self) -> None:
        with self._lock:
            driver, self.driver = self.driver, None
        if driver is not None:
            driver.close()


async def ticking(items: AsyncIterator[T], period_s: float) -> AsyncIterator[T | None]:
    """`items`, with a None after every `period_s` of silence, so a caller can redraw while
    nothing happens (a tool pause is silent). Leaving early cancels the source, which for
    `ChatSession.ask` cancels the request and frees its blocks."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    end = object()

    async def pump() -> None:
        try:
            async for item in items:
                queue.put_nowait(item)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, who raises it
            queue.put_nowait(exc)
        else:
            queue.put_nowait(end)

    task = asyncio.create_task(pump())
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), period_s)
            except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
                yield None
                continue
            if item is end:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        task.cancel()
