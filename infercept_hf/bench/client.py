"""Client mode: replay multi-turn agent sessions against any OpenAI-compatible server.

Each trace request becomes one session: its prompt is the first user message; each tool call
ends a turn (`max_tokens` = the tokens the workload decodes before the call), the client then
waits the call's duration (think / tool time, `--time-scale` applies) and sends the whole
transcript back with the answer as the next message; the last turn decodes the final tokens.
So the six workloads' call patterns arrive as client-side tool turns, the way agents drive
servers. Text lengths are in words from a fixed list of short English words (about one token
each for BPE tokenizers, several for character-level ones): the figures come from the
server's own `usage`.

Reported per turn: time to first token (first streamed delta with text), the turn's latency,
prompt / cached / completion tokens; per run: sessions/s, the paper's normalized latency
(session latency without client time, per generated token) and the cached share of the prompt
tokens of turns 2 and later, the share the server did not compute again.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np

from .workloads import TraceRequest

WORDS = ("the", "and", "for", "you", "not", "are", "all", "new", "was", "can", "has", "one", "day", "get", "use",
         "man", "way", "she", "how", "now", "old", "see", "two", "who", "boy", "did", "its", "let", "put", "say",
         "too", "top", "red", "sun", "sea", "car", "dog", "cat", "map", "box")


@dataclass
class TurnRecord:
    session: int
    turn: int
    ttft_s: float | None
    latency_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class SessionRecord:
    session: int
    arrival_s: float
    finished_s: float | None = None
    client_s: float = 0.0  # time spent in tools / thinking, the client's
    turns: list[TurnRecord] = field(default_factory=list)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


def session_plan(req: TraceRequest, turns: int | None, turn_tokens: int | None,
                 seed: int) -> tuple[str, list[tuple[int, float, str]]]:
    """(first message, [(max_tokens, client seconds after the turn, next message)]): the last entry's
    seconds and message are unused. `turns` cuts or repeats the workload's calls to that many turns;
    `turn_tokens` replaces the workload's decode lengths."""
    rng = random.Random(f"{seed}-{req.request_id}")
    segments = list(req.segments)
    if turns is not None:
        segments = [segments[i % len(segments)] for i in range(turns - 1)] if segments else []
    plan = [(turn_tokens or n, pause, _words(rng, answer)) for n, pause, answer in segments]
    return _words(rng, req.prompt_len), [*plan, (turn_tokens or req.final_tokens, 0.0, "")]


async def _turn(client: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int,
                record: TurnRecord, key: str | None) -> str:
    """One streamed turn; fills `record` and returns the assistant's text."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if key is not None:  # OpenAI's session hint; a strict server (transformers serve) refuses unknown fields
        body["prompt_cache_key"] = key
    start = time.monotonic()
    text: list[str] = []
    async with client.stream("POST", "/chat/completions", json=body) as response:
        if response.status_code != 200:
            record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return ""
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                record.error = str(chunk["error"])[:200]
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if (delta.get("content") or delta.get("tool_calls")) and record.ttft_s is None:
                    record.ttft_s = time.monotonic() - start
                text.append(delta.get("content") or "")
            if usage := chunk.get("usage"):
                record.prompt_tokens = usage.get("prompt_tokens", 0)
                record.completion_tokens = usage.get("completion_tokens", 0)
                record.cached_tokens = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    record.latency_s = time.monotonic() - start
    return "".join(text)


async def _session(client: httpx.AsyncClient, model: str, req: TraceRequest, record: SessionRecord,
                   turns: int | None, turn_tokens: int | None, seed: int, t0: float, cache_key: bool) -> None:
    """Fills `record` as the session goes (a replay cut at its deadline keeps what was done)."""
    await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.monotonic()))
    first, plan = session_plan(req, turns, turn_tokens, seed)
    messages = [{"role": "user", "content": first}]
    for i, (max_tokens, pause_s, answer) in enumerate(plan):
        turn = TurnRecord(req.request_id, i + 1, None, 0.0, 0, 0, 0)
        record.turns.append(turn)
        try:
            key = f"session-{req.request_id}" if cache_key else None
            reply = await _turn(client, model, messages, max_tokens, turn, key)
        except httpx.HTTPError as exc:
            turn.error = f"{type(exc).__name__}: {exc}"
        if turn.error is not None:
            return
        if i == len(plan) - 1:
            break
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": answer}]
        record.client_s += pause_s
        await asyncio.sleep(pause_s)
    record.finished_s = time.monotonic() - t0


async def replay(base_url: str, trace: Sequence[TraceRequest], turns: int | None = None,
                 turn_tokens: int | None = None, seed: int = 0, api_key: str | None = None,
                 timeout_s: float = 300.0, model: str | None = None, cache_key: bool = True,
                 deadline_s: float | None = None) -> tuple[list[SessionRecord], float]:
    """Every session of `trace` against the server at `base_url` (…/v1); returns them and the wall time.
    `model`: the name to ask for (default: the first the server lists). At `deadline_s` the sessions
    still going are stopped: they count as unfinished, with the turns they completed."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=len(trace) + 4)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s, limits=limits) as client:
        if model is None:
            model = (await client.get("/models")).json()["data"][0]["id"]
        t0 = time.monotonic()
        records = [SessionRecord(r.request_id, r.arrival_s) for r in trace]
        tasks = [asyncio.ensure_future(_session(client, model, r, rec, turns, turn_tokens, seed, t0, cache_key))
                 for r, rec in zip(trace, records)]
        _, unfinished = await asyncio.wait(tasks, timeout=deadline_s)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        for rec in records:  # a turn cut short by the deadline is no measurement
            rec.turns = [t for t in rec.turns if t.latency_s > 0 or t.error is not None]
        return records, time.monotonic() - t0


def _median(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if values else None


def summarize(sessions: Sequence[SessionRecord], wall_s: float) -> dict[str, Any]:
    turns = [t for s in sessions for t in s.turns]
    later = [t for t in turns if t.turn > 1 and t.error is None]
    first = [t for t in turns if t.turn == 1 and t.error is None]
    done = [s for s in sessions if s.finished_s is not None]
    norm = [sum(t.latency_s for t in s.turns) / max(1, sum(t.completion_tokens for t in s.turns)) for s in done]
    prompt_later = sum(t.prompt_tokens for t in later)
    return {
        "sessions": len(sessions), "sessions_completed": len(done), "turns": len(turns),
        "turn_errors": sum(t.error is not None for t in turns), "wall_s": wall_s,
        "sessions_per_s": len(done) / wall_s if wall_s else None,
        "ttft_turn1_median_s": _median([t.ttft_s for t in first if t.ttft_s is not None]),
        "ttft_later_median_s": _median([t.ttft_s for t in later if t.ttft_s is not None]),
        "normalized_latency_mean_s": float(np.mean(norm)) if norm else None,
        "cached_share_later": sum(t.cached_tokens for t in later) / prompt_later if prompt_later else None,
        "prompt_tokens_later": prompt_later,
    }


def run_client(base_url: str, trace: Sequence[TraceRequest], turns: int | None, turn_tokens: int | None, seed: int,
               api_key: str | None, timeout_s: float, model: str | None, cache_key: bool,
               deadline_s: float | None) -> dict[str, Any]:
    sessions, wall = asyncio.run(replay(base_url, trace, turns, turn_tokens, seed, api_key, timeout_s, model,
                                        cache_key, deadline_s))
    return {"summary": summarize(sessions, wall), "sessions": [asdict(s) for s in sessions]}


def markdown(summary: dict[str, Any], base_url: str) -> str:
    def cell(key: str, fmt: str) -> str:
        value = summary.get(key)
        return "-" if value is None else fmt.format(value)

    rows = [("sessions completed", f"{summary['sessions_completed']}/{summary['sessions']}"),
            ("turn errors", str(summary["turn_errors"])),
            ("sessions/s", cell("sessions_per_s", "{:.3f}")),
            ("TTFT median, turn 1 (s)", cell("ttft_turn1_median_s", "{:.3f}")),
            ("TTFT median, turns 2+ (s)", cell("ttft_later_median_s", "{:.3f}")),
            ("normalized latency mean (s/token)", cell("normalized_latency_mean_s", "{:.4f}")),
            ("cached share of turn 2+ prompt tokens", cell("cached_share_later", "{:.1%}"))]
    return "\n".join([f"# infercept-bench client: {base_url}", "", "| figure | value |", "|---|---|",
                      *(f"| {k} | {v} |" for k, v in rows)]) + "\n"
