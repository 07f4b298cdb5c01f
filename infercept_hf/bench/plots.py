"""The benchmark's figures: the paper's latency-against-rate curve, and memory by state over time.

matplotlib runs on the Agg backend so that plotting works on headless machines and in tests.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

DEVICE_STATES = ("running", "preserved", "free")


def plot_latency_vs_rate(
    runs: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "normalized_latency_mean_s"
) -> None:
    """One line per policy: `metric` (the paper's normalized latency by default) against request rate.

    Runs without a value for `metric` (nothing completed) are left out of their line.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in sorted({str(r["policy"]) for r in runs}):
        points = sorted((r["qps"], r[metric]) for r in runs if str(r["policy"]) == policy and r.get(metric) is not None)
        if points:
            ax.plot([q for q, _ in points], [v for _, v in points], marker="o", label=policy)
    ax.set_xlabel("request rate (requests/s)")
    ax.set_ylabel("normalized latency (s/token)" if metric.startswith("normalized_latency") else metric)
    ax.set_title("latency against request rate")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory_timeline(samples: Sequence[Mapping[str, float]], path: str | Path) -> None:
    """Device KV blocks by state, stacked over time, with host blocks holding swapped KV as a line.

    `samples` are the engine's timeline entries `{"t", "running", "preserved", "swapped_host", "free"}`.
    """
    fig, ax = plt.subplots(figsize=(7, 4))
    if samples:
        t0 = samples[0]["t"]
        t = [s["t"] - t0 for s in samples]
        ax.stackplot(
            t, *[[s[k] for s in samples] for k in DEVICE_STATES], labels=[f"{k} (device)" for k in DEVICE_STATES],
            colors=["tab:blue", "tab:orange", "tab:gray"], alpha=0.8,
        )
        ax.plot(t, [s["swapped_host"] for s in samples], color="tab:green", linestyle="--", label="swapped (host)")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("KV blocks")
    ax.set_title("KV memory by state")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
