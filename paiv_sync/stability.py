"""The stability gate: a file counts only once it has stopped changing.

A path enters the gate when an event or a scan mentions it. It is settled when two looks at its
size and mtime, at least ``settle_time`` apart on the local monotonic clock, agree. The pipeline
re-checks a settled file after hashing it, so a write that starts during hashing is caught too.
The gate holds only the paths not yet settled; it does no I/O of its own (the stat is passed in).
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable
from dataclasses import dataclass

StatFn = Callable[[str], os.stat_result]

# Seconds an mtime must lie in the past, beyond the settle time, to count as already settled.
CLOCK_SKEW_ALLOWANCE = 30.0


@dataclass
class _Watch:
    size: int
    mtime_ns: int
    since: float  # when this size and mtime were first seen


@dataclass(frozen=True)
class Settled:
    """A path whose size and mtime held still for the settle time."""

    path: str
    size: int
    mtime_ns: int


class StabilityGate:
    """Tracks paths until they settle.

    ``offer`` adds or refreshes a path; ``due`` returns the paths that settled (and forgets
    them) and reports paths that vanished through ``on_gone``.
    """

    def __init__(
        self,
        settle_time: float,
        clock: Callable[[], float],
        stat: StatFn = os.stat,
        wall: Callable[[], float] | None = None,
    ) -> None:
        self._settle = settle_time
        self._clock = clock
        self._wall = wall
        self._stat = stat
        self._watches: dict[str, _Watch] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._watches)

    def __contains__(self, path: object) -> bool:
        return path in self._watches

    def offer(self, path: str, size: int, mtime_ns: int) -> None:
        """Start (or continue) watching ``path`` whose current stat is ``size``/``mtime_ns``."""
        now = self._clock()
        watch = self._watches.get(path)
        if watch is None:
            since = now
            if (
                self._wall is not None
                and self._wall() - mtime_ns / 1e9 >= self._settle + CLOCK_SKEW_ALLOWANCE
            ):
                # Not written for a good while already (its mtime says so): one more look, at
                # once, settles it, so a start-up or --once over old files does not wait. The
                # allowance covers a file server whose clock lags ours (NFS, SMB), where a file
                # still being written could otherwise look old.
                since = now - self._settle
            self._watches[path] = _Watch(size, mtime_ns, since)
            heapq.heappush(self._heap, (since + self._settle, path))
        elif (watch.size, watch.mtime_ns) != (size, mtime_ns):
            watch.size, watch.mtime_ns, watch.since = size, mtime_ns, now
            heapq.heappush(self._heap, (now + self._settle, path))

    def next_due(self) -> float | None:
        """The clock time of the next check, or None when nothing is watched."""
        return self._heap[0][0] if self._heap else None

    def totals(self) -> tuple[int, int]:
        """``(paths watched, their total size in bytes as last seen)``."""
        return len(self._watches), sum(w.size for w in self._watches.values())

    def due(self, on_gone: Callable[[Settled], None] | None = None) -> list[Settled]:
        """Look at every path whose check time has come; return those that settled.

        A path that vanished is dropped and given to ``on_gone`` with its last seen stat.
        """
        now = self._clock()
        settled: list[Settled] = []
        while self._heap and self._heap[0][0] <= now:
            _, path = heapq.heappop(self._heap)
            watch = self._watches.get(path)
            if watch is None:
                continue
            try:
                st = self._stat(path)
            except OSError:
                del self._watches[path]
                if on_gone is not None:
                    on_gone(Settled(path, watch.size, watch.mtime_ns))
                continue
            if (st.st_size, st.st_mtime_ns) != (watch.size, watch.mtime_ns):
                watch.size, watch.mtime_ns, watch.since = st.st_size, st.st_mtime_ns, now
                heapq.heappush(self._heap, (now + self._settle, path))
            elif now - watch.since >= self._settle:
                del self._watches[path]
                settled.append(Settled(path, watch.size, watch.mtime_ns))
            else:
                # A stale heap entry from before the last change: the fresh one is queued.
                continue
        return settled

    def discard(self, path: str) -> None:
        """Stop watching ``path`` (its heap entries are skipped lazily)."""
        self._watches.pop(path, None)
