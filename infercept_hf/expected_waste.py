"""min-waste's figures weighed over a pause's duration distribution, as pure functions.

min-waste prices preserving a paused KV as `T_int * C * M` with one number for `T_int`. Over a
distribution of remaining durations `R` (equally likely outcomes, `DurationEstimator.
remaining_distribution`), preserving is linear in `R`, so its expectation is the mean's figure;
what the mean hides is that the scheduler re-decides every iteration: it may keep the KV for a
while and discard it if the call has not answered by then (a time-to-live `tau`). That plan wastes

    W_keep(tau) = M_dev * E[min(R, tau)] + P(R > tau) * W_discard

(`M_dev` the device KV bytes held), and the best plan is the `tau` that minimises it. A pause
likely to be short but sometimes long is then worth keeping (most outcomes end before `tau`),
where its mean alone would have called for a discard, and a pause certainly long is discarded
at once. Only `tau` of at least one iteration counts as keeping: a shorter one is a discard now.
"""
from __future__ import annotations

from collections.abc import Sequence

from .policy import CostModel, PausedView, WasteFigures, discard_waste, swap_waste


def _check_outcomes(remaining: Sequence[float]) -> None:
    if not remaining:
        raise ValueError("no outcomes: pass at least one remaining duration")
    if any(not 0 <= r < float("inf") for r in remaining):
        raise ValueError(f"remaining durations must be finite and >= 0, got {list(remaining)!r}")
    if any(a > b for a, b in zip(remaining, remaining[1:])):
        raise ValueError("remaining durations must be in ascending order")


def ttl_waste(remaining: Sequence[float], ttl_s: float, keep_bytes: float, discard_bytes_s: float) -> float:
    """`keep_bytes * E[min(R, ttl)] + P(R > ttl) * discard_bytes_s` over ascending outcomes `remaining`."""
    _check_outcomes(remaining)
    held = sum(min(r, ttl_s) for r in remaining) / len(remaining)
    late = sum(1 for r in remaining if r > ttl_s) / len(remaining)
    return keep_bytes * held + late * discard_bytes_s


def best_ttl(remaining: Sequence[float], keep_bytes: float, discard_bytes_s: float,
             min_ttl_s: float) -> tuple[float, float]:
    """`(tau, W_keep(tau))` for the `tau >= min_ttl_s` with the least expected waste; ties take the
    shortest `tau`. The optimum lies at `min_ttl_s` or at an outcome (between outcomes `W_keep` only
    grows), so those are the candidates, scanned once with running sums: O(len(remaining))."""
    _check_outcomes(remaining)
    n = len(remaining)
    candidates = [min_ttl_s] + [r for r in remaining if r > min_ttl_s]
    best: tuple[float, float] | None = None
    i = 0  # outcomes <= tau so far
    below = 0.0  # their sum
    for tau in candidates:
        while i < n and remaining[i] <= tau:
            below += remaining[i]
            i += 1
        waste = keep_bytes * (below + (n - i) * tau) / n + (n - i) / n * discard_bytes_s
        if best is None or waste < best[1]:
            best = (tau, waste)
    assert best is not None
    return best


def expected_figures(view: PausedView, remaining: Sequence[float], other_tokens: int, cost: CostModel,
                     chunk_tokens: int | None, step_s: float) -> WasteFigures:
    """A paused request's figures over its outcomes `remaining`: discard and swap as min-waste
    computes them, preserve as the best keep-then-maybe-discard plan (`best_ttl`, `tau` at least
    `step_s`, one iteration). `best` then reads "discard" exactly when discarding now beats every
    plan that keeps the KV for a while."""
    discard = discard_waste(view.context_tokens, other_tokens, cost, chunk_tokens)
    _, keep = best_ttl(remaining, view.device_tokens * cost.kv_bytes_per_token, discard, step_s)
    return WasteFigures(preserve=keep, discard=discard, swap=swap_waste(view.device_tokens, other_tokens, cost))
