"""infercept_hf: serve tool-calling LLMs on transformers without recomputing paused contexts.

An implementation of INFERCEPT (Abhyankar et al., ICML 2024): while a sequence waits for a
tool, its KV cache is preserved, swapped to host memory, or discarded and recomputed in
chunks, whichever wastes the least memory-time.
"""
from importlib import import_module
from typing import TYPE_CHECKING, Any

# name -> module: imported on first use, so that `infercept-bench --help` and other light
# entry points do not pay for torch and transformers (seconds) before doing anything
_EXPORTS = {
    "custom_generate": "api", "generate": "api", "InterceptPagedCache": "cache",
    "TensorParallelEngine": "distributed", "build_engine": "distributed", "InterceptEngine": "engine",
    "InterceptionRecord": "outputs", "RequestEvent": "outputs", "RequestResult": "outputs",
    "CostModel": "policy", "POLICIES": "policy", "UnsupportedModelError": "batch_runner", "Sampler": "sampling",
    "AsyncInterceptEngine": "serving", "Scripted": "tools", "Tool": "tools", "ToolCall": "tools",
    "CallRecord": "chat_tools", "FunctionTool": "chat_tools", "chat": "chat_tools", "function_tool": "chat_tools",
    "load_causal_lm": "loading", "PredictorSettings": "predictive",
}
# `ih.demo`: the bundled model, its tools and prompt format, loaded on first use too
_SUBMODULES = ("demo",)

if TYPE_CHECKING:
    from . import demo
    from .api import custom_generate, generate
    from .batch_runner import UnsupportedModelError
    from .cache import InterceptPagedCache
    from .chat_tools import CallRecord, FunctionTool, chat, function_tool
    from .distributed import TensorParallelEngine, build_engine
    from .engine import InterceptEngine
    from .loading import load_causal_lm
    from .outputs import InterceptionRecord, RequestEvent, RequestResult
    from .policy import POLICIES, CostModel
    from .predictive import PredictorSettings
    from .sampling import Sampler
    from .serving import AsyncInterceptEngine
    from .tools import Scripted, Tool, ToolCall


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module 'infercept_hf' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_SUBMODULES])


__version__ = "0.1.0"

__all__ = [
    "POLICIES",
    "AsyncInterceptEngine",
    "CallRecord",
    "CostModel",
    "FunctionTool",
    "InterceptEngine",
    "InterceptPagedCache",
    "InterceptionRecord",
    "PredictorSettings",
    "RequestEvent",
    "RequestResult",
    "Sampler",
    "Scripted",
    "TensorParallelEngine",
    "Tool",
    "ToolCall",
    "UnsupportedModelError",
    "build_engine",
    "chat",
    "custom_generate",
    "function_tool",
    "generate",
    "load_causal_lm",
]
