"""The demo's tool functions and their wiring as `infercept_hf.Tool`s, one per augmentation type.

Plain functions (`calculate`, `image_file`, ...) compute the answer text; `demo_tools()`
wraps each in a `Tool` whose `fn` sleeps for the tool's simulated latency and returns the
answer inside the answer tags, which is exactly what the engine appends.
"""
from __future__ import annotations

import ast
import operator
import re
import time
from collections.abc import Callable
from typing import Any

from ..chat_tools import FunctionTool, current_call, function_tool
from ..tools import Tool, ToolCall
from .chat_format import ANSWER_CLOSE, ANSWER_OPEN, TOOL_TAGS, wrap_answer
from .game import GameSessions
from .knowledge import lookup as knowledge_lookup

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_MAX_SLUG_WORDS = 6
HUMAN_TURN_S = 30.0  # a person's reply takes tens of seconds (the paper's chatbot pauses average ~29 s)


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ValueError("only numbers, + - * / and parentheses are allowed")


def format_number(value: float) -> str:
    """Integers without a decimal point, other values to 4 decimals without trailing zeros."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.4f}".rstrip("0").rstrip(".")


def calculate(expression: str) -> str:
    """Evaluate `+ - * /` arithmetic exactly (no `eval`); errors come back as text the model can read."""
    try:
        return format_number(_evaluate(ast.parse(expression.strip(), mode="eval").body))
    except ZeroDivisionError:
        return "error: division by zero"
    except (SyntaxError, ValueError) as exc:
        return f"error: {exc.msg if isinstance(exc, SyntaxError) else exc}"


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / and parentheses.

    Args:
        expression: The expression, e.g. "123*45".
    """
    return calculate(expression)


def slug(text: str) -> str:
    """A file name stem from a prompt's first words: what the image and speech tools save under."""
    words = re.findall(r"[a-z0-9]+", text.lower())[:_MAX_SLUG_WORDS]
    return "_".join(words) or "untitled"


def image_name(prompt: str) -> str:
    """The file the image tool saves `prompt` under (what a reply names)."""
    return f"{slug(prompt)}.png"


def speech_name(text: str) -> str:
    """The file the speech tool saves `text` under (what a reply names)."""
    return f"{slug(text)}.wav"


def image_file(prompt: str) -> str:
    return f"[image saved: {image_name(prompt)}]"


def speech_file(text: str) -> str:
    return f"[audio saved: {speech_name(text)}]"


# The chatbot augmentation: (question the model asks, replies a user gives, reply template).
CHAT_INTENTS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "trip": ("Where do you want to go?", ("Rome", "Tokyo", "the beach", "New York", "my home town", "Cairo"),
             "Great, I booked your trip to {}."),
    "meal": ("What cuisine do you like?", ("Italian", "Thai", "Mexican", "Indian", "French", "Greek"),
             "Enjoy your {} dinner tonight!"),
    "reminder": ("What should I remind you about?", ("call mom", "buy milk", "water the plants", "pay rent",
                                                    "feed the cat"), "OK, I will remind you to {}."),
    "name": ("What is your name?", ("Alice", "Bob", "Maria", "Chen", "Omar", "Priya"), "Nice to meet you, {}!"),
}


def scripted_reply(question: str) -> str:
    """The user's answer when nobody is typing: the first sample reply to a known question."""
    for asked, replies, _ in CHAT_INTENTS.values():
        if question.strip() == asked:
            return replies[0]
    return "yes"


def _sleeping(seconds: float, answer: Callable[[ToolCall], str]) -> Callable[[ToolCall], str]:
    def fn(call: ToolCall) -> str:
        if seconds > 0:
            time.sleep(seconds)
        return wrap_answer(answer(call))

    return fn


def demo_tools(
    *,
    lookup_seconds: float = 0.05,
    game_seconds: float = 0.05,
    image_seconds: float = 3.0,
    tts_seconds: float = 2.0,
    chat_seconds: float = 0.0,
    chat_reply: Callable[[str], str] = scripted_reply,
    game_seed: int = 0,
) -> list[Tool]:
    """The six demo tools with simulated latencies (pass 0 for fast tests).

    `chat_reply(question)` supplies the user's next turn, e.g. from a UI; it may block, and
    `chat_seconds` adds a fixed think time on top; a custom `chat_reply` is expected to take a
    human's time (`HUMAN_TURN_S`), which the min-waste policy uses to plan. Each call of `demo_tools` starts a fresh
    game, whose episodes are keyed by the engine's request id.
    """
    sessions = GameSessions(game_seed)
    fns: dict[str, tuple[float, Callable[[ToolCall], str]]] = {
        "calculator": (0.0, lambda call: calculate(call.text)),
        "lookup": (lookup_seconds, lambda call: knowledge_lookup(call.text)),
        "game": (game_seconds, lambda call: sessions.act(call.request_id, call.text)),
        "image": (image_seconds, lambda call: image_file(call.text)),
        "tts": (tts_seconds, lambda call: speech_file(call.text)),
        "chat": (chat_seconds, lambda call: chat_reply(call.text)),
    }
    expected = {"chat": chat_seconds + (0.0 if chat_reply is scripted_reply else HUMAN_TURN_S)}
    tools = []
    for name, (seconds, answer) in fns.items():
        start, end = TOOL_TAGS[name]
        tools.append(Tool(name=name, start=start, end=end, fn=_sleeping(seconds, answer),
                          expected_duration=expected.get(name, seconds)))
    return tools


def demo_functions(**options: Any) -> list[FunctionTool]:
    """The six demo tools as plain Python functions, called through the chat protocol (the
    tokenizer's response and chat templates) rather than text triggers. `options` are
    `demo_tools`'s; each function runs that tool's `fn` (its latency, its per-request game), and
    the chat template adds the answer tags, so both forms append the same tokens."""
    tools = {t.name: t for t in demo_tools(**options)}

    def answer(name: str, text: str) -> str:
        call = current_call()
        wrapped = tools[name].fn(ToolCall(name, text, call.request_id, call.generated_ids, call.started_at))
        return wrapped[len(ANSWER_OPEN):-len(ANSWER_CLOSE)]

    def lookup(query: str) -> str:
        """Look up the capital, currency or continent of a country.

        Args:
            query: The question, e.g. "capital of Peru".
        """
        return answer("lookup", query)

    def game(action: str) -> str:
        """Act in the text game: "start <item>", "go <direction>" or "take <item>".

        Args:
            action: The action.
        """
        return answer("game", action)

    def image(prompt: str) -> str:
        """Draw a picture.

        Args:
            prompt: What to draw.
        """
        return answer("image", prompt)

    def tts(text: str) -> str:
        """Read text aloud.

        Args:
            text: What to say.
        """
        return answer("tts", text)

    def chat(question: str) -> str:
        """Ask the user a question.

        Args:
            question: The question.
        """
        return answer("chat", question)

    return [function_tool(fn, expected_duration=tools[fn.__name__].expected_duration)
            for fn in (calculator, lookup, game, image, tts, chat)]
