"""A ledger that refuses writes (a full disk, a failing one): hold, back off, probe, go on.

Any stage whose ledger write fails reports it to :class:`LedgerHold`; while the hold lasts,
intake and uploads wait, and the pipeline thread asks :meth:`LedgerHold.held` each turn. Once
the back-off is over, one small write tells whether the disk takes writes again; then a scan
takes in what could not be recorded meanwhile. Nothing is lost: a file not recorded is found
again by that scan, and an upload whose outcome was not recorded stays in doubt, to be settled
against the server. After ``give_up`` seconds of failures the service stops (exit 1); with
``give_up`` 0 (``--once``, which must end) it stops at the first failure.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from paiv_sync.ledger import Ledger, LedgerWriteError
from paiv_sync.retry import RetryPolicy

log = logging.getLogger(__name__)

# How long the ledger may refuse every write before the service stops, and the back-off between
# two tries meanwhile (its longest wait below the health check's stall limit of the loop).
LEDGER_GIVE_UP = 600.0
_LEDGER_RETRY = RetryPolicy(initial=1.0, maximum=30.0, jitter=0.0)
# How often the same failure is logged again while it lasts.
_SAY_AGAIN = 60.0


class LedgerHold:
    """Whether the ledger refuses writes, since when, and when to try again.

    ``failed`` is called from any thread (the pipeline, upload workers, the connector);
    ``held`` only from the pipeline thread. ``back`` runs (on the pipeline thread) once the
    ledger takes writes again: there the service rescans and looks at uploads again.
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        give_up: float,
        stop_event: threading.Event,
        clock: Callable[[], float],
        back: Callable[[], None],
    ) -> None:
        self._ledger = ledger
        self._give_up = give_up
        self._stop = stop_event
        self._clock = clock
        self._back = back
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._failures = 0
        self._blocked_until = 0.0
        self._said = 0.0
        self.fatal = False  # the service gave up: it stops with exit 1

    @property
    def down(self) -> bool:
        """Whether the last write failed and no probe has gone through since."""
        return self._down_since is not None

    def failed(self, exc: LedgerWriteError) -> None:
        """A write to the ledger failed: hold intake and uploads, back off, and say so."""
        now = self._clock()
        with self._lock:
            self._failures += 1
            first = self._down_since is None
            if self._down_since is None:
                self._down_since = now
            down_for = now - self._down_since
            delay = _LEDGER_RETRY.delay(self._failures)
            self._blocked_until = max(self._blocked_until, now + delay)
            say = first or now - self._said >= _SAY_AGAIN
            if say:
                self._said = now
            give_up = down_for >= self._give_up
            first_fatal = give_up and not self.fatal
            if give_up:
                self.fatal = True
        if give_up:
            if first_fatal:
                log.error("%s; %s", exc, self._giving_up(down_for))
            self._stop.set()
            return
        if say:
            log.error(
                "%s; nothing is recorded or sent meanwhile; trying again in %.0f s (paiv-sync "
                "stops if this lasts %.0f min)",
                exc,
                delay,
                self._give_up / 60,
            )

    def _giving_up(self, down_for: float) -> str:
        if not self._give_up:
            # --once must end: it stops now rather than wait for the disk.
            return (
                "paiv-sync --once stops (exit 1). Nothing is lost: what was not recorded is "
                "found again by the next run"
            )
        return (
            f"the ledger has refused every write for {down_for / 60:.0f} min: paiv-sync stops "
            "(exit 1). Nothing is lost: what was not recorded is found again at the next start"
        )

    def held(self) -> bool:
        """Whether the pipeline waits for the ledger (after waiting a moment, if so)."""
        if self._down_since is None:
            return False
        now = self._clock()
        if now < self._blocked_until:
            self._stop.wait(min(1.0, self._blocked_until - now))
            return True
        try:
            self._ledger.set_meta("last_write_check", str(time.time()))
            self._ledger.sync()
            self._ledger.checkpoint()
        except LedgerWriteError as exc:
            self.failed(exc)
            return True
        log.warning(
            "the ledger %s can be written again after %.0f s; going on, and rescanning so "
            "that no file is missed",
            self._ledger.path,
            now - self._down_since,
        )
        with self._lock:
            self._down_since = None
            self._failures = 0
        try:
            self._back()
        except LedgerWriteError as exc:
            self.failed(exc)
            return True
        return False
