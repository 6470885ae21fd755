"""Signs of life of the pipeline loop and of the threads doing jobs, and the verdict on them.

Liveness means that the process works, not that the server answers: the pipeline loop beats
at each turn (and during a long scan), a job thread (an upload worker, the connector) beats
when it starts and whenever it begins a back-off wait, so a thread retrying through a long
outage is alive. :meth:`Heartbeats.verdict` tells the health check and the systemd watchdog
whether every part still moves.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)


class Heartbeats:
    """The last beat of the loop and of each job thread, on ``clock``.

    ``stall_limit``: the longest the loop may go without a turn; ``job_limit``: the longest a
    job thread may go without a beat (a request plus its back-off waits).
    """

    def __init__(self, clock: Callable[[], float], *, stall_limit: float, job_limit: float):
        self._clock = clock
        self.stall_limit = stall_limit
        self.job_limit = job_limit
        self.last_loop = clock()
        self._loop_thread: int | None = None
        self._jobs: dict[int, float] = {}
        self._lock = threading.Lock()

    def loop(self) -> None:
        """The pipeline loop turned (from the loop's thread, which is remembered)."""
        self._loop_thread = threading.get_ident()
        self.last_loop = self._clock()

    def alive(self) -> None:
        """The calling thread is about to wait before trying again: a sign of life."""
        ident = threading.get_ident()
        now = self._clock()
        if ident == self._loop_thread:
            self.last_loop = now
        with self._lock:
            if ident in self._jobs:
                self._jobs[ident] = now

    @contextlib.contextmanager
    def job(self) -> Iterator[None]:
        """Count the calling thread as a job at work while inside (nested: the outer counts)."""
        ident = threading.get_ident()
        with self._lock:
            outer = ident in self._jobs
            self._jobs[ident] = self._clock()
        try:
            yield
        finally:
            if not outer:
                with self._lock:
                    self._jobs.pop(ident, None)

    def verdict(self) -> tuple[bool, str]:
        """Whether the loop and every job still move; and if not, which and for how long."""
        now = self._clock()
        if now - self.last_loop > self.stall_limit:
            return False, f"the pipeline loop has not turned for {now - self.last_loop:.0f} s"
        with self._lock:
            oldest = min(self._jobs.values(), default=now)
        if now - oldest > self.job_limit:
            return False, f"an upload worker has shown no progress for {now - oldest:.0f} s"
        return True, "ok"


def ping_watchdog(
    stop: threading.Event,
    interval: float,
    healthy: Callable[[], tuple[bool, str]],
    notify: Callable[[str], None],
) -> None:
    """Ping systemd's watchdog every ``interval`` s while ``healthy()``; withhold it otherwise."""
    complained = False
    while not stop.wait(interval):
        ok, why = healthy()
        if ok:
            notify("WATCHDOG=1")
            complained = False
        elif not complained:
            log.error("not healthy: %s; withholding the systemd watchdog ping", why)
            complained = True
