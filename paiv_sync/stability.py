"""The stability gate: a file counts only once it has stopped changing.

A file enters the gate when an event or a scan mentions it. It is settled when two looks at
its size and mtime, at least ``settle_time`` apart on the local monotonic clock, agree. The
pipeline re-checks a settled file after hashing it, so a write that starts during hashing is
caught too. The gate holds only the files not yet settled; it does no I/O of its own (the stat
is passed in). A file is known by a key of the caller's choosing (intake's is the file's
:class:`~paiv_sync.layout.Location`, so that nothing is located twice); ``path_of`` turns a key
into the path to stat.
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

StatFn = Callable[[str], os.stat_result]
K = TypeVar("K", bound=Hashable)

# Seconds an mtime must lie in the past, beyond the settle time, to count as already settled.
CLOCK_SKEW_ALLOWANCE = 30.0


@dataclass
class _Watch:
    size: int
    mtime_ns: int
    since: float  # when this size and mtime were first seen


@dataclass(frozen=True)
class Settled(Generic[K]):
    """A file whose size and mtime held still for the settle time."""

    key: K
    size: int
    mtime_ns: int


class StabilityGate(Generic[K]):
    """Tracks files until they settle.

    ``offer`` adds or refreshes a file; ``due`` returns the files that settled (and forgets
    them) and reports files that vanished through ``on_gone``.
    """

    def __init__(
        self,
        settle_time: float,
        clock: Callable[[], float],
        stat: StatFn = os.stat,
        wall: Callable[[], float] | None = None,
        path_of: Callable[[K], str] = str,
    ) -> None:
        self._settle = settle_time
        self._clock = clock
        self._wall = wall
        self._stat = stat
        self._path_of = path_of
        self._watches: dict[K, _Watch] = {}
        # (check time, tie-breaker, key): keys need not be comparable.
        self._heap: list[tuple[float, int, K]] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._watches)

    def __contains__(self, key: object) -> bool:
        return key in self._watches

    def offer(self, key: K, size: int, mtime_ns: int) -> None:
        """Start (or continue) watching ``key`` whose current stat is ``size``/``mtime_ns``."""
        now = self._clock()
        watch = self._watches.get(key)
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
            self._watches[key] = _Watch(size, mtime_ns, since)
            heapq.heappush(self._heap, (since + self._settle, next(self._order), key))
        elif (watch.size, watch.mtime_ns) != (size, mtime_ns):
            watch.size, watch.mtime_ns, watch.since = size, mtime_ns, now
            heapq.heappush(self._heap, (now + self._settle, next(self._order), key))

    def next_due(self) -> float | None:
        """The clock time of the next check, or None when nothing is watched."""
        return self._heap[0][0] if self._heap else None

    def totals(self) -> tuple[int, int]:
        """``(files watched, their total size in bytes as last seen)``."""
        return len(self._watches), sum(w.size for w in self._watches.values())

    def due(self, on_gone: Callable[[Settled[K]], None] | None = None) -> list[Settled[K]]:
        """Look at every file whose check time has come; return those that settled.

        A file that vanished is dropped and given to ``on_gone`` with its last seen stat.
        """
        now = self._clock()
        settled: list[Settled[K]] = []
        while self._heap and self._heap[0][0] <= now:
            _, _, key = heapq.heappop(self._heap)
            watch = self._watches.get(key)
            if watch is None:
                continue
            try:
                st = self._stat(self._path_of(key))
            except OSError:
                del self._watches[key]
                if on_gone is not None:
                    on_gone(Settled(key, watch.size, watch.mtime_ns))
                continue
            if (st.st_size, st.st_mtime_ns) != (watch.size, watch.mtime_ns):
                watch.size, watch.mtime_ns, watch.since = st.st_size, st.st_mtime_ns, now
                heapq.heappush(self._heap, (now + self._settle, next(self._order), key))
            elif now - watch.since >= self._settle:
                del self._watches[key]
                settled.append(Settled(key, watch.size, watch.mtime_ns))
            else:
                # A stale heap entry from before the last change: the fresh one is queued.
                continue
        return settled

    def discard(self, key: K) -> None:
        """Stop watching ``key`` (its heap entries are skipped lazily)."""
        self._watches.pop(key, None)
