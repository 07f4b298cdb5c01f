"""Three tool-call chat formats, written for the tests from each format's public description,
with a character-level tokenizer and a tiny random model per format.

- hermes: Qwen 2.5 / Hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` then
  `<|im_end|>`; results as `<tool_response>` blocks in one user turn. No response template on
  the tokenizer: the model is a Qwen2, so transformers' per-model_type fallback parses it.
- llama: Llama 3.1 JSON tool calling: the assistant turn is `{"name": ..., "parameters": {...}}`
  then `<|eot_id|>`; results in an `ipython` turn. One call per turn, as Llama 3.1 allows.
- mistral: Mistral v3: `[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}]</s>`; results
  as `[TOOL_RESULTS]{"content": ..., "call_id": ...}[/TOOL_RESULTS]`, the model continues after.
"""
from __future__ import annotations

import string
from dataclasses import dataclass

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call functions.\n<tools>"
    "{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'user' %}<|im_start|>user\n{{ m.content }}<|im_end|>\n"
    "{% elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}{% if not loop.first or m.content %}{{ '\\n' }}{% endif %}"
    "<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}\n"
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n' }}<tool_response>\n{{ m.content }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA_TEMPLATE = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython<|eot_id|>"
    "{% for m in messages %}"
    "{% if m.role == 'user' %}<|start_header_id|>user<|end_header_id|>\n\n"
    "{% if loop.first and tools %}Use these functions:\n{% for t in tools %}{{ t | tojson }}\n\n{% endfor %}"
    "{% endif %}{{ m.content }}<|eot_id|>"
    "{% elif m.role == 'assistant' %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% if m.tool_calls %}{% if m.tool_calls | length != 1 %}{{ raise_exception('one call per turn') }}{% endif %}"
    "{\"name\": \"{{ m.tool_calls[0].function.name }}\", \"parameters\": "
    "{{ m.tool_calls[0].function.arguments | tojson }}}"
    "{% else %}{{ m.content }}{% endif %}<|eot_id|>"
    "{% elif m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA_RESPONSE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "fields": {
        "tool_calls": {"open_pattern": r"(?=\{\"name\")", "close": "<|eot_id|>", "content": "json",
                       "repeats": True,
                       "transform": {"type": "function",
                                     "function": {"name": "{content.name}", "arguments": "{content.parameters}"}}},
        "content": {"close": "<|eot_id|>", "content": "text"},
    },
}

MISTRAL_TEMPLATE = (
    "<s>{%- for m in messages %}"
    "{%- if m.role == 'user' %}{%- if tools and loop.first %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "[INST]{{ m.content }}[/INST]"
    "{%- elif m.role == 'assistant' %}{%- if m.tool_calls %}[TOOL_CALLS]["
    "{%- for c in m.tool_calls %}{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}, \"id\": \"{{ c.id }}\"}{% if not loop.last %}, {% endif %}{%- endfor %}]"
    "{%- else %}{{ m.content }}{%- endif %}</s>"
    "{%- elif m.role == 'tool' %}[TOOL_RESULTS]{\"content\": {{ m.content | tojson }}, "
    "\"call_id\": \"{{ m.tool_call_id }}\"}[/TOOL_RESULTS]"
    "{%- endif %}{%- endfor %}"
)
MISTRAL_RESPONSE = {
    "defaults": {"role": "assistant"},
    "start_anchor": ["[/INST]", "[/TOOL_RESULTS]"],
    "fields": {
        "tool_calls": {"open": "[TOOL_CALLS]", "close": "</s>", "content": "json", "transform_each": True,
                       "transform": {"id": "{id}", "type": "function",
                                     "function": {"name": "{name}", "arguments": "{arguments}"}}},
        "content": {"close": "</s>", "content": "text"},
    },
}


@dataclass(frozen=True)
class Format:
    name: str
    chat_template: str
    response_template: dict | None
    specials: tuple[str, ...]
    eos: str
    config: type

    def call_text(self, calls: list[tuple[str, str]]) -> str:
        """What the model writes for `calls` [(name, arguments as JSON)], end-of-turn included."""
        if self.name == "hermes":
            body = "\n".join(f'<tool_call>\n{{"name": "{n}", "arguments": {a}}}\n</tool_call>' for n, a in calls)
            return body + "<|im_end|>"
        if self.name == "llama":
            (n, a), = calls
            return f'{{"name": "{n}", "parameters": {a}}}<|eot_id|>'
        items = ", ".join(f'{{"name": "{n}", "arguments": {a}, "id": "call{i:05d}"}}' for i, (n, a) in enumerate(calls))
        return f"[TOOL_CALLS][{items}]</s>"


FORMATS = {
    "hermes": Format("hermes", HERMES_TEMPLATE, None,
                     ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>",
                      "</tool_response>"), "<|im_end|>", Qwen2Config),
    "llama": Format("llama", LLAMA_TEMPLATE, LLAMA_RESPONSE,
                    ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                    "<|eot_id|>", LlamaConfig),
    "mistral": Format("mistral", MISTRAL_TEMPLATE, MISTRAL_RESPONSE,
                      ("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                       "[TOOL_RESULTS]", "[/TOOL_RESULTS]"), "</s>", MistralConfig),
}

CHARACTERS = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c")
# Multi-character pieces, as a real BPE vocabulary has them: short calls keep the tests fast.
PIECES = ('{"name": "', '", "arguments": ', '", "parameters": ', ', "id": "', '{"type": "function", "function": ',
          '"description": "', '"parameters": {"type": "object", "properties": {', '"type": "string"', '"type": "integer"',
          '"required": [', "weather", '"city"', "Rome")


def format_tokenizer(fmt: Format) -> PreTrainedTokenizerFast:
    """One token per printable character, per common piece and per control token of the format."""
    specials = ("<pad>", "<unk>") + fmt.specials
    vocab = {t: i for i, t in enumerate(specials + PIECES + CHARACTERS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in PIECES])
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=fmt.eos, pad_token="<pad>", unk_token="<unk>",
                                  chat_template=fmt.chat_template, clean_up_tokenization_spaces=False)
    tok.response_template = fmt.response_template
    return tok


def format_model(fmt: Format, tok: PreTrainedTokenizerFast, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = fmt.config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


class ForceText:
    """A logits processor that makes the model write `forced[i]` right after `prompts[i]`, then
    leaves it free: how a random model is made to emit a tool call."""

    def __init__(self, cases: list[tuple[list[int], list[int]]]) -> None:
        self.cases = [(list(p), list(f)) for p, f in cases]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for row in range(input_ids.shape[0]):
            ids = input_ids[row].tolist()
            for prompt, forced in self.cases:
                k = len(ids) - len(prompt)
                if 0 <= k < len(forced) and ids[:len(prompt)] == prompt:
                    scores[row] = torch.where(torch.arange(scores.shape[1]) == forced[k], 0.0, -torch.inf)
        return scores
