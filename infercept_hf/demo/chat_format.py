"""The demo model's one tool-call format, shared by the data generator, tokenizer and tools.

A dialogue is a single user turn and the assistant's answer, with tool calls inline:

    <user>What is 123 * 45?<assistant><calculator expression>123*45</calculator><r>5535</r>The answer is 5535.<eos>
    \\_________ prompt ________/\\___________ model ______________/\\ tool /\\______ model ______/

The model writes `<calculator expression>...</calculator>` and stops being asked: the engine
pauses on the closing tag, runs the tool and appends its answer as `<r>5535</r>`. The
opening tag names the tool and its one argument, so the tokenizer's response template reads
a call as `calculator(expression="123*45")`, and its chat template renders `tool` messages as
`<r>...</r>`: plain Python functions work as tools (`tools=[calculator]`), as with any chat
model. Every tag is a single added token (the ids the model was trained on) and every other
character is its own token, so an answer tokenizes the same on its own as inside the context.
"""
from __future__ import annotations

USER = "<user>"
ASSISTANT = "<assistant>"
EOS = "<eos>"
PAD = "<pad>"
UNK = "<unk>"
ANSWER_OPEN = "<r>"
ANSWER_CLOSE = "</r>"

# tool name -> its one argument's name. The order fixes the tags' token ids: do not reorder.
TOOL_ARGS: dict[str, str] = {
    "calculator": "expression",
    "lookup": "query",
    "game": "action",
    "image": "prompt",
    "tts": "text",
    "chat": "question",
}
# tool name -> (start tag, end tag); the engine pauses on the end tag.
TOOL_TAGS: dict[str, tuple[str, str]] = {name: (f"<{name} {arg}>", f"</{name}>") for name, arg in TOOL_ARGS.items()}

CONTROL_TOKENS = (PAD, UNK, EOS, USER, ASSISTANT)
TAG_TOKENS = (ANSWER_OPEN, ANSWER_CLOSE) + tuple(tag for pair in TOOL_TAGS.values() for tag in pair)

# Hugging Face chat template: `demo_prompt`'s text for one user message; an assistant turn with
# `tool_calls` as the model writes them, a `tool` message as `<r>...</r>`, the assistant going on
# after it without a new tag. `tools` are checked, not listed: the model learned its six tools in
# training and never saw a tool list.
CHAT_TEMPLATE = (
    "{%- set args = " + repr(TOOL_ARGS) + " %}"
    "{%- for t in tools or [] %}{% set name = (t.function or t).name %}{% if name not in args %}"
    "{{ raise_exception('the demo model knows the tools " + ", ".join(TOOL_ARGS) + ", not ' ~ name) }}"
    "{% endif %}{% endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}" + USER + "{{ message.content }}"
    "{%- elif message.role == 'tool' %}" + ANSWER_OPEN + "{{ message.content }}" + ANSWER_CLOSE +
    "{%- else %}{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}" + ASSISTANT + "{% endif %}"
    "{{ message.content or '' }}"
    "{%- for call in message.tool_calls or [] %}{% set f = call.function %}"
    "<{{ f.name }} {{ args[f.name] }}>{{ f.arguments[args[f.name]] }}</{{ f.name }}>{% endfor %}"
    "{%- if not message.tool_calls %}" + EOS + "{% endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt and (not messages or messages[-1].role != 'tool') %}" + ASSISTANT + "{% endif %}"
)
_NAMES = "|".join(TOOL_ARGS)
# transformers response template: a call is `<name arg>value</name>`, read as name(arg=value).
RESPONSE_TEMPLATE: dict = {
    "defaults": {"role": "assistant"},
    "start_anchor": [ASSISTANT, ANSWER_CLOSE],
    "fields": {
        "tool_calls": {
            "open_pattern": rf"(?=<(?P<name>{_NAMES}) \w+>)",
            "close_pattern": rf"</(?:{_NAMES})>",
            "repeats": True,
            "content": "xml-inline",
            "content_args": {"tag_pattern": r"<\w+ (?P<key>\w+)>(?P<value>.*)"},
            "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}},
        },
        "content": {"close": EOS, "content": "text"},
    },
}


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
