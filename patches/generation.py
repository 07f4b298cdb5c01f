"""One row's view of the logits processors `model.generate` built for a whole batch.

The engine runs each row's processors on that row alone (rows advance independently). Two of
transformers' processors hold per-batch state that a lone row must not see whole: the
repetition penalty's `prompt_ignore_length` (one padding length per row) and the prefix
constraint's `batch_id` (the row's index, read from a private attribute). Every other
processor is shared as is.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from transformers.generation.logits_process import (
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)


def row_processors(processors: Sequence[Any], row: int) -> list[Any]:
    """`processors` as row `row` of the batch sees them."""
    out = []
    for p in processors:
        if isinstance(p, RepetitionPenaltyLogitsProcessor) and isinstance(p.prompt_ignore_length, torch.Tensor):
            p = copy.copy(p)
            p.prompt_ignore_length = p.prompt_ignore_length[row : row + 1]
        elif isinstance(p, PrefixConstrainedLogitsProcessor):
            fn = p._prefix_allowed_tokens_fn
            p = copy.copy(p)
            p._prefix_allowed_tokens_fn = lambda _batch_id, ids, fn=fn: fn(row, ids)
        out.append(p)
    return out
