"""`infercept-serve [MODEL]`: the OpenAI-compatible server from the command line.

    infercept-serve                                   # the bundled demo model, offline
    infercept-serve smollm2 --policy min-waste --port 8000
    infercept-serve path/to/model.gguf --tools mypkg.tools:search,mypkg.tools:fetch --api-key sk-local
"""
from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Sequence
from typing import Any

import uvicorn

from ..chat_tools import FunctionTool
from ..engine import InterceptEngine
from ..loading import load_causal_lm
from ..scheduler import POLICIES
from .app import build_app
from .service import ServeConfig, Service

BUNDLED = "infercept-demo"


def load_tools(spec: str | None) -> list[FunctionTool]:
    """`pkg.module:fn,pkg.module:other` -> the functions as server tools."""
    tools = []
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        module, sep, name = item.partition(":")
        if not sep or not module or not name:
            raise SystemExit(f"--tools: {item!r} is not of the form pkg.module:function")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise SystemExit(f"--tools: cannot load {item!r}: {exc}") from exc
        tools.append(fn if isinstance(fn, FunctionTool) else FunctionTool(fn))
    return tools


def load_model(spec: str | None) -> tuple[Any, Any, str]:
    """(model, tokenizer, served name); no MODEL: the bundled demo model."""
    if spec is None:
        from ..demo.model import ASSET_DIR

        model, tokenizer = load_causal_lm(str(ASSET_DIR))
        return model, tokenizer, BUNDLED
    model, tokenizer = load_causal_lm(spec)
    return model, tokenizer, spec


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="infercept-serve", description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="a folder, a GGUF file, a hub id or 'smollm2' (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--policy", default="min-waste", choices=POLICIES, help="(default: %(default)s)")
    p.add_argument("--tools", help="server-side tools, comma-separated pkg.module:function")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--num-blocks", type=int, help="device KV blocks (default: sized from free memory)")
    p.add_argument("--block-size", type=int, help="tokens per KV block")
    p.add_argument("--host-pool-mb", type=int, help="host memory for swapped KV, MiB")
    p.add_argument("--max-batch-tokens", type=int, default=256, help="tokens per iteration (default: %(default)s)")
    p.add_argument("--session-ttl", type=float, default=ServeConfig.session_ttl_s,
                   help="seconds a held context waits for its client's next turn (default: %(default)s)")
    p.add_argument("--max-sessions", type=int, default=ServeConfig.max_sessions,
                   help="held contexts at most (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=ServeConfig.max_queue,
                   help="requests in flight beyond which the server answers 429 (default: %(default)s)")
    p.add_argument("--log-level", default="info", help="(default: %(default)s)")
    return p.parse_args(argv)


def build_service(args: argparse.Namespace) -> Service:
    model, tokenizer, name = load_model(args.model)
    engine = InterceptEngine(model, tokenizer=tokenizer, policy=args.policy, num_blocks=args.num_blocks,
                             block_size=args.block_size,
                             host_pool_bytes=None if args.host_pool_mb is None else args.host_pool_mb << 20,
                             max_batch_tokens=args.max_batch_tokens)
    config = ServeConfig(model_name=name, api_key=args.api_key, session_ttl_s=args.session_ttl,
                         max_sessions=args.max_sessions, max_queue=args.max_queue)
    return Service(engine, tokenizer, config, load_tools(args.tools))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    service = build_service(args)
    try:
        uvicorn.run(build_app(service), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        service.close()
