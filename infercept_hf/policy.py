"""INFERCEPT's waste equations and the min-waste decision, as pure functions.

Waste is device memory that holds data nobody computes with, integrated over time, in
bytes x seconds. Notation (the paper's): `C` context tokens of the paused request, `M`
KV bytes per token, `T_int` the (remaining) interception time, `T_fwd(n) = a*n + b`,
`T_swap(n) = n*M / bandwidth`, `C_other` tokens of the other running requests,
`C_batch` tokens of the whole running batch.

Every iteration the scheduler ranks paused requests by `min(W_preserve, W_discard)`,
largest first, spends the swap budget (the KV that can cross the host link behind one
forward pass) from the top, and preserves or discards the rest, whichever wastes less.
No torch here: the simulator and the tests run this without a model.

Each policy is described by data (`PolicyTraits`): what it does at a pause, where a resumed
request re-queues, where evicted KV goes, whether placements are revisited every iteration.
The scheduler reads the traits, never the policy's name. Every equation has one entry
point, which validates its arguments.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if value is None:
            raise TypeError(f"{name} is None: pass a number (an estimate when the true value is unknown)")
        if not value >= 0:  # `not >=` also rejects NaN
            raise ValueError(f"{name} must be >= 0, got {value!r}")


@dataclass(frozen=True)
class PolicyTraits:
    """What one policy does with the KV of paused requests: the scheduler reads these fields,
    never the policy's name."""

    name: str
    # the first decision ("swap": discard when the host is full; "budget": `swap_at_pause` decides between
    # a swap within the next iteration's swap budget and keeping)
    at_pause: Literal["keep", "discard", "swap", "budget"]
    resume_at_back: bool  # a resumed request re-queues at the end (a new vLLM request); else at its arrival place
    evict_to_host: bool  # device KV of paused or queued requests, pushed out for room, goes to host when it fits
    preempt_to_host: bool  # a preempted running request's KV goes to host when it fits; else it is recomputed
    revisit_each_step: bool  # paused placements re-decided every iteration, within the swap budget (min-waste)
    chunked_recompute: bool  # recompute in chunks that fill the device to its saturation point beside the decodes
    host_room_by_pause: bool  # a full host pool drops the host copies of requests expected to pause longer
    predictive: bool = False  # min-waste plus duration distributions, prefetch and ranking by work (predictive.py)


_PLAIN = dict(evict_to_host=False, preempt_to_host=False, revisit_each_step=False, chunked_recompute=False,
              host_room_by_pause=False)
POLICY_TRAITS: dict[str, PolicyTraits] = {
    # vLLM's behaviour: a tool call ends the request; its continuation is a new request at the back of the queue
    "discard": PolicyTraits("discard", "discard", resume_at_back=True, **_PLAIN),
    # discard, but the continuation keeps its original queue place: the cost of recompute without the re-queueing
    "discard-head": PolicyTraits("discard-head", "discard", resume_at_back=False, **_PLAIN),
    "preserve": PolicyTraits("preserve", "keep", resume_at_back=False, **_PLAIN),
    "swap": PolicyTraits("swap", "swap", resume_at_back=False, evict_to_host=True, preempt_to_host=True,
                         revisit_each_step=False, chunked_recompute=False, host_room_by_pause=False),
    # INFERCEPT: at the pause and then every iteration, swap within the budget or preserve / discard by least waste
    "min-waste": PolicyTraits("min-waste", "budget", resume_at_back=False, evict_to_host=True, preempt_to_host=False,
                              revisit_each_step=True, chunked_recompute=True, host_room_by_pause=True),
    # min-waste over predicted duration distributions, swapped KV back before the answer, queue by predicted work;
    # it keeps a context at its pause and places it from the next iteration on
    "predictive": PolicyTraits("predictive", "keep", resume_at_back=False, evict_to_host=True, preempt_to_host=False,
                               revisit_each_step=True, chunked_recompute=True, host_room_by_pause=True,
                               predictive=True),
}
POLICIES = tuple(POLICY_TRAITS)


def check_policy(policy: str) -> str:
    if policy not in POLICY_TRAITS:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return policy


@dataclass(frozen=True)
class CostModel:
    """What the scheduler knows about the hardware, from `profiler.load_or_profile`."""

    fwd_per_token_s: float  # a in T_fwd(n) = a*n + b
    fwd_fixed_s: float  # b
    swap_bytes_per_s: float  # host link bandwidth, one direction
    kv_bytes_per_token: int  # M: KV bytes per token over all layers
    saturation_tokens: int  # S: batch tokens at which the device saturates (chunk budget)
    # the measured `(n, seconds)` forwards behind a and b, by n: their shape below S (flat on a GPU, a
    # line on a CPU) decides whether a chunk rides free beside decodes; empty: the line a*n + b
    fwd_points: tuple[tuple[int, float], ...] = ()
    # copies run behind the forward (a CUDA device's swap stream), so those within the swap budget cost
    # no wall time; on a CPU every copy holds up the step
    copies_overlap: bool = True

    def __post_init__(self) -> None:
        _check_non_negative(fwd_per_token_s=self.fwd_per_token_s, fwd_fixed_s=self.fwd_fixed_s)
        for name in ("swap_bytes_per_s", "kv_bytes_per_token", "saturation_tokens"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        points = tuple((int(n), float(t)) for n, t in self.fwd_points)
        if any(n < 1 or not t >= 0 for n, t in points) or any(a[0] >= b[0] for a, b in zip(points, points[1:])):
            raise ValueError(f"fwd_points must be (n >= 1, seconds >= 0) pairs by increasing n, got {self.fwd_points!r}")
        object.__setattr__(self, "fwd_points", points)

    def t_fwd(self, n_tokens: int) -> float:
        """Forward time for a batch of `n_tokens`; an empty batch runs no forward at all."""
        _check_non_negative(n_tokens=n_tokens)
        return self.fwd_per_token_s * n_tokens + self.fwd_fixed_s if n_tokens else 0.0

    def t_fwd_measured(self, n_tokens: int) -> float:
        """Forward time for `n_tokens` read off the measured points (linear between them, the end
        segments extended, never below zero); the fitted line when
        fewer than two were measured. The line prices waste; this shape prices chunking."""
        _check_non_negative(n_tokens=n_tokens)
        pts = self.fwd_points
        if len(pts) < 2:
            return self.t_fwd(n_tokens)
        if not n_tokens:
            return 0.0
        i = bisect.bisect_left(pts, n_tokens, lo=1, hi=len(pts) - 1, key=lambda p: p[0])  # the segment ending at or past n
        (n0, t0), (n1, t1) = pts[i - 1], pts[i]
        return max(t0 + (t1 - t0) * (n_tokens - n0) / (n1 - n0), 0.0)

    def t_swap(self, n_tokens: int) -> float:
        """Time to copy `n_tokens` of KV over the host link in one direction."""
        _check_non_negative(n_tokens=n_tokens)
        return n_tokens * self.kv_bytes_per_token / self.swap_bytes_per_s


def preserve_waste(context_tokens: int, remaining_pause_s: float, cost: CostModel) -> float:
    """`T_int * C * M`: the paused KV sits idle on the device for the rest of the pause.

    `remaining_pause_s` must be a number: when the duration is unknown the caller passes
    an estimate (`estimator.DurationEstimator.remaining`).
    """
    _check_non_negative(context_tokens=context_tokens, remaining_pause_s=remaining_pause_s)
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
    _check_non_negative(context_tokens=context_tokens, other_tokens=other_tokens)
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens!r}")
    c = context_tokens if chunk_tokens is None else min(chunk_tokens, context_tokens)
    if c == 0:
        return 0.0
    full, last = divmod(context_tokens, c)
    # closed form of the sum, so a long context in small chunks costs O(1): the full chunks
    # have R_k = k*c for k = 1..full, the last (if any) ends with R = C
    resident_sum = c * full * (full + 1) // 2
    # an infinite (float) context makes `last` NaN, which `t_fwd` refuses
    waste = cost.t_fwd(c) * (resident_sum + full * other_tokens) + cost.t_fwd(last) * (context_tokens + other_tokens)
    return waste * cost.kv_bytes_per_token


def swap_waste(context_tokens: int, batch_tokens: int, cost: CostModel, budget_tokens: int | None = None) -> float:
    """`2*T_swap(C)*C_batch*M`: out and back in, each copy stalling the running batch.

    A copy that fits the per-iteration swap budget runs behind the forward pass and costs
    no wall time, so only the tokens beyond `budget_tokens` stall:
    `2*T_swap(max(0, C - N))*C_batch*M`. The same budget is assumed for the swap-in on
    return. `budget_tokens=None` means no overlap: the paper's figure.
    """
    _check_non_negative(context_tokens=context_tokens, batch_tokens=batch_tokens)
    stalled = context_tokens
    if budget_tokens is not None:
        _check_non_negative(budget_tokens=budget_tokens)
        stalled = max(0, context_tokens - budget_tokens)
    return 2 * cost.t_swap(stalled) * batch_tokens * cost.kv_bytes_per_token


def chunk_pays(decodes: int, prefill: int, chunk: int, cost: CostModel) -> bool:
    """Whether prefilling `prefill` tokens in chunks of `chunk` beside `decodes` running decodes
    delays the requests less, summed, than one iteration that takes them whole.

    Whole: each decode waits `T(D+P) - T(D)` longer for its token and the prefilled request
    gets its token after `T(D+P)`. Chunked: each chunk iteration delays each decode by
    `T(D+c) - T(D)`, and the prefilled request waits for every chunk. Where the forward is flat
    below the saturation point (a GPU, memory bound at small batches) chunks ride free and
    chunking wins; where it is a line from the start (a CPU), the decodes' delays sum to the
    same either way and the chunked request's extra iterations make chunking lose. `T` is the
    measured forward (`CostModel.t_fwd_measured`).
    """
    _check_non_negative(decodes=decodes, prefill=prefill)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk!r}")
    if prefill <= chunk:
        return False
    t = cost.t_fwd_measured
    base = t(decodes) if decodes else 0.0

    def delay(tokens: int) -> float:  # one iteration's: every decode's extra wait, and the prefilled request's
        return decodes * (t(decodes + tokens) - base) + t(decodes + tokens)

    full, rest = divmod(prefill, chunk)
    return full * delay(chunk) + (delay(rest) if rest else 0.0) < delay(prefill)


def swap_budget_tokens(batch_tokens: int, cost: CostModel) -> int:
    """`N` with `T_swap(N) = T_fwd(B)`: the KV tokens that cross the link behind one forward."""
    return math.floor(cost.t_fwd(batch_tokens) * cost.swap_bytes_per_s / cost.kv_bytes_per_token)


def swap_at_pause(evicted_share: float) -> bool:
    """min-waste's first decision for a context that just paused: swap it within the swap budget
    now, or keep it (revisited every iteration from the next one on).

    Kept, a context costs nothing if its tool answers before anyone needs its blocks; but when
    most contexts kept at their pause lately were evicted before they resumed (`evicted_share`,
    of `pause_outcomes.PauseOutcomes`, above one half), it would be pulled out in pieces just as
    the room is wanted, its blocks overwritten at once: a copy now leaves it whole, and its device
    blocks stay readable, for a quick return, until reused. Whether memory is short at the pause
    itself says little: the evictions come with the admissions of the next iterations.
    """
    _check_non_negative(evicted_share=evicted_share)
    return evicted_share > 0.5


def split_swap_budget(
    budget: int, want_out: int, want_in: int, free_host_tokens: int, free_device_tokens: int
) -> tuple[int, int]:
    """Share one iteration's swap budget: returns `(out_tokens, in_tokens)`.

    Constraints: `in + out <= budget`; `out <= free_host + in` (a swap-in
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
    shared_tokens: int = 0  # of `device_tokens`, those in blocks other requests read too (the prefix index)

    def __post_init__(self) -> None:
        _check_non_negative(
            context_tokens=self.context_tokens, device_tokens=self.device_tokens, host_tokens=self.host_tokens,
            paused_for_s=self.paused_for_s, expected_remaining_s=self.expected_remaining_s,
            shared_tokens=self.shared_tokens,
        )
        if self.shared_tokens > self.device_tokens:
            raise ValueError(f"shared_tokens ({self.shared_tokens}) exceeds device_tokens ({self.device_tokens})")

    @property
    def own_device_tokens(self) -> int:
        """Device tokens the request holds alone: what preserving costs and what a move frees."""
        return self.device_tokens - self.shared_tokens


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

    Blocks shared with other requests (`shared_tokens`) count in none of them: they stay on
    the device whatever this request does, so keeping them costs nothing, dropping or moving
    them frees nothing, and a discarded request finds them there and recomputes only the rest.
    """
    own = view.own_device_tokens
    return WasteFigures(
        preserve=preserve_waste(own, view.expected_remaining_s, cost),
        discard=discard_waste(view.context_tokens - view.shared_tokens, other_tokens, cost, chunk_tokens),
        swap=swap_waste(own, other_tokens, cost),
    )


def rank_by_waste(
    paused: list[PausedView], other_tokens: int, cost: CostModel, chunk_tokens: int | None
) -> list[tuple[PausedView, WasteFigures]]:
    """Paused requests by `min(W_preserve, W_discard)`, largest first: the order in which the
    swap budget is spent, since swapping within the budget removes that waste. Ties go to
    the earliest arrival, then the lowest id, so the order is deterministic."""
    return rank_figures([(v, waste_figures(v, other_tokens, cost, chunk_tokens)) for v in paused])


def rank_figures(figures: list[tuple[PausedView, WasteFigures]]) -> list[tuple[PausedView, WasteFigures]]:
    """`rank_by_waste`'s order for figures however computed: `least` largest first, then arrival, then id."""
    return sorted(figures, key=lambda vf: (-vf[1].least, vf[0].arrival_time, vf[0].request_id))


def choose_preserve_or_discard(view: PausedView, other_tokens: int, cost: CostModel, chunk_tokens: int | None) -> str:
    """"preserve" or "discard" for a request the swap budget did not reach."""
    return waste_figures(view, other_tokens, cost, chunk_tokens).best


@dataclass(frozen=True)
class Move:
    """What the scheduler does with one paused request's KV this iteration."""

    kind: Literal["swap", "discard", "keep", "drop-host"]  # "drop-host": free its host KV for another's swap
    blocks: int = 0  # for "swap": how many tail blocks go to host


@dataclass(frozen=True)
class PlannedMove:
    request_id: int
    move: Move


@dataclass(frozen=True)
class HostRoom:
    """The host pool as `plan_paused_moves` sees it, per allocator (one per attention type): the
    cache's whole-model counts are a request's most blocks over allocators and the fewest free."""

    free: tuple[int, ...]  # free host blocks per allocator
    returning: tuple[int, ...]  # per allocator, host blocks of swap-ins in flight: free once copies finish,
    # which any host drop or discard waits for
    device: Mapping[int, tuple[int, ...]]  # request id -> its device blocks per allocator
    host: Mapping[int, tuple[int, ...]]  # request id -> its host blocks per allocator (absent: none)


def movable_blocks(want: int, have: int, supports_partial: bool) -> int:
    """How many of a request's `have` device blocks a move of up to `want` blocks takes: all of
    them, or a tail where the cache allows partial moves; 0 when it can take none."""
    n = min(want, have)
    return n if n > 0 and (n == have or supports_partial) else 0


def paused_move(swappable_blocks: int, figures: WasteFigures, memory_pressure: bool) -> Move:
    """min-waste's move for a ranked paused request: swap what the budget (and host room)
    allows; else, when paused KV stands in someone's way, the cheaper of preserve and discard."""
    if swappable_blocks:
        return Move("swap", swappable_blocks)
    if memory_pressure and figures.best == "discard":
        return Move("discard")
    return Move("keep")


def host_victims(swapped: list[PausedView], tokens_needed: int) -> list[int]:
    """Ids of swapped requests whose host KV to drop to free `tokens_needed` host tokens.

    The longest expected remaining pause goes first: its KV would occupy the host longest
    and it has the most time to be recomputed. Ties drop the latest arrival first. Stops
    as soon as enough is freed; returns every candidate when even that is not enough.
    """
    return take_host_victims(_victim_order(swapped), tokens_needed)


def take_host_victims(ordered: Iterable[PausedView], tokens_needed: int) -> list[int]:
    """`host_victims` from views already in `victim_key` order, read only as far as needed."""
    _check_non_negative(tokens_needed=tokens_needed)
    return _take_victims(((v.request_id, v.host_tokens) for v in ordered), tokens_needed)


def victim_key(view: PausedView) -> tuple[float, float, int]:
    """`host_victims`' order: the longest expected remaining pause first, then the latest arrival."""
    return -view.expected_remaining_s, -view.arrival_time, -view.request_id


def _victim_order(views: list[PausedView]) -> list[PausedView]:
    return sorted(views, key=victim_key)


def _take_victims(candidates: Iterable[tuple[int, int]], tokens_needed: int) -> list[int]:
    """From `(request id, host tokens)` in victim order, those that hold host KV, until enough is freed."""
    victims: list[int] = []
    freed = 0
    for rid, tokens in candidates:
        if freed >= tokens_needed:
            break
        if tokens:
            victims.append(rid)
            freed += tokens
    return victims


def plan_paused_moves(
    ranked: list[tuple[PausedView, WasteFigures]],
    longer_than: Callable[[float], Iterable[PausedView]],
    room: HostRoom,
    out_budget_tokens: int,
    block_size: int,
    supports_partial: bool,
    memory_pressure: bool,
) -> list[PlannedMove]:
    """min-waste's moves for the paused requests that hold device KV, `ranked` by waste, in the
    order the scheduler applies them: one move per ranked request (swap, discard or keep), each
    swap preceded by the host drops that make room for it.

    The swap budget is spent from the top; a swap the host cannot hold first drops the host KV
    of requests expected to pause longer (`longer_than(seconds)`: the paused requests expected to
    pause longer than `seconds`, in `victim_key` order, asked only when the host runs short and
    read only as far as the victims go, so a plan looks at few requests beyond the ranked ones). The plan tracks the host room each
    move leaves, block for block as the cache counts it, so a later move sees what the earlier
    ones freed or took."""
    free = list(room.free)
    device = {rid: list(blocks) for rid, blocks in room.device.items()}
    host: dict[int, list[int]] = {}  # per request, read from `room.host` when the plan first looks
    plan: list[PlannedMove] = []
    moved = 0

    def host_of(rid: int) -> list[int]:
        if rid not in host:
            host[rid] = list(room.host.get(rid, [0] * len(free)))
        return host[rid]

    def host_blocks(rid: int) -> int:
        return max(host_of(rid), default=0)

    returning = list(room.returning)

    def drop_host(rid: int) -> None:
        free[:] = [f + h + r for f, h, r in zip(free, host_of(rid), returning)]
        host[rid] = [0] * len(free)
        returning[:] = [0] * len(free)

    for view, figs in ranked:
        rid = view.request_id
        have = max(device[rid], default=0)
        n = movable_blocks((out_budget_tokens - moved) // block_size, have, supports_partial)
        if n:
            missing = n - min(free)
            if missing > 0:
                longer = longer_than(view.expected_remaining_s)
                candidates = ((v.request_id, host_blocks(v.request_id) * block_size) for v in longer)
                for victim in _take_victims(candidates, missing * block_size):
                    drop_host(victim)
                    plan.append(PlannedMove(victim, Move("drop-host")))
                    if min(free) >= n:
                        break
            n = movable_blocks(min(n, min(free)), have, supports_partial)
        move = paused_move(n, figs, memory_pressure)
        if move.kind == "swap":
            taken = [min(n, d) for d in device[rid]]  # a shorter (sliding) table gives all it has
            device[rid] = [d - t for d, t in zip(device[rid], taken)]
            host[rid] = [h + t for h, t in zip(host_of(rid), taken)]
            free[:] = [f - t for f, t in zip(free, taken)]
            moved += n * block_size
        elif move.kind == "discard":
            drop_host(rid)
            device[rid] = [0] * len(free)
        plan.append(PlannedMove(rid, move))
    return plan
