"""The OpenAI-compatible HTTP routes over a `Service`.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health   GET /metrics

Responses are built from the `openai` package's own types (`ChatCompletion`, `ChatCompletionChunk`,
`Completion`, `CompletionUsage`), as `transformers serve` builds them. A server tool's call and
result show in the stream as `server_tool_call` on the delta (and as `server_tool_calls` on a
non-streamed message): fields OpenAI clients keep as extras.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from openai.types import Completion, CompletionChoice, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.completion_usage import PromptTokensDetails

from ..patches.transformers_serve import sse
from .errors import APIError, bad_request
from .params import chat_request, completion_request
from .service import Service
from .turns import ServerCall, TextDelta, Turn, TurnEnd

logger = logging.getLogger(__name__)

CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"
ENDPOINTS = {CHAT_PATH: "chat", COMPLETIONS_PATH: "completions"}  # metrics labels
DISCONNECT_POLL_S = 0.25  # how often a non-streamed turn checks whether its client is still there


def build_app(service: Service) -> FastAPI:
    async def authorized(request: Request) -> None:
        """A dependency, not a middleware: Starlette's `BaseHTTPMiddleware` ends streamed responses
        early once the endpoint has read the body."""
        key = service.config.api_key
        if key is not None and request.headers.get("authorization") != f"Bearer {key}":
            raise APIError(401, "a valid API key is required (Authorization: Bearer ...)", code="invalid_api_key")

    app = FastAPI(title="infercept-serve", dependencies=[Depends(authorized)])
    generation_config = getattr(service.engine.model, "generation_config", None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status < 500:  # refused before it ran; a turn that ran counted itself
            service.metrics.request_done(_endpoint(request), "rejected")
        return exc.response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        service.metrics.request_done(_endpoint(request), "error")
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    health_app = FastAPI()  # /health answers without the key: load balancers probe it

    @health_app.get("/health")
    async def health() -> JSONResponse:
        if not service.healthy:
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        return JSONResponse({"status": "ok"})

    app.router.routes.extend(health_app.router.routes)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": service.config.model_name, "object": "model", "created": 0, "owned_by": "infercept_hf"}]})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = await asyncio.to_thread(service.render_metrics)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post(CHAT_PATH)
    async def chat_completions(request: Request) -> Response:
        req = chat_request(await _body(request), request.headers, generation_config)
        prompt = service.render_chat(req.messages, req.tools)
        return await _serve_turn(service, request, ENDPOINTS[CHAT_PATH], prompt, req.turn, req.tools,
                                 _ChatFormatter())

    @app.post(COMPLETIONS_PATH)
    async def completions(request: Request) -> Response:
        req = completion_request(await _body(request), request.headers, generation_config)
        prompt = service.encode(req.prompt)
        echo = service.tokenizer.decode(prompt) if req.echo else ""
        return await _serve_turn(service, request, ENDPOINTS[COMPLETIONS_PATH], prompt, req.turn, [],
                                 _TextFormatter(echo))

    return app


def _endpoint(request: Request) -> str:
    """The `endpoint` label of a request's metrics."""
    return ENDPOINTS.get(request.url.path, request.url.path.strip("/"))


async def _body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


async def _serve_turn(service: Service, request: Request, endpoint: str, prompt: list[int], params: Any,
                      tools: list[dict], formatter: _Formatter) -> Response:
    service.admit()
    try:
        turn = await service.start_turn(prompt, params, tools, chat=endpoint == ENDPOINTS[CHAT_PATH])
    except BaseException:
        service.release()
        raise
    formatter.start(service.config.model_name, params.include_usage)
    if params.stream:
        return StreamingResponse(_stream(service, endpoint, turn, formatter), media_type="text/event-stream")
    try:
        pieces = await _collect(turn, request)
    except BaseException:
        service.abandon(turn)
        service.end_turn(turn, endpoint, "cancelled")
        raise
    finally:
        service.release()
    end = pieces[-1]
    service.end_turn(turn, endpoint, end.finish_reason)
    if end.finish_reason == "error":
        raise APIError(500, f"generation failed: {end.error}", type="server_error")
    if end.finish_reason == "cancelled":
        raise APIError(503, "the server stopped the request", type="server_error")
    return JSONResponse(formatter.whole(pieces, turn))


async def _collect(turn: Turn, request: Request) -> list[Any]:
    """All of a turn's pieces; a client that goes away meanwhile cancels it."""
    async def drain() -> list[Any]:
        return [piece async for piece in turn.pieces()]

    task = asyncio.ensure_future(drain())
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise asyncio.CancelledError("the client disconnected")


async def _stream(service: Service, endpoint: str, turn: Turn, formatter: _Formatter) -> AsyncIterator[str]:
    outcome = "cancelled"
    try:
        yield sse(formatter.opening())
        async for piece in turn.pieces():
            if isinstance(piece, TurnEnd):
                outcome = piece.finish_reason
                if piece.finish_reason in ("error", "cancelled"):
                    yield sse(json.dumps(APIError(500, f"generation {piece.finish_reason}: {piece.error}",
                                                  type="server_error").body()))
                else:
                    for chunk in formatter.closing(piece, turn):
                        yield sse(chunk)
            else:
                chunk = formatter.chunk(piece)
                if chunk is not None:
                    yield sse(chunk)
        yield sse("[DONE]")
    finally:  # also when the client went away: the generator is closed early
        service.abandon(turn)
        service.end_turn(turn, endpoint, outcome)
        service.release()


def _usage(turn: Turn) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=turn.prompt_tokens, completion_tokens=turn.completion_tokens,
                           total_tokens=turn.prompt_tokens + turn.completion_tokens,
                           prompt_tokens_details=PromptTokensDetails(cached_tokens=turn.cached_tokens))


class _Formatter(ABC):
    """Pieces of a turn as one endpoint's response objects."""

    id_prefix = "cmpl"

    def start(self, model: str, include_usage: bool) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    @abstractmethod
    def opening(self) -> Any:
        """The first streamed chunk."""

    @abstractmethod
    def chunk(self, piece: TextDelta | ServerCall) -> Any:
        """A streamed chunk for one piece (None: nothing to send)."""

    @abstractmethod
    def closing(self, end: TurnEnd, turn: Turn) -> list[Any]:
        """The last streamed chunks: calls, the finish reason, usage when asked for."""

    @abstractmethod
    def whole(self, pieces: list[Any], turn: Turn) -> dict:
        """The non-streamed response."""


class _ChatFormatter(_Formatter):
    id_prefix = "chatcmpl"

    def _chunk(self, delta: dict | None, finish_reason: str | None = None,
               usage: CompletionUsage | None = None) -> ChatCompletionChunk:
        choices = [] if delta is None else [ChunkChoice(index=0, delta=ChoiceDelta.model_validate(delta),
                                                        finish_reason=finish_reason)]
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, object="chat.completion.chunk",
                                   choices=choices, usage=usage)

    def opening(self) -> ChatCompletionChunk:
        return self._chunk({"role": "assistant", "content": ""})

    def chunk(self, piece: TextDelta | ServerCall) -> ChatCompletionChunk:
        if isinstance(piece, TextDelta):
            return self._chunk({"content": piece.text})
        return self._chunk({"server_tool_call": {k: v for k, v in piece._asdict().items() if v not in (None, "")}})

    def closing(self, end: TurnEnd, turn: Turn) -> list[ChatCompletionChunk]:
        out = []
        if end.tool_calls:
            out.append(self._chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(end.tool_calls)]}))
        out.append(self._chunk({}, end.finish_reason))
        if self.include_usage:
            out.append(self._chunk(None, usage=_usage(turn)))
        return out

    def whole(self, pieces: list[Any], turn: Turn) -> dict:
        end = pieces[-1]
        content = "".join(p.text for p in pieces if isinstance(p, TextDelta))
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if end.tool_calls else "")}
        if end.tool_calls:
            message["tool_calls"] = end.tool_calls
        server_calls = [p._asdict() for p in pieces if isinstance(p, ServerCall) and p.result is not None]
        if server_calls:
            message["server_tool_calls"] = server_calls
        completion = ChatCompletion(id=self.id, created=self.created, model=self.model, object="chat.completion",
                                    choices=[Choice(index=0, message=ChatCompletionMessage.model_validate(message),
                                                    finish_reason=end.finish_reason)], usage=_usage(turn))
        return completion.model_dump(exclude_none=True)


class _TextFormatter(_Formatter):
    def __init__(self, echo: str) -> None:
        self.echo = echo

    def _completion(self, text: str, finish_reason: str | None, usage: CompletionUsage | None = None) -> Completion:
        # streamed chunks carry finish_reason None until the last; the type insists on a value, hence construct
        choice = CompletionChoice.model_construct(index=0, text=text, finish_reason=finish_reason, logprobs=None)
        return Completion.model_construct(id=self.id, created=self.created, model=self.model, object="text_completion",
                                          choices=[choice] if text is not None else [], usage=usage)

    def opening(self) -> Completion:
        return self._completion(self.echo, None)

    def chunk(self, piece: TextDelta | ServerCall) -> Completion | None:
        return self._completion(piece.text, None) if isinstance(piece, TextDelta) else None

    def closing(self, end: TurnEnd, turn: Turn) -> list[Completion]:
        out = [self._completion("", end.finish_reason)]
        if self.include_usage:
            out.append(self._completion(None, None, _usage(turn)))
        return out

    def whole(self, pieces: list[Any], turn: Turn) -> dict:
        text = self.echo + "".join(p.text for p in pieces if isinstance(p, TextDelta))
        return Completion(id=self.id, created=self.created, model=self.model, object="text_completion",
                          choices=[CompletionChoice(index=0, text=text, finish_reason=pieces[-1].finish_reason)],
                          usage=_usage(turn)).model_dump(exclude_none=True)
