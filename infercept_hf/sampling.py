"""Next-token choice per request, reusing transformers' logits processors.

Processors take `(input_ids [B, L], scores [B, V])` with one length for the batch; our
requests have different lengths, so each sampled row is processed on its own. Greedy rows
with no processors skip all of it and are decided by one batched argmax.

A row whose choice fails (a processor raises, the scores turn NaN) yields a `SamplingError`
in place of its token: it ends that one request, and every other row keeps its token.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch

from .faults import RequestFault, describe


class SamplingError(RequestFault):
    """One request's next token could not be chosen."""


class Sampler:
    """How one request turns logits into a token: processors, then argmax or a seeded draw.

    `processors(input_ids [1, L], scores [1, V]) -> scores` is any callable of that shape,
    e.g. a transformers `LogitsProcessorList`."""

    def __init__(self, processors: Callable | None = None, do_sample: bool = False, seed: int | None = None) -> None:
        if processors is not None and not callable(processors):
            raise TypeError("Sampler processors must be callable (e.g. a LogitsProcessorList), "
                            f"got {type(processors).__name__}")
        if not isinstance(do_sample, bool):
            raise TypeError(f"Sampler do_sample must be a bool, got {do_sample!r}")
        if seed is not None:
            try:
                seed = None if isinstance(seed, bool) else operator.index(seed)
            except TypeError:
                seed = None
            if seed is None:
                raise TypeError("Sampler seed must be an int or None")
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
        if bool(torch.isnan(scores).any()):
            raise SamplingError("the scores are NaN after the logits processors")
        if not self.do_sample:
            return int(scores[0].argmax())
        probs = torch.softmax(scores[0].float(), dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))


GREEDY = Sampler()


def sample_batch(samplers: Sequence[Sampler], token_logs: Sequence[Sequence[int]],
                 logits: torch.Tensor) -> list[int | SamplingError]:
    """Pick one token per row of `logits` [n, V]; a row that fails gets its `SamplingError`."""
    out: list[int | SamplingError] = logits.argmax(dim=-1).tolist()
    nan_rows = torch.isnan(logits).any(dim=-1).tolist()
    for i, sampler in enumerate(samplers):
        if nan_rows[i]:
            out[i] = SamplingError("the model's logits are NaN")
        elif not sampler.is_plain_greedy:
            try:
                out[i] = sampler(token_logs[i], logits[i])
            except SamplingError as exc:
                out[i] = exc
            except Exception as exc:  # noqa: BLE001 - a processor's bug is its request's failure
                out[i] = SamplingError(f"sampling raised {describe(exc)}")
    return out
