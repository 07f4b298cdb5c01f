"""`infercept-bench agents` (or `python -m infercept_hf.bench.agents`): an agent mix whose sessions share a system prompt and tool schemas.

Every session of one agent starts with the same prefix (system prompt + tool schemas), then its
own user message; each turn decodes, calls a tool, and gets back the tool's answer followed by
the user's next message (appended tokens, as any tool answer), so every turn starts with the
whole previous turn. The engine runs with prefix sharing on and off, beside transformers'
continuous batching (its prefix cache on; each turn a new request carrying the whole context).

Reported per contender: computed prompt tokens (every token a forward processed that was not a
just-sampled token fed back: prompts, answers, recomputation), mean TTFT, completed requests/s.

    infercept-bench agents --sessions 16 --prefix 512 --turns 4 --out out/agents
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine import InterceptEngine
from ..outputs import RequestResult
from ..tools import Scripted
from .hf_peer import run_hf_cb
from .jobs import EngineSettings, Job
from .policy_runs import replay, sleep_until
from .workloads import TraceRequest

CONTENDERS = ("sharing-on", "sharing-off", "hf-cb")


def agent_jobs(sessions: int, prefix_len: int, turns: int, user_len: int, answer_len: int, decode_len: int,
               pause_s: float, gap_s: float, vocab_size: int, seed: int = 0) -> list[Job]:
    """One job per session, arriving `gap_s` apart: shared prefix + own user message, then `turns`
    tool calls whose answers carry the tool's result and the next user message."""
    for name, value in (("sessions", sessions), ("prefix_len", prefix_len), ("turns", turns),
                        ("user_len", user_len), ("decode_len", decode_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    rng = np.random.default_rng(seed)

    def ids(n: int) -> list[int]:
        return rng.integers(1, vocab_size, size=n).tolist()

    prefix = ids(prefix_len)
    jobs = []
    for s in range(sessions):
        prompt = prefix + ids(user_len)
        segments = [(decode_len, pause_s, ids(answer_len + user_len)) for _ in range(turns)]
        req = TraceRequest(s, s * gap_s, "agent", len(prompt), [(n, p, len(a)) for n, p, a in segments], decode_len)
        jobs.append(Job(req, prompt, Scripted(segments, name="agent"), req.max_new_tokens))
    return jobs


def computed_prompt_tokens(forward_tokens: int, results: Sequence[RequestResult]) -> int:
    """Forward tokens less the sampled tokens fed back (each generated token but a request's last)."""
    return forward_tokens - sum(max(0, r.num_generated - 1) for r in results)


def summarize(name: str, results: Sequence[RequestResult], duration: float, forward_tokens: int) -> dict[str, Any]:
    done = [r for r in results if r.finish_reason == "length"]
    return {
        "contender": name,
        "completed": len(done),
        "computed_prompt_tokens": computed_prompt_tokens(forward_tokens, results),
        "cached_tokens": sum(r.cached_tokens for r in results),
        "ttft_ms": 1000 * statistics.fmean(r.first_token_time - r.arrival_time for r in done) if done else None,
        "req_per_s": len(done) / duration if duration > 0 else 0.0,
        "duration_s": duration,
    }


def run_contender(name: str, model: torch.nn.Module, jobs: Sequence[Job], settings: EngineSettings,
                  policy: str) -> dict[str, Any]:
    if name == "hf-cb":
        results, _, duration, stats = run_hf_cb(model, jobs, settings)
        return summarize(name, results, duration, stats["forward_tokens"])
    engine = InterceptEngine(model, policy=policy, num_blocks=settings.num_blocks, block_size=settings.block_size,
                             max_batch_tokens=settings.max_batch_tokens, cost_model=settings.cost_model,
                             clock=time.perf_counter, prefix_sharing=name == "sharing-on")
    try:
        results, _, duration = replay(engine, jobs, time.perf_counter, sleep_until)
        stats = engine.stats()
        engine.cache.check_integrity()
    finally:
        engine.close()
    out = summarize(name, results, duration, stats["forward_tokens"])
    out["prefix_hit_tokens"] = stats["prefix_hit_tokens"]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infercept-bench agents", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (random Llama), demo, smollm2, or a transformers id/path")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--prefix", type=int, default=512, help="shared system prompt + tool schema tokens")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--user", type=int, default=16, help="tokens of each user message")
    p.add_argument("--answer", type=int, default=16, help="tokens of each tool result")
    p.add_argument("--decode", type=int, default=16, help="tokens generated per turn")
    p.add_argument("--pause", type=float, default=0.05, help="seconds each tool call takes")
    p.add_argument("--gap", type=float, default=0.1, help="seconds between session starts")
    p.add_argument("--policy", default="min-waste")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--num-blocks", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=512)
    p.add_argument("--out", default="bench_out/agents")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    contenders = args.contenders.split(",")
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    from ..profiler import load_or_profile
    from .models import load_model

    torch.set_num_threads(1)
    model, label = load_model(args.model)
    jobs = agent_jobs(args.sessions, args.prefix, args.turns, args.user, args.answer, args.decode, args.pause,
                      args.gap, model.config.vocab_size)
    settings = EngineSettings(num_blocks=args.num_blocks, block_size=args.block_size,
                              max_batch_tokens=args.max_batch_tokens, cost_model=load_or_profile(model))
    rows = []
    for name in contenders:
        rows.append(run_contender(name, model, jobs, settings, args.policy))
        print(json.dumps(rows[-1]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "agents.json").write_text(json.dumps({"model": label, "args": vars(args), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
