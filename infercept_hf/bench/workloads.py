"""Synthetic augmented-LLM workloads shaped like the INFERCEPT paper's six augmentation types.

A request is a prompt followed by segments: decode some tokens, pause for a tool call, get an
answer appended; after the last call it decodes `final_tokens` more. Every number and how it
is drawn is documented in docs/WORKLOADS.md; the table below is the single source of truth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..tools import Scripted

MIX = "mix"
MIN_PROMPT = 8


@dataclass(frozen=True)
class WorkloadSpec:
    """Means and standard deviations of one augmentation type.

    pause, calls and context come from the paper's Table 1; answer (tokens a call returns)
    and decode (tokens generated before each call and after the last) are our choices.
    """

    pause_mean_s: float
    pause_std_s: float
    calls_mean: float
    calls_std: float
    context_mean: float
    context_std: float
    answer_mean: float
    answer_std: float
    decode_mean: float
    decode_std: float


WORKLOADS: dict[str, WorkloadSpec] = {
    "arithmetic": WorkloadSpec(9e-5, 6e-5, 3.75, 1.3, 1422, 738, 3, 1, 30, 15),
    "qa": WorkloadSpec(0.69, 0.17, 2.52, 1.73, 1846, 428, 60, 30, 40, 15),
    "virtual_env": WorkloadSpec(0.09, 0.014, 28.18, 15.2, 2185, 115, 20, 10, 12, 6),
    "chatbot": WorkloadSpec(28.6, 15.6, 4.45, 1.96, 753, 703, 40, 30, 85, 60),
    "image": WorkloadSpec(20.03, 7.8, 6.91, 3.93, 1247, 792, 10, 4, 50, 20),
    "tts": WorkloadSpec(17.24, 7.6, 6.91, 3.93, 1251, 792, 10, 4, 50, 20),
}
KINDS: tuple[str, ...] = tuple(WORKLOADS)


@dataclass
class TraceRequest:
    """One scripted request. `segments` holds `(n_tokens, pause_s, answer_len)` per tool call."""

    request_id: int
    arrival_s: float
    kind: str
    prompt_len: int
    segments: list[tuple[int, float, int]]
    final_tokens: int

    def __post_init__(self) -> None:
        if self.request_id < 0:
            raise ValueError(f"field 'request_id' must be >= 0, got {self.request_id}")
        if not math.isfinite(self.arrival_s) or self.arrival_s < 0:
            raise ValueError(f"field 'arrival_s' must be a finite number >= 0, got {self.arrival_s}")
        if self.prompt_len < 1:
            raise ValueError(f"field 'prompt_len' must be >= 1, got {self.prompt_len}")
        if self.final_tokens < 1:
            raise ValueError(
                f"field 'final_tokens' must be >= 1 (a request reaching its length ends before it can pause), "
                f"got {self.final_tokens}"
            )
        for i, (n_tokens, pause_s, answer_len) in enumerate(self.segments):
            if n_tokens < 1:
                raise ValueError(f"field 'segments[{i}][0]' (n_tokens) must be >= 1, got {n_tokens}")
            if not math.isfinite(pause_s) or pause_s < 0:
                raise ValueError(f"field 'segments[{i}][1]' (pause_s) must be a finite number >= 0, got {pause_s}")
            if answer_len < 0:
                raise ValueError(f"field 'segments[{i}][2]' (answer_len) must be >= 0, got {answer_len}")

    @property
    def max_new_tokens(self) -> int:
        """Tokens the model generates; appended answers are not generated and do not count."""
        return sum(n for n, _, _ in self.segments) + self.final_tokens

    @property
    def total_tokens(self) -> int:
        """Context length at the end: prompt + generated + appended answers."""
        return self.prompt_len + self.max_new_tokens + sum(a for _, _, a in self.segments)

    @property
    def tool_seconds(self) -> float:
        return sum(p for _, p, _ in self.segments)


def poisson_arrivals(num_requests: int, qps: float, seed: int) -> list[float]:
    """Arrival times of a Poisson process at `qps` (all at 0 for an infinite rate).

    The gaps are unit exponentials divided by `qps`, so one seed gives the same arrival
    order at every rate, only stretched: runs at different rates stay comparable.
    """
    if not qps > 0:
        raise ValueError(f"qps must be > 0, got {qps}")
    if math.isinf(qps):
        return [0.0] * num_requests
    gaps = np.random.default_rng([seed, 0]).standard_exponential(num_requests) / qps
    return np.cumsum(gaps).tolist()


def _lognormal(rng: np.random.Generator, mean: float, std: float) -> float:
    """A positive draw with the given mean and standard deviation (durations and lengths are right-skewed)."""
    sigma2 = math.log1p((std / mean) ** 2)
    return float(rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2)))


def _count(rng: np.random.Generator, mean: float, std: float, minimum: int) -> int:
    """An integer >= `minimum` with the given mean: a lognormal above the minimum, stochastically
    rounded so that rounding does not move the mean."""
    return minimum + int(math.floor(_lognormal(rng, mean - minimum, std) + rng.random()))


def _fit(parts: list[int], budget: int) -> list[int]:
    """Shrink positive lengths proportionally so they sum to at most `budget` (each stays >= 1)."""
    total = sum(parts)
    if total <= budget or total == len(parts):
        return parts
    spare = max(0, budget - len(parts))
    scale = spare / (total - len(parts))
    return [1 + int((p - 1) * scale) for p in parts]


def _sample_request(rng: np.random.Generator, request_id: int, arrival_s: float, kind: str) -> TraceRequest:
    spec = WORKLOADS[kind]
    calls = _count(rng, spec.calls_mean, spec.calls_std, 1)
    context = _count(rng, spec.context_mean, spec.context_std, 0)
    pauses = [_lognormal(rng, spec.pause_mean_s, spec.pause_std_s) for _ in range(calls)]
    answers = [_count(rng, spec.answer_mean, spec.answer_std, 1) for _ in range(calls)]
    decodes = [_count(rng, spec.decode_mean, spec.decode_std, 1) for _ in range(calls + 1)]
    parts = _fit(decodes + answers, context - MIN_PROMPT)
    decodes, answers = parts[: calls + 1], parts[calls + 1 :]
    prompt_len = max(MIN_PROMPT, context - sum(parts))
    segments = list(zip(decodes[:calls], pauses, answers))
    return TraceRequest(request_id, arrival_s, kind, prompt_len, segments, decodes[calls])


def _scale(n: int, factor: float) -> int:
    return max(1, round(n * factor))


def _rescale(req: TraceRequest, time_scale: float, context_scale: float) -> TraceRequest:
    segments = [(_scale(n, context_scale), p * time_scale, _scale(a, context_scale)) for n, p, a in req.segments]
    return replace(req, prompt_len=_scale(req.prompt_len, context_scale), segments=segments,
                   final_tokens=_scale(req.final_tokens, context_scale))


def _cap(req: TraceRequest, max_context: int) -> TraceRequest:
    """Fit a request into `max_context` tokens.

    The prompt keeps at most half the cap, so that a long prompt cannot crowd out every
    interception; whole segments are kept in order while they fit beside one final token;
    the final decode takes what is left.
    """
    if req.total_tokens <= max_context:
        return req
    prompt_len = min(req.prompt_len, max_context // 2)
    used = prompt_len
    segments = []
    for n, p, a in req.segments:
        if used + n + a + 1 > max_context:
            break
        segments.append((n, p, a))
        used += n + a
    final_tokens = min(req.final_tokens, max_context - used)
    return replace(req, prompt_len=prompt_len, segments=segments, final_tokens=final_tokens)


def generate_trace(
    mix: str,
    num_requests: int,
    qps: float,
    seed: int,
    time_scale: float = 1.0,
    context_scale: float = 1.0,
    max_context: int | None = None,
) -> list[TraceRequest]:
    """Requests of one augmentation type (or `"mix"`: each request's type uniform over the six).

    Deterministic per seed. Request contents do not depend on `qps` or `num_requests` (a
    longer trace extends a shorter one), and the scales and the cap are applied after the
    draws, so the same seed gives the same requests, only scaled.
    """
    if mix != MIX and mix not in WORKLOADS:
        raise ValueError(f"unknown workload {mix!r}; choose one of {[*KINDS, MIX]}")
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if time_scale < 0:
        raise ValueError(f"time_scale must be >= 0, got {time_scale}")
    if not context_scale > 0:
        raise ValueError(f"context_scale must be > 0, got {context_scale}")
    if max_context is not None and max_context < 2:
        raise ValueError(f"max_context must be >= 2 (one prompt token, one generated token), got {max_context}")
    arrivals = poisson_arrivals(num_requests, qps, seed)
    rng = np.random.default_rng([seed, 1])
    out = []
    for i, arrival in enumerate(arrivals):
        kind = KINDS[int(rng.integers(len(KINDS)))] if mix == MIX else mix
        req = _rescale(_sample_request(rng, i, arrival, kind), time_scale, context_scale)
        out.append(req if max_context is None else _cap(req, max_context))
    return out


def to_scripted(
    req: TraceRequest, vocab_size: int, seed: int, min_token_id: int = 1
) -> tuple[list[int], Scripted, int]:
    """Concrete dummy prompt and answer ids for a request, as the reference benchmark feeds dummy tokens.

    Ids are uniform in `[min_token_id, vocab_size)`: id 0 and the special ids a tokenizer keeps
    at the bottom of its vocabulary stay out. Deterministic per (seed, request_id).
    Returns `(prompt_ids, scripted, max_new_tokens)`.
    """
    if min_token_id < 1:
        raise ValueError(f"min_token_id must be >= 1 (id 0 is avoided), got {min_token_id}")
    if vocab_size <= min_token_id:
        raise ValueError(f"vocab_size {vocab_size} leaves no ids at or above min_token_id {min_token_id}")
    rng = np.random.default_rng([seed, req.request_id])

    def ids(n: int) -> list[int]:
        return rng.integers(min_token_id, vocab_size, size=n).tolist()

    prompt = ids(req.prompt_len)
    scripted = Scripted([(n, p, ids(a)) for n, p, a in req.segments], name=req.kind)
    return prompt, scripted, req.max_new_tokens
