"""Progress of a ``--once`` run: the counts the pipeline keeps, and the line that shows them.

The pipeline and the upload workers count into a :class:`ProgressCounter`, which hands a
:class:`Progress` to a hook each time more files are done; the CLI's hook is a
:class:`ProgressLine` on stderr, drawn in place on a terminal and as plain lines elsewhere.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """Where a ``--once`` run's uploads stand; what the progress hook is given.

    ``files_total``/``bytes_total`` are the files pending when the uploads began plus those
    admitted since (so they grow while new files are still being checked); ``*_done`` count
    the files the server confirmed, refused for good, or already held. ``elapsed`` is seconds
    since the uploads began.
    """

    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int
    elapsed: float


ProgressHook = Callable[[Progress], None]


class ProgressCounter:
    """The counts behind the reports, kept by the pipeline and the upload workers alike.

    Nothing is reported before :meth:`start`. A hook that raises is logged and dropped: a
    display must not stop the uploads.
    """

    def __init__(self, hook: ProgressHook, clock: Callable[[], float]) -> None:
        self._hook: ProgressHook | None = hook
        self._clock = clock
        self._lock = threading.Lock()
        self._counts = [0, 0, 0, 0]  # files done, files total, bytes done, bytes total
        self._shown: tuple[int, ...] = ()  # the counts of the last report
        self._started: float | None = None

    def start(self, *, total: tuple[int, int]) -> None:
        """Begin the clock with ``(files, bytes)`` to do."""
        self._started = self._clock()
        self.add(total=total)

    def add(
        self,
        *,
        done: tuple[int, int] = (0, 0),
        total: tuple[int, int] = (0, 0),
        report: bool = False,
    ) -> None:
        """Count files (and bytes) done or newly to do; tell the hook when done moved, or
        when ``report`` asks for the counts as they are (if they changed since)."""
        hook = self._hook
        if hook is None or self._started is None:
            return
        with self._lock:
            counts = self._counts
            counts[0] += done[0]
            counts[1] += total[0]
            counts[2] += done[1]
            counts[3] += total[1]
            snapshot = Progress(
                counts[0], counts[1], counts[2], counts[3], self._clock() - self._started
            )
            if not done[0] and not (report and tuple(counts) != self._shown):
                return
            self._shown = tuple(counts)
            try:
                # Under the lock: reports reach the hook in order, never with a count going back.
                hook(snapshot)
            except Exception:
                log.exception("the progress display failed; no more progress reports")
                self._hook = None


def format_progress(progress: Progress) -> str:
    """One line for a :class:`Progress` report.

    E.g. ``"1,234/5,000 files (24 %), 37.0/150.2 MB, 812 files/s, 24.3 MB/s, ETA 0:04"``. The
    percentage counts files and shows 100 only when every file is done.
    """
    files, files_total = progress.files_done, progress.files_total
    percent = 100 if files >= files_total else (100 * files) // max(1, files_total)
    elapsed = max(progress.elapsed, 1e-6)
    file_rate = files / elapsed
    byte_rate = progress.bytes_done / elapsed
    # By bytes when known: a few big files left take longer than their count says.
    if progress.bytes_total and byte_rate > 0:
        left = max(0, progress.bytes_total - progress.bytes_done) / byte_rate
    elif file_rate > 0:
        left = max(0, files_total - files) / file_rate
    else:
        left = None
    eta = "?" if left is None else f"{int(left) // 60}:{int(left) % 60:02d}"
    return (
        f"{files:,}/{files_total:,} files ({percent} %), "
        f"{progress.bytes_done / 1e6:.1f}/{progress.bytes_total / 1e6:.1f} MB, "
        f"{file_rate:.0f} files/s, {byte_rate / 1e6:.1f} MB/s, ETA {eta}"
    )


class ProgressLine:
    """Shows ``--once`` progress on a stream (stderr).

    On a terminal: one line redrawn in place (carriage return) after every report. Otherwise
    (a log file, a pipe): a plain ``progress: …`` line at most every ``every`` seconds or each
    time another tenth of the files is done, and the last report at :meth:`finish`. Called
    from upload worker threads; each call is one short write.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool,
        every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._tty = tty
        self._every = every
        self._clock = clock
        self._lock = threading.Lock()
        self._last: Progress | None = None
        self._shown: Progress | None = None  # the report last written
        self._shown_at = clock()
        self._on_screen = False  # a terminal line is drawn and not yet ended

    def __call__(self, progress: Progress) -> None:
        with self._lock:
            self._last = progress
            if self._tty:
                self._draw(progress)
                return
            tenth = self._tenth(progress)
            shown = self._shown
            if (
                shown is None
                or tenth > self._tenth(shown)
                or self._clock() - self._shown_at >= self._every
            ):
                self._write_line(progress)

    def clear(self) -> None:
        """Wipe the terminal line (before a log line is written under it)."""
        with self._lock:
            if self._on_screen:
                self._stream.write("\r\x1b[K")
                self._stream.flush()
                self._on_screen = False

    def finish(self) -> None:
        """Show the last report (if not yet shown in full) and end the line."""
        with self._lock:
            last = self._last
            if last is None:
                return
            if self._tty:
                self._draw(last)
                self._stream.write("\n")
                self._stream.flush()
                self._on_screen = False
            elif last != self._shown:
                self._write_line(last)

    @staticmethod
    def _tenth(progress: Progress) -> int:
        return (10 * progress.files_done) // max(1, progress.files_total)

    def _draw(self, progress: Progress) -> None:
        self._stream.write("\r\x1b[K" + format_progress(progress))
        self._stream.flush()
        self._on_screen = True
        self._shown = progress

    def _write_line(self, progress: Progress) -> None:
        self._stream.write(f"progress: {format_progress(progress)}\n")
        self._stream.flush()
        self._shown = progress
        self._shown_at = self._clock()
