"""The server's per-file failures within a batch: which blame the file, and when to give up.

A refusal that blames the file itself (its type, size or content) rejects it after a few of
them; any other failure ("Internal error while storing the file", no verdict at all) is the
server's: the file is sent again, with back-off, until the server has failed it for
``TRANSIENT_LIMIT`` seconds, and then set aside as rejected until a restart or
``paiv-sync retry``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from paiv_sync.ledger import REFUSED_PREFIX, FileRow

log = logging.getLogger(__name__)

# Words in a per-file fault that blame the file itself rather than the server.
_REFUSAL_WORDS = (
    "not a ",
    "unsupported",
    "not supported",
    "invalid",
    "format",
    "file type",
    "too large",
    "too big",
    "exceed",
    "empty",
    "corrupt",
    "damaged",
    "truncated",
    "cannot decode",
    "could not decode",
)

# How long the server may keep failing one file (while storing others) before it is set aside
# as rejected; a restart or ``paiv-sync retry`` sends it again.
TRANSIENT_LIMIT = 900.0


def blames_the_file(fault: str) -> bool:
    """Tell whether a server's per-file fault says the file itself is unacceptable."""
    text = fault.lower()
    return any(word in text for word in _REFUSAL_WORDS)


class FileFaults:
    """The server's failures of each file of one batch: how often, and since when.

    A refusal that blames the file rejects it after ``max_refusals`` of them; any other
    failure only after the server kept failing the file for ``limit`` seconds.
    """

    def __init__(self, clock: Callable[[], float], max_refusals: int, limit: float) -> None:
        self._clock = clock
        self._max_refusals = max_refusals
        self._limit = limit
        self._refusals: Counter[int] = Counter()
        self._failing_since: dict[int, float] = {}
        self.worst = 0  # the most failures of any one file: the back-off's attempt number
        self._counts: Counter[int] = Counter()

    def verdict(self, row: FileRow, fault: str, *, refusal: bool) -> str | None:
        """Record one failure of ``row``; return its rejection reason when it is rejected now.

        Logs the failure (the first one of a file at WARNING, later ones at DEBUG).
        """
        self._counts[row.id] += 1
        self.worst = max(self.worst, self._counts[row.id])
        first = self._counts[row.id] == 1
        if refusal:
            self._refusals[row.id] += 1
            if self._refusals[row.id] >= self._max_refusals:
                log.error(
                    "%s rejected by the server after %d attempts: %s",
                    row.rel_path,
                    self._refusals[row.id],
                    fault,
                )
                return REFUSED_PREFIX + fault
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "%s refused by the server (%s); will retry",
                row.rel_path,
                fault,
            )
            return None
        now = self._clock()
        since = self._failing_since.setdefault(row.id, now)
        if now - since >= self._limit:
            minutes = max(1, round((now - since) / 60))
            log.error(
                "%s: the server kept failing it for %d min (%s); set aside as rejected, a "
                "restart or `paiv-sync retry` sends it again",
                row.rel_path,
                minutes,
                fault,
            )
            return (
                f"the server failed it for {minutes} min ({fault}); a restart or "
                "`paiv-sync retry` sends it again"
            )
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "%s failed on the server (%s); it is sent again while the server keeps storing "
            "other files (for up to %d min)",
            row.rel_path,
            fault,
            round(self._limit / 60),
        )
        return None
