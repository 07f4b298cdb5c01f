"""What the engine hands back: small immutable records, cheap to copy across threads."""
from __future__ import annotations

from typing import NamedTuple


class InterceptionRecord(NamedTuple):
    """One pause of one request, as it happened.

    Times are seconds on the engine's clock (`time.monotonic()` by default, or the simulator's
    virtual clock), never stepping back even if that clock does. `waste` holds the
    figures the policy compared when it chose `strategy` (bytes x seconds, keyed by strategy name).
    `calls` holds a chat-format pause's calls (`chat_tools.CallRecord`: name, parsed arguments, result
    text, seconds), in call order; empty for `Tool` and `Scripted` pauses.
    """

    tool: str
    call: str
    paused_at: float
    returned_at: float | None
    resumed_at: float | None
    strategy: str
    answer_len: int
    waste: dict[str, float]
    error: str | None = None
    calls: tuple = ()

    @property
    def tool_seconds(self) -> float:
        """Time spent inside the tool (excluded from the paper's normalized latency)."""
        return 0.0 if self.returned_at is None else self.returned_at - self.paused_at


class RequestResult(NamedTuple):
    """A finished request.

    `token_ids` holds what came after the prompt: generated tokens and appended tool answers,
    in order. `token_times[i]` is when the i-th *generated* token came out.
    """

    request_id: int
    prompt_len: int
    token_ids: list[int]
    num_generated: int
    finish_reason: str  # "length" | "stop" | "cancelled" | "error"
    error: str | None  # with "error": what failed (the tool, the tokenizer, the sampler...) and why
    arrival_time: float
    first_token_time: float | None
    finish_time: float
    token_times: list[float]
    interceptions: list[InterceptionRecord]
    telemetry: dict[str, float] | None = None  # request.TELEMETRY_KEYS: waste_preserve / waste_discard (byte-s), recomputed_tokens, swapped_bytes
    cached_tokens: int = 0  # context tokens whose KV came from shared or retained blocks instead of a forward

    @property
    def tool_seconds(self) -> float:
        return sum(i.tool_seconds for i in self.interceptions)

    @property
    def normalized_latency(self) -> float:
        """(end-to-end latency - time inside tools) / generated tokens, as the INFERCEPT paper defines it."""
        e2e = self.finish_time - self.arrival_time - self.tool_seconds
        return e2e / max(1, self.num_generated)


class RequestEvent(NamedTuple):
    """Something that happened to one request, delivered in order to its `on_event` callback.

    kind "token": `token_ids` is the generated token; "tool_call": the request paused at `tool`
    with call `text`; "tool_answer": `token_ids` were appended (`error` set when an error text
    stood in for the answer); "finish": the last event, with the request's `result`.
    """

    request_id: int
    kind: str
    token_ids: tuple[int, ...] = ()
    tool: str | None = None
    text: str | None = None
    error: str | None = None
    result: RequestResult | None = None
