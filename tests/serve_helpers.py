"""Start `infercept-serve`'s app on loopback with the bundled model, for the server tests."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import openai
import torch

import infercept_hf as ih
from infercept_hf.demo import demo_model
from infercept_hf.serve import BackgroundServer, ServeConfig, Service, build_app

from conftest import TEST_COST

CALCULATOR_SCHEMA = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
TIMEOUT_S = 60.0

SLOW_TOOL_S = 1.5
_MODEL = None


def lookup(query: str) -> str:
    """Look a fact up, slowly: keeps a request in flight inside the server for a while.

    Args:
        query: What to look up.
    """
    time.sleep(SLOW_TOOL_S)
    return "Lima"


def bundled():
    global _MODEL
    if _MODEL is None:
        _MODEL = demo_model()[:2]
    return _MODEL


@contextlib.contextmanager
def serving(policy: str = "min-waste", server_tools: Sequence[Callable] = (), num_blocks: int = 64,
            **config) -> Iterator[tuple[Service, BackgroundServer, openai.OpenAI]]:
    model, tok = bundled()
    engine = ih.InterceptEngine(model, tokenizer=tok, policy=policy, num_blocks=num_blocks, block_size=8,
                                host_pool_bytes=1 << 20, cost_model=TEST_COST)
    service = Service(engine, tok, ServeConfig(**config), [ih.FunctionTool(f) for f in server_tools])
    try:
        with BackgroundServer(build_app(service)) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key=config.get("api_key") or "-", max_retries=0,
                                   timeout=TIMEOUT_S)
            yield service, server, client
    finally:
        service.close()


def reference(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain transformers, greedy, up to and including the first EOS."""
    model, tok = bundled()
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def idle_and_empty(service: Service) -> bool:
    """No request left and no block held, checked under the engine's lock."""
    engine = service.engine
    with engine._lock:
        if engine._requests:
            return False
        engine.cache.check_integrity()
        return engine.cache.is_empty()
