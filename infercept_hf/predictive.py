"""What `policy="predictive"` adds to min-waste: the scheduler's one collaborator for it.

- Durations as distributions: a paused request's remaining time is the mean of the outcomes its
  tool's kept durations still allow (`DurationEstimator.remaining_distribution`), and its waste
  figures weigh keep-then-maybe-discard plans over those outcomes (`expected_waste.py`).
- Prefetch: swapped KV comes back ahead of the predicted answer (`prefetch.py`), within the swap
  budget and into blocks nobody queued wants.
- Ranking: the waiting queue (new, resumed and preempted requests) in order of predicted
  remaining work, aged so that nobody starves, requests resuming after a tool first (`ranking.py`).
Every decision reads the estimator and the cache only, so tensor-parallel replicas, fed the
same answers on the same clock, decide alike.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .cache import InterceptPagedCache
from .estimator import DurationEstimator
from .expected_waste import expected_figures
from .policy import CostModel, PausedView, WasteFigures, rank_figures, waste_figures
from .prefetch import (
    DEFAULT_MAX_HELD_FRACTION,
    DEFAULT_OVERDUE_QUANTILE,
    DEFAULT_PREFETCH_QUANTILE,
    PrefetchLedger,
    prefetch_start,
)
from .prefetch_due import ORACLE_GROUP, PrefetchDue
from .ranking import DEFAULT_AGING_S, predicted_work, rank_key
from .request import Request

Call = tuple[str, "float | None"]  # a paused request's tool name and, for the oracle, its true duration
PERIOD_SAMPLES = 8  # iterations whose spacing `step_period` reads
QueueKey = Callable[[Request], tuple[int, float, float, int]]


def _slack(*values: float) -> float:
    """Room for rounding when a sum is compared in another order than `prefetch_start` computes it."""
    return 1e-9 * max(1.0, *(abs(v) for v in values))


@dataclass(frozen=True)
class PredictorSettings:
    """`predictive`'s settings (`InterceptEngine(predictor_settings=...)`); the defaults are the ones
    measured in docs/BENCHMARK.md, where the prefetch trade-off shows what moving them costs."""

    prefetch_quantile: float = DEFAULT_PREFETCH_QUANTILE  # swapped KV is back by this quantile of its tool's durations
    max_held_fraction: float = DEFAULT_MAX_HELD_FRACTION  # of the device pool, at most this holds prefetched KV
    overdue_quantile: float = DEFAULT_OVERDUE_QUANTILE  # a prefetch unanswered past this quantile is no longer pinned
    aging_s: float = DEFAULT_AGING_S  # waiting this long halves a request's predicted work in the queue order

    def __post_init__(self) -> None:
        for name in ("prefetch_quantile", "overdue_quantile"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        if not 0 <= self.max_held_fraction <= 1:
            raise ValueError(f"max_held_fraction must be in [0, 1], got {self.max_held_fraction!r}")
        if not self.aging_s > 0:
            raise ValueError(f"aging_s must be > 0, got {self.aging_s!r}")


class Predictor:
    """The scheduler's hooks for `predictive`."""

    def __init__(
        self,
        cache: InterceptPagedCache,
        estimator: DurationEstimator,
        cost: CostModel,
        call_of: Callable[[Request], Call],
        settings: PredictorSettings = PredictorSettings(),
    ) -> None:
        self.cache = cache
        self.estimator = estimator
        self.cost = cost
        self.call_of = call_of  # a paused request's call, from the scheduler (which knows the oracle)
        self.aging_s = settings.aging_s
        self.prefetch_quantile = settings.prefetch_quantile
        self.overdue_quantile = settings.overdue_quantile
        self.max_held_blocks = int(settings.max_held_fraction * cache.num_blocks)
        self.ledger = PrefetchLedger()
        self.due = PrefetchDue()  # swapped calls not yet prefetched, by when their prefetch falls due
        self._overdue: set[int] = set()  # prefetched, then outlived the overdue quantile: not pinned, not again
        self.ranking = {"reordered_iterations": 0, "overtakes": 0}
        self._busy_since: float | None = None  # when the latest iteration began, if it ran a forward
        self._periods: deque[float] = deque(maxlen=PERIOD_SAMPLES)  # seconds between such iterations

    # ------------------------------------------------------------------ durations
    def remaining(self, call: Call, elapsed_s: float) -> float:
        """Expected rest of the pause: the mean of the outcomes still possible, else the estimator's rule."""
        outcomes = self.estimator.remaining_distribution(call[0], elapsed_s, call[1])
        if outcomes:
            return sum(outcomes) / len(outcomes)
        return self.estimator.remaining(call[0], elapsed_s, call[1])

    def rank_by_waste(self, views: Sequence[PausedView], calls: Sequence[Call], other_tokens: int,
                      chunk_tokens: int | None, step_s: float) -> list[tuple[PausedView, WasteFigures]]:
        """min-waste's ranking with each request's figures weighed over its outcomes (`calls[i]`
        is `views[i]`'s)."""
        figures = []
        for v, (tool, truth) in zip(views, calls):
            outcomes = self.estimator.remaining_distribution(tool, v.paused_for_s, truth)
            figs = (expected_figures(v, outcomes, other_tokens, self.cost, chunk_tokens, step_s) if outcomes
                    else waste_figures(v, other_tokens, self.cost, chunk_tokens))
            figures.append((v, figs))
        return rank_figures(figures)

    # ------------------------------------------------------------------ ranking
    def queue_key(self, now: float) -> QueueKey:
        """This iteration's queue order: requests resuming after a tool first, then aged predicted
        work, ties by the arrival order (`ranking.py`; memoised: the scheduler compares many
        times per iteration)."""
        memo: dict[int, tuple[int, float, float, int]] = {}

        def key(req: Request) -> tuple[int, float, float, int]:
            k = memo.get(req.request_id)
            if k is None:
                resuming = req.resume_pending_since is not None
                since = req.resume_pending_since if resuming else req.arrival_time
                work = predicted_work(len(req.tokens), req.max_new_tokens - req.num_generated)
                k = memo[req.request_id] = (not resuming, rank_key(work, now - since, self.aging_s),
                                            req.queue_key, req.request_id)
            return k

        return key

    def note_admissions(self, admitted: Sequence[Request], still_waiting: Sequence[Request],
                        swap_ins_hidden: bool) -> None:
        """Telemetry: requests admitted while an earlier arrival still waits (the ranking's decisions),
        and which late returns resumed at once behind the forward (`swap_ins_hidden`: this
        iteration's swap-ins fit its swap budget; `PrefetchLedger.admitted`)."""
        self.ledger.admitted((r.request_id for r in admitted), swap_ins_hidden)
        if not admitted or not still_waiting:
            return
        first = min((r.queue_key, r.request_id) for r in still_waiting)
        ahead = sum(1 for r in admitted if (r.queue_key, r.request_id) > first)
        if ahead:
            self.ranking["reordered_iterations"] += 1
            self.ranking["overtakes"] += ahead

    # ------------------------------------------------------------------ prefetch
    def may_prefetch(self, req: Request) -> bool:
        """False once a prefetched call outlived its tool's overdue quantile: it is not brought back again."""
        return req.request_id not in self._overdue

    def pinned(self, req: Request) -> bool:
        """A prefetched request min-waste must leave on the device until its answer."""
        return req.request_id in self.ledger and req.request_id not in self._overdue

    def step_period(self, step_s: float) -> float:
        """How far apart iterations are: the longest of the last few measured between iterations
        that ran a forward, and at least `step_s`, the cost model's forward time of this one (an
        iteration also samples, schedules and copies; a prefetch timed by the forward alone lands
        after the answer whenever the next iteration starts later than predicted)."""
        return max(step_s, max(self._periods, default=0.0))

    def keeps(self, req: Request, call: Call, now: float, step_s: float) -> bool:
        """Whether min-waste must leave `req`'s device KV alone: it is pinned, or its answer is so
        near that a copy out would have to come straight back (its prefetch would be due before
        the copy out and back could be done)."""
        if self.pinned(req):
            return True
        if req.request_id in self._overdue:
            return False
        at = self.back_by(*call)
        out_and_back = self._lead(2 * self.cache.device_tokens(req.rid), self.step_period(step_s))
        return at is not None and prefetch_start(req.paused_at, at, out_and_back) <= now

    def _lead(self, tokens: int, step_s: float) -> float:
        """How long before an answer a copy of `tokens` back must start: the copy, and one iteration
        (`step_s`, a `step_period`)."""
        return self.cost.t_swap(tokens) + step_s

    def prefetch(self, now: float, budget_tokens: int, spare_blocks: int, step_s: float, busy: bool) -> int:
        """Once per iteration (`busy`: it runs a forward; `step_s` its forward time): copy back the
        swapped KV of calls about to answer, soonest first, while `budget_tokens` (the swap budget
        this iteration has left; the first copy may exceed it, as its swap-in on return would) and
        `spare_blocks` (free device blocks nobody queued wants) last. Unpins prefetched calls that
        outlived the overdue quantile. Returns the tokens copied."""
        if self._busy_since is not None:
            self._periods.append(now - self._busy_since)
        self._busy_since = now if busy else None
        step_s = self.step_period(step_s)
        bs = self.cache.block_size
        for req in list(self.ledger.requests()):
            if req.request_id not in self._overdue:
                tool, truth = self.call_of(req)
                overdue = self.estimator.duration_quantile(tool, self.overdue_quantile, truth)
                if overdue is not None and now - req.paused_at > overdue + step_s:
                    self._overdue.add(req.request_id)
        room = min(spare_blocks, self.max_held_blocks - self.ledger.held_blocks)
        if budget_tokens <= 0 or room <= 0:
            return 0
        due = [(start, req.arrival_time, req.request_id, req, host)
               for start, req, host in self.due_now(now, step_s) if host <= room]
        moved = 0
        for *_, req, host in sorted(due, key=lambda d: d[:3]):
            if host > room or moved and moved + host * bs > budget_tokens:
                continue
            nbytes = self.cache.swap_in(req.rid)
            if not nbytes:
                continue
            self.ledger.start(req, now, nbytes, host)
            self.due.remove(req.request_id)
            room -= host
            moved += host * bs
            if moved >= budget_tokens:
                break
        return moved

    def back_by(self, tool: str, truth: float | None) -> float | None:
        """How long into a call of `tool` its KV should be back on the device: the `prefetch_quantile`
        of the tool's durations (None: none yet; oracle mode: the call's true duration)."""
        return self.estimator.duration_quantile(tool, self.prefetch_quantile, truth)

    def _start(self, req: Request, host: int, step_s: float) -> float | None:
        """When `req`'s prefetch of `host` blocks must start (None: its tool has no durations yet)."""
        at = self.back_by(*self.call_of(req))
        if at is None:
            return None
        return prefetch_start(req.paused_at, at, self._lead(host * self.cache.block_size, step_s))

    def _group_quantile(self, group: str | None) -> float | None:
        """What a `due` group's keys lack of their starts (before the lead's iteration): the tool's
        quantile; nothing in oracle mode, whose keys hold each call's own duration."""
        if self.estimator.oracle:
            return 0.0
        assert group is not ORACLE_GROUP
        return self.back_by(group, None)

    def _file(self, req: Request) -> None:
        """(Re)file `req` in `due` by its host KV now, or take it out: no host KV, already
        prefetched, or overdue (never again)."""
        host = self.cache.host_blocks(req.rid)
        if not host or req.request_id in self.ledger or req.request_id in self._overdue:
            self.due.remove(req.request_id)
            return
        tool, truth = self.call_of(req)
        swap_s = self.cost.t_swap(host * self.cache.block_size)
        if self.estimator.oracle:
            at = self.back_by(tool, truth)
            self.due.put(req, ORACLE_GROUP, req.paused_at + at - swap_s)
        else:
            self.due.put(req, tool, req.paused_at - swap_s)

    def due_now(self, now: float, step_s: float) -> list[tuple[float, Request, int]]:
        """`(start, request, host blocks)` of the swapped calls whose prefetch is due at `now`.
        Reads each group's prefix that may be due; a candidate that is not (its key was stale)
        is filed again."""
        due, stale = [], []
        for group in self.due.groups():
            q = self._group_quantile(group)
            if q is None:
                continue
            limit = now + step_s - q
            limit += _slack(limit, q)
            for key, req in self.due.members(group):
                if key > limit:
                    break
                host = self.cache.host_blocks(req.rid)
                start = self._start(req, host, step_s) if host else None
                if start is not None and start <= now:
                    due.append((start, req, host))
                else:
                    stale.append(req)
        for req in stale:
            self._file(req)
        return due

    def next_due(self, now: float, step_s: float) -> float | None:
        """The earliest moment after `now` at which a prefetch falls due (those due already wait
        for budget or room, which only a step's events can free); `step_s` a `step_period`."""
        best: float | None = None
        for group in self.due.groups():
            q = self._group_quantile(group)
            if q is None:
                continue
            for key, req in self.due.members(group):
                if best is not None and key + q - step_s > best + _slack(best, q):
                    break  # every start from here on is later (a stale key is only ever smaller)
                host = self.cache.host_blocks(req.rid)
                start = self._start(req, host, step_s) if host else None
                if start is not None and start > now and (best is None or start < best):
                    best = start
        return best

    def returned(self, req: Request, now: float) -> None:
        """`req`'s answer arrived: settle its prefetch outcome."""
        self._overdue.discard(req.request_id)
        self.due.remove(req.request_id)
        self.ledger.returned(req.request_id, now, self.cache.host_blocks(req.rid))

    def moved_out(self, req: Request) -> None:
        """`req`'s KV leaves the device before its answer (evicted or swapped out; told after a swap
        out, before a discard, so its key may count host blocks a discard then drops)."""
        self.ledger.undone(req.request_id)
        self._file(req)

    def forget(self, req: Request) -> None:
        """`req` ended (finished, failed, cancelled)."""
        self._overdue.discard(req.request_id)
        self.due.remove(req.request_id)
        self.ledger.undone(req.request_id)

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {"prefetch": self.ledger.snapshot(), "ranking": dict(self.ranking)}
