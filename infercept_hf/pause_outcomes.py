"""What became of the contexts min-waste kept on the device at their pause.

Keeping a context at its pause costs nothing when it resumes before anyone needs its blocks
(a tool that answers at once), but when admissions run short first, `Scheduler._evict_paused`
pulls it out in pieces just as the room is wanted: the blocks are overwritten at once, so its
return copies the whole context back, where a copy made at the pause would have left the
device blocks readable until reused. Which case a workload is in shows in what happened to
the contexts paused so far: this keeps the recent share of them that lost device blocks before
they resumed (an exponentially weighted mean, O(1) memory beyond the contexts still paused),
and `policy.swap_at_pause` reads it. A kept context counts when an eviction takes its blocks or
when it resumes untouched; a context copied out at its pause counts when it comes back: its
device blocks overwritten meanwhile (the copy back moved bytes), it would have been evicted had
it stayed. So the evidence keeps coming whichever way the pauses go, and the share falls again
when the workload changes.
"""
from __future__ import annotations

DEFAULT_ALPHA = 0.25  # three evictions in a row from no evidence cross one half


class PauseOutcomes:
    def __init__(self, alpha: float = DEFAULT_ALPHA) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.alpha = alpha
        self.evicted_share = 0.0  # no evidence yet: keep, as a tool that answers at once wants
        self._kept: set[str] = set()
        self._swapped: set[str] = set()

    def kept(self, rid: str) -> None:
        """The request paused and its context stayed on the device."""
        self._kept.add(rid)

    def evicted(self, rid: str) -> bool:
        """An eviction took device blocks of the request; True when it was one kept at its pause."""
        if rid not in self._kept:
            return False
        self._kept.discard(rid)
        self._note(1.0)
        return True

    def resumed(self, rid: str) -> None:
        """The request resumed, no eviction having touched it since its pause."""
        if rid in self._kept:
            self._kept.discard(rid)
            self._note(0.0)

    def swapped(self, rid: str) -> None:
        """The request paused and its context was copied to host at once, its device blocks left named."""
        self._swapped.add(rid)

    def swapped_back(self, rid: str, copied: bool) -> None:
        """A context copied out at its pause came back: `copied` when its device blocks had been
        reused meanwhile and bytes crossed the link again, which keeping it would not have spared."""
        if rid in self._swapped:
            self._swapped.discard(rid)
            self._note(1.0 if copied else 0.0)

    def forget(self, rid: str) -> None:
        """The request left while paused (cancelled), or its host copy was dropped: no outcome."""
        self._kept.discard(rid)
        self._swapped.discard(rid)

    def _note(self, outcome: float) -> None:
        self.evicted_share += self.alpha * (outcome - self.evicted_share)
