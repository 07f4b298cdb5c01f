"""The worker threads that run tool functions, and the pending call each one answers."""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .checks import as_token_ids
from .faults import describe, safe_repr
from .tools import Answer, PendingCall, Tool, ToolCall


class ToolFuture(PendingCall):
    """A tool function running on a worker thread, with its timeout and error policy.

    `started_at` is when the request paused (what the duration estimate measures); the
    timeout counts from `running_since`, when a worker took the call up, so a call that
    waited for a free worker is not charged for the wait.
    """

    def __init__(self, tool: Tool, call: ToolCall, pool: ToolPool) -> None:
        super().__init__(tool.name, call.text, call.started_at, tool.expected_duration)
        self.tool = tool
        self.call = call
        self.future: Future[Any] = Future()
        self.abandoned = False
        self.running_since: float | None = None  # on the engine's clock; set on the engine's thread
        self._pool = pool
        self._on_start: list[Callable[[], None]] = []

    def on_change(self, callback: Callable[[], None]) -> None:
        self._on_start.append(callback)
        self.future.add_done_callback(lambda _f: callback())

    def started(self) -> None:
        """A worker took the call up (the pool tells, under its lock)."""
        for callback in self._on_start:
            callback()

    def poll(self, now: float) -> Answer | None:
        if self.future.done():
            return self._outcome()
        if self.running_since is None and self.future.running():
            self.running_since = now  # a worker took it up since the last poll
        if self.tool.timeout is not None and self.running_since is not None \
                and now - self.running_since >= self.tool.timeout:
            self.abandon()
            return self._error(f"tool {self.tool.name!r} timed out after {self.tool.timeout:g} s")
        return None

    def next_check(self, now: float) -> float | None:
        if self.future.done():
            return now
        if self.tool.timeout is None or self.running_since is None:
            return None
        return self.running_since + self.tool.timeout

    def abandon(self) -> None:
        self._pool.abandon(self)

    def _outcome(self) -> Answer:
        """The answer, or the error standing in for it. Never raises: the tool's exception or
        value may be hostile (a `__str__` or `__repr__` that raises)."""
        exc = self.future.exception()
        if exc is not None:
            return self._error(f"tool {self.tool.name!r} raised {describe(exc)}")
        value = self.future.result()
        if isinstance(value, str):
            return Answer(value)
        try:
            if isinstance(value, (list, tuple)):
                return Answer(as_token_ids(value, "answer"))
        except Exception:  # noqa: BLE001 - any element that is not an id makes it the wrong type
            pass
        msg = f"tool {self.tool.name!r} returned {type(value).__name__} ({safe_repr(value)}), expected str or list[int]"
        return Answer("", error=msg, fail=True)

    def _error(self, msg: str) -> Answer:
        return Answer(f"[error: {msg}]", error=msg, fail=self.tool.on_error == "fail")


class ToolPool:
    """Runs each tool call on its own daemon thread, at most `max_workers` calls at once.

    Not a ThreadPoolExecutor: a call abandoned on timeout or cancel may never return, and a pool
    would lose that worker for good (then join it at interpreter exit and hang shutdown). Here an
    abandoned call hands its slot to the next queued call at once; its thread is left to finish
    on its own, and its answer is dropped.
    """

    def __init__(self, max_workers: int = 8) -> None:
        if max_workers < 1:
            raise ValueError(f"max_tool_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers
        self._queue: deque[ToolFuture] = deque()
        self._holding: set[ToolFuture] = set()  # calls that occupy a slot
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, tool: Tool, call: ToolCall) -> ToolFuture:
        """Queue the call; one that starts at once is running from `call.started_at`."""
        pending = ToolFuture(tool, call, self)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._queue.append(pending)
            self._start_queued()
        if pending.future.running() or pending.future.done():
            pending.running_since = call.started_at
        return pending

    def abandon(self, pending: ToolFuture) -> None:
        with self._lock:
            pending.abandoned = True
            pending.future.cancel()  # succeeds only while it is still queued
            self._release(pending)

    def close(self) -> None:
        """Abandon every call: queued ones never start, running ones are left to their threads."""
        with self._lock:
            self._closed = True
            for pending in [*self._queue, *self._holding]:
                pending.abandoned = True
                pending.future.cancel()
            self._queue.clear()
            self._holding.clear()

    @property
    def busy(self) -> int:
        """Calls holding a worker slot right now."""
        with self._lock:
            return len(self._holding)

    def _start_queued(self) -> None:
        while self._queue and len(self._holding) < self.max_workers and not self._closed:
            pending = self._queue.popleft()
            if pending.abandoned or not pending.future.set_running_or_notify_cancel():
                continue
            self._holding.add(pending)
            pending.started()
            name = f"infercept-tool-{pending.tool.name}"
            threading.Thread(target=self._run, args=(pending,), name=name, daemon=True).start()

    def _run(self, pending: ToolFuture) -> None:
        try:
            result = pending.tool.fn(pending.call)
        except BaseException as exc:  # noqa: BLE001 - whatever the tool does becomes its request's answer
            pending.future.set_exception(exc)
        else:
            pending.future.set_result(result)
        finally:
            with self._lock:
                self._release(pending)

    def _release(self, pending: ToolFuture) -> None:
        if pending in self._holding:
            self._holding.discard(pending)
            self._start_queued()
