"""The demo model's one tool-call format, shared by the data generator, tokenizer and tools.

A dialogue is a single user turn and the assistant's answer, with tool calls inline:

    <user>What is 123 * 45?<assistant><calc>123*45</calc><r>5535</r>The answer is 5535.<eos>
    \\_________ prompt ________/\\__ model __/\\ tool /\\______ model ______/

The model writes `<calc>...</calc>` and stops being asked: the engine pauses on `</calc>`,
runs the tool and appends the tool's return value, `<r>5535</r>`, verbatim. The wrapper
is part of what the tool returns so the model never predicts it; every tag is a single
added token and every other character is its own token, so the answer text tokenizes the
same on its own as inside the context.
"""
from __future__ import annotations

USER = "<user>"
ASSISTANT = "<assistant>"
EOS = "<eos>"
PAD = "<pad>"
UNK = "<unk>"
ANSWER_OPEN = "<r>"
ANSWER_CLOSE = "</r>"

# tool name -> (start tag, end tag); the engine pauses on the end tag.
TOOL_TAGS: dict[str, tuple[str, str]] = {
    "calculator": ("<calc>", "</calc>"),
    "lookup": ("<lookup>", "</lookup>"),
    "game": ("<act>", "</act>"),
    "image": ("<image>", "</image>"),
    "tts": ("<tts>", "</tts>"),
    "chat": ("<ask>", "</ask>"),
}

CONTROL_TOKENS = (PAD, UNK, EOS, USER, ASSISTANT)
TAG_TOKENS = (ANSWER_OPEN, ANSWER_CLOSE) + tuple(tag for pair in TOOL_TAGS.values() for tag in pair)

# Hugging Face chat template producing exactly `demo_prompt`'s text for one user message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% else %}" + ASSISTANT + "{{ message['content'] }}" + EOS + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def demo_prompt(question: str) -> str:
    """The prompt text training used: the user turn, then the assistant tag to answer after."""
    return f"{USER}{question}{ASSISTANT}"


def call_text(tool: str, body: str) -> str:
    """What the model writes to call `tool` with `body`."""
    start, end = TOOL_TAGS[tool]
    return f"{start}{body}{end}"


def wrap_answer(text: str) -> str:
    """What a tool returns to the engine: its answer inside the answer tags."""
    return f"{ANSWER_OPEN}{text}{ANSWER_CLOSE}"
