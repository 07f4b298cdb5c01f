"""Accuracy of the demo model per augmentation type, through the reference tool loop.

`python -m infercept_hf.demo.evaluate [--path DIR]` prints the figures quoted in
docs/DEMO_MODEL.md. Arithmetic and QA questions come from the held-out shares that
training never generates (see `data.py`); the other kinds are fresh random samples.
"""
from __future__ import annotations

import argparse
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..tools import Tool
from .chat_format import ANSWER_CLOSE, ANSWER_OPEN, demo_prompt
from .data import Piece, arithmetic_item, chat, game_question, image_generation, qa_facts, qa_question, text_to_speech
from .game import ALL_ITEMS
from .knowledge import lookup
from .model import demo_model
from .reference_loop import Transcript, run_with_tools
from .tools import calculator, demo_tools

EVAL_SEED = 20240
MAX_NEW_TOKENS = 160
GAME_MAX_NEW_TOKENS = 100


@dataclass
class Score:
    """How many of `total` dialogues passed, with the first few failures for a quick look."""

    correct: int = 0
    total: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def line(self, name: str) -> str:
        """`name  correct/total  percent`, as this module and the training script print a score."""
        return f"{name:30s} {self.correct:3d}/{self.total:<3d} {100 * self.accuracy:5.1f}%"

    def add(self, ok: bool, transcript: str) -> None:
        self.total += 1
        self.correct += ok
        if not ok and len(self.failures) < 5:
            self.failures.append(transcript)


def fast_tools(**options: Any) -> list[Tool]:
    """The demo tools with every simulated latency at zero; `options` go to `demo_tools`."""
    return demo_tools(**{"lookup_seconds": 0.0, "game_seconds": 0.0, "image_seconds": 0.0, "tts_seconds": 0.0,
                         **options})


def ask(model: torch.nn.Module, tokenizer: Any, tools: Sequence[Tool], question: str,
        max_new_tokens: int = MAX_NEW_TOKENS, request_id: int = 0) -> Transcript:
    ids = tokenizer.encode(demo_prompt(question), add_special_tokens=False)
    return run_with_tools(model, tokenizer, tools, ids, max_new_tokens, request_id=request_id)


def _text(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def contains_number(text: str, number: str) -> bool:
    """`number` appears as a whole number (so 12 is not found in 123 or 1.25)."""
    return re.search(rf"(?<![\d.]){re.escape(number)}(?![\d]|\.\d)", text) is not None


def arithmetic_score(model: torch.nn.Module, tokenizer: Any, n: int = 50, seed: int = EVAL_SEED) -> Score:
    """Held-out single-operation questions: the calculator is called and the reply holds the result."""
    rng, tools, score = random.Random(seed), fast_tools(), Score()
    for _ in range(n):
        item = arithmetic_item(rng, heldout=True)
        t = ask(model, tokenizer, tools, item.question)
        called = any(c.tool == "calculator" for c in t.calls)
        score.add(called and contains_number(_text(tokenizer, t.reply_ids), item.result),
                  _text(tokenizer, t.ids[t.prompt_len - 1:]) + f"  (expected {item.result})")
    return score


def chat_arithmetic_score(model: torch.nn.Module, tokenizer: Any, n: int = 50, seed: int = EVAL_SEED) -> Score:
    """The held-out arithmetic questions as chats through `infercept_hf.chat(tools=[calculator])`
    (a plain function, called through the chat and response templates), in one batch."""
    from ..chat_tools import chat

    rng, score = random.Random(seed), Score()
    items = [arithmetic_item(rng, heldout=True) for _ in range(n)]
    chats = chat(model, tokenizer, [[{"role": "user", "content": item.question}] for item in items],
                 tools=[calculator], max_new_tokens=MAX_NEW_TOKENS)
    for item, [out] in zip(items, chats):
        messages = out["generated_text"]
        called = any(m["role"] == "tool" and m["name"] == "calculator" for m in messages)
        score.add(called and contains_number(messages[-1]["content"], item.result),
                  f"{messages[1:]}  (expected {item.result})")
    return score


def qa_score(model: torch.nn.Module, tokenizer: Any, seed: int = EVAL_SEED) -> Score:
    """Every held-out (relation, country) fact in two phrasings: lookup called, answer in the reply."""
    rng, tools, score = random.Random(seed), fast_tools(), Score()
    for relation, country in qa_facts(heldout=True):
        expected = lookup(f"{relation} of {country}")
        for _ in range(2):
            t = ask(model, tokenizer, tools, qa_question(rng, relation, country))
            called = any(c.tool == "lookup" for c in t.calls)
            score.add(called and expected in _text(tokenizer, t.reply_ids), _text(tokenizer, t.ids))
    return score


def game_score(model: torch.nn.Module, tokenizer: Any, n: int = 20, seed: int = EVAL_SEED) -> Score:
    """Episodes from random start rooms: the item ends up taken and the reply says so."""
    rng, tools, score = random.Random(seed), fast_tools(game_seed=seed), Score()
    for episode in range(n):
        item = rng.choice(ALL_ITEMS)
        t = ask(model, tokenizer, tools, game_question(rng, item), GAME_MAX_NEW_TOKENS, request_id=episode)
        took = any(c.tool == "game" and f"You take the {item}." in str(c.answer) for c in t.calls)
        score.add(took and f"I got the {item}." in _text(tokenizer, t.reply_ids), _text(tokenizer, t.ids))
    return score


def exact_score(model: torch.nn.Module, tokenizer: Any, generator: Callable[[random.Random], list[Piece]],
                n: int = 20, seed: int = EVAL_SEED) -> Score:
    """Fresh dialogues of one kind: the model's whole continuation matches the reference exactly.

    The chat tool answers with the user reply the reference dialogue has after the question.
    """
    rng, score = random.Random(seed), Score()
    for _ in range(n):
        pieces = generator(rng)
        prompt, expected = pieces[0][0], "".join(text for text, _ in pieces[1:])
        user_turns = [text[len(ANSWER_OPEN):-len(ANSWER_CLOSE)] for text, trained in pieces[1:] if not trained]
        tools = fast_tools(chat_reply=lambda _question, turns=iter(user_turns): next(turns, "yes"))
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        t = run_with_tools(model, tokenizer, tools, ids, MAX_NEW_TOKENS)
        got = tokenizer.decode(t.ids[t.prompt_len:], skip_special_tokens=False)
        score.add(got == expected, got)
    return score


def evaluate_all(model: torch.nn.Module, tokenizer: Any) -> dict[str, Score]:
    return {
        "arithmetic (50 held-out)": arithmetic_score(model, tokenizer),
        "arithmetic via ih.chat": chat_arithmetic_score(model, tokenizer),
        "qa lookup (held-out facts)": qa_score(model, tokenizer),
        "game (20 episodes)": game_score(model, tokenizer),
        "image (exact)": exact_score(model, tokenizer, image_generation),
        "tts (exact)": exact_score(model, tokenizer, text_to_speech),
        "chat (exact)": exact_score(model, tokenizer, chat),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--path", default=None, help="model directory (default: the bundled one)")
    parser.add_argument("--failures", action="store_true", help="print up to 5 failing transcripts per kind")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer, _ = demo_model(args.path)
    for name, score in evaluate_all(model, tokenizer).items():
        print(score.line(name))
        for failure in score.failures if args.failures else ():
            print("    ", failure)


if __name__ == "__main__":
    main()
