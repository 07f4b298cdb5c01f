"""A request paused at the end of a turn, waiting for its caller's next one.

An OpenAI-style client ends a turn at a tool call (or an answer) and comes back later with the
whole transcript. Pausing the request there, instead of finishing it, keeps its KV under the
same policies as any tool pause: the caller's gap plays the tool's duration (`tool_name` keys
its estimate), and `InterceptEngine.continue_request` resumes it with the caller's next prompt.
A caller that never comes back is dropped at `deadline`: the request then fails and frees its blocks.
"""
from __future__ import annotations

from .tools import Answer, PendingCall


class AwaitingCaller(PendingCall):
    """Answered only by `InterceptEngine.continue_request`; expires at `deadline` (engine clock)."""

    def __init__(self, tool_name: str, started_at: float, deadline: float, call_text: str = "") -> None:
        super().__init__(tool_name, call_text, started_at, None)
        self.deadline = deadline

    def poll(self, now: float) -> Answer | None:
        if now < self.deadline:
            return None
        return Answer("", error=f"the caller did not come back within {self.deadline - self.started_at:g} s", fail=True)

    def next_check(self, now: float) -> float | None:
        return self.deadline
