"""Request bodies in, checked parameters out: the boundary where malformed input becomes a 400.

Bodies are validated against the `openai` package's own request types (the schemas real
clients are written against), so a wrong type names its field; fields a type does not know
(`prompt_cache_key`, `cache_salt`, vendor extensions) are ignored, as clients expect.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params
from pydantic import TypeAdapter, ValidationError
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from ..sampling import Sampler
from .errors import bad_request

DEFAULT_MAX_TOKENS = 256  # when a request names none (and the context has room for them)
SESSION_HEADERS = ("x-session-id", "session_id", "session-id")

_CHAT = TypeAdapter(chat_create_params.CompletionCreateParamsBase)
_COMPLETION = TypeAdapter(completion_create_params.CompletionCreateParamsBase)


@dataclass(frozen=True)
class TurnParams:
    """What one request asks of its turn, whatever the endpoint."""

    max_tokens: int | None  # None: DEFAULT_MAX_TOKENS, or what room the context leaves
    stop: tuple[str, ...]
    sampler: Sampler | None  # None: greedy
    stream: bool
    include_usage: bool
    session_key: str | None  # prompt_cache_key, X-Session-ID or user: breaks ties between held contexts
    call_required: bool = False  # tool_choice "required" or a named function: the turn opens with a call
    call_name: str | None = None  # tool_choice naming a function: the call is to it
    parallel_calls: bool = True  # parallel_tool_calls=false: the turn ends at the first call's close


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]  # the client's tools (JSON schemas); empty with tool_choice "none"
    turn: TurnParams


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str | list[int]
    echo: bool
    turn: TurnParams


def _validated(adapter: TypeAdapter, body: Any, iterables: tuple[str, ...]) -> dict[str, Any]:
    """The body checked against an openai request type; its iterable fields (lazy in pydantic) are
    drawn into lists here so that a bad message is refused now, naming where it is."""
    if not isinstance(body, Mapping):
        raise bad_request("the request body must be a JSON object")
    try:
        params = dict(adapter.validate_python(dict(body)))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise bad_request(f"invalid request: {where}: {err['msg']}", param=where) from None
    for name in iterables:
        if params.get(name) is None or isinstance(params[name], str):
            continue
        try:
            params[name] = [dict(x) if isinstance(x, Mapping) else x for x in params[name]]
        except ValidationError as exc:  # a union of item types: say what each alternative missed, briefly
            errors = exc.errors()
            where = f"{name}.{errors[0]['loc'][0]}"
            reasons = list(dict.fromkeys(f"{'.'.join(map(str, e['loc'][2:])) or 'value'}: {e['msg']}" for e in errors))
            message = f"invalid request: {where} is malformed ({'; '.join(reasons[:4])})"
            raise bad_request(message, param=where) from None
    return params


def _turn(params: dict[str, Any], body: Mapping[str, Any], headers: Mapping[str, str],
          generation_config: Any) -> TurnParams:
    n = params.get("n")
    if n is not None and n != 1:
        raise bad_request(f"n={n} is not supported: this server returns one choice per request (n=1)", param="n")
    max_tokens = params.get("max_completion_tokens") or params.get("max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    stop = params.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(s for s in stop if s)
    stream = body.get("stream")  # in the openai types, only the streaming / non-streaming variants hold it
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"stream must be true or false, got {stream!r}", param="stream")
    options = params.get("stream_options") or {}
    key = body.get("prompt_cache_key") or next((headers[h] for h in SESSION_HEADERS if h in headers), None)
    return TurnParams(max_tokens, stop, _sampler(params, generation_config), bool(stream),
                      bool(options.get("include_usage")), key or params.get("user"))


def _sampler(params: dict[str, Any], generation_config: Any) -> Sampler | None:
    """temperature 0 is greedy; unset temperature and top_p follow the model's generation config."""
    temperature, top_p = params.get("temperature"), params.get("top_p")
    if temperature is not None and not 0 <= temperature <= 2:
        raise bad_request(f"temperature must be in [0, 2], got {temperature}", param="temperature")
    if top_p is not None and not 0 < top_p <= 1:
        raise bad_request(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    if temperature == 0:
        return None
    if temperature is None and top_p is None:
        if not getattr(generation_config, "do_sample", False):
            return None
        temperature, top_p = generation_config.temperature, generation_config.top_p
    processors = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(float(temperature)))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(float(top_p)))
    return Sampler(processors or None, do_sample=True, seed=params.get("seed"))


def chat_request(body: Any, headers: Mapping[str, str], generation_config: Any) -> ChatRequest:
    params = _validated(_CHAT, body, ("messages", "tools", "stop"))
    if not params["messages"]:
        raise bad_request("messages must hold at least one message", param="messages")
    tools = [dict(t) for t in params.get("tools") or []]
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise bad_request(f"tools[{i}]: only function tools are supported, got type {tool.get('type')!r}",
                              param=f"tools.{i}.type")
    choice = params.get("tool_choice")
    if choice == "none":
        tools = []
    if isinstance(choice, Mapping) and choice.get("type") != "function":
        raise bad_request(f"tool_choice of type {choice.get('type')!r} is not supported: use \"none\", \"auto\", "
                          "\"required\" or a function by name", param="tool_choice")
    name = choice["function"]["name"] if isinstance(choice, Mapping) else None
    turn = replace(_turn(params, body, headers, generation_config), call_name=name,
                   call_required=choice == "required" or name is not None,
                   parallel_calls=params.get("parallel_tool_calls") is not False)
    return ChatRequest(params["messages"], tools, turn)


def completion_request(body: Any, headers: Mapping[str, str], generation_config: Any) -> CompletionRequest:
    params = _validated(_COMPLETION, body, ("stop",))
    prompt = params["prompt"]
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        pass
    elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    elif not isinstance(prompt, str):
        raise bad_request("prompt must be one string or one list of token ids (batches are not supported)",
                          param="prompt")
    if not prompt:
        raise bad_request("prompt is empty", param="prompt")
    return CompletionRequest(prompt, bool(params.get("echo")), _turn(params, body, headers, generation_config))
