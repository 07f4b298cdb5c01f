"""The live KV memory panel: where the shared engine's blocks are, sampled while requests run.

Block counts come from the engine's own per-step timeline (`InterceptEngine.timeline()`). What
it does not record is sampled here: KV that was computed, then dropped, and not yet rebuilt
(`Request.high_water - Request.num_cached`, over every live request), and the running total
of recomputed tokens. Sampling reads plain attributes without the engine lock: a sample may
straddle a step, which a chart at 10 Hz cannot show anyway.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import pandas as pd

import infercept_hf as ih

from transcript import WASTE_ORDER, byte_seconds

BLOCK_SERIES = {"running": "device: running", "preserved": "device: preserved (paused)",
                "swapped_host": "host: swapped out"}
WINDOW_S = 90.0
# The driver steps (and the timeline samples) every few ms while any request is unfinished, paused ones
# included: a longer gap means the pool was empty.
IDLE_GAP_S = 0.5
MAX_POINTS = 400  # per series: enough for a smooth line, few enough to redraw every tick


class MemoryMonitor:
    """Samples the engine that `get_engine()` returns now (the session may swap it) every `period_s`."""

    def __init__(self, get_engine: Callable[[], ih.InterceptEngine | None], period_s: float = 0.1) -> None:
        self.get_engine = get_engine
        self.period_s = period_s
        self.t0 = time.monotonic()
        self.samples: deque[dict[str, float]] = deque(maxlen=int(WINDOW_S / period_s))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="infercept-demo-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last: tuple[int, int] | None = None
        while not self._stop.wait(self.period_s):
            engine = self.get_engine()
            if engine is None or engine.closed:
                continue
            stats = engine.stats()
            busy = bool(stats["running"] or stats["waiting"] or stats["paused"])
            now = (stats["recompute_owed_tokens"], stats["recomputed_tokens"])
            if busy or now != last:  # idle and unchanged: nothing new to draw
                self.samples.append({"t": time.monotonic(), "discarded": now[0], "recomputed": now[1]})
                last = now

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def block_frame(self, engine: ih.InterceptEngine) -> pd.DataFrame:
        """Long-form (t, series, blocks) for the last `WINDOW_S` seconds of the engine's timeline."""
        now = time.monotonic()
        recent = [s for s in engine.timeline() if s["t"] >= now - WINDOW_S]
        recent = recent[:: max(1, len(recent) // MAX_POINTS)] or [{"t": now, **dict.fromkeys(BLOCK_SERIES, 0)}]
        rows = []
        for prev, sample in zip([None, *recent], recent, strict=False):
            if prev is not None and sample["t"] - prev["t"] > IDLE_GAP_S:  # drop to zero, not a slope across the gap
                rows += self._block_rows({"t": sample["t"] - 0.01, **dict.fromkeys(BLOCK_SERIES, 0)})
            rows += self._block_rows(sample)
        return _frame(rows, "blocks")

    def _block_rows(self, sample: dict[str, float]) -> list[dict]:
        return [{"t": round(sample["t"] - self.t0, 2), "series": label, "blocks": sample[key]}
                for key, label in BLOCK_SERIES.items()]

    def token_frame(self) -> pd.DataFrame:
        """Long-form (t, series, tokens): discarded-and-owed now, recomputed so far."""
        samples = list(self.samples) or [{"t": time.monotonic(), "discarded": 0, "recomputed": 0}]
        rows = [{"t": round(s["t"] - self.t0, 2), "series": label, "tokens": s[key]}
                for s in samples for key, label in
                (("discarded", "discarded, awaiting recompute"), ("recomputed", "recomputed (total)"))]
        return _frame(rows, "tokens")


def _frame(rows: list[dict], y: str) -> pd.DataFrame:
    """Never empty and always typed: a chart first drawn from an empty frame draws no lines after."""
    return pd.DataFrame(rows, columns=["t", "series", y]).astype({"t": float, "series": str, y: float})


def figures_markdown(stats: dict[str, Any], policy: str, model_name: str) -> str:
    """The engine's counters as a short two-column table beside the charts."""
    waste = stats["waste_by_cause"]
    strategies = ", ".join(f"{k} {v}" for k, v in sorted(stats["strategies"].items())) or "none yet"
    rows = [
        ("requests", f"{stats['running']} running, {stats['paused']} paused at a tool, {stats['waiting']} waiting"),
        ("device blocks used", f"{stats['device_blocks_used']} / {stats['device_blocks_total']}"),
        ("host blocks used", f"{stats['host_blocks_used']} / {stats['host_blocks_total']}"),
        ("recomputed tokens", str(stats["recomputed_tokens"])),
        ("swapped", f"{stats['swapped_bytes'] / 1e6:.2f} MB"),
        ("waste preserve / swap / discard",
         " / ".join(byte_seconds(waste[k]) for k in WASTE_ORDER)),
        ("finished pauses by strategy", strategies),
    ]
    return "\n".join([f"**{model_name}** under policy **{policy}**", "", "| engine | now |", "|---|---|",
                      *(f"| {k} | {v} |" for k, v in rows)])
