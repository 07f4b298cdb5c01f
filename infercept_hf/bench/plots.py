"""The benchmark's figures: the paper's latency-against-rate curve, and memory by state over time.

Every policy keeps one colour in every figure (`POLICY_COLORS`). matplotlib runs on the Agg
backend so that plotting works on headless machines and in tests.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

DEVICE_STATES = ("running", "preserved", "free")
POLICY_COLORS = {
    "discard": "tab:red", "discard-head": "tab:orange", "preserve": "tab:purple", "swap": "tab:green",
    "min-waste": "tab:blue", "oracle": "tab:cyan", "predictive": "black", "predictive-oracle": "tab:olive",
    "hf-cb": "tab:brown", "hf-generate": "tab:pink",
}


def policy_color(policy: str) -> str:
    return POLICY_COLORS.get(policy, "tab:gray")


def policy_colors_hex() -> dict[str, str]:
    """`POLICY_COLORS` as CSS hex colours, for charts drawn outside matplotlib (the demo's)."""
    return {policy: matplotlib.colors.to_hex(color) for policy, color in POLICY_COLORS.items()}


def plot_latency_vs_rate(
    runs: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "normalized_latency_mean_s",
    slo: float | None = None,
) -> None:
    """One line per policy (in the order the runs give them): `metric` (the paper's normalized
    latency by default) against request rate, with the SLO as a dashed line. A run at a single
    rate is drawn as bars, one per policy. Runs without a value for `metric` are left out."""
    policies = list(dict.fromkeys(str(r["policy"]) for r in runs))
    points = {p: sorted((r["qps"], r[metric]) for r in runs if str(r["policy"]) == p and r.get(metric) is not None)
              for p in policies}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    single_rate = len({r["qps"] for r in runs}) == 1
    if single_rate:
        shown = [p for p in policies if points[p]]
        ax.bar(range(len(shown)), [points[p][0][1] for p in shown], color=[policy_color(p) for p in shown])
        ax.set_xticks(range(len(shown)), shown, rotation=20, ha="right")
        ax.margins(y=0.12)  # headroom: no bar touches the frame
        ax.set_xlabel(f"policy (at {runs[0]['qps']:g} requests/s)")
    else:
        for p in policies:
            if points[p]:
                ax.plot([q for q, _ in points[p]], [v for _, v in points[p]], marker="o", label=p,
                        color=policy_color(p))
        ax.set_xlabel("request rate (requests/s)")
    if slo is not None:
        ax.axhline(slo, color="black", linestyle="--", linewidth=1, label=f"SLO {slo:g}")
    ax.set_ylabel("normalized latency (s/token)" if metric.startswith("normalized_latency") else metric)
    ax.set_title("latency against request rate" if not single_rate else "latency by policy")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory_timeline(samples: Sequence[Mapping[str, float]], path: str | Path, policy: str | None = None,
                         x_max: float | None = None) -> None:
    """Device KV blocks by state, stacked over time, with host blocks holding swapped KV as a line.

    `samples` are the engine's timeline entries `{"t", "running", "preserved", "swapped_host", "free"}`;
    `x_max` shares one time axis across the policies' figures.
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
    if x_max:
        ax.set_xlim(0, x_max)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("KV blocks")
    ax.set_title(f"KV memory by state: {policy}" if policy else "KV memory by state")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
