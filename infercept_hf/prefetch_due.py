"""Swapped paused requests in the order their prefetches fall due, so a step never walks the paused set.

A swapped call's prefetch falls due at `paused_at + q - T_swap(host tokens) - step` (`prefetch.
prefetch_start`), where `q` is its tool's prefetch quantile: a figure every call of the tool shares
and that moves whenever the tool answers. So each tool keeps its calls sorted by the part that is
theirs alone, `paused_at - T_swap(host tokens)`, and the calls due at `now` are a prefix of each
tool's list: those whose key is at most `now + step - q`. (Oracle mode: each call's own duration is
its quantile, so all calls share one list keyed by `paused_at + duration - T_swap(host tokens)`.)

Keys are set when a call's KV goes to host (its host blocks only grow then); when host KV is
dropped instead the stored key is smaller than the true one, which only makes the call show up
early: readers recompute each candidate's exact start and re-key it (`rekey`), so what the index
yields is a superset of the due calls and no decision depends on its bookkeeping.
"""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator

from .request import Request

ORACLE_GROUP = None  # the one list of oracle mode (tool names are strings)


class PrefetchDue:
    """Per group, `(key, request id)` ascending, and each member's entry."""

    def __init__(self) -> None:
        self._groups: dict[str | None, list[tuple[float, int]]] = {}
        self._entry: dict[int, tuple[str | None, float, Request]] = {}

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._entry

    def __len__(self) -> int:
        return len(self._entry)

    def put(self, req: Request, group: str | None, key: float) -> None:
        """File `req` (again) under `group` with `key`."""
        self.remove(req.request_id)
        self._entry[req.request_id] = (group, key, req)
        bisect.insort(self._groups.setdefault(group, []), (key, req.request_id))

    def remove(self, request_id: int) -> None:
        entry = self._entry.pop(request_id, None)
        if entry is None:
            return
        group, key, _ = entry
        members = self._groups[group]
        del members[bisect.bisect_left(members, (key, request_id))]
        if not members:
            del self._groups[group]

    def groups(self) -> list[str | None]:
        return list(self._groups)

    def members(self, group: str | None, above: float | None = None) -> Iterator[tuple[float, Request]]:
        """`(key, request)` of `group` ascending, from the first key above `above` (from the first
        when None). Lazy: read as far as needed, and change the index only after reading."""
        members = self._groups.get(group, [])
        i = 0 if above is None else bisect.bisect_right(members, (above, float("inf")))
        for key, request_id in itertools.islice(members, i, None):
            yield key, self._entry[request_id][2]
