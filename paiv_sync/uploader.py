"""The uploader: sends one category's pending files in batches and settles each file's fate.

A file leaves ``pending`` only when the server confirmed it. A POST whose outcome cannot be
known (the connection dropped after the request went out, a read timed out, a 5xx) leaves its
files ``uploading``; before any of them is sent again, the batch is reconciled against what the
dataset really holds (paiv_sync.holdings), so a file is never stored twice. Per-file failures
are weighed in paiv_sync.filefaults; the tags each upload carries are in paiv_sync.tags.

Only rows of a batch that no thread of this process is sending are in doubt: a batch still on
its way is left to its own worker. Limits of recognising by name and size: two files of one
category with the same name and size (in different sub-folders) sent at the same time can be
told apart only by the server's content, which its list does not show; and a request the server
carries out only after the client gave up waiting (a read timeout) is looked for a few times,
over about seven times as long as the request was given, before the files are sent again; a
server slower than that still gets a second copy.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import requests

from paiv_sync.api import (
    AmbiguousError,
    AuthError,
    DatasetLocked,
    FileResult,
    MviClient,
    MviError,
    NotFoundError,
    RequestError,
    TlsError,
    TransientError,
    UploadPart,
)
from paiv_sync.filefaults import TRANSIENT_LIMIT, FileFaults, blames_the_file
from paiv_sync.holdings import Holdings
from paiv_sync.ledger import FileRow, Ledger
from paiv_sync.retry import RetryPolicy
from paiv_sync.tags import ServerTags, UploadTags

log = logging.getLogger(__name__)


# Tries of a DELETE of a copy that holds other content than checked (see _sent_other_content):
# the upload worker must not wait for ever on a server that keeps failing them.
DELETE_TRIES = 5


@dataclass
class _Sending:
    """Where the sending of one batch stands (see Uploader._send_batch)."""

    faults: FileFaults
    attempt: int = 0
    maybe_sent: bool = False  # True once a POST of this batch may have reached the server
    late_checks: int = 0  # after a timed-out POST: looks before sending again, and the wait
    late_wait: float = 0.0
    one_by_one: bool = False  # after the server refused a whole request: find the file at fault
    locked_seen: bool = False


class UploadsPaused(Exception):
    """Uploads cannot go on until something outside changes (credentials, dataset, TLS)."""


class DatasetGone(UploadsPaused):
    """The dataset this service feeds no longer exists on the server."""


@dataclass
class BatchReport:
    """What became of one batch."""

    category: str
    uploaded: int = 0
    rejected: int = 0
    returned: int = 0  # went back to pending (deleted, changed, or not sent at shutdown)
    in_doubt: int = 0  # left ``uploading``: resolved against the server at the next start
    settled_bytes: int = 0  # size of the files uploaded or rejected (for progress reports)
    forgotten: int = 0  # deleted before upload: dropped from the ledger (also in ``returned``)
    forgotten_bytes: int = 0
    closed: bool = False  # the batch was closed with its last files' commit
    names: list[str] = field(default_factory=list)


class Uploader:
    """Uploads batches of one category at a time; safe to call from several threads."""

    def __init__(
        self,
        client: MviClient,
        ledger: Ledger,
        *,
        retry: RetryPolicy,
        stop_event: threading.Event,
        max_file_attempts: int = 5,
        transient_limit: float = TRANSIENT_LIMIT,
        late_checks: int = 3,
        sleep: Callable[[float], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        look_again: Callable[[str], None] | None = None,
        tags: UploadTags | None = None,
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.dataset_id: str | None = None
        self._retry = retry
        self._stop = stop_event
        self._max_file_attempts = max_file_attempts
        self._transient_limit = transient_limit
        self._late_checks = late_checks
        # Told the path of a file whose content changed while it was sent (see _settle_results).
        self._look_again = look_again
        self._clock = clock
        self._sleep = sleep or stop_event.wait
        # Reconciling reads the category's whole file list: one at a time per category.
        self._category_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # Batches whose POST this process is handling right now. Their rows are ``uploading``
        # but NOT in doubt: resolving them against the server while the POST is on its way
        # would put them back to ``pending`` and so send them twice.
        self._active_batches: set[int] = set()
        self._active_lock = threading.Lock()
        # The upload tags, whether the server honours them, and lookups in the dataset.
        self.tags = ServerTags(client, ledger, tags, clock=clock)
        self._holdings = Holdings(client, ledger, self.tags)

    def _category_lock(self, category: str) -> threading.Lock:
        with self._locks_guard:
            return self._category_locks.setdefault(category, threading.Lock())

    def _backoff(self, attempt: int, hint: float | None = None) -> None:
        self._sleep(self._retry.delay(attempt, hint))

    # -- one batch -----------------------------------------------------------------------

    def upload_batch(self, category: str, file_ids: Sequence[int]) -> BatchReport:
        """Send the still-pending files among ``file_ids`` (all of ``category``) to the dataset.

        Returns what happened to them. Raises UploadsPaused (after putting the files back to
        ``pending``) when the server refuses the credentials, the TLS certificate, or no longer
        has the dataset.
        """
        report = BatchReport(category)
        dataset_id = self.dataset_id
        if dataset_id is None or self._stop.is_set():
            return report
        category_id = self._ensure_category(dataset_id, category)
        if category_id is None:
            return report
        with self._active_lock:
            batch_id = self.ledger.begin_batch(category, dataset_id, file_ids)
            self._active_batches.add(batch_id)
        try:
            self._send_batch(batch_id, dataset_id, category, category_id, report)
        finally:
            with self._active_lock:
                self._active_batches.discard(batch_id)
        if not report.closed:
            self.ledger.finish_batch(batch_id, "done" if not report.in_doubt else "in doubt")
        if report.uploaded:
            log.info(
                "uploaded %d file%s to category %r of dataset %s",
                report.uploaded,
                "" if report.uploaded == 1 else "s",
                category,
                dataset_id,
            )
            rows = [r for r in (self.ledger.get(i) for i in file_ids) if r is not None]
            self.tags.look_for_other_feeders(dataset_id, category, rows)
        return report

    def _send_batch(
        self,
        batch_id: int,
        dataset_id: str,
        category: str,
        category_id: str,
        report: BatchReport,
    ) -> None:
        """POST the batch's rows until each is settled, shutdown comes, or uploads pause."""
        st = _Sending(FileFaults(self._clock, self._max_file_attempts, self._transient_limit))
        while True:
            rows = self.ledger.batch_rows(batch_id)
            if rows and st.maybe_sent:
                unsettled = self._settle_maybe_sent(
                    st, dataset_id, category, category_id, rows, report
                )
                if unsettled == "again":
                    continue
                if unsettled == "stop":
                    return
                rows = unsettled
            if not rows:
                return
            rows = self._still_on_disk(rows, report)
            if not rows:
                return
            if self._stop.is_set():
                # Nothing of these rows can be on the server: the last POST (if any) was settled.
                self.ledger.mark_pending([r.id for r in rows])
                report.returned += len(rows)
                return
            st.attempt += 1
            sending = rows[:1] if st.one_by_one else rows
            started = self._clock()
            try:
                results = self.client.upload(
                    dataset_id,
                    [UploadPart(r.file_path, r.upload_name, r.content_type or "") for r in sending],
                    category_name=category,
                    category_id=category_id,
                    metadata=self.tags.metadata(batch_id, sending),
                )
            except (MviError, OSError) as exc:
                self._upload_failed(exc, st, category, sending, rows, report, started)
                continue
            settled_all = self._settle_results(
                sending, results, report, st.faults, batch_id if sending is rows else None
            )
            if self.tags.supported(dataset_id) is None:
                stored = next((r.file_id for r in results if r.ok and r.file_id), None)
                if stored is not None:
                    self.tags.learn(dataset_id, batch_id, stored)
            if settled_all:
                return  # every row of the batch is settled: nothing left to read back

    def _settle_maybe_sent(
        self,
        st: _Sending,
        dataset_id: str,
        category: str,
        category_id: str,
        rows: list[FileRow],
        report: BatchReport,
    ) -> list[FileRow] | Literal["again", "stop"]:
        """After a POST that may have reached the server: the rows it does not hold.

        Before anything else, and whatever became of the files on disk since: the server may
        hold them, and only the server can say. A file touched or deleted after an unanswered
        POST must not go back to ``pending`` unchecked. Returns ``"again"`` to look again
        (after a wait), ``"stop"`` after leaving the rows in doubt (the server cannot be asked).
        """
        unsettled = self._reconcile(dataset_id, category, category_id, rows, report)
        if unsettled is None:
            self._leave_in_doubt(rows, report)
            return "stop"
        if unsettled and st.late_checks > 0:
            # The POST timed out: the server may still be storing it. Give it a few times as
            # long as the POST was given before sending the files again.
            st.late_checks -= 1
            log.info(
                "category %r: %d files of a timed-out upload are not in the dataset yet; "
                "looking again in %.1f s before sending them again",
                category,
                len(unsettled),
                st.late_wait,
            )
            self._sleep(st.late_wait)
            st.late_wait *= 2
            return "again"
        st.maybe_sent = False
        return unsettled

    def _upload_failed(
        self,
        exc: MviError | OSError,
        st: _Sending,
        category: str,
        sending: list[FileRow],
        rows: list[FileRow],
        report: BatchReport,
        started: float,
    ) -> None:
        """A POST of ``sending`` (of the batch's ``rows``) failed: decide, say and wait.

        Raises DatasetGone or UploadsPaused (after putting the rows back to ``pending``) when
        the dataset is gone or the server refuses the credentials or the certificate.
        """
        hint = getattr(exc, "retry_after", None)
        if isinstance(exc, AmbiguousError):
            st.maybe_sent = True
            st.late_checks = 0
            if isinstance(exc.__cause__, requests.exceptions.Timeout):
                st.late_checks = self._late_checks
                st.late_wait = max(self._clock() - started, self._retry.initial)
            log.warning(
                "category %r: upload of %d files may or may not have reached the server (%s); "
                "checking the dataset before sending again",
                category,
                len(sending),
                exc,
            )
        elif isinstance(exc, DatasetLocked):
            # Nothing was stored; a training holds the dataset, maybe for a long while.
            if not st.locked_seen:
                log.info(
                    "category %r: the dataset is locked by a training (%s); %d files wait "
                    "until it ends",
                    category,
                    exc.reason,
                    len(sending),
                )
                st.locked_seen = True
        elif isinstance(exc, TransientError):
            log.warning(
                "category %r: upload of %d files failed (%s); files stay pending, retrying",
                category,
                len(sending),
                exc,
            )
        elif isinstance(exc, (NotFoundError, AuthError, TlsError)):
            gone = isinstance(exc, NotFoundError)
            reason = "dataset not found" if gone else str(exc)
            self.ledger.mark_pending([r.id for r in rows], reason=reason)
            report.returned += len(rows)
            raise (DatasetGone if gone else UploadsPaused)(str(exc)) from exc
        elif isinstance(exc, RequestError):
            # A refusal without a per-file list says nothing of the files one by one: the
            # server may have stored some before refusing. Ask it before sending again.
            st.maybe_sent = True
            hint = None
            if len(sending) > 1:
                # The rest of the batch stays in it and goes one by one right after, so no
                # file falls back below the upload threshold to wait for the next flush.
                log.warning(
                    "the server refused a batch of %d files (%s); sending them one by one",
                    len(sending),
                    exc,
                )
                st.one_by_one = True
            else:
                self._refused_alone(sending[0], exc, report, st.faults)
        elif isinstance(exc, MviError):
            # An answer of an unexpected shape: the files may be stored; check first.
            st.maybe_sent = True
            hint = None
            log.warning(
                "category %r: unexpected answer to an upload (%s); checking the dataset before "
                "sending again",
                category,
                exc,
            )
        else:
            # A file vanished or changed while it was being sent: the request was cut short
            # and the server stored nothing. The next round re-checks every file on disk.
            hint = None
            log.warning(
                "category %r: a file changed while it was sent (%s); trying again", category, exc
            )
        self._backoff(st.attempt, hint)

    def _ensure_category(self, dataset_id: str, category: str) -> str | None:
        attempt = 0
        while not self._stop.is_set():
            attempt += 1
            try:
                return self.client.ensure_category(dataset_id, category)
            except TransientError as exc:
                log.warning(
                    "category %r: cannot look it up on the server (%s); retrying", category, exc
                )
                self._backoff(attempt, getattr(exc, "retry_after", None))
            except NotFoundError as exc:
                raise DatasetGone(str(exc)) from exc
            except (AuthError, TlsError) as exc:
                raise UploadsPaused(str(exc)) from exc
        return None

    def _still_on_disk(self, rows: list[FileRow], report: BatchReport) -> list[FileRow]:
        """Drop from the batch files deleted or changed since they were hashed."""
        keep = []
        for row in rows:
            try:
                st = os.stat(row.file_path)
            except FileNotFoundError:
                self.ledger.mark_pending([row.id])
                self.ledger.forget(row.id)
                log.warning("%s was deleted before upload; forgotten", row.rel_path)
                report.returned += 1
                report.forgotten += 1
                report.forgotten_bytes += row.size
                continue
            except OSError as exc:
                self.ledger.mark_pending([row.id], reason=f"unreadable: {exc.strerror}")
                log.warning("%s is unreadable (%s); will try again later", row.path, exc.strerror)
                report.returned += 1
                continue
            if (st.st_size, st.st_mtime_ns) != (row.size, row.mtime_ns):
                # Its content is being replaced: the pipeline sees the change and hashes anew.
                self.ledger.mark_pending([row.id])
                report.returned += 1
                continue
            keep.append(row)
        return keep

    def _settle_results(
        self,
        rows: list[FileRow],
        results: Sequence[FileResult],
        report: BatchReport,
        faults: FileFaults,
        batch_id: int | None = None,
    ) -> bool:
        """Record the server's verdict on ``rows``; True when every one of them is settled.

        ``batch_id`` when ``rows`` are all the batch has left: once all of them are uploaded,
        the batch is closed in the same commit.
        """
        uploaded: list[tuple[int, str | None]] = []
        rejected: list[tuple[int, str]] = []
        moved = 0  # sent while being overwritten: out of the batch, to be taken in again
        by_name: dict[str, list[FileResult]] = {}
        ordered = len(results) == len(rows)
        if not ordered:
            for entry in results:
                by_name.setdefault(entry.name, []).append(entry)
        for index, row in enumerate(rows):
            result: FileResult | None
            if ordered:
                result = results[index]
            else:
                matches = by_name.get(row.upload_name)
                result = matches.pop(0) if matches else None
            if result is not None and result.ok:
                if result.sent_sha256 is not None and result.sent_sha256 != row.sha256:
                    self._sent_other_content(row, result, report)
                    moved += 1
                    continue
                uploaded.append((row.id, result.file_id))
                report.names.append(f"{row.category}/{row.rel_path}")
                continue
            fault = (result.fault if result else None) or "no result for this file"
            reason = faults.verdict(row, fault, refusal=blames_the_file(fault))
            if reason is not None:
                rejected.append((row.id, reason))
        # Not durable on its own: one fsync per batch (begin_batch's) instead of two. The next
        # durable commit (the next batch's begin_batch, or the service's sync when uploads go
        # quiet) carries it to disk; a power cut before that leaves these rows in doubt, which
        # the next start resolves against the dataset's list rather than sending them again.
        closing = batch_id if len(uploaded) + moved == len(rows) else None
        marked = self.ledger.mark_uploaded(uploaded, durable=False, finish_batch=closing)
        report.uploaded += marked
        report.closed = closing is not None and marked == len(uploaded)
        if rejected:
            self.ledger.mark_rejected(rejected)
            report.rejected += len(rejected)
        settled = {fid for fid, _ in uploaded} | {fid for fid, _ in rejected}
        report.settled_bytes += sum(r.size for r in rows if r.id in settled)
        if len(uploaded) + len(rejected) + moved < len(rows):
            self._backoff(max(1, faults.worst))
            return False
        return marked == len(uploaded)

    def _sent_other_content(self, row: FileRow, result: FileResult, report: BatchReport) -> None:
        """The server stored what was read while the file was being overwritten in place.

        That copy is neither the old content nor the new: it is deleted on the server, and
        the file is looked at again, to be sent once it has settled. Where the server cannot
        delete it, it stays (and is said so), and the file's content is sent again all the
        same.
        """
        assert result.sent_sha256 is not None
        kept_as: str | None = None
        if result.file_id is not None and self.dataset_id is not None:
            try:
                self.client.delete_file(self.dataset_id, result.file_id, tries=DELETE_TRIES)
            except MviError as exc:
                kept_as = result.file_id
                log.error(
                    "%s changed while it was being sent, and the server's copy (file %s) is a "
                    "mix of two versions that could not be deleted (%s); delete it in the MVI "
                    "UI if it is. The file is looked at again once it has settled, and sent "
                    "again unless it holds what that copy holds",
                    row.rel_path,
                    result.file_id,
                    exc,
                )
        if kept_as is None:
            log.warning(
                "%s changed while it was being sent; the copy the server stored was deleted, "
                "and the file is sent again once it has settled",
                row.rel_path,
            )
        self.ledger.sent_other_content(row.id, kept_as=kept_as, sent_sha256=result.sent_sha256)
        report.returned += 1
        if self._look_again is not None:
            self._look_again(row.file_path)

    def _refused_alone(
        self, row: FileRow, exc: RequestError, report: BatchReport, faults: FileFaults
    ) -> None:
        """The server refused a request holding only ``row``: rejected once it did so often.

        Several refusals are needed, not one: a refusal of the whole request may have had
        nothing to do with the file (a fresh login that failed, a server hiccup).
        """
        reason = faults.verdict(row, str(exc), refusal=True)
        if reason is not None:
            self.ledger.mark_rejected([(row.id, reason)])
            report.rejected += 1
            report.settled_bytes += row.size

    def _leave_in_doubt(self, rows: list[FileRow], report: BatchReport) -> None:
        """Shutdown came before the server could be asked: the rows stay ``uploading``."""
        report.in_doubt += len(rows)
        log.info(
            "stopping: %d files of category %r stay in doubt until the next start",
            len(rows),
            rows[0].category,
        )

    # -- reconciling with the server -----------------------------------------------------

    def _reconcile(
        self,
        dataset_id: str,
        category: str,
        category_id: str,
        rows: list[FileRow],
        report: BatchReport,
    ) -> list[FileRow] | None:
        """Mark the rows the dataset already holds as uploaded; return the others.

        Returns None, changing nothing, when shutdown came before the server could be asked:
        the rows must then stay in doubt. Retries (with back-off) while the list cannot be
        read; raises DatasetGone, UploadsPaused, or the server's RequestError once it refused
        the listing ``max_file_attempts`` times in a row.
        """
        attempt = 0
        refusals = 0
        while True:
            if self._stop.is_set():
                return None
            attempt += 1
            try:
                with self._category_lock(category):
                    found = self._holdings.held(dataset_id, category, category_id, rows)
                break
            except TransientError as exc:
                log.warning(
                    "category %r: cannot list the dataset's files (%s); retrying", category, exc
                )
                self._backoff(attempt, getattr(exc, "retry_after", None))
            except NotFoundError as exc:
                raise DatasetGone(str(exc)) from exc
            except (AuthError, TlsError) as exc:
                raise UploadsPaused(str(exc)) from exc
            except RequestError as exc:
                # Servers answer "result: fail" in a 200 now and then; nothing may be sent
                # again before the list was read, so ask again rather than give up at once.
                refusals += 1
                if refusals >= self._max_file_attempts:
                    raise
                log.warning(
                    "category %r: the server refused to list the dataset's files (%s); retrying",
                    category,
                    exc,
                )
                self._backoff(attempt)
        if found:
            report.uploaded += self.ledger.mark_uploaded(found)
            held = {fid for fid, _ in found}
            report.settled_bytes += sum(r.size for r in rows if r.id in held)
            log.info(
                "category %r: the server had stored %d of %d files of an unanswered upload; "
                "not sending those again",
                category,
                len(found),
                len(rows),
            )
        done = {fid for fid, _ in found}
        return [r for r in rows if r.id not in done]

    def resolve_in_doubt(self) -> int:
        """Settle rows left ``uploading`` by a crash, against the server; return how many.

        Each one the dataset holds becomes ``uploaded``; the others go back to ``pending``.
        """
        dataset_id = self.dataset_id
        if dataset_id is None:
            return 0
        with self._active_lock:
            # Rows of a batch this process is sending right now are not in doubt.
            active = set(self._active_batches)
            rows = [r for r in self.ledger.in_doubt() if r.batch_id not in active]
        if not rows:
            return 0
        by_category: dict[str, list[FileRow]] = {}
        for row in rows:
            by_category.setdefault(row.category, []).append(row)
        resolved = 0
        for category, group in sorted(by_category.items()):
            category_id = self._ensure_category(dataset_id, category)
            if category_id is None:
                return resolved
            report = BatchReport(category)
            rest = self._reconcile(dataset_id, category, category_id, group, report)
            if rest is None:
                return resolved
            self.ledger.mark_pending([r.id for r in rest])
            log.info(
                "category %r: %d files were in doubt (their upload's outcome was not "
                "recorded): %d already on the server, %d to send again",
                category,
                len(group),
                report.uploaded,
                len(rest),
            )
            resolved += len(group)
        return resolved

    def mark_server_duplicates(self, category: str) -> int:
        """With skip_duplicates: pending files of ``category`` the dataset already holds become
        ``duplicate``; return how many.

        The server's list has no content hash, so "already holds" means a file of the same
        name and size in the same category, beyond the copies the ledger itself uploaded.
        Raises MviError when the server cannot be asked.
        """
        dataset_id = self.dataset_id
        if dataset_id is None:
            return 0
        category_id = self.client.find_category(dataset_id, category)
        if category_id is None:
            return 0  # the dataset has no such category yet: nothing to clash with
        pending = self.ledger.pending(category)
        found = self._holdings.held_by_name_and_size(
            dataset_id, category, str(category_id), pending
        )
        found_ids = {fid for fid, _ in found}
        why = "the dataset already holds a file of this name and size"
        self.ledger.mark_duplicates([(fid, why) for fid in found_ids])
        if found_ids:
            log.info(
                "category %r: %d pending files are already in the dataset (same name and size); "
                "skipping them (skip_duplicates)",
                category,
                len(found_ids),
            )
        return len(found_ids)
