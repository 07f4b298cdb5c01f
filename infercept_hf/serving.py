"""asyncio front end for servers: one background thread drives the engine, coroutines stream.

    engine = InterceptEngine(model, tokenizer=tok, num_blocks=1024)
    async with AsyncInterceptEngine(engine) as aengine:
        async for event in aengine.stream(prompt_ids, max_new_tokens=64, tools=[calc]):
            if event.kind == "token":
                send(event.token_ids[0])
        result = await aengine.generate(prompt_ids, max_new_tokens=64)

Nothing here blocks the event loop: requests are added on a worker thread (the engine lock
may be held by a step), events come back through `loop.call_soon_threadsafe`, and a consumer
that stops early (`break`, task cancelled, client gone) cancels its request, which frees its
blocks at once.

A failure of one request ends that stream only (its last event is a "finish" whose result has
`finish_reason="error"`). A step that raises (a transient device error) is retried; only a step
that keeps raising fails every open stream.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from .engine import IDLE_POLL_S, InterceptEngine
from .outputs import RequestEvent, RequestResult

Listener = Callable[[RequestEvent | BaseException], None]

logger = logging.getLogger(__name__)

MAX_STEP_FAILURES = 3  # consecutive raising steps before the driver gives up on the engine


class AsyncInterceptEngine:
    """Drives `engine.step()` on a daemon thread from construction until `close()`."""

    def __init__(self, engine: InterceptEngine) -> None:
        if engine.closed:
            raise RuntimeError("the InterceptEngine is closed; create a new one")
        self.engine = engine
        self._stop = threading.Event()
        self._listeners: set[Listener] = set()
        self._listeners_lock = threading.Lock()
        self._failure: BaseException | None = None
        self._driver = threading.Thread(target=self._drive, name="infercept-driver", daemon=True)
        self._driver.start()

    # ------------------------------------------------------------------ consumer side
    async def stream(self, prompt_ids: Any, **kwargs: Any) -> AsyncIterator[RequestEvent]:
        """Add a request (`InterceptEngine.add_request` arguments) and yield its events as they
        happen; the last one has kind "finish" and the result. Leaving early cancels the request."""
        self._check_running()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[RequestEvent | BaseException] = asyncio.Queue()

        def deliver(item: RequestEvent | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # the consumer's loop has closed: nobody to tell
                loop.call_soon_threadsafe(events.put_nowait, item)

        with self._listeners_lock:
            self._listeners.add(deliver)
        adding = loop.run_in_executor(None, functools.partial(self.engine.add_request, prompt_ids, on_event=deliver, **kwargs))
        finished = False
        try:
            await asyncio.shield(adding)  # a consumer cancelled meanwhile still learns the id, to cancel it
            while not finished:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise RuntimeError("the engine's driver thread failed") from item
                finished = item.kind == "finish"
                yield item
        finally:
            with self._listeners_lock:
                self._listeners.discard(deliver)
            if not finished:  # the consumer left early: cancel the request, now or once it is added
                adding.add_done_callback(lambda f: f.cancelled() or f.exception() or self._cancel_soon(f.result()))

    async def generate(self, prompt_ids: Any, **kwargs: Any) -> RequestResult:
        """Run one request to its end and return its result (cancelled if this coroutine is)."""
        async with contextlib.aclosing(self.stream(prompt_ids, **kwargs)) as events:
            async for event in events:
                if event.result is not None:
                    return event.result
        raise AssertionError("a request's events always end with its result")  # pragma: no cover

    # ------------------------------------------------------------------ driver side
    def _drive(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                if self.engine.has_unfinished():
                    try:
                        self.engine.step()
                        failures = 0
                    except Exception:
                        if self.engine.closed:
                            return  # closed under us is a normal way to stop
                        failures += 1
                        if failures >= MAX_STEP_FAILURES:
                            raise
                        logger.warning("engine step failed (%d in a row); retrying", failures, exc_info=True)
                        self._stop.wait(IDLE_POLL_S * failures)
                        continue
                self.engine.wait_for_work(IDLE_POLL_S)
        except RuntimeError as exc:
            if not self.engine.closed:
                self._fail_everyone(exc)
        except BaseException as exc:
            self._fail_everyone(exc)

    def _fail_everyone(self, exc: BaseException) -> None:
        """The engine cannot step any more: every open stream raises rather than waits forever."""
        self._failure = exc
        with self._listeners_lock:
            listeners = list(self._listeners)
        for deliver in listeners:
            deliver(exc)

    def _cancel_soon(self, request_id: int) -> None:
        """Cancel without blocking the event loop: the engine lock may be held by a step."""
        def cancel() -> None:
            with contextlib.suppress(RuntimeError):  # closed meanwhile: already freed
                self.engine.cancel(request_id)

        threading.Thread(target=cancel, name="infercept-cancel", daemon=True).start()

    @property
    def failed(self) -> bool:
        """The driver gave up on the engine (a step kept raising): no stream can run any more."""
        return self._failure is not None

    def _check_running(self) -> None:
        if self._failure is not None:
            raise RuntimeError("the engine's driver thread failed") from self._failure
        if self._stop.is_set() or self.engine.closed:
            raise RuntimeError("the AsyncInterceptEngine is closed")

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop the driver and close the engine: open streams end with a "cancelled" result."""
        self._stop.set()
        self.engine.close()
        self._driver.join()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    async def __aenter__(self) -> AsyncInterceptEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
