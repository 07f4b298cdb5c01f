"""Who runs this iteration, and where paused requests keep their KV.

Every iteration, in this order:
1. paused requests: the policy decides preserve / swap / discard (min-waste re-decides every
   iteration within a swap budget, see `policy.py`);
2. running requests get their next chunk (a decode is 1 token), in queue order;
3. waiting requests (new, preempted, or resuming after a tool) are admitted in queue order
   while tokens and blocks last; strict FIFO, so nobody starves.
A caller's next turn (`expedite`: a held conversation's follow-up, whose new messages are all
there is to compute) instead gets an iteration of its own, ahead of the decodes and prefills:
its first token then costs one small forward over its own context, not one over everybody's.
At most every other iteration is such an express one, so the decodes never stall.
When blocks run out, paused requests give theirs up first (longest expected pause first),
then the youngest running request is preempted.

`queue_key` orders everybody: the original arrival time, except under a policy whose
resumed requests re-enter at the back like new vLLM requests (`discard`). `predictive` orders
the waiting queue by predicted remaining work instead, aged so that nobody starves, and copies
swapped KV back before the answer is due (`predictive.py`). What each policy
does is data, `policy.PolicyTraits`; this file applies it.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from .cache import InterceptPagedCache
from .estimator import DurationEstimator
from .policy import (
    POLICIES,
    POLICY_TRAITS,
    CostModel,
    HostRoom,
    PausedView,
    WasteFigures,
    check_policy,
    chunk_pays,
    plan_paused_moves,
    rank_by_waste,
    split_swap_budget,
    swap_at_pause,
    swap_budget_tokens,
    take_host_victims,
    victim_key,
    waste_figures,
)
from .longer_pauses import pending_tool
from .paused_blocks import PausedBlocks
from .pause_outcomes import PauseOutcomes
from .predictive import Call, Predictor, PredictorSettings
from .request import Chunk, Request, Status

SWAP_LOG_LENGTH = 100_000
__all__ = ["POLICIES", "Scheduler", "StepPlan", "SwapIteration", "check_policy", "queue_order"]


def queue_order(req: Request) -> tuple[float, int]:
    """Who is ahead in the queue: `queue_key`, ties broken by id, so that every pass agrees."""
    return req.queue_key, req.request_id


def _as_dict(figs: WasteFigures) -> dict[str, float]:
    """A request's `waste`: the figures the policy compared, by strategy name."""
    return {"preserve": figs.preserve, "discard": figs.discard, "swap": figs.swap}


@dataclass(frozen=True)
class SwapIteration:
    budget: int
    swapped_in: int
    swapped_out: int


@dataclass
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        cache: InterceptPagedCache,
        policy: str,
        max_batch_tokens: int,
        cost: CostModel,
        estimator: DurationEstimator,
        predictor_settings: PredictorSettings | None = None,
    ) -> None:
        self.cache = cache
        self.policy = check_policy(policy)
        self.traits = POLICY_TRAITS[policy]
        self.max_batch_tokens = max_batch_tokens
        self.cost = cost
        self.estimator = estimator
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.paused: list[Request] = []
        self.paused_blocks = PausedBlocks(cache.block_bytes, cache.exclusive_blocks, cache.prefix.device_table)
        cache.watch_device_blocks(self.paused_blocks.changed)
        cache.watch_host_blocks(self.paused_blocks.host_changed)
        # min-waste: budget and tokens moved, per iteration (the most recent ones: a server runs for ever)
        self.swap_log: deque[SwapIteration] = deque(maxlen=SWAP_LOG_LENGTH)
        self.preemptions = 0
        self._swapped_in_bytes = 0  # by the swap-ins of the iteration being scheduled
        # the decisions behind the placements, counted (engine stats "moves"): every move of paused
        # KV (at the pause and after it), and the iterations whose prefills min-waste chunked
        self.moves: dict[str, int] = {}
        # `predictive`: durations as distributions, prefetch and the queue by predicted work
        if predictor_settings is not None and not self.traits.predictive:
            raise ValueError(f"predictor_settings are for policy='predictive', not {policy!r}")
        self.predictor = (Predictor(cache, estimator, cost, self._call, predictor_settings or PredictorSettings())
                          if self.traits.predictive else None)
        self._queue_key = queue_order  # this iteration's queue order (the predictor's ranks it by work)
        self._step_s = 0.0  # the latest iteration's forward time, as the cost model predicts it
        # min-waste: tokens swapped out at pauses since the latest iteration was scheduled (their copies
        # run behind the next forward, so they come out of its swap budget)
        self._paused_out = 0
        self.pause_outcomes = PauseOutcomes()  # min-waste: what became of the contexts it kept at their pause
        self._express: list[Request] = []  # callers' next turns, to run in an iteration of their own
        self._express_last = False  # the previous iteration was an express one: this one is everybody's

    # ------------------------------------------------------------------ transitions
    def add(self, req: Request) -> None:
        self.cache.track(req.rid, req.kv, req.tokens)
        self.waiting.append(req)

    def pause(self, req: Request, now: float) -> None:
        """A running request hit a tool call: apply the policy's first decision."""
        self.running.remove(req)
        req.status = Status.PAUSED
        req.paused_at = now
        self.paused.append(req)
        self.paused_blocks.pause(req, self.cache.device_blocks(req.rid), self.cache.host_blocks(req.rid))
        req.waste = self._waste_figures(req, now)
        if self.traits.at_pause == "discard":
            self._discard(req)
        elif self.traits.at_pause == "swap":
            if not self._swap_out(req, None, wait=False):
                self._discard(req)
        elif self.traits.at_pause == "budget" and self.cache.device_blocks(req.rid):
            self._place_at_pause(req, now)
        req.strategy = self._placement(req)

    def resume(self, req: Request, now: float) -> None:
        """The answer is in the token log: queue the request to continue."""
        if self.predictor is not None:
            self.predictor.returned(req, now)
        self.pause_outcomes.resumed(req.rid)
        self.paused.remove(req)
        self.paused_blocks.leave(req)
        req.status = Status.WAITING
        if self.traits.resume_at_back:
            req.queue_key = now
        self.waiting.append(req)

    def expedite(self, req: Request) -> None:
        """A resumed request whose caller waits on its first token: run its chunk in the next iteration
        that may be an express one."""
        if req.status is Status.WAITING and req not in self._express:
            self._express.append(req)

    def remove(self, req: Request) -> None:
        if req in self._express:
            self._express.remove(req)
        for queue in (self.waiting, self.running, self.paused):
            if req in queue:
                queue.remove(req)
        self.paused_blocks.leave(req)
        self.pause_outcomes.forget(req.rid)
        if self.predictor is not None:
            self.predictor.forget(req)
        self.cache.free(req.rid)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ the iteration
    def schedule(self, now: float) -> StepPlan:
        self._recount_paused_shares()
        plan = StepPlan()
        self._swapped_in_bytes = 0
        self._queue_key = self.predictor.queue_key(now) if self.predictor is not None else queue_order
        self.running.sort(key=lambda r: (r.uncached > 1, r.queue_key))  # decodes first, then prefills
        admitted = self._admit_express(plan, now)
        budget = self.max_batch_tokens
        prefill_budget = 0 if admitted else self._prefill_budget()
        scheduled: set[int] = set()
        for req in [] if admitted else list(self.running):
            if req.status is not Status.RUNNING:  # preempted while making room for an older one
                continue
            prefill = req.uncached > 1  # `_reserve` never changes `req`'s own cached length
            n = min(req.uncached, budget, prefill_budget if prefill else 1)
            if n == 0:
                continue
            if not self._reserve(req, n, now, protected=scheduled):
                self._preempt(req)
                continue
            plan.chunks.append(Chunk(req, req.num_cached, n))
            scheduled.add(req.request_id)
            budget -= n
            if prefill:
                prefill_budget -= n
        budget = min(budget, prefill_budget)
        self.waiting.sort(key=self._queue_key)
        while self.waiting and budget > 0:
            req = self.waiting[0]
            n = self._admit(req, budget, plan, now)
            if not n:
                break
            admitted.append(req)
            budget -= n
        if self.traits.revisit_each_step:
            swap_in_tokens = self._swapped_in_bytes // self.cache.spec.rank_kv_bytes_per_token
            self._step_s = self.cost.t_fwd(max(1, plan.num_tokens))
            if self.predictor is not None:
                hidden = swap_in_tokens <= swap_budget_tokens(max(1, plan.num_tokens), self.cost)
                self.predictor.note_admissions(admitted, self.waiting, hidden)
                swap_in_tokens += self._prefetch(now, plan.num_tokens, swap_in_tokens)
            self._min_waste(now, plan.num_tokens, swap_in_tokens)
        return plan

    def _admit_express(self, plan: StepPlan, now: float) -> list[Request]:
        """This iteration for the expedited requests alone, when any is waiting and the previous one was
        not theirs (a decode waits at most one such iteration). Returns those admitted: none, and the
        iteration is everybody's, when none is waiting or none fits."""
        self._express = [r for r in self._express if r.status is Status.WAITING]
        if self._express_last or not self._express:
            self._express_last = False
            return []
        admitted, budget = [], self.max_batch_tokens
        for req in list(self._express):
            n = self._admit(req, budget, plan, now)
            if n:
                self._express.remove(req)
                admitted.append(req)
                budget -= n
        self._express_last = bool(admitted)
        return admitted

    def _admit(self, req: Request, budget: int, plan: StepPlan, now: float) -> int:
        """Move a waiting request to running with its next chunk, at most `budget` tokens, reusing
        what the prefix index holds. Returns the chunk's tokens: 0 when none fit, its KV cannot
        come back from host, or its blocks cannot be had."""
        self.cache.attach_prefix(req.rid)
        n = min(req.uncached, budget)
        if n == 0 or not self._swap_in(req, now) or not self._reserve(req, n, now, protected=None):
            return 0
        self.waiting.remove(req)
        req.status = Status.RUNNING
        self.running.append(req)
        plan.chunks.append(Chunk(req, req.num_cached, n))
        return n

    def _recount_paused_shares(self) -> None:
        """Other requests took or dropped shares of blocks since the last step: what a paused
        request reading them holds alone (its preserve waste) may have changed without a move of its own."""
        if touched := self.cache.prefix.take_touched():
            self.paused_blocks.shares_changed(touched)

    def _prefill_budget(self) -> int:
        """Tokens for prompt, answer and recompute chunks this iteration: `_chunk_tokens()` while
        chunking lowers waste, that is while decodes run (a long prefill would stall them) or while
        memory is short (a chunk takes fewer blocks now, so a paused request may return before its
        KV is evicted); otherwise chunks would only add steps."""
        decodes = self._decodes()
        if not decodes and not self._memory_pressure():
            return self.max_batch_tokens
        chunk = self._chunk_tokens(self._pending_prefill(self.max_batch_tokens - decodes), decodes)
        if chunk < self.max_batch_tokens:
            self._note("chunked_iterations")
        return chunk

    def _decodes(self) -> int:
        return sum(1 for r in self.running if r.uncached == 1)

    def _pending_prefill(self, cap: int) -> int:
        """Prompt, answer and recompute tokens waiting to run, counted up to `cap`."""
        total = 0
        for r in itertools.chain((r for r in self.running if r.uncached > 1), self.waiting):
            total += r.uncached
            if total >= cap:
                return cap
        return total

    def _chunk_tokens(self, prefill: int | None = None, decodes: int | None = None) -> int:
        """The chunk size of a prefill of `prefill` tokens (None: a batch's worth) next to the running
        decodes (`decodes`, if the caller counted them already).

        min-waste recomputes in chunks that fill the device up to its saturation point S next to
        the running decodes (INFERCEPT's chunked recomputation), so no decode stalls behind a long
        prefill; the other policies prefill as much as the batch allows, as vLLM does. Beside
        decodes it chunks only where that delays the requests less in sum (`policy.chunk_pays`):
        where the measured forward is flat below S a chunk rides free, where it is a line (a CPU)
        each chunk only adds an iteration to the chunked request's wait. With nothing decoding
        (memory short) a chunk claims fewer blocks now, unless every batch costs the same.
        """
        if not self.traits.chunked_recompute:
            return self.max_batch_tokens
        decodes = self._decodes() if decodes is None else decodes
        chunk = max(1, min(self.max_batch_tokens, self.cost.saturation_tokens) - decodes)
        if decodes:
            room = max(1, self.max_batch_tokens - decodes)
            pays = chunk_pays(decodes, room if prefill is None else min(prefill, room), chunk, self.cost)
        else:
            pays = self.cost.t_fwd(self.max_batch_tokens) > self.cost.t_fwd(chunk)
        return chunk if pays else self.max_batch_tokens

    # ------------------------------------------------------------------ memory
    def _reserve(self, req: Request, n: int, now: float, protected: set[int] | None) -> bool:
        """Blocks for `n` more tokens of `req`, taken from paused requests, then (when `protected` is
        given) from running requests younger than `req` that hold no chunk in this step yet."""
        while True:
            if self.cache.allocate(req.rid, req.num_cached, n):
                return True
            need = self.cache.blocks_needed(req.rid, req.num_cached, n) - self.cache.free_device_blocks()
            if self._evict_paused(max(1, need), now, exclude=req) or self._evict_waiting(req):
                continue
            if protected is None:
                return False
            victims = [r for r in self.running if r is not req and r.request_id not in protected]
            if not victims:
                return False
            self._preempt(max(victims, key=lambda r: r.queue_key))

    def _swap_in(self, req: Request, now: float) -> bool:
        if not self.cache.host_blocks(req.rid):
            self.pause_outcomes.forget(req.rid)
        while held := self.cache.host_blocks(req.rid):
            moved = self.cache.swap_in(req.rid)
            if moved is not None:
                self._swapped_in_bytes += moved
                # most of it copied: its named device blocks were reused (a partial last block always is)
                self.pause_outcomes.swapped_back(req.rid, copied=2 * moved > held * self.cache.block_bytes)
                return True
            need = self.cache.host_blocks(req.rid) - self.cache.free_device_blocks()
            if not self._evict_paused(max(1, need), now, exclude=req) and not self._evict_waiting(req):
                return False
        return True

    def _evict_paused(self, blocks: int, now: float, exclude: Request) -> bool:
        """Free `blocks` device blocks held by paused requests, longest expected pause first: to host
        where the policy swaps (min-waste first drops the host copies of requests expected to pause
        longer still), else discarded. Only blocks a request holds alone free anything; when no
        paused request holds any, whole requests let go of their shares (the last one out frees)."""
        holders = [r for r in self.paused_blocks.holders.values() if r is not exclude]
        if not holders:
            return False
        holders.sort(key=lambda r: (self._kept_for_return(r, now), -self._remaining(r, now)))
        alone = any(self.cache.exclusive_blocks(r.rid) for r in holders)
        freed = 0
        for r in holders:
            have = self.cache.exclusive_blocks(r.rid) if alone else self.cache.device_blocks(r.rid)
            if not have:
                continue
            take = min(have, blocks - freed) if self.cache.supports_partial else have
            if self.pause_outcomes.evicted(r.rid):
                self._note("kept_at_pause_evicted")
            if self.traits.host_room_by_pause:
                self._make_host_room(take, self._view(r, now), now)
            moved = self._swap_out(r, take) if self.traits.evict_to_host else 0
            if not moved:
                if self.cache.host_blocks(r.rid):
                    self.cache.discard_host(r.rid)
                    take = self.cache.device_blocks(r.rid) if not self.cache.supports_partial else take
                self._discard(r, take)
            freed += take
            r.strategy = self._placement(r)
            if freed >= blocks:
                break
        return freed > 0

    def _evict_waiting(self, req: Request) -> bool:
        """Free the device KV of a waiting request queued behind `req` (kept through a pause, or swapped
        in before the batch filled up): it is of no use before `req` runs, and left alone, two requests
        can wait on each other forever, or `req` can preempt itself over and over. Takes the last in
        the queue first: to host where the policy swaps and there is room, else discarded."""
        order = self._queue_key
        holders = [r for r in self.waiting if order(r) > order(req) and self.cache.device_blocks(r.rid)]
        if not holders:
            return False
        victim = max(holders, key=order)
        if not (self.traits.evict_to_host and self._swap_out(victim, None)):
            self._discard(victim)
        return True

    def _preempt(self, victim: Request) -> None:
        """Last resort: push a running request back to waiting, freeing its blocks."""
        self.running.remove(victim)
        if not (self.traits.preempt_to_host and self._swap_out(victim, None)):
            self._discard(victim)
        victim.status = Status.WAITING
        self.waiting.append(victim)
        self.preemptions += 1

    # ------------------------------------------------------------------ moves
    def _swap_out(self, req: Request, num_blocks: int | None, wait: bool = True) -> int:
        """`wait=False` lets the copy run behind the next forward (its blocks come free after it);
        eviction under memory pressure needs the blocks now and waits."""
        moved = self.cache.swap_out(req.rid, num_blocks, wait=wait)
        if moved and req.status is Status.PAUSED:
            self._note("swap_out_paused")
            if self.predictor is not None:
                self.predictor.moved_out(req)
        return moved

    def _note(self, move: str) -> None:
        self.moves[move] = self.moves.get(move, 0) + 1

    def _discard(self, req: Request, num_blocks: int | None = None) -> None:
        """Drop device blocks from the tail (all by default); the token log keeps what to recompute."""
        if req.status is Status.PAUSED:
            self._note("discard_paused")
            if self.predictor is not None:
                self.predictor.moved_out(req)
        if num_blocks is None or not self.cache.supports_partial:
            self.cache.discard_host(req.rid)
            self.cache.discard_device(req.rid)
            return
        self.cache.discard_device(req.rid, num_blocks)

    def _placement(self, req: Request) -> str:
        dev, host = self.cache.device_blocks(req.rid), self.cache.host_blocks(req.rid)
        if dev and host:
            return "partial-swap"
        if host:
            return "swap"
        if dev:
            return "preserve" if req.num_cached else "discard"
        return "discard"

    # ------------------------------------------------------------------ min-waste
    def _call(self, req: Request) -> Call:
        """The paused request's tool name and, for the benchmark's oracle, its true duration (a scripted
        call's expected duration is its true one)."""
        return pending_tool(req), req.pending.expected_duration if req.pending and self.estimator.oracle else None

    def _remaining(self, req: Request, now: float) -> float:
        call = self._call(req)
        if self.predictor is not None:
            return self.predictor.remaining(call, now - req.paused_at)
        return self.estimator.remaining(call[0], now - req.paused_at, call[1])

    def _host_outlasting(self, seconds: float, now: float, skip_holders: bool) -> Iterator[PausedView]:
        """Paused requests holding host KV expected to pause longer than `seconds`, in victim order
        (without the device holders min-waste ranks, when `skip_holders`)."""
        holders = self.paused_blocks.holders
        skip = (lambda r: r.rid in holders and r.num_cached > 0) if skip_holders else (lambda r: False)
        return self.paused_blocks.host_by_pause.outlasting(self.estimator, seconds, now,
                                                           lambda r: self._view(r, now), skip)

    def _others_tokens(self) -> int:
        return sum(r.num_cached for r in self.running)

    def _view(self, req: Request, now: float) -> PausedView:
        return PausedView(
            request_id=req.request_id,
            context_tokens=req.num_cached,
            device_tokens=(device := self.cache.device_tokens(req.rid)),
            shared_tokens=min(device, self.cache.shared_device_tokens(req.rid)),
            host_tokens=self.cache.host_blocks(req.rid) * self.cache.block_size,
            paused_for_s=now - req.paused_at,
            expected_remaining_s=self._remaining(req, now),
            arrival_time=req.arrival_time,
        )

    def _waste_figures(self, req: Request, now: float) -> dict[str, float]:
        figs = waste_figures(self._view(req, now), self._others_tokens(), self.cost, self._chunk_tokens())
        return _as_dict(figs)

    def _min_waste(self, now: float, batch_tokens: int, swap_in_tokens: int) -> None:
        """Spend what is left of this iteration's swap budget, after the swap-ins of returning
        requests, on the most wasteful paused requests; under memory pressure, preserve or discard
        the rest, whichever wastes less; `swap_log` notes the budget and what moved.
        Requests that paused since the latest iteration were placed at their pause
        (`_place_at_pause`), out of this iteration's budget.

        The budget is the KV that moves over the host link in the time of this iteration's
        forward (`T_swap(N) = T_fwd(B)`): where copies hide under compute (a CUDA stream), those
        that fit are spent whether or not memory is short, banking free blocks for the arrivals
        to come. Where every copy holds up the step (synchronous copies, on a CPU) they wait, as a
        discard does (it costs recomputation), until the memory is wanted (see `_memory_pressure`).
        """
        budget = swap_budget_tokens(max(1, batch_tokens), self.cost)
        holders = [r for r in self.paused_blocks.holders.values() if r.num_cached and not self._kept_for_return(r, now)]
        early, self._paused_out = self._paused_out, 0
        held_back = bool(holders) and not self.cost.copies_overlap and not self._memory_pressure()
        if held_back:
            self._note("moves_waiting_for_pressure")
        moved = self._place_paused(holders, budget - early, swap_in_tokens, now) if holders and not held_back else 0
        self.swap_log.append(SwapIteration(budget, swap_in_tokens, early + moved))

    def _place_at_pause(self, req: Request, now: float) -> None:
        """min-waste at a pause (`policy.swap_at_pause`): swap what the next iteration's swap budget
        covers (the smallest a forward can have, less the pauses before this one) and keep the rest
        until `_min_waste` revisits it; or keep it all, and note what becomes of it."""
        if not swap_at_pause(self.pause_outcomes.evicted_share):
            self.pause_outcomes.kept(req.rid)
            return
        left = swap_budget_tokens(1, self.cost) - self._paused_out
        if left > 0:
            moved = self._place_paused([req], left, 0, now, pressure=False)
            self._paused_out += moved
            if moved:
                self._note("swapped_at_pause")
            if self.cache.host_blocks(req.rid) and not self.cache.exclusive_blocks(req.rid):
                self.pause_outcomes.swapped(req.rid)

    def _place_paused(self, holders: list[Request], budget: int, swap_in_tokens: int, now: float,
                      pressure: bool = True) -> int:
        """`_min_waste` for paused requests that hold device KV: swap out, preserve or discard each.
        Returns the tokens swapped out. Only the holders are viewed and ranked; the requests whose
        host KV may give way are viewed only when the host runs short (`plan_paused_moves`).
        `pressure=False` (at a pause) swaps within the budget and keeps the rest, discarding nothing."""
        bs = self.cache.block_size
        out_budget, _ = split_swap_budget(
            budget,
            want_out=sum(self.cache.exclusive_blocks(r.rid) for r in holders) * bs,
            want_in=swap_in_tokens,
            # host room held by paused requests counts: a longer-pausing one may give way (plan_paused_moves)
            free_host_tokens=(self.cache.free_host_blocks() + self.paused_blocks.host_total) * bs,
            free_device_tokens=self.cache.free_device_blocks() * bs,
        )
        views = [self._view(r, now) for r in holders]
        ranked = self._rank_paused(views, holders)
        for view, figs in ranked:
            self.paused_blocks.request(str(view.request_id)).waste = _as_dict(figs)

        ranked_by_victim_key = sorted(views, key=victim_key)

        def longer_than(seconds: float) -> Iterator[PausedView]:
            # whose host KV may give way to a swap: those with some now, and the holders (they may swap first)
            ranked_ones = (v for v in ranked_by_victim_key if v.expected_remaining_s > seconds)
            return heapq.merge(ranked_ones, self._host_outlasting(seconds, now, skip_holders=True), key=victim_key)

        plan = plan_paused_moves(ranked, longer_than, self._host_room(), out_budget, bs,
                                 self.cache.supports_partial, pressure and self._memory_pressure())
        moved = 0
        for planned in plan:
            req, move = self.paused_blocks.request(str(planned.request_id)), planned.move
            if move.kind == "drop-host":
                self.cache.discard_host(req.rid)
                self._note("host_drop_paused")
            elif move.kind == "swap":
                moved += self._swap_out(req, move.blocks, wait=False) * bs
            elif move.kind == "discard":
                self._discard(req)
            req.strategy = self._placement(req)
        return moved

    def _kept_for_return(self, req: Request, now: float) -> bool:
        """`predictive`: a paused request whose KV stays on the device for its imminent answer (moved
        only when nothing else can give way)."""
        return self.predictor is not None and self.predictor.keeps(req, self._call(req), now, self._step_s)

    def _rank_paused(self, views: list[PausedView], holders: list[Request]) -> list[tuple[PausedView, WasteFigures]]:
        if self.predictor is None:
            return rank_by_waste(views, self._others_tokens(), self.cost, self._chunk_tokens())
        calls = [self._call(r) for r in holders]
        return self.predictor.rank_by_waste(views, calls, self._others_tokens(), self._chunk_tokens(), self._step_s)

    def _prefetch(self, now: float, batch_tokens: int, swap_in_tokens: int) -> int:
        """`predictive`: bring back swapped KV whose answer is due soon, with what this iteration's swap
        budget has left after the returning requests' swap-ins, into blocks nobody queued wants.
        Returns the tokens copied in."""
        assert self.predictor is not None
        budget = swap_budget_tokens(max(1, batch_tokens), self.cost) - swap_in_tokens
        spare = self.cache.free_device_blocks() - self._blocks_wanted()
        moved = self.predictor.prefetch(now, budget, spare, self._step_s, busy=batch_tokens > 0)
        if moved:
            for r in self.predictor.ledger.requests():
                r.strategy = self._placement(r)
        return moved

    def next_prefetch(self, now: float) -> float | None:
        """`predictive`: when the next prefetch falls due (after `now`), so an idle engine wakes for it."""
        if self.predictor is None:
            return None
        return self.predictor.next_due(now, self.predictor.step_period(self._step_s))

    def _host_room(self) -> HostRoom:
        """The host pool and the paused requests' blocks, per allocator, for `plan_paused_moves`:
        read for the requests the plan looks at, not for every paused one."""
        return HostRoom(self.cache.free_host_per_allocator(), self.cache.host_blocks_returning(),
                        _PerAllocator(self, device=True), _PerAllocator(self, device=False))

    def _memory_pressure(self) -> bool:
        """Whether paused KV stands in anyone's way: the running requests (the rest of their prompt
        and one more token each) and the waiting ones (their uncached tokens and any context on
        host) need more device blocks than are free. Without pressure, preserved memory is memory
        nobody could use: keeping it wastes nothing, and discarding it would only buy
        recomputation. (The paper compares the waste figures regardless; in simulation, waiting
        for pressure cut min-waste's normalized latency by up to 38% under load, docs/BENCHMARK.md.)"""
        return self._blocks_wanted() > self.cache.free_device_blocks()

    def _blocks_wanted(self) -> int:
        """Device blocks the running requests (the rest of their prompt and one more token each) and
        the waiting ones (their uncached tokens and any context on host) still need."""
        need = sum(self.cache.blocks_needed(r.rid, r.num_cached, r.uncached + 1) for r in self.running)
        return need + sum(self.cache.blocks_needed(r.rid, r.num_cached, r.uncached) for r in self.waiting)

    def _make_host_room(self, blocks: int, candidate: PausedView, now: float) -> None:
        """Host full: drop the host KV of swapped requests expected to pause longer than `candidate`."""
        missing = blocks - self.cache.free_host_blocks()
        if missing <= 0:
            return
        longer = self._host_outlasting(candidate.expected_remaining_s, now, skip_holders=False)
        for rid in take_host_victims(longer, missing * self.cache.block_size):
            victim = self.paused_blocks.request(str(rid))
            self.cache.discard_host(victim.rid)
            self._note("host_drop_paused")
            victim.strategy = self._placement(victim)
            if self.cache.free_host_blocks() >= blocks:
                return


class _PerAllocator(Mapping[int, tuple[int, ...]]):
    """The paused holders' device blocks (`device=True`), or every paused request's host blocks,
    per allocator, by request id, each read from the cache when the plan asks for it."""

    def __init__(self, scheduler: Scheduler, device: bool) -> None:
        blocks = scheduler.paused_blocks
        self._cache = scheduler.cache
        self._members = blocks.holders if device else blocks.host_holders
        self._device = device

    def __getitem__(self, request_id: int) -> tuple[int, ...]:
        rid = str(request_id)
        if rid not in self._members:
            raise KeyError(request_id)
        return self._cache.blocks_per_allocator(rid)[0 if self._device else 1]

    def __iter__(self) -> Iterator[int]:
        return (r.request_id for r in self._members.values())

    def __len__(self) -> int:
        return len(self._members)
