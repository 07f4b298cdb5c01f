"""Next-token choice per request, reusing transformers' logits processors.

Processors take `(input_ids [B, L], scores [B, V])` with one length for the batch; our
requests have different lengths, so each sampled row is processed on its own. Greedy rows
with no processors skip all of it and are decided by one batched argmax.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


class Sampler:
    """How one request turns logits into a token: processors, then argmax or a seeded draw."""

    def __init__(self, processors=None, do_sample: bool = False, seed: int | None = None) -> None:
        self.processors = processors if processors else None
        self.do_sample = do_sample
        self.generator = None
        if do_sample:
            self.generator = torch.Generator(device="cpu")
            # drawn from torch's global RNG, so torch.manual_seed(...) before generate() reproduces a run
            self.generator.manual_seed(int(torch.randint(0, 2**62, (1,))) if seed is None else seed)

    @property
    def is_plain_greedy(self) -> bool:
        return not self.do_sample and self.processors is None

    def __call__(self, token_ids: Sequence[int], logits: torch.Tensor) -> int:
        scores = logits[None]
        if self.processors is not None:
            ids = torch.tensor([list(token_ids)], dtype=torch.long, device=logits.device)
            scores = self.processors(ids, scores)
        if not self.do_sample:
            return int(scores[0].argmax())
        probs = torch.softmax(scores[0].float(), dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))


GREEDY = Sampler()


def sample_batch(samplers: Sequence[Sampler], token_logs: Sequence[Sequence[int]], logits: torch.Tensor) -> list[int]:
    """Pick one token per row of `logits` [n, V]."""
    out = logits.argmax(dim=-1).tolist()
    for i, sampler in enumerate(samplers):
        if not sampler.is_plain_greedy:
            out[i] = sampler(token_logs[i], logits[i])
    return out
