"""infercept_hf: serve tool-calling LLMs on transformers without recomputing paused contexts.

An implementation of INFERCEPT (Abhyankar et al., ICML 2024): while a sequence waits for a
tool, its KV cache is preserved, swapped to host memory, or discarded and recomputed in
chunks, whichever wastes the least memory-time.
"""
import importlib
from typing import Any

from .api import custom_generate, generate
from .cache import InterceptPagedCache
from .distributed import TensorParallelEngine, build_engine
from .engine import InterceptEngine
from .outputs import InterceptionRecord, RequestEvent, RequestResult
from .policy import POLICIES, CostModel
from .batch_runner import UnsupportedModelError
from .sampling import Sampler
from .serving import AsyncInterceptEngine
from .tools import Scripted, Tool, ToolCall

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`ih.demo` (the bundled model, its tools and prompt format) is imported on first use:
    it loads the demo's tool code, which `import infercept_hf` alone does not need."""
    if name == "demo":
        return importlib.import_module(".demo", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "POLICIES",
    "AsyncInterceptEngine",
    "CostModel",
    "InterceptEngine",
    "InterceptPagedCache",
    "InterceptionRecord",
    "RequestEvent",
    "RequestResult",
    "Sampler",
    "Scripted",
    "TensorParallelEngine",
    "Tool",
    "ToolCall",
    "UnsupportedModelError",
    "build_engine",
    "custom_generate",
    "generate",
]
