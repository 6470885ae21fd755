"""Debounce per category, then cut the pending files into batches.

A category flushes when its pending count has reached the upload threshold and no new file has
arrived for the quiet time. A steady stream cannot hold a flush back for longer than the maximum
delay, counted from the moment the threshold was reached; and a category past its threshold with
a full batch pending sends its full batches at once, the quiet time applying to the tail (a
camera station's stream reaches the server within a batch's worth of files). The clock is
passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass
class _CategoryClock:
    last_arrival: float
    threshold_since: float | None = None
    # Its full batches went early: the tail goes after the quiet time, whatever its count.
    tail_owed: bool = False


class Debouncer:
    """Decides when each category's pending files go to the uploader."""

    def __init__(
        self, *, threshold: int, quiet_time: float, max_delay: float, clock: Callable[[], float]
    ) -> None:
        self.threshold = threshold
        self.quiet_time = quiet_time
        self.max_delay = max_delay
        self._clock = clock
        self._categories: dict[str, _CategoryClock] = {}

    def arrived(self, category: str) -> None:
        """A new file became pending in ``category``: the quiet time starts again."""
        now = self._clock()
        entry = self._categories.get(category)
        if entry is None:
            self._categories[category] = _CategoryClock(last_arrival=now)
        else:
            entry.last_arrival = now

    def ready(self, pending: Mapping[str, int], *, force: bool = False) -> list[str]:
        """The categories that should flush now, given ``category -> pending count``.

        With ``force`` every category with a pending file flushes (``--once``).
        """
        now = self._clock()
        result = []
        for category, count in pending.items():
            if count <= 0:
                continue
            if force:
                result.append(category)
                continue
            entry = self._categories.setdefault(category, _CategoryClock(last_arrival=now))
            if count < self.threshold and not entry.tail_owed:
                entry.threshold_since = None
                continue
            if entry.threshold_since is None:
                entry.threshold_since = now
            quiet = now - entry.last_arrival >= self.quiet_time
            overdue = now - entry.threshold_since >= self.max_delay
            if quiet or overdue:
                result.append(category)
        return result

    def full_batches(self, pending: Mapping[str, int], batch_size: int) -> dict[str, int]:
        """Categories past the threshold with at least one full batch pending, and how many
        files their full batches hold (the rest waits for the quiet time)."""
        return {
            category: count - count % batch_size
            for category, count in pending.items()
            if count >= self.threshold and count >= batch_size
        }

    def sent_early(self, category: str) -> None:
        """``category``'s full batches were handed over: its tail waits for quiet, no more."""
        entry = self._categories.get(category)
        if entry is not None:
            entry.tail_owed = True

    def flushed(self, category: str) -> None:
        """``category`` was handed to the uploader; its delay clock starts over."""
        entry = self._categories.get(category)
        if entry is not None:
            entry.threshold_since = None
            entry.tail_owed = False

    def next_deadline(self, pending: Mapping[str, int]) -> float | None:
        """The earliest clock time at which ``ready`` could change its answer, or None."""
        deadlines = []
        for category, count in pending.items():
            entry = self._categories.get(category)
            if entry is None or (count < self.threshold and not entry.tail_owed):
                continue
            deadline = entry.last_arrival + self.quiet_time
            if entry.threshold_since is not None:
                deadline = min(deadline, entry.threshold_since + self.max_delay)
            deadlines.append(deadline)
        return min(deadlines) if deadlines else None

    def needed(self, count: int) -> int:
        """How many more files a category with ``count`` pending needs to reach the threshold."""
        return max(0, self.threshold - count)


def batches(items: Sequence[T], size: int) -> list[list[T]]:
    """``items`` cut into lists of at most ``size``, in order."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
