"""Engine telemetry: where device memory went (waste by cause), recompute, swap traffic.

Waste is device memory holding data nobody computes with, integrated over time
(byte-seconds), split as INFERCEPT does:
- preserve: KV kept on device by paused requests, for as long as they are paused;
- discard: the forward time spent recomputing evicted context, times the KV resident meanwhile;
- swap: the time copies took outside the forward, times the KV resident meanwhile
  (on CPU copies are synchronous, so all of it; pipelined CUDA copies hide under compute).
"""
from __future__ import annotations

from typing import Any

from .cache import InterceptPagedCache
from .request import Request


def add_telemetry(req: Request, key: str, value: float) -> None:
    req.telemetry[key] = req.telemetry.get(key, 0) + value


class EngineStats:
    def __init__(self, cache: InterceptPagedCache) -> None:
        self.cache = cache
        self.bytes_per_block = cache.block_bytes
        self.forward_s = 0.0
        self.recompute_forward_s = 0.0
        self.forward_tokens = 0
        self.recomputed_tokens = 0
        self.steps = 0
        self.waste = {"preserve": 0.0, "swap": 0.0, "discard": 0.0}
        self.swap_s = 0.0
        self.strategies: dict[str, int] = {}
        self.finished: dict[str, int] = {}
        self._last_t: float | None = None
        self.timeline: list[dict[str, float]] = []

    def record_forward(self, plan: Any, seconds: float) -> None:
        # per chunk, the tokens below its request's high-water mark: computed before, dropped, computed again
        owners = [(c.request, n) for c in plan.chunks if (n := min(c.start + c.length, c.request.high_water) - c.start) > 0]
        recompute = sum(n for _, n in owners)
        tokens = plan.num_tokens
        self.steps += 1
        self.forward_s += seconds
        self.forward_tokens += tokens
        self.recomputed_tokens += recompute
        if recompute:
            share = seconds * recompute / tokens
            self.recompute_forward_s += share
            waste = share * self.cache.used_device_blocks() * self.bytes_per_block
            self.waste["discard"] += waste
            for req, own in owners:
                add_telemetry(req, "recomputed_tokens", own)
                add_telemetry(req, "waste_discard", waste * own / recompute)

    def record_step(self, scheduler: Any, now: float) -> None:
        """Integrate paused requests' device memory over the time since the last step (each
        request's share is settled by `PausedBlocks` when its blocks change or it resumes)."""
        bytes_per_block = self.bytes_per_block
        paused_blocks = scheduler.paused_blocks.total
        if self._last_t is not None:
            dt = now - self._last_t
            scheduler.paused_blocks.advance(dt)
            self.waste["preserve"] += dt * paused_blocks * bytes_per_block
        self._last_t = now
        used = self.cache.used_device_blocks()
        new_swap_s = self.cache.pipeline.seconds - self.swap_s
        if new_swap_s > 0:
            self.waste["swap"] += new_swap_s * used * bytes_per_block
            self.swap_s = self.cache.pipeline.seconds
        self.timeline.append(
            {
                "t": now,
                "running": used - paused_blocks,
                "preserved": paused_blocks,
                "swapped_host": self.cache.used_host_blocks(),
                "free": self.cache.free_device_blocks(),
            }
        )
        if len(self.timeline) > 20000:  # keep memory bounded on long runs: thin to every other sample
            self.timeline = self.timeline[::2]

    def record_finish(self, req: Request) -> None:
        self.finished[req.finish_reason] = self.finished.get(req.finish_reason, 0) + 1
        for rec in req.interceptions:
            self.strategies[rec.strategy] = self.strategies.get(rec.strategy, 0) + 1

    def snapshot(self, scheduler: Any) -> dict[str, Any]:
        c = self.cache
        swapped = c.swapped_out_bytes + c.swapped_in_bytes
        return {
            "device_blocks_total": c.num_blocks,
            "device_blocks_used": c.used_device_blocks(),
            "device_blocks_free": c.free_device_blocks(),
            "host_blocks_total": c.num_host_blocks,
            "host_blocks_used": c.used_host_blocks(),
            "block_size": c.block_size,
            "running": len(scheduler.running),
            "waiting": len(scheduler.waiting),
            "paused": len(scheduler.paused),
            "steps": self.steps,
            "forward_s": self.forward_s,
            "forward_tokens": self.forward_tokens,
            "recomputed_tokens": self.recomputed_tokens,
            # computed once, dropped, not rebuilt yet: the recomputation still owed
            "recompute_owed_tokens": sum(
                max(0, r.high_water - r.num_cached)
                for queue in (scheduler.running, scheduler.waiting, scheduler.paused)
                for r in queue
            ),
            "recompute_share": self.recompute_forward_s / self.forward_s if self.forward_s else 0.0,
            "swapped_out_bytes": c.swapped_out_bytes,
            "swapped_in_bytes": c.swapped_in_bytes,
            "swapped_bytes": swapped,
            "swap_s": self.swap_s,
            "swap_gbps": swapped / self.swap_s / 1e9 if self.swap_s else 0.0,
            "waste_by_cause": dict(self.waste),
            "strategies": dict(self.strategies),
            "finished": dict(self.finished),
            "preemptions": scheduler.preemptions,
            "moves": dict(scheduler.moves),
            # min-waste: the recent share of paused contexts that lost their device blocks before resuming
            "pause_evicted_share": scheduler.pause_outcomes.evicted_share,
            "prefix_sharing": c.prefix.enabled,
            "prefix_hit_tokens": c.prefix.hit_tokens,
            "prefix_host_hit_tokens": c.prefix.host_hit_tokens,
            "prefix_cached_blocks": c.prefix.cached_blocks(),
            "prefix_shared_blocks": c.prefix.shared_in_use(),
            # `predictive` only: prefetches (on time / late / wasted / early, bytes moved early) and ranking decisions
            **({"predictive": scheduler.predictor.snapshot()} if scheduler.predictor is not None else {}),
        }
