"""The demo tokenizer: one token per printable ASCII character, one per tag.

Character level because exact arithmetic matters more than compression: every digit is
its own token, so `5535` reads and copies the same wherever it appears, and a tool
answer tokenizes identically on its own and inside the context. Built with the
`tokenizers` library (a BPE model with no merges is a character vocabulary) and wrapped
as a `PreTrainedTokenizerFast`, so `save_pretrained`/`AutoTokenizer` work as for any model.
"""
from __future__ import annotations

import string

from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from .chat_format import CHAT_TEMPLATE, CONTROL_TOKENS, EOS, PAD, RESPONSE_TEMPLATE, TAG_TOKENS, UNK

CHARACTERS = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c")
MAX_LENGTH = 512


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Control tokens are special (dropped by `skip_special_tokens`); tool tags are plain added
    tokens, so a decoded reply still shows its tool calls. The chat and response templates make
    the tool-call format readable to transformers (`apply_chat_template`, `parse_response`)."""
    vocab = {token: i for i, token in enumerate(CONTROL_TOKENS + TAG_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        response_template=RESPONSE_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_LENGTH,
    )
