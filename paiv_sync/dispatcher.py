"""Dispatch: when a category's pending files go to the upload workers, and in what batches.

The pipeline thread asks :meth:`Dispatcher.dispatch` once per turn; the debouncer says which
categories are due (threshold reached and quiet for a while, or held back too long). Each due
category goes to the worker pool as batches; the first flush of a category in a run first
compares its files with the dataset's list (``skip_duplicates``), in a worker, as the server
may be slow. Rows an upload left in doubt and no batch is settling any more are looked up on
the server every few seconds (:meth:`Dispatcher.resolve_orphans`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from paiv_sync.batcher import Debouncer, batches
from paiv_sync.config import Config
from paiv_sync.errors import MviError
from paiv_sync.heartbeats import Heartbeats
from paiv_sync.ledger import Ledger, LedgerWriteError
from paiv_sync.progress import ProgressCounter
from paiv_sync.uploader import DatasetGone, Uploader, UploadsPaused

log = logging.getLogger(__name__)

# Seconds between two looks for rows in doubt that no upload is settling.
ORPHAN_CHECK_INTERVAL = 5.0


class Tally(Protocol):
    """Where uploads are counted (the service's run summary)."""

    uploaded: int
    rejected: int
    duplicates: int


class Dispatcher:
    """Hands pending files to ``pool`` as upload jobs for ``uploader``.

    ``connected()`` and ``may_write()`` (the ledger takes writes) gate every dispatch;
    ``lost`` is set when a job finds the connection gone; ``on_ledger_failure`` takes a ledger
    that refused a write; ``on_uploaded`` runs after a batch stored files (the trainer looks).
    """

    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        uploader: Uploader,
        debouncer: Debouncer,
        pool: ThreadPoolExecutor,
        *,
        tally: Tally,
        progress: ProgressCounter | None,
        beats: Heartbeats,
        stop_event: threading.Event,
        lost: threading.Event,
        clock: Callable[[], float],
        connected: Callable[[], bool],
        may_write: Callable[[], bool],
        on_ledger_failure: Callable[[LedgerWriteError], None],
        on_uploaded: Callable[[], None],
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.uploader = uploader
        self.debouncer = debouncer
        self._pool = pool
        self._tally = tally
        self._progress = progress
        self._beats = beats
        self._stop = stop_event
        self._lost = lost
        self._clock = clock
        self._connected = connected
        self._may_write = may_write
        self._on_ledger_failure = on_ledger_failure
        self._on_uploaded = on_uploaded
        self.inflight: dict[str, list[Future[None]]] = {}
        self._pending: dict[str, int] = {}
        self._returned: set[str] = set()  # categories with files back from an upload
        self._dirty = True
        # Categories whose pending files were checked against the server's list this run.
        self._dup_checked: set[str] = set()
        # Rows left ``uploading`` by a batch that ended without settling them (the dataset
        # vanished, the credentials were refused mid-reconcile): resolved while running.
        self._orphans: Future[int] | None = None
        self._next_orphan_check = 0.0
        self.last_upload_time: float | None = None  # wall clock of the last confirmed upload

    # -- what is pending -----------------------------------------------------------------

    def changed(self) -> None:
        """The pending files changed otherwise than by dispatch: read the counts again."""
        self._dirty = True

    def new_dataset(self) -> None:
        """Another dataset: what it holds has not been compared with the pending files."""
        self._dup_checked.clear()

    def pending_counts(self) -> dict[str, int]:
        """``category -> pending files``, re-read only after something may have changed it.

        The categories holding files that came back from an interrupted upload are refreshed
        with it: rows return to pending only in the cases that mark the counts dirty.
        """
        if self._dirty:
            self._pending = self.ledger.pending_counts()
            self._returned = {c for c, n in self.ledger.returned_counts().items() if n}
            self._dirty = False
        return self._pending

    # -- dispatching ---------------------------------------------------------------------

    def dispatch(self, *, force: bool) -> None:
        """Hand every due category to the workers (``force``: every category with files)."""
        if not self._connected() or self._stop.is_set() or not self._may_write():
            return
        counts = {c: n for c, n in self.pending_counts().items() if c not in self.inflight}
        ready = self.debouncer.ready(counts, force=force)
        # Files handed to the uploader before that came back (in doubt after a crash and not on
        # the server, not sent at shutdown) passed the threshold then: they do not wait again.
        ready += [c for c in counts if c not in ready and c in self._returned]
        for category in ready:
            if self._send(category, limit=None):
                self.debouncer.flushed(category)
        waiting = {c: n for c, n in counts.items() if c not in self.inflight}
        for category, files in self.debouncer.full_batches(waiting, self.config.batch_size).items():
            # A stream that never goes quiet: its full batches go now, the tail waits.
            if self._send(category, limit=files):
                self.debouncer.sent_early(category)

    def _send(self, category: str, *, limit: int | None) -> bool:
        """Hand ``category``'s pending files (the oldest ``limit``) to the workers as batches;
        False when there was nothing to send."""
        if self.config.skip_duplicates and category not in self._dup_checked:
            # The first flush of a category in a run compares its files with the dataset's
            # list first. In a worker: the server may be slow or down, and this thread must go
            # on taking in files meanwhile.
            self.inflight[category] = [self._pool.submit(self._first_flush, category)]
        else:
            rows = self.ledger.pending(category, limit=limit)
            if not rows:
                return False
            self._log_flush(category, len(rows))
            self.inflight[category] = [
                self._pool.submit(self._upload_job, category, [r.id for r in chunk])
                for chunk in batches(rows, self.config.batch_size)
            ]
        self._dirty = True
        return True

    def collect(self) -> bool:
        """Forget the categories whose jobs ended; True when the last ones just did."""
        done = [c for c, futures in self.inflight.items() if all(f.done() for f in futures)]
        for category in done:
            del self.inflight[category]
            self._dirty = True
        return bool(done) and not self.inflight

    def resolve_orphans(self, *, now: bool = False) -> None:
        """Every few seconds while connected: settle rows no batch is sending any more.

        The rows of a batch in flight are not touched (the uploader knows which those are);
        the others are looked up on the server in an upload worker, so the loop goes on.
        """
        if self._orphans is not None:
            if not self._orphans.done():
                return
            try:
                if self._orphans.result():
                    self._dirty = True
            except MviError as exc:
                log.warning("files in doubt could not be checked against the server (%s)", exc)
            except UploadsPaused as exc:
                log.error("files in doubt wait: %s", exc)
                self._lost.set()
            except Exception:
                log.exception("checking files in doubt against the server crashed; will retry")
            self._orphans = None
        if not self._connected() or self._stop.is_set():
            return
        if not now and self._clock() < self._next_orphan_check:
            return
        self._next_orphan_check = self._clock() + ORPHAN_CHECK_INTERVAL
        self._orphans = self._pool.submit(self.uploader.resolve_in_doubt)

    @property
    def resolving(self) -> bool:
        """Whether a look for rows in doubt is under way."""
        return self._orphans is not None

    def look_for_orphans_now(self) -> None:
        """Make the next :meth:`resolve_orphans` look at once."""
        self._next_orphan_check = 0.0

    # -- the jobs (in upload workers) ----------------------------------------------------

    def _log_flush(self, category: str, count: int) -> None:
        log.info(
            "category %r: uploading %d files to dataset %s",
            category,
            count,
            self.uploader.dataset_id,
        )

    def _first_flush(self, category: str) -> None:
        """An upload job: skip what the server already holds, then send the rest in batches."""
        if self._stop.is_set() or self._lost.is_set():
            return
        with self._beats.job():
            try:
                if not self._check_server_duplicates(category):
                    return
            except LedgerWriteError as exc:
                self._on_ledger_failure(exc)
                return
            rows = self.ledger.pending(category)
            if rows:
                self._log_flush(category, len(rows))
            for chunk in batches(rows, self.config.batch_size):
                self._upload_job(category, [r.id for r in chunk])

    def _check_server_duplicates(self, category: str) -> bool:
        """Once a run per category, before its first upload: skip what the server holds.

        Returns False when the server could not be asked (the files stay pending; the flush is
        tried again once the service has reconnected).
        """
        if not self.config.skip_duplicates or category in self._dup_checked:
            return True
        sizes = (
            {r.id: r.size for r in self.ledger.pending(category)}
            if self._progress is not None
            else {}
        )
        try:
            marked = self.uploader.mark_server_duplicates(category)
        except MviError as exc:
            log.warning(
                "category %r: cannot compare with the dataset's files (%s); will retry",
                category,
                exc,
            )
            self._lost.set()
            return False
        self._dup_checked.add(category)
        self._tally.duplicates += marked
        if marked and sizes and self._progress is not None:
            for row in self.ledger.pending(category):
                sizes.pop(row.id, None)
            self._progress.add(done=(len(sizes), sum(sizes.values())))
        if marked:
            self._dirty = True
        return True

    def _upload_job(self, category: str, file_ids: list[int]) -> None:
        if self._stop.is_set() or self._lost.is_set():
            return
        with self._beats.job():
            self._upload_job_inner(category, file_ids)

    def _upload_job_inner(self, category: str, file_ids: list[int]) -> None:
        try:
            report = self.uploader.upload_batch(category, file_ids)
        except DatasetGone as exc:
            log.error("the dataset is gone from the server (%s); looking it up again", exc)
            self._lost.set()
            return
        except UploadsPaused as exc:
            log.error("uploads paused: %s", exc)
            self._lost.set()
            return
        except LedgerWriteError as exc:
            self._on_ledger_failure(exc)
            return
        except Exception:
            log.exception(
                "upload of %d files of category %r crashed; they stay in the ledger",
                len(file_ids),
                category,
            )
            self._lost.set()
            return
        self._tally.uploaded += report.uploaded
        self._tally.rejected += report.rejected
        if self._progress is not None:
            self._progress.add(
                done=(report.uploaded + report.rejected, report.settled_bytes),
                total=(-report.forgotten, -report.forgotten_bytes),
            )
        if report.uploaded:
            self.last_upload_time = time.time()
            self._on_uploaded()
