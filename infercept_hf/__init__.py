"""infercept_hf: serve tool-calling LLMs on transformers without recomputing paused contexts.

An implementation of INFERCEPT (Abhyankar et al., ICML 2024): while a sequence waits for a
tool, its KV cache is preserved, swapped to host memory, or discarded and recomputed in
chunks, whichever wastes the least memory-time.
"""
from .api import custom_generate, generate
from .cache import InterceptPagedCache
from .chat_tools import CallRecord, FunctionTool, chat, function_tool
from .distributed import TensorParallelEngine, build_engine
from .engine import InterceptEngine
from .loading import load_causal_lm
from .outputs import InterceptionRecord, RequestEvent, RequestResult
from .policy import CostModel
from .runner import UnsupportedModelError
from .sampling import Sampler
from .scheduler import POLICIES
from .serving import AsyncInterceptEngine
from .tools import Scripted, Tool, ToolCall

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
