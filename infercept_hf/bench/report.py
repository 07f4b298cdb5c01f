"""A markdown summary of benchmark runs: one table per request rate, one row per policy, in the
order the runs came (the order of --policies)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .metrics import WASTE_CAUSES

COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("completed/s", "completed_rps", "{:.3f}"),
    ("norm. latency mean (s/tok)", "normalized_latency_mean_s", "{:.4f}"),
    ("norm. latency p99 (s/tok)", "normalized_latency_p99_s", "{:.4f}"),
    ("throughput (tok/s)", "throughput_tok_s", "{:.1f}"),
    ("TTFT p99 (ms)", "p99_ttft_ms", "{:.0f}"),
    ("ITL p99 (ms)", "p99_itl_ms", "{:.1f}"),
    ("resume mean (ms)", "mean_resume_latency_ms", "{:.1f}"),
    ("in flight at window end", "in_flight", "{:d}"),
    ("in system (mean)", "backlog_mean", "{:.0f}"),
    ("backlog growth / arrivals", "backlog_growth_share", "{:+.1%}"),
    ("recompute share (tokens)", "recompute_share", "{:.1%}"),
    ("recompute share (forward time)", "recompute_time_share", "{:.1%}"),
)


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _waste(run: Mapping[str, Any]) -> str:
    """Waste by cause in GB x s: preserve / swap / discard."""
    waste = run.get("waste_by_cause")
    if not waste:
        return "-"
    return " / ".join(f"{waste.get(c, 0.0) / 1e9:.3g}" for c in WASTE_CAUSES)


def markdown_summary(runs: Sequence[Mapping[str, Any]]) -> str:
    """Tables of the key metrics; missing figures show as '-'."""
    header = ["policy", *(c[0] for c in COLUMNS), "waste GB*s (preserve / swap / discard)"]
    parts = []
    for qps in sorted({r["qps"] for r in runs}):
        lines = [
            f"### {qps:g} requests/s",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for run in (r for r in runs if r["qps"] == qps):
            cells = [str(run["policy"]), *(_cell(run.get(key), fmt) for _, key, fmt in COLUMNS), _waste(run)]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def sustainable_table(rates: Mapping[str, Any], slo: float) -> str:
    """The sustainable rate per policy (`policy_runs.Sustainable`), with its note."""
    lines = [f"### Sustainable rate (normalized latency mean <= {slo:g} s/token)", "",
             "| policy | requests/s | note |", "|---|---|---|"]
    for policy, s in rates.items():
        rate = "-" if s.rate is None else (">= " if s.note == "not broken" else "") + f"{s.rate:.2f}"
        lines.append(f"| {policy} | {rate} | {s.note} |")
    return "\n".join(lines) + "\n"
