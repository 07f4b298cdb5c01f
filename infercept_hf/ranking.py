"""Queue order by predicted remaining work, with aging: who `predictive` admits first.

Serving the request with the least work left first lowers the mean latency the most (shortest
job first); a request's cost to the others is the device memory it holds times the time it
holds it, so work is counted in token-iterations: a request with `C` tokens of context and `n`
tokens left to generate holds about `(C + n/2) * n` of them. The tokens left come from its
`max_new_tokens` (what a caller tells us; later tool calls are not foreseen).

Shortest first alone starves long requests under a steady stream of short ones, so a waiting
request's key shrinks with its wait: `work / (1 + waited / aging_s)`. A newcomer's key is at
least its own work (>= 1), so a request that has waited `aging_s * (work - 1)` seconds is ahead
of every later arrival: nobody waits for ever.

A request resuming after a tool goes ahead of every other, whatever its work: it mostly still
holds its KV (kept on the device or swapped to host) while it waits, memory nobody else can
use, where a new request holds none; shortest first among all would leave long resumed requests
holding pools full while short arrivals pass, until host copies are dropped and recomputed
(INFERCEPT keeps a resumed request's place in the queue for the same reason).
"""
from __future__ import annotations

DEFAULT_AGING_S = 2.0


def predicted_work(context_tokens: int, tokens_left: int) -> float:
    """`(C + n/2) * n`, at least 1: KV token-iterations a request still holds until it ends."""
    if context_tokens < 0 or tokens_left < 0:
        raise ValueError(f"token counts must be >= 0, got {context_tokens!r}, {tokens_left!r}")
    return max(1.0, (context_tokens + tokens_left / 2) * tokens_left)


def rank_key(work: float, waited_s: float, aging_s: float) -> float:
    """The queue key (smallest first): `work / (1 + waited_s / aging_s)`."""
    if not aging_s > 0:
        raise ValueError(f"aging_s must be > 0, got {aging_s!r}")
    return work / (1 + max(waited_s, 0.0) / aging_s)


def starvation_bound_s(work: float, aging_s: float) -> float:
    """Wait after which a request of `work` ranks ahead of any request that arrives later."""
    return aging_s * max(work - 1.0, 0.0)
