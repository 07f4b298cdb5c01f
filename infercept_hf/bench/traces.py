"""Traces on disk: our JSONL form, and the INFERCEPT reference benchmark's JSON form.

JSONL: one request per line, `{"request_id", "arrival_s", "kind", "prompt_len",
"segments": [[n_tokens, pause_s, answer_len], ...], "final_tokens"}` (docs/WORKLOADS.md).

Reference form (what WukLab/InferCept's `final_tput_bench_real.py` reads): a JSON object
mapping a request key to its list of segments `{"prompt_tokens", "completion_tokens",
"api_time", "api_token_length"}`. The benchmark reads `prompt_tokens` of the first segment
only (the prompt it sends); later ones are ignored at run time, and we write the context
length at the start of that segment, the prompt an engine without interception support
would re-send. A segment without `api_time`/`api_token_length`, or with both 0, makes no call.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .workloads import TraceRequest, poisson_arrivals

FIELDS = ("request_id", "arrival_s", "kind", "prompt_len", "segments", "final_tokens")
REFERENCE_KIND = "reference"


def save_jsonl(path: str | Path, requests: Iterable[TraceRequest]) -> None:
    """One line per request; the dataclass's fields are the schema (`FIELDS`, in the same order)."""
    with open(path, "w", encoding="utf-8") as f:
        for req in requests:
            f.write(json.dumps(asdict(req)) + "\n")


def _int(value: Any, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{label} must be an integer, got {value!r}")
    return value


def _number(value: Any, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{label} must be a finite number, got {value!r}")
    return float(value)


def _from_dict(obj: Any) -> TraceRequest:
    if not isinstance(obj, dict):
        raise ValueError(f"a request must be a JSON object, got {type(obj).__name__}")
    missing = [f for f in FIELDS if f not in obj]
    if missing:
        raise ValueError(f"field {missing[0]!r} is missing")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise ValueError(f"field {unknown[0]!r} is not part of the schema {list(FIELDS)}")
    if not isinstance(obj["kind"], str):
        raise ValueError(f"field 'kind' must be a string, got {obj['kind']!r}")
    if not isinstance(obj["segments"], list):
        raise ValueError(f"field 'segments' must be a list, got {obj['segments']!r}")
    segments = []
    for i, seg in enumerate(obj["segments"]):
        if not isinstance(seg, list) or len(seg) != 3:
            raise ValueError(f"field 'segments[{i}]' must be [n_tokens, pause_s, answer_len], got {seg!r}")
        segments.append(
            tuple(f(seg[j], f"field 'segments[{i}][{j}]'") for j, f in enumerate((_int, _number, _int)))
        )
    return TraceRequest(
        _int(obj["request_id"], "field 'request_id'"),
        _number(obj["arrival_s"], "field 'arrival_s'"),
        obj["kind"],
        _int(obj["prompt_len"], "field 'prompt_len'"),
        segments,
        _int(obj["final_tokens"], "field 'final_tokens'"),
    )


def load_jsonl(path: str | Path) -> list[TraceRequest]:
    """Read and validate a trace; a bad line raises ValueError naming the line and the field."""
    out: list[TraceRequest] = []
    seen: set[int] = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                req = _from_dict(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            except ValueError as e:
                raise ValueError(f"{path} line {lineno}: {e}") from None
            if req.request_id in seen:
                raise ValueError(f"{path} line {lineno}: field 'request_id' repeats {req.request_id}")
            seen.add(req.request_id)
            out.append(req)
    return out


def to_reference(requests: Iterable[TraceRequest]) -> dict[str, list[dict[str, Any]]]:
    """The reference benchmark's form, keyed by request id; arrival times and kinds have no place in it."""
    out: dict[str, list[dict[str, Any]]] = {}
    for req in requests:
        context = req.prompt_len
        segments = []
        for n, p, a in req.segments:
            segments.append({"prompt_tokens": context, "completion_tokens": n, "api_time": p, "api_token_length": a})
            context += n + a
        segments.append({"prompt_tokens": context, "completion_tokens": req.final_tokens})
        out[str(req.request_id)] = segments
    return out


def _reference_request(key: str, segments: Any) -> tuple[int, list[tuple[int, float, int]], int]:
    """(prompt_len, segments, final_tokens) of one reference entry."""
    if not isinstance(segments, list) or not segments:
        raise ValueError(f"request {key!r}: must be a non-empty list of segments")
    prompt_len = 0
    ours: list[tuple[int, float, int]] = []
    pending = 0
    for i, seg in enumerate(segments):
        where = f"request {key!r} segment {i}"
        if not isinstance(seg, dict):
            raise ValueError(f"{where}: must be an object, got {seg!r}")
        for field in ("prompt_tokens", "completion_tokens") if i == 0 else ("completion_tokens",):
            if field not in seg:
                raise ValueError(f"{where}: field {field!r} is missing (text-only segments need tokenizing first)")
        if i == 0:
            prompt_len = _int(seg["prompt_tokens"], f"{where} field 'prompt_tokens'")
        completion = _int(seg["completion_tokens"], f"{where} field 'completion_tokens'")
        if ("api_time" in seg) != ("api_token_length" in seg):
            raise ValueError(f"{where}: fields 'api_time' and 'api_token_length' come together")
        api_time = _number(seg.get("api_time", 0), f"{where} field 'api_time'")
        api_len = _int(seg.get("api_token_length", 0), f"{where} field 'api_token_length'")
        if completion < 0 or api_time < 0 or api_len < 0:
            raise ValueError(f"{where}: token counts and api_time must be >= 0")
        pending += completion
        if api_time == 0 and api_len == 0:
            continue
        ours.append((max(1, pending), api_time, api_len))
        pending = 0
    return max(1, prompt_len), ours, max(1, pending)


def from_reference(
    data: dict[str, Any], qps: float, seed: int, kind: str = REFERENCE_KIND
) -> list[TraceRequest]:
    """Requests from the reference form, in key order, with ids 0, 1, ... and Poisson arrivals.

    Decoded tokens of a segment that makes no call join the next segment, as the reference
    engine decodes straight through it; a call needs at least one decoded token before it,
    and a request at least one after its last call (the reference then ends the request).
    """
    if not isinstance(data, dict):
        raise ValueError(f"the reference form is a JSON object of request -> segments, got {type(data).__name__}")
    arrivals = poisson_arrivals(len(data), qps, seed)
    out = []
    for i, (key, segments) in enumerate(data.items()):
        prompt_len, ours, final_tokens = _reference_request(key, segments)
        out.append(TraceRequest(i, arrivals[i], kind, prompt_len, ours, final_tokens))
    return out


def save_reference(path: str | Path, requests: Iterable[TraceRequest]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_reference(requests), f)


def load_reference(path: str | Path, qps: float, seed: int, kind: str = REFERENCE_KIND) -> list[TraceRequest]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    return from_reference(data, qps, seed, kind)
