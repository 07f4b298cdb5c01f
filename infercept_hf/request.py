"""A request and its state machine.

    WAITING --admit--> RUNNING --trigger--> PAUSED --answer--> WAITING (to resume) --> RUNNING
       ^                  |                  (KV preserved | swapped | discarded,          |
       +---preempted------+                   or a mix: device head + host tail)           v
                                                                                       FINISHED

`tokens` is the one token log: prompt, generated tokens and appended answers, in order.
`num_cached` tokens at its front have KV in the cache (device head + host tail); whatever
lies past it, `tokens[num_cached:]`, is what the next forward passes over: a resumed
answer, a recomputed context, or the last sampled token. That count lives in the request's
`KVRecord`, which only the paged cache writes (`kv_ledger.py`).
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .kv_ledger import KVRecord
from .outputs import InterceptionRecord, RequestEvent, RequestResult
from .tools import PendingCall, Scripted, Segment, Tool


# Per-request telemetry in a result: memory waste by cause (bytes x seconds) and tokens computed again
# after a discard, which stats.py adds up as the request runs; KV bytes moved over the host link, from its KVRecord.
STATS_TELEMETRY_KEYS = ("waste_preserve", "waste_discard", "recomputed_tokens")
TELEMETRY_KEYS = (*STATS_TELEMETRY_KEYS, "swapped_bytes")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: the scheduler's `req in queue` scans must not compare token logs field by field
class Request:
    request_id: int
    tokens: list[int]
    prompt_len: int
    max_new_tokens: int
    arrival_time: float
    tools: tuple[Tool, ...] = ()
    scripted: Scripted | None = None
    eos_token_ids: frozenset[int] = frozenset()
    sampler: Any = None
    status: Status = Status.WAITING
    kv: KVRecord = field(default_factory=KVRecord)  # written by the cache that holds its blocks
    num_generated: int = 0
    segment_start: int = 0  # index into tokens where the current tool-free stretch began
    queue_key: float = 0.0  # ordering among waiting requests: arrival time, or re-queue time (vLLM-style)
    pending: PendingCall | None = None
    paused_at: float = 0.0
    strategy: str = ""
    waste: dict[str, float] = field(default_factory=dict)
    resume_pending_since: float | None = None  # answer arrived, next token not out yet
    finish_reason: str | None = None
    error: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    interceptions: list[InterceptionRecord] = field(default_factory=list)
    num_pauses: int = 0
    telemetry: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STATS_TELEMETRY_KEYS, 0))
    on_event: Callable[[RequestEvent], None] | None = None  # streaming: hears every token, tool event, the finish

    def __post_init__(self) -> None:
        self.queue_key = self.arrival_time
        self.segment_start = len(self.tokens)

    @cached_property
    def rid(self) -> str:
        """The key of this request in the paged cache's block tables (`request_id` never changes;
        cached because the scheduler and stats look it up many times per step)."""
        return str(self.request_id)

    @property
    def num_cached(self) -> int:
        return self.kv.computed

    @property
    def high_water(self) -> int:
        """Most tokens ever cached: anything below it computed again is recomputation."""
        return self.kv.high_water

    @property
    def uncached(self) -> int:
        return len(self.tokens) - self.num_cached

    @property
    def next_segment(self) -> Segment | None:
        """The next scripted interception, if any is left."""
        if self.scripted is None or self.num_pauses >= len(self.scripted):
            return None
        return self.scripted.segments[self.num_pauses]

    @property
    def segment_len(self) -> int:
        """`len(generated_since_resume())` without copying the tokens: checked after every token."""
        return len(self.tokens) - self.segment_start

    def generated_since_resume(self) -> list[int]:
        return self.tokens[self.segment_start :]

    def result(self) -> RequestResult:
        assert self.finish_reason is not None and self.finish_time is not None
        return RequestResult(
            request_id=self.request_id,
            prompt_len=self.prompt_len,
            token_ids=self.tokens[self.prompt_len :],
            num_generated=self.num_generated,
            finish_reason=self.finish_reason,
            error=self.error,
            arrival_time=self.arrival_time,
            first_token_time=self.first_token_time,
            finish_time=self.finish_time,
            token_times=list(self.token_times),
            interceptions=list(self.interceptions),
            telemetry={**self.telemetry, "swapped_bytes": self.kv.swapped_bytes},
            cached_tokens=self.kv.reused,
        )


@dataclass
class Chunk:
    """`length` tokens of one request's token log from position `start` (its cached length), for
    one forward: a decode is a chunk of 1; a prompt, a resumed answer or a recompute is longer."""

    request: Request
    start: int
    length: int

    @property
    def yields_token(self) -> bool:
        """A chunk that reaches the end of the token log yields the request's next token."""
        return self.start + self.length == len(self.request.tokens)
