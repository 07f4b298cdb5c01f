"""Python functions as tools: their JSON schema, their options, and how a worker runs a call.

A plain function (type hints and a Google-style docstring, as transformers' chat templates
need) is described by `transformers.utils.get_json_schema`; `function_tool(fn, ...)` adds the
per-tool options `Tool` has (`on_error`, `timeout`, `expected_duration`). Each becomes a
worker `Tool` whose `ToolCall.text` is the call's arguments as JSON, so calls run on the
engine's tool workers with the same timeout and error handling as every other tool.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers.utils import get_json_schema

from ..tools import Tool, ToolCall


_RUNNING = threading.local()


def current_call() -> ToolCall | None:
    """Inside a function tool (on its worker thread): the call it runs for, e.g. its
    `request_id` for per-request state; None elsewhere."""
    return getattr(_RUNNING, "call", None)


@dataclass(frozen=True)
class FunctionTool:
    """A Python function the model calls through its chat format, with `Tool`'s options."""

    fn: Callable[..., Any]
    on_error: str = "answer"
    timeout: float | None = None
    expected_duration: float | None = None
    schema: dict = field(init=False, compare=False)
    worker: Tool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"a tool must be an infercept_hf.Tool or a function, got {type(self.fn).__name__}")
        try:
            schema = get_json_schema(self.fn)
        except Exception as exc:  # transformers raises several types; all mean "cannot describe it"
            name = getattr(self.fn, "__name__", repr(self.fn))
            raise ValueError(f"tool function {name!r} cannot be described as a JSON schema ({exc}); give it type "
                             "hints and a Google-style docstring with an Args: section") from exc
        object.__setattr__(self, "schema", schema)
        # `end` is never matched: chat calls are found by the response template, not by a trigger.
        worker = Tool(name=self.name, end=self.name, fn=self._run, timeout=self.timeout, on_error=self.on_error,
                      expected_duration=self.expected_duration)
        object.__setattr__(self, "worker", worker)

    @property
    def name(self) -> str:
        return self.schema["function"]["name"]

    def _run(self, call: ToolCall) -> str:
        """On a worker thread: the call's arguments (JSON in `call.text`) into the function; the
        result as the text of the `tool` message (JSON for anything but a string)."""
        _RUNNING.call = call
        try:
            result = self.fn(**json.loads(call.text))
        finally:
            _RUNNING.call = None
        return result if isinstance(result, str) else json.dumps(result)


def function_tool(fn: Callable[..., Any], *, on_error: str = "answer", timeout: float | None = None,
                  expected_duration: float | None = None) -> FunctionTool:
    """A function as a tool with options: `on_error="fail"` ends the request when the call raises,
    is malformed or names no tool, instead of answering the model with the error."""
    return FunctionTool(fn, on_error=on_error, timeout=timeout, expected_duration=expected_duration)


def split_tools(tools: Sequence[Any] | None) -> tuple[tuple[Tool, ...], tuple[FunctionTool, ...]]:
    """`tools=` as given (Tool objects, functions, FunctionTools) -> (trigger tools, function tools).

    Names must be unique across both kinds: a call is routed by name."""
    triggers: list[Tool] = []
    functions: list[FunctionTool] = []
    for t in tools or ():
        if isinstance(t, Tool):
            triggers.append(t)
        elif isinstance(t, FunctionTool):
            functions.append(t)
        elif callable(t):
            functions.append(FunctionTool(t))
        else:
            raise TypeError(f"tools must be infercept_hf.Tool objects or functions, got {type(t).__name__}")
    names = [t.name for t in triggers] + [f.name for f in functions]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"two tools share the name {', '.join(map(repr, repeated))}; tool names must be unique")
    return tuple(triggers), tuple(functions)
