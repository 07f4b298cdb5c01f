"""`tool_choice` forcing a call: the opening the prompt is followed by, and, where the tools' calls
open differently, a constraint on the first generated tokens.

The chat template writes each tool's call with its own opening (`ChatFormat.forced_opener`: from the
generation prompt through the name). A named function's opening, and the part all tools'
openings share, are appended to the prompt: the model writes the rest of the call. Where the
openings then still differ (a format with one token per tool, `<calculator expression>`, or
the names themselves after Hermes' `{"name": "`), `"required"` restricts the next tokens to
those that continue one of the openings, with transformers' `PrefixConstrainedLogitsProcessor`,
until one is complete: the model chooses which tool, never whether.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PrefixConstrainedLogitsProcessor

from ..chat_tools import ChatFormat
from ..sampling import Sampler


class OpenerConstraint(LogitsProcessor):
    """Masks every token that does not continue one of `rests` (the openings past the prompt) while
    the turn's tokens, from `prompt_len` on, are still short of a whole opening; then does nothing."""

    def __init__(self, prompt_len: int, rests: Sequence[Sequence[int]]) -> None:
        self.prompt_len = prompt_len
        self.rests = [tuple(r) for r in rests]
        self._mask = PrefixConstrainedLogitsProcessor(self._allowed, num_beams=1)

    def _generated(self, ids: torch.Tensor) -> tuple[int, ...]:
        return tuple(ids[self.prompt_len:].tolist())

    def _allowed(self, batch_id: int, ids: torch.Tensor) -> list[int]:
        done = self._generated(ids)
        return sorted({r[len(done)] for r in self.rests if len(r) > len(done) and r[:len(done)] == done})

    def opening(self, ids: torch.Tensor) -> bool:
        """Whether the tokens so far are a proper prefix of some opening (no whole one written yet)."""
        done = self._generated(ids)
        return done not in self.rests and any(len(r) > len(done) and r[:len(done)] == done for r in self.rests)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self._mask(input_ids, scores) if self.opening(input_ids[0]) else scores


class ForcedCall(NamedTuple):
    opener: list[int]  # follows the prompt
    rests: tuple[tuple[int, ...], ...]  # the openings past `opener`, to constrain to; () when one is left

    def sampler(self, sampler: Sampler | None, prompt_len: int) -> Sampler | None:
        """`sampler` with the constraint first (greedy when None); unchanged when nothing is constrained."""
        if not self.rests:
            return sampler
        constraint = OpenerConstraint(prompt_len, self.rests)
        if sampler is None:
            return Sampler(LogitsProcessorList([constraint]))
        constrained = copy.copy(sampler)  # the same seeded generator: the draws are the request's
        constrained.processors = LogitsProcessorList([constraint, *(sampler.processors or [])])
        return constrained


def forced_call(fmt: ChatFormat, name: str | None) -> ForcedCall:
    """The call `tool_choice` forces: to `name`, or (None, `"required"`) to any of the format's tools.
    Raises `ChatTemplateError` when the template shows no opening for a call."""
    if name is not None:
        return ForcedCall(fmt.forced_opener(name), ())
    openers = [fmt.forced_opener(n) for n in fmt.functions]
    common = os.path.commonprefix(openers)
    rests = tuple(dict.fromkeys(tuple(o[len(common):]) for o in openers))
    return ForcedCall(list(common), rests if len(rests) > 1 else ())
