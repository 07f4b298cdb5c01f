"""INFERCEPT's waste equations and the min-waste decision, as pure functions.

Waste is device memory that holds data nobody computes with, integrated over time, in
bytes x seconds. Notation (INFERCEPT.md): `C` context tokens of the paused request, `M`
KV bytes per token, `T_int` the (remaining) interception time, `T_fwd(n) = a*n + b`,
`T_swap(n) = n*M / bandwidth`, `C_other` tokens of the other running requests,
`C_batch` tokens of the whole running batch.

Every iteration the scheduler ranks paused requests by `min(W_preserve, W_discard)`,
largest first, spends the swap budget (the KV that can cross the host link behind one
forward pass) from the top, and preserves or discards the rest, whichever wastes less.
No torch here: the simulator and the tests run this without a model.

The public functions validate their arguments; the scheduler ranks every paused request
every iteration, so the per-request arithmetic lives in unchecked `_` helpers that the
public functions (and the ranking, after checking its shared arguments once) call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if value is None:
            raise TypeError(f"{name} is None: pass a number (an estimate when the true value is unknown)")
        if not value >= 0:  # `not >=` also rejects NaN
            raise ValueError(f"{name} must be >= 0, got {value!r}")


@dataclass(frozen=True)
class CostModel:
    """What the scheduler knows about the hardware, from `profiler.load_or_profile`."""

    fwd_per_token_s: float  # a in T_fwd(n) = a*n + b
    fwd_fixed_s: float  # b
    swap_bytes_per_s: float  # host link bandwidth, one direction
    kv_bytes_per_token: int  # M: KV bytes per token over all layers
    saturation_tokens: int  # S: batch tokens at which the device saturates (chunk budget)

    def __post_init__(self) -> None:
        _check_non_negative(fwd_per_token_s=self.fwd_per_token_s, fwd_fixed_s=self.fwd_fixed_s)
        for name in ("swap_bytes_per_s", "kv_bytes_per_token", "saturation_tokens"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

    def t_fwd(self, n_tokens: int) -> float:
        """Forward time for a batch of `n_tokens`; an empty batch runs no forward at all."""
        _check_non_negative(n_tokens=n_tokens)
        return self._t_fwd(n_tokens)

    def t_swap(self, n_tokens: int) -> float:
        """Time to copy `n_tokens` of KV over the host link in one direction."""
        _check_non_negative(n_tokens=n_tokens)
        return self._t_swap(n_tokens)

    def _t_fwd(self, n_tokens: int) -> float:
        return self.fwd_per_token_s * n_tokens + self.fwd_fixed_s if n_tokens else 0.0

    def _t_swap(self, n_tokens: int) -> float:
        return n_tokens * self.kv_bytes_per_token / self.swap_bytes_per_s


def preserve_waste(context_tokens: int, remaining_pause_s: float, cost: CostModel) -> float:
    """`T_int * C * M`: the paused KV sits idle on the device for the rest of the pause.

    `remaining_pause_s` must be a number: when the duration is unknown the caller passes
    an estimate (`estimator.DurationEstimator.remaining`).
    """
    _check_non_negative(context_tokens=context_tokens, remaining_pause_s=remaining_pause_s)
    return _preserve_waste(context_tokens, remaining_pause_s, cost)


def _preserve_waste(context_tokens: int, remaining_pause_s: float, cost: CostModel) -> float:
    return remaining_pause_s * context_tokens * cost.kv_bytes_per_token


def discard_waste(context_tokens: int, other_tokens: int, cost: CostModel, chunk_tokens: int | None = None) -> float:
    """Waste of rebuilding `C` discarded tokens on return.

    Un-chunked (one prefill): `T_fwd(C)*C*M + T_fwd(C)*C_other*M`, the request's own KV
    while it is rebuilt plus every other running request stalled behind the prefill.

    Chunked with chunk size `c`, `n = ceil(C/c)` chunks of sizes `s_k` (all `c` but the
    last): `sum_k T_fwd(s_k) * (R_k + C_other) * M`, where `R_k = s_1 + ... + s_k` is the
    request's own KV resident once chunk `k` has written its keys and values, and
    `T_fwd(s_k)` is the time chunk `k` adds to its iteration, during which the other
    requests' KV waits. With linear `T_fwd` this is the paper's
    `~T_fwd(C)*C*M/2 + n*T_fwd(C/n)*C_other*M`; a chunk at least as large as `C` gives
    exactly the un-chunked figure.
    """
    _check_non_negative(context_tokens=context_tokens)
    _check_batch_inputs(other_tokens, chunk_tokens)
    return _discard_waste(context_tokens, other_tokens, cost, chunk_tokens)


def _check_batch_inputs(other_tokens: int, chunk_tokens: int | None) -> None:
    """The arguments every paused request of one ranking shares, checked once for all of them."""
    _check_non_negative(other_tokens=other_tokens)
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens!r}")


def _discard_waste(context_tokens: int, other_tokens: int, cost: CostModel, chunk_tokens: int | None) -> float:
    c = context_tokens if chunk_tokens is None else min(chunk_tokens, context_tokens)
    if c == 0:
        return 0.0
    full, last = divmod(context_tokens, c)
    # closed form of the sum, so a long context in small chunks costs O(1): the full chunks
    # have R_k = k*c for k = 1..full, the last (if any) ends with R = C
    resident_sum = c * full * (full + 1) // 2
    # `last` keeps the checked `t_fwd`: an infinite (float) context makes it NaN, which it refuses
    waste = cost._t_fwd(c) * (resident_sum + full * other_tokens) + cost.t_fwd(last) * (context_tokens + other_tokens)
    return waste * cost.kv_bytes_per_token


def swap_waste(context_tokens: int, batch_tokens: int, cost: CostModel, budget_tokens: int | None = None) -> float:
    """`2*T_swap(C)*C_batch*M`: out and back in, each copy stalling the running batch.

    A copy that fits the per-iteration swap budget runs behind the forward pass and costs
    no wall time, so only the tokens beyond `budget_tokens` stall:
    `2*T_swap(max(0, C - N))*C_batch*M`. The same budget is assumed for the swap-in on
    return. `budget_tokens=None` means no overlap: the paper's figure.
    """
    _check_non_negative(context_tokens=context_tokens, batch_tokens=batch_tokens)
    if budget_tokens is None:
        return _swap_waste(context_tokens, batch_tokens, cost)
    _check_non_negative(budget_tokens=budget_tokens)
    return _swap_waste(max(0, context_tokens - budget_tokens), batch_tokens, cost)


def _swap_waste(stalled_tokens: int, batch_tokens: int, cost: CostModel) -> float:
    return 2 * cost._t_swap(stalled_tokens) * batch_tokens * cost.kv_bytes_per_token


def swap_budget_tokens(batch_tokens: int, cost: CostModel) -> int:
    """`N` with `T_swap(N) = T_fwd(B)`: the KV tokens that cross the link behind one forward."""
    return math.floor(cost.t_fwd(batch_tokens) * cost.swap_bytes_per_s / cost.kv_bytes_per_token)


def split_swap_budget(
    budget: int, want_out: int, want_in: int, free_host_tokens: int, free_device_tokens: int
) -> tuple[int, int]:
    """Share one iteration's swap budget: returns `(out_tokens, in_tokens)`.

    Constraints (INFERCEPT.md): `in + out <= budget`; `out <= free_host + in` (a swap-in
    frees host room); `in <= free_device + out` (a swap-out frees device room). Pass
    `free_device_tokens` net of the tokens this iteration's new work already claims.

    Swap-in goes first: a returning request cannot make progress until its KV is back,
    while a swap-out only saves waste. `in` is therefore the largest value for which some
    `out` satisfies every constraint (making device room for it may force a swap-out), and
    `out` then takes whatever the constraints leave.
    """
    _check_non_negative(
        budget=budget, want_out=want_out, want_in=want_in,
        free_host_tokens=free_host_tokens, free_device_tokens=free_device_tokens,
    )
    in_tokens = min(want_in, budget, free_device_tokens + want_out, (free_device_tokens + budget) // 2)
    out_tokens = min(want_out, budget - in_tokens, free_host_tokens + in_tokens)
    return out_tokens, in_tokens


@dataclass(frozen=True)
class PausedView:
    """What the policy needs to know about one paused request."""

    request_id: int
    context_tokens: int  # C: tokens whose KV a resume needs
    device_tokens: int  # of those, held on the device now
    host_tokens: int  # of those, held in the host pool now
    paused_for_s: float  # elapsed since the call started
    expected_remaining_s: float  # estimate of the rest of the pause
    arrival_time: float  # the request's original arrival, for fair tie-breaks

    def __post_init__(self) -> None:
        _check_non_negative(
            context_tokens=self.context_tokens, device_tokens=self.device_tokens, host_tokens=self.host_tokens,
            paused_for_s=self.paused_for_s, expected_remaining_s=self.expected_remaining_s,
        )


@dataclass(frozen=True)
class WasteFigures:
    """One paused request's waste under each strategy (bytes x seconds)."""

    preserve: float
    discard: float
    swap: float

    @property
    def best(self) -> str:
        """The cheaper of preserve and discard; a tie keeps the KV (no recompute work)."""
        return "discard" if self.discard < self.preserve else "preserve"

    @property
    def least(self) -> float:
        return min(self.preserve, self.discard)


def waste_figures(view: PausedView, other_tokens: int, cost: CostModel, chunk_tokens: int | None) -> WasteFigures:
    """Figures for one paused request.

    Preserve counts only the KV still on the device (a partly swapped request wastes just
    its head); discard rebuilds the whole context, since a tail in the host pool is of no
    use without its head. Swap is the stalled figure for the device part: what moving it
    outside the budget would cost, the reason min-waste swaps only within the budget.
    """
    _check_batch_inputs(other_tokens, chunk_tokens)
    return _waste_figures(view, other_tokens, cost, chunk_tokens)


def _waste_figures(view: PausedView, other_tokens: int, cost: CostModel, chunk_tokens: int | None) -> WasteFigures:
    """`waste_figures` without the checks: `PausedView` validated its fields when it was built."""
    return WasteFigures(
        preserve=_preserve_waste(view.device_tokens, view.expected_remaining_s, cost),
        discard=_discard_waste(view.context_tokens, other_tokens, cost, chunk_tokens),
        swap=_swap_waste(view.device_tokens, other_tokens, cost),
    )


def rank_by_waste(
    paused: list[PausedView], other_tokens: int, cost: CostModel, chunk_tokens: int | None
) -> list[tuple[PausedView, WasteFigures]]:
    """Paused requests by `min(W_preserve, W_discard)`, largest first: the order in which the
    swap budget is spent, since swapping within the budget removes that waste. Ties go to
    the earliest arrival, then the lowest id, so the order is deterministic."""
    views = list(paused)
    if views:  # an empty ranking never looked at its other arguments
        _check_batch_inputs(other_tokens, chunk_tokens)
    figures = [(v, _waste_figures(v, other_tokens, cost, chunk_tokens)) for v in views]
    return sorted(figures, key=lambda vf: (-vf[1].least, vf[0].arrival_time, vf[0].request_id))


def choose_preserve_or_discard(view: PausedView, other_tokens: int, cost: CostModel, chunk_tokens: int | None) -> str:
    """"preserve" or "discard" for a request the swap budget did not reach."""
    return waste_figures(view, other_tokens, cost, chunk_tokens).best


def host_victims(swapped: list[PausedView], tokens_needed: int) -> list[int]:
    """Ids of swapped requests whose host KV to drop to free `tokens_needed` host tokens.

    The longest expected remaining pause goes first: its KV would occupy the host longest
    and it has the most time to be recomputed. Ties drop the latest arrival first. Stops
    as soon as enough is freed; returns every candidate when even that is not enough.
    """
    _check_non_negative(tokens_needed=tokens_needed)
    order = sorted(swapped, key=lambda v: (-v.expected_remaining_s, -v.arrival_time, -v.request_id))
    victims: list[int] = []
    freed = 0
    for view in order:
        if freed >= tokens_needed:
            break
        if view.host_tokens:
            victims.append(view.request_id)
            freed += view.host_tokens
    return victims
