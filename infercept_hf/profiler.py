"""The cost model from measurement: `T_fwd(n) = a*n + b`, the host-link bandwidth, KV bytes.

Measuring takes seconds, so `load_or_profile` keeps the figures in a small JSON file per
(model, dtype, device) under `~/.cache/infercept_hf/` (or `$INFERCEPT_CACHE_DIR`); later
engines on the same hardware read it back. Only measured figures are cached: KV bytes per
token come from the `ModelSpec`, and overrides from the caller are never written.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .model_spec import ModelSpec
from .policy import CostModel

CPU_TOKEN_COUNTS = (8, 16, 32, 64, 128)
CUDA_TOKEN_COUNTS = (64, 128, 256, 512, 1024, 2048)
# S when it is not measured: the reference hard-codes 384 for an A100; a CPU forward is
# compute bound from a few dozen tokens on.
SATURATION_FALLBACK = {"cuda": 384, "cpu": 64}
SATURATION_TOLERANCE = 0.1  # per-token time must still drop by more than this to count as "falling"
FORWARD_FIELDS = ("fwd_per_token_s", "fwd_fixed_s")  # known (cached or given), the forward is not measured
MEASURED_FIELDS = (*FORWARD_FIELDS, "fwd_points", "swap_bytes_per_s", "saturation_tokens")
CACHE_VERSION = 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_forward(
    model: torch.nn.Module, token_counts: Sequence[int] | None = None, repeats: int = 3, spec: ModelSpec | None = None
) -> list[tuple[int, float]]:
    """`(n, seconds)` for one forward of a single packed sequence of `n` tokens, per count.

    Each point is the fastest of `repeats` runs after one warm-up: noise from other
    processes only ever adds time, so the minimum is the closest to the model's own cost.
    Counts beyond the model's maximum positions are dropped. `spec` is the engine's, if it has one.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    spec = spec or ModelSpec.of(model)
    device = spec.device
    if token_counts is None:
        token_counts = CUDA_TOKEN_COUNTS if device.type == "cuda" else CPU_TOKEN_COUNTS
    max_pos = spec.max_positions
    counts = sorted({int(n) for n in token_counts if n >= 1 and (max_pos is None or n <= max_pos)})
    if not counts:
        raise ValueError(f"no usable token count in {token_counts!r} (model positions: {max_pos})")
    points = []
    with torch.inference_mode():
        for n in counts:
            ids = torch.randint(0, spec.vocab_size, (1, n), device=device)
            model(input_ids=ids, use_cache=False)
            best = math.inf
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                _sync(device)
                best = min(best, time.perf_counter() - t0)
            points.append((n, best))
    return points


def fit_linear(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares `(a, b)` of `t = a*n + b` with `a, b >= 0`.

    A negative slope (noise on a flat curve) refits a constant; a negative intercept refits
    a line through the origin: the constrained least-squares optimum in either case.
    """
    if not points:
        raise ValueError("need at least one (n, seconds) point")
    ns = [float(n) for n, _ in points]
    ts = [float(t) for _, t in points]
    k = len(points)
    mean_n, mean_t = sum(ns) / k, sum(ts) / k
    var_n = sum((n - mean_n) ** 2 for n in ns)
    a = sum((n - mean_n) * (t - mean_t) for n, t in zip(ns, ts)) / var_n if var_n else 0.0
    b = mean_t - a * mean_n
    if a < 0:
        return 0.0, max(mean_t, 0.0)
    if b < 0:
        return max(sum(n * t for n, t in zip(ns, ts)) / sum(n * n for n in ns), 0.0), 0.0
    return a, b


def saturation_point(points: Sequence[tuple[int, float]]) -> int:
    """Smallest measured `n` beyond which forward time per token falls by less than 10%.

    Below saturation a bigger batch is nearly free (time per token drops); past it every
    token costs the same. If the curve is still falling at the largest count, that count
    is returned: the device saturates there or later.
    """
    if not points:
        raise ValueError("need at least one (n, seconds) point")
    per_token = sorted((n, t / n) for n, t in points)
    return next(
        n for i, (n, p) in enumerate(per_token)
        if all(q >= (1 - SATURATION_TOLERANCE) * p for _, q in per_token[i + 1 :])
    )


def forward_figures(points: Sequence[tuple[int, float]]) -> dict[str, Any]:
    """The `CostModel` fields a forward measurement gives: the line, its points, the saturation point."""
    a, b = fit_linear(points)
    return {"fwd_per_token_s": a, "fwd_fixed_s": b, "fwd_points": tuple(sorted(points)),
            "saturation_tokens": saturation_point(points)}


def profile_forward(
    model: torch.nn.Module, token_counts: Sequence[int] | None = None, repeats: int = 3
) -> tuple[float, float]:
    """`(a, b)` of `T_fwd(n) = a*n + b` for `model` on its own device (seconds)."""
    return fit_linear(measure_forward(model, token_counts, repeats))


def profile_link(device: torch.device | str, nbytes: int | None = None, repeats: int = 3) -> float:
    """Host-link bandwidth in bytes/s, one direction (the slower of host->device and back).

    On CUDA the host side is pinned memory, as the host pool is. On CPU "device" and host
    pools are both RAM and a swap is a memory copy, so a CPU->CPU copy is the stand-in.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    nbytes = nbytes or (1 << 26 if cuda else 1 << 24)
    if nbytes < 1 or repeats < 1:
        raise ValueError(f"nbytes and repeats must be >= 1, got {nbytes}, {repeats}")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    directions = ((host, dev), (dev, host)) if cuda else ((host, dev),)  # on CPU both are one memcpy
    bandwidths = []
    for src, dst in directions:
        dst.copy_(src, non_blocking=cuda)  # warm-up
        fastest = math.inf
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=cuda)
            _sync(device)
            fastest = min(fastest, time.perf_counter() - t0)
        bandwidths.append(nbytes / max(fastest, 1e-9))
    return min(bandwidths)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _cache_file(model: torch.nn.Module, dtype: torch.dtype, device: torch.device, cache_dir: str | Path | None) -> Path:
    """One file per model identity (config class, name or path, config contents), dtype, device."""
    config = model.config
    config_json = json.dumps(config.to_dict(), sort_keys=True, default=str)
    key = json.dumps(
        [type(config).__name__, config.name_or_path, hashlib.sha256(config_json.encode()).hexdigest(),
         str(dtype), _device_name(device)]
    )
    root = Path(cache_dir or os.environ.get("INFERCEPT_CACHE_DIR") or Path.home() / ".cache" / "infercept_hf")
    return root / f"{type(config).__name__}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def _read_cache(path: Path) -> dict[str, float]:
    """Cached figures, or nothing if the file is missing, unreadable or from another version."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    measured = data.get("measured", {})
    figures = {k: v for k, v in measured.items() if k in MEASURED_FIELDS and isinstance(v, (int, float))}
    points = measured.get("fwd_points")
    if isinstance(points, list) and all(isinstance(p, list) and len(p) == 2 for p in points):
        figures["fwd_points"] = tuple((int(n), float(t)) for n, t in points)
    return figures


def _write_cache(path: Path, measured: dict[str, float], dtype: torch.dtype, device: torch.device) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(
        {"version": CACHE_VERSION, "dtype": str(dtype), "device": _device_name(device), "measured": measured},
        indent=2, sort_keys=True,
    ))
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one


def load_or_profile(
    model: torch.nn.Module,
    spec: ModelSpec | None = None,
    cache_dir: str | Path | None = None,
    **overrides: Any,
) -> CostModel:
    """The `CostModel` for `model` (with its `spec`, the engine's if it has one): overrides
    first, then the on-disk cache, then measurement.

    Any `CostModel` field can be overridden (e.g. `fwd_per_token_s=1e-4`). The forward pass
    is measured only when `fwd_per_token_s` or `fwd_fixed_s` is neither overridden nor
    cached, and the link only when `swap_bytes_per_s` is; new measurements are added to the
    cache. `saturation_tokens` comes from the forward measurement, else from
    `SATURATION_FALLBACK` for the device type.
    """
    unknown = set(overrides) - set(CostModel.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown cost model fields: {sorted(unknown)}")
    spec = spec or ModelSpec.of(model)
    dtype, device = spec.dtype, spec.device
    path = _cache_file(model, dtype, device, cache_dir)
    cached = _read_cache(path)
    known = {**cached, **overrides}
    measured: dict[str, float] = {}
    if any(f not in known for f in FORWARD_FIELDS):
        points = measure_forward(model, spec=spec)
        measured.update(forward_figures(points))
    if "swap_bytes_per_s" not in known:
        measured["swap_bytes_per_s"] = profile_link(device)
    if measured:
        _write_cache(path, {**cached, **measured}, dtype, device)
    figures = {**measured, **known}
    figures.setdefault("saturation_tokens", SATURATION_FALLBACK["cuda" if device.type == "cuda" else "cpu"])
    figures.setdefault("kv_bytes_per_token", spec.rank_kv_bytes_per_token)  # what this process's pool moves
    figures.setdefault("copies_overlap", device.type == "cuda")  # the swap pipeline's stream; CPU copies block
    return CostModel(**figures)
