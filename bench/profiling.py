"""cProfile over every thread of a process, and a summary of where the time went.

cProfile sees only the thread that enabled it. ``threading.setprofile`` installs a hook that
each new thread calls once at its first event: the hook removes itself and enables a profiler
of that thread's own. The per-thread profiles are merged when the run ends.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import threading
from collections import defaultdict
from collections.abc import Sequence
from types import FrameType
from typing import Any

# Where a function's own time is booked, by a piece of its file's path. First match wins.
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("emulator", ("paiv_sync/emulator/", "werkzeug/", "socketserver", "http/server")),
    ("ledger (sqlite)", ("paiv_sync/ledger.py", "sqlite3")),
    ("hashing", ("paiv_sync/hashing.py", "_hashlib", "hashlib")),
    ("image check", ("paiv_sync/images.py",)),
    ("scan + layout", ("paiv_sync/scanner.py", "paiv_sync/layout.py", "posix.scandir")),
    (
        "HTTP client",
        (
            "paiv_sync/api.py",
            "requests/",
            "urllib3/",
            "http/client",
            "socket.py",
            "_socket",
            "ssl.py",
            "email/",
            "tenacity/",
            "json/",
        ),
    ),
    ("waiting (locks, sleeps)", ("threading.py", "lock", "time.sleep", "queue.py", "select")),
    ("pipeline (service)", ("paiv_sync/",)),
)


class AllThreadsProfile:
    """Profile the calling thread and every thread started after ``start``."""

    def __init__(self) -> None:
        self._profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()
        self._main: cProfile.Profile | None = None

    def _bootstrap(self, frame: FrameType, event: str, arg: Any) -> None:
        sys.setprofile(None)
        profile = cProfile.Profile()
        with self._lock:
            self._profiles.append(profile)
        profile.enable()

    def start(self) -> None:
        """Begin profiling."""
        threading.setprofile(self._bootstrap)
        self._main = cProfile.Profile()
        self._main.enable()

    def stop(self) -> pstats.Stats:
        """Stop profiling new threads and this one; return the merged statistics.

        Threads still running keep their profiler; what they did so far is included.
        """
        threading.setprofile(None)
        assert self._main is not None
        self._main.disable()
        stats = pstats.Stats(self._main)
        with self._lock:
            others = list(self._profiles)
        for profile in others:
            profile.create_stats()
            stats.add(profile)
        return stats


def _bucket(filename: str, function: str) -> str:
    where = f"{filename}:{function}"
    for name, needles in BUCKETS:
        if any(needle in where for needle in needles):
            return name
    return "other"


def buckets(stats: pstats.Stats) -> dict[str, float]:
    """Own time (tottime) per bucket of :data:`BUCKETS`, in seconds, largest first."""
    totals: dict[str, float] = defaultdict(float)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, function), (_cc, _nc, tottime, _ct, _callers) in raw.items():
        totals[_bucket(filename, function)] += tottime
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def top_lines(stats: pstats.Stats, count: int = 15, sort: str = "tottime") -> list[str]:
    """The ``count`` top rows of the profile, as pstats prints them."""
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats(sort).print_stats(count)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return [line.rstrip() for line in lines[start : start + count + 1] if line.strip()]


def describe(stats: pstats.Stats, label: str, wall: float, count: int = 12) -> list[str]:
    """Lines for the report: time per bucket as a share of the whole, then the top functions."""
    shares = buckets(stats)
    total = sum(shares.values()) or 1.0
    lines = [f"{label}: {total:.2f} s of profiled CPU/wait time over {wall:.2f} s wall, by area:"]
    lines += [
        f"  {name:<26} {seconds:7.2f} s  {seconds / total:6.1%}" for name, seconds in shares.items()
    ]
    lines.append(f"  top {count} functions by own time:")
    lines += ["    " + line for line in top_lines(stats, count)]
    return lines


def merge(paths: Sequence[str]) -> pstats.Stats:
    """Load and merge profile files."""
    stats = pstats.Stats(paths[0])
    for path in paths[1:]:
        stats.add(path)
    return stats
