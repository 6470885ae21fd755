"""The uploader: sends one category's pending files in batches and settles each file's fate.

A file leaves ``pending`` only when the server confirmed it. A POST whose outcome cannot be
known (the connection dropped after the request went out, a read timed out, a 5xx) leaves its
files ``uploading``; before any of them is sent again, the batch is reconciled against what the
dataset really holds, so a file is never stored twice. The server's file list carries no content
hash, so a stored file is recognised by its original name (as sent) and size in its category,
counting the copies the ledger already knows about -- earlier contents of replaced files included.

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
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
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
    NotSupportedError,
    RequestError,
    TlsError,
    TransientError,
    UploadPart,
    as_int,
    wire_name,
)
from paiv_sync.ledger import REFUSED_PREFIX, FileRow, Ledger
from paiv_sync.retry import RetryPolicy

log = logging.getLogger(__name__)


# The user-metadata keys each upload carries (see docs/configuration.md, "Upload tags").
TAG_HOST = "paiv_sync_host"
TAG_INSTANCE = "paiv_sync_instance"
TAG_BATCH = "paiv_sync_batch"
TAG_FOLDER = "paiv_sync_folder"


# Words in a per-file fault that blame the file itself (its type, size or content) rather than
# the server: the file is refused after a few tries. Any other fault ("Internal error while
# storing the file", no verdict at all) is the server's: the file is sent again, with back-off,
# for as long as TRANSIENT_LIMIT.
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

# Tries of a DELETE of a copy that holds other content than checked (see _sent_other_content):
# the upload worker must not wait for ever on a server that keeps failing them.
DELETE_TRIES = 5
# How often (seconds) each category looks for uploads of another paiv-sync from its folder.
OTHER_FEEDER_INTERVAL = 600.0

# How long the server may keep failing one file (while storing others) before it is set aside
# as rejected; a restart or ``paiv-sync retry`` sends it again.
TRANSIENT_LIMIT = 900.0


def blames_the_file(fault: str) -> bool:
    """Tell whether a server's per-file fault says the file itself is unacceptable."""
    text = fault.lower()
    return any(word in text for word in _REFUSAL_WORDS)


class _FileFaults:
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


@dataclass(frozen=True)
class UploadTags:
    """What each upload tells the server of where it came from (as user metadata).

    ``instance`` is the ledger's own random id: with the ledger's batch id it names one batch
    uniquely across every station feeding the dataset, so a batch whose answer was lost can be
    looked up on the server as exactly that batch.
    """

    host: str
    instance: str

    def batch(self, batch_id: int) -> str:
        """The tag value of batch ``batch_id``."""
        return f"{self.instance}:{batch_id}"

    def metadata(self, batch_id: int, rows: Sequence[FileRow]) -> dict[str, str]:
        """The user metadata of one POST of batch ``batch_id`` (holding ``rows``)."""
        return {
            TAG_HOST: self.host,
            TAG_INSTANCE: self.instance,
            TAG_BATCH: self.batch(batch_id),
            TAG_FOLDER: self.folder(rows),
        }

    @staticmethod
    def folder(rows: Sequence[FileRow]) -> str:
        """The folder tag of a POST holding ``rows``: their category folders, sorted."""
        folders = sorted({os.path.join(r.root, r.rel_path.split("/", 1)[0]) for r in rows})
        return "; ".join(folders)


@dataclass
class _Sending:
    """Where the sending of one batch stands (see Uploader._send_batch)."""

    faults: _FileFaults
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
        # Upload tags, and whether the dataset's server stores and queries them: None until
        # it was seen (and then kept in the ledger), True or False after.
        self.tags: UploadTags | None = None
        self._tag_support: dict[str, bool] = {}
        # Looking for another paiv-sync feeding the dataset from the same folders: when each
        # category is due, what was said, and since when (server time, epoch ms) it counts.
        self._feeder_checks: dict[str, float] = {}
        self._feeders_said: set[tuple[str, str]] = set()
        self._started_ms = int(time.time() * 1000)

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
            self._look_for_other_feeders(dataset_id, category, file_ids)
        return report

    def _look_for_other_feeders(
        self, dataset_id: str, category: str, file_ids: Sequence[int]
    ) -> None:
        """Say so when another paiv-sync uploads from the same folder into this dataset.

        Two services with their own ledgers on the same folders each send every image: the
        dataset gets it twice. Their uploads carry another instance tag: one query (every
        OTHER_FEEDER_INTERVAL per category, where the server keeps and queries the tags) finds
        such files stored since this process started.
        """
        tags = self.tags
        now = self._clock()
        if (
            tags is None
            or not self.tags_supported(dataset_id)
            or now < self._feeder_checks.get(category, 0.0)
        ):
            return
        self._feeder_checks[category] = now + OTHER_FEEDER_INTERVAL
        rows = [r for r in (self.ledger.get(i) for i in file_ids) if r is not None]
        folder = tags.folder(rows)
        if not folder or any(c in folder for c in '"\\,'):
            return  # not a value a query can carry safely: the check is skipped
        query = (
            f'metadata.{TAG_FOLDER} == "{folder}", metadata.{TAG_INSTANCE} != "{tags.instance}", '
            f"created_at > {self._started_ms}"
        )
        try:
            found = self.client.list_files(dataset_id, query=query, limit=1, retry=False)
            if not found:
                return
            other = self.client.file_metadata(dataset_id, str(found[0].get("_id")), retry=False)
        except MviError as exc:
            log.debug("could not look for another paiv-sync feeding %s: %s", folder, exc)
            return
        instance = str(other.get(TAG_INSTANCE, "?"))
        if (folder, instance) in self._feeders_said:
            return
        self._feeders_said.add((folder, instance))
        log.warning(
            "another paiv-sync (host %s, instance %s, not this one's ledger) is uploading files "
            "from %s into dataset %s too: each image may reach the dataset twice. Run one "
            "paiv-sync per folder and dataset (stop the other, or take the folder out of one "
            "of the configurations)",
            other.get(TAG_HOST, "?"),
            instance,
            folder,
            dataset_id,
        )

    def _send_batch(
        self,
        batch_id: int,
        dataset_id: str,
        category: str,
        category_id: str,
        report: BatchReport,
    ) -> None:
        """POST the batch's rows until each is settled, shutdown comes, or uploads pause."""
        st = _Sending(_FileFaults(self._clock, self._max_file_attempts, self._transient_limit))
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
            tags = self.tags
            try:
                results = self.client.upload(
                    dataset_id,
                    [UploadPart(r.file_path, r.upload_name, r.content_type or "") for r in sending],
                    category_name=category,
                    category_id=category_id,
                    metadata=tags.metadata(batch_id, sending) if tags is not None else None,
                )
            except (MviError, OSError) as exc:
                self._upload_failed(exc, st, category, sending, rows, report, started)
                continue
            settled_all = self._settle_results(
                sending, results, report, st.faults, batch_id if sending is rows else None
            )
            if self.tags is not None and self.tags_supported(dataset_id) is None:
                stored = next((r.file_id for r in results if r.ok and r.file_id), None)
                if stored is not None:
                    self._learn_tag_support(dataset_id, batch_id, stored)
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
        faults: _FileFaults,
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
        self, row: FileRow, exc: RequestError, report: BatchReport, faults: _FileFaults
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
                    found = self._held_by_server(dataset_id, category, category_id, rows)
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

    # -- upload tags ---------------------------------------------------------------------

    def tags_supported(self, dataset_id: str) -> bool | None:
        """Whether the server stores and queries the upload tags (None: not known yet)."""
        if dataset_id not in self._tag_support:
            known = self.ledger.get_meta(f"tags_supported:{dataset_id}")
            if known is None:
                return None
            self._tag_support[dataset_id] = known == "yes"
        return self._tag_support[dataset_id]

    def _learn_tag_support(self, dataset_id: str, batch_id: int, file_id: str) -> None:
        """After the first upload into a dataset: does the server keep and query our tags?

        Yes when the file just stored carries the batch's tag, a query for that tag finds it,
        and a query for a tag nobody sent finds nothing (a server that ignores ``query``
        answers every file). Any other answer is a no; a failure to ask leaves it unknown.
        """
        if self.tags is None:
            return
        tag = self.tags.batch(batch_id)
        try:
            # One try each: the uploads must not wait on this; unknown means "ask again later".
            metadata = self.client.file_metadata(dataset_id, file_id, retry=False)
            supported = metadata.get(TAG_BATCH) == tag
            if supported:
                found = self.client.list_files(dataset_id, query=_tag_query(tag), retry=False)
                nobody = self.client.list_files(
                    dataset_id, query=_tag_query(tag + ":none"), retry=False
                )
                supported = file_id in {f.get("_id") for f in found} and not nobody
        except NotSupportedError:
            supported = False
        except MviError as exc:
            log.debug("could not check whether the server keeps upload tags: %s", exc)
            return
        self._tag_support[dataset_id] = supported
        self.ledger.set_meta(f"tags_supported:{dataset_id}", "yes" if supported else "no")
        log.info(
            "the server %s the upload tags (user metadata): files in doubt are looked up %s",
            "keeps and queries" if supported else "does not keep or query",
            "by their batch" if supported else "by name and size in their category",
        )

    def _held_by_server(
        self, dataset_id: str, category: str, category_id: str, rows: Iterable[FileRow]
    ) -> list[tuple[int, str | None]]:
        rows = list(rows)
        if (
            self.tags is not None
            and self.tags_supported(dataset_id)
            and all(r.batch_id is not None for r in rows)
        ):
            return self._held_in_batches(dataset_id, rows)
        return self._held_by_name_and_size(dataset_id, category, category_id, rows)

    def _held_in_batches(
        self, dataset_id: str, rows: list[FileRow]
    ) -> list[tuple[int, str | None]]:
        """Rows the server holds, asking it for exactly the files of each row's batch.

        Of the files tagged with a batch, those the ledger already records as uploaded are
        set aside; each row then takes one of the rest with its name and size.
        """
        assert self.tags is not None
        found: list[tuple[int, str | None]] = []
        by_batch: dict[int, list[FileRow]] = {}
        for row in rows:
            assert row.batch_id is not None
            by_batch.setdefault(row.batch_id, []).append(row)
        for batch_id, group in by_batch.items():
            tagged = list(
                self.client.iter_files(dataset_id, query=_tag_query(self.tags.batch(batch_id)))
            )
            listed = {str(f["_id"]) for f in tagged if f.get("_id") is not None}
            # A row that already names its stored copy (recorded, then put in doubt by a
            # crash before the commit was on disk) is held when that copy is listed.
            own = {r.server_file_id for r in group if r.server_file_id in listed}
            set_aside = self.ledger.known_server_ids(listed - own) | own
            free: dict[tuple[str, int], list[str | None]] = {}
            for item in tagged:
                server_id = item.get("_id")
                if server_id is not None and str(server_id) in set_aside:
                    continue
                key = (str(item.get("original_file_name", "")), as_int(item.get("size")))
                free.setdefault(key, []).append(None if server_id is None else str(server_id))
            for row in group:
                if row.server_file_id in own:
                    found.append((row.id, row.server_file_id))
                    continue
                copies = free.get((wire_name(row.upload_name), row.size))
                if copies:
                    found.append((row.id, copies.pop(0)))
        return found

    def _held_by_name_and_size(
        self, dataset_id: str, category: str, category_id: str, rows: Iterable[FileRow]
    ) -> list[tuple[int, str | None]]:
        server: dict[tuple[str, int], list[str | None]] = {}
        listed: set[object] = set()
        for item in self.client.iter_files(dataset_id, category_id=category_id):
            server_id = item.get("_id")
            if server_id is not None:
                # Paging while files arrive can list one twice: a repeat must not count as a
                # second copy, or an unsent file would pass for stored.
                if server_id in listed:
                    continue
                listed.add(server_id)
            key = (str(item.get("original_file_name", "")), as_int(item.get("size")))
            server.setdefault(key, []).append(server_id)
        # The server records a file under the name it was sent as, which is not always the
        # name on disk (see ``wire_name``): compare names as the server knows them.
        known: Counter[tuple[str, int]] = Counter()
        for (name, size), count in self.ledger.uploaded_keys(category).items():
            known[(wire_name(name), size)] += count
        found: list[tuple[int, str | None]] = []
        taken: Counter[tuple[str, int]] = Counter()
        for row in rows:
            key = (wire_name(row.upload_name), row.size)
            copies = server.get(key, [])
            if len(copies) - known.get(key, 0) - taken[key] > 0:
                found.append((row.id, copies[-1 - taken[key]]))
                taken[key] += 1
        return found

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
        categories = {c.get("name"): c.get("_id") for c in self.client.list_categories(dataset_id)}
        category_id = categories.get(category)
        if category_id is None:
            return 0  # the dataset has no such category yet: nothing to clash with
        pending = self.ledger.pending(category)
        found = self._held_by_name_and_size(dataset_id, category, str(category_id), pending)
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


def _tag_query(tag: str) -> str:
    """The ``query`` that finds the files of one batch."""
    return f'metadata.{TAG_BATCH} == "{tag}"'
