"""Intake: from path hints and scans to ledger rows.

A hint (a watchdog event) or a scan offers a file to the stability gate; once it has settled,
it is checked (a complete JPEG or PNG within the size limit), hashed and recorded in the
ledger: ``pending``, ``duplicate`` or ``rejected`` with the reason. A pending row whose file
is deleted before its upload is forgotten. All of this runs on the pipeline thread; the only
way out is the ledger (and the callbacks below), so that uploading can run beside it.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from paiv_sync import reconcile
from paiv_sync.batcher import Debouncer
from paiv_sync.config import Config
from paiv_sync.heartbeats import Heartbeats
from paiv_sync.ignore import IGNORE_FILE
from paiv_sync.images import Inspection, content_type, inspect_image
from paiv_sync.layout import SKIP_EXTENSION, SKIP_IN_ROOT, Layout, Location, Skip, shown
from paiv_sync.ledger import DUPLICATE, PENDING, Ledger, NewFile, Outcome
from paiv_sync.progress import ProgressCounter
from paiv_sync.scanner import SKIP_NOT_REGULAR, scan, scan_stats
from paiv_sync.stability import Settled, StabilityGate
from paiv_sync.stamps import Stamp, unchanged

log = logging.getLogger(__name__)

# How an event's path ends when it is a .paivignore file.
_IGNORE_FILE_TAIL = os.sep + IGNORE_FILE

# Rows given their ctime and inode per write while a scan goes through an older ledger.
_FILL_BATCH = 5000

# Named like an image but a pipe, socket or device: the user meant a file there.
_SKIP_SPECIAL_IMAGE = Skip(
    "not a regular file (a named pipe, socket or device); only regular files are uploaded",
    warn=True,
)


class Counts(Protocol):
    """Where intake counts what it found in a run (the service's run summary)."""

    added: int
    rejected: int
    duplicates: int


@dataclass(frozen=True)
class _Checked:
    """A settled file read and hashed, waiting to be recorded."""

    where: Location
    settled: Settled[Location]
    seen: Inspection


class Intake:
    """Takes files in for one configuration (its layout, its gate) into ``ledger``.

    ``counts``: where what was added, rejected and skipped as a duplicate is counted.
    ``pending_counts()`` gives the service's count of pending files per category (a dict
    that intake keeps in step as it adds files); ``changed()`` says the pending files changed
    otherwise; ``between_slices()`` runs after each slice of settled files is recorded (the
    service hands full batches to the upload workers there, while the rest is still read).
    ``thresholds_apply``: whether files wait for the upload threshold (not under ``--once``);
    only what is logged for a new file depends on it. ``scanning(root, files)`` is told how
    far a scan of a root has come, every few thousand files.
    """

    def __init__(
        self,
        config: Config,
        layout: Layout,
        gate: StabilityGate[Location],
        ledger: Ledger,
        *,
        counts: Counts,
        debouncer: Debouncer,
        beats: Heartbeats,
        progress: ProgressCounter | None,
        stop_event: threading.Event,
        clock: Callable[[], float],
        thresholds_apply: bool,
        pending_counts: Callable[[], dict[str, int]],
        changed: Callable[[], None],
        between_slices: Callable[[], None],
        scanning: Callable[[Path, int], None] | None = None,
    ) -> None:
        self.config = config
        self.layout = layout
        self.gate = gate
        self.ledger = ledger
        self.counts = counts
        self._debouncer = debouncer
        self._beats = beats
        self._progress = progress
        self._stop = stop_event
        self._clock = clock
        self._thresholds_apply = thresholds_apply
        self._pending_counts = pending_counts
        self._changed = changed
        self._between_slices = between_slices
        self._scanning = scanning
        self._warned: set[str] = set()

    # -- hints ---------------------------------------------------------------------------

    def take_hint(self, path: str, is_dir: bool) -> None:
        """A path the watcher saw created, modified or moved in."""
        if path.endswith(_IGNORE_FILE_TAIL):
            self._ignore_file_changed(path)
            return
        if is_dir:
            self.scan_subtree(Path(path))
            return
        where = self.layout.locate(path)
        if isinstance(where, Skip):
            if where in (SKIP_EXTENSION, SKIP_IN_ROOT) and os.path.islink(path):
                # A link named like no image: perhaps a folder linked in (watchdog reports a
                # new link as a file). The scan's rules decide: skipped with a warning, or,
                # with follow_symlinks, walked now rather than at the next rescan.
                self.scan_subtree(Path(path))
                return
            self._skip(path, where)
            return
        # The scan's rules for this one path, so an event cannot let in what a scan keeps out:
        # a link is not followed (or, with follow_symlinks, only to a target inside its root),
        # and only a regular file is taken — opening a named pipe would block this thread.
        # A regular file (nearly every event) takes the short way, as the scan would take it.
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return  # gone already: nothing to take
        except OSError:
            info = None  # the scan reports why it cannot look
        if info is not None and stat.S_ISREG(info.st_mode):
            self.gate.offer(where, info.st_size, info.st_mtime_ns)
            return
        for found in scan(
            self.layout,
            Path(path),
            follow_symlinks=self.config.follow_symlinks,
            on_skip=self._on_scan_skip,
        ):
            self.gate.offer(found.location, found.size, found.mtime_ns)

    def _skip(self, path: str, skip: Skip) -> None:
        if (skip.warn or skip.tell) and path not in self._warned:
            if len(self._warned) > 100_000:
                self._warned.clear()
            self._warned.add(path)
            log.log(
                logging.WARNING if skip.warn else logging.INFO,
                "%s skipped: %s",
                shown(path),
                skip.reason,
            )

    def _ignore_file_changed(self, path: str) -> None:
        """A .paivignore was written or removed: read the root's rules again, and look at the
        folder anew (a rule taken out lets in what it kept out)."""
        root = self.layout.root_of(path)
        if root is None:
            return
        root_text = str(root)
        self.layout.rules.load(root_text)
        folder = os.path.dirname(path)  # noqa: PTH120 - an event's path string
        prefix = "" if folder == root_text else os.path.relpath(folder, root_text) + "/"
        ruled_out = [
            rel
            for rel, _, _, state, _, _ in self.ledger.iter_stats(root_text)
            if state == PENDING
            and rel.startswith(prefix)
            and isinstance(self.layout.locate(os.path.join(root_text, rel)), Skip)
        ]
        for rel in ruled_out:  # not sent: the next dispatch would not wait for the rescan
            self.forget(root_text, rel, still_there=True)
        if os.path.isdir(folder):  # noqa: PTH112
            self.scan_subtree(Path(folder))

    def _on_scan_skip(self, path: Path, skip: Skip) -> None:
        if skip is SKIP_NOT_REGULAR and self.layout.classify_name(path.name) is None:
            skip = _SKIP_SPECIAL_IMAGE
        self._skip(str(path), skip)

    # -- scans ---------------------------------------------------------------------------

    def scan_root(self, root: Path) -> int:
        """Merge the scan of ``root`` with its ledger rows; return how many files were offered.

        See paiv_sync.reconcile: a file the ledger lacks or whose stamp differs enters the
        gate, a row of an older ledger gets its ctime and inode, and a pending row whose file
        is gone is forgotten (unless the root itself vanished during the scan).
        """
        ledger = self.ledger
        root_text = str(root)
        self.layout.rules.load(root_text)  # a .paivignore changed while no one watched

        def walk() -> Iterator[reconcile.Found]:
            found = scan_stats(
                self.layout,
                root,
                follow_symlinks=self.config.follow_symlinks,
                on_skip=self._on_scan_skip,
            )
            for count, item in enumerate(found, start=1):
                if count % 4096 == 0:
                    self._beats.loop()  # a long scan is progress too
                    if self._scanning is not None:
                        self._scanning(root, count)
                yield item

        def lookup(rel: str) -> reconcile.Recorded | None:
            row = ledger.lookup(root_text, rel)
            return None if row is None else row.stamp

        offered = 0
        fills: list[tuple[str, int, int]] = []
        gone: list[str] = []
        for change in reconcile.merge(walk(), ledger.iter_stats(root_text), lookup):
            if change.kind == reconcile.OFFER:
                assert change.found is not None
                _, size, mtime_ns, _, _ = change.found
                self.gate.offer(self.layout.at(root, change.rel_path), size, mtime_ns)
                offered += 1
            elif change.kind == reconcile.FILL:
                assert change.found is not None
                fills.append((change.rel_path, change.found[3], change.found[4]))
                if len(fills) >= _FILL_BATCH:
                    ledger.fill_stamps(root_text, fills)
                    fills = []
            else:
                gone.append(change.rel_path)
        ledger.fill_stamps(root_text, fills)
        if root.is_dir():  # vanished during the scan: do not take its files for deleted
            for rel in gone:
                self.forget(root_text, rel, still_there=os.path.lexists(os.path.join(root, rel)))
        return offered

    def scan_subtree(self, path: Path) -> None:
        """Offer the new or changed files below ``path`` (a folder moved in, a link made)."""
        for found in scan(
            self.layout,
            path,
            follow_symlinks=self.config.follow_symlinks,
            on_skip=self._on_scan_skip,
        ):
            loc = found.location
            row = self.ledger.lookup(str(loc.root), loc.rel_path)
            if row is not None and unchanged(
                row.stamp, found.size, found.mtime_ns, found.ctime_ns, found.inode
            ):
                continue
            self.gate.offer(loc, found.size, found.mtime_ns)

    def forget(self, root: str, rel: str, *, still_there: bool = False) -> None:
        """A file deleted before its upload (or, ``still_there``, one a scan no longer takes:
        an ignore rule made since): its pending row goes."""
        row = self.ledger.lookup(root, rel)
        if row is not None and row.state == PENDING and self.ledger.forget(row.id):
            self._changed()
            self._nothing_to_send(row.size)  # it was counted as a pending row
            if still_there:
                log.warning(
                    "%s is no longer taken (an ignore rule or the configuration keeps it out); "
                    "it will not be uploaded",
                    rel,
                )
            else:
                log.warning("%s was deleted before upload; forgotten", rel)

    # -- admitting settled files ---------------------------------------------------------

    def admit_settled(self) -> None:
        """Check, hash and record every file the gate found settled."""
        # In a burst (or --once) thousands of files settle at once: hand full batches to the
        # upload workers while the rest are still being hashed, so the two overlap.
        slice_size = self.config.batch_size * self.config.upload_workers
        due = self.gate.due(on_gone=self._gone)
        for start in range(0, len(due), slice_size):
            # Read and hash the slice first, then write it: the ledger is held only for the
            # writes, so the upload workers' commits do not wait for the file reads.
            checked: list[_Checked] = []
            located = due[start : start + slice_size]
            known = self.ledger.known_stats((str(s.key.root), s.key.rel_path) for s in located)
            for settled in located:
                if self._stop.is_set():
                    return
                where = settled.key
                if _recorded_as_is(settled, known.get((str(where.root), where.rel_path))):
                    # An event for a file the scan had seen, or a touch: nothing new.
                    self._nothing_to_send(settled.size)
                    continue
                found = self._inspect(settled)
                if found is not None:
                    checked.append(found)
            self._admit(checked)
            self._between_slices()

    def admit_all(self) -> None:
        """Wait for every file the gate watches to settle, and take it in (``--once``, and
        recording everything after the ledger was rebuilt)."""
        while len(self.gate) and not self._stop.is_set():
            due = self.gate.next_due()
            if due is not None:
                self._stop.wait(max(0.0, min(1.0, due - self._clock())))
            self.admit_settled()

    def _gone(self, gone: Settled[Location]) -> None:
        self._nothing_to_send(gone.size)
        self.forget(str(gone.key.root), gone.key.rel_path)

    def _inspect(self, settled: Settled[Location]) -> _Checked | None:
        """Check and hash one settled file; None when there is nothing to record."""
        where = settled.key
        root, rel, path = str(where.root), where.rel_path, where.path
        try:
            # One open for the image checks, the kind and the hash: every open costs a syscall
            # pair and, in watch mode, inotify events the observer thread has to wade through.
            seen = inspect_image(path, self.config.max_file_size)
            st = os.stat(path)  # by path: a file replaced meanwhile shows here
        except FileNotFoundError:
            self._nothing_to_send(settled.size)
            self.forget(root, rel)
            return None
        except OSError as exc:
            self._nothing_to_send(settled.size)
            log.warning(
                "%s cannot be read (%s); will try again at the next scan", rel, exc.strerror or exc
            )
            return None
        if (st.st_size, st.st_mtime_ns) != (settled.size, settled.mtime_ns) or (
            seen.stamp is not None and Stamp.of(st) != seen.stamp
        ):
            # Still being written, or replaced while it was read: back to the gate, still to
            # be sent (the size counted for progress is the one seen first; a file growing
            # meanwhile makes the bytes a guess).
            self.gate.offer(where, st.st_size, st.st_mtime_ns)
            return None
        return _Checked(where, settled, seen)

    def _admit(self, checked: Sequence[_Checked]) -> None:
        """Record a slice of checked files, in one transaction: rejected, duplicate or pending."""
        images: list[_Checked] = []
        with self.ledger.batch():
            for found in checked:
                if found.seen.problem is None:
                    images.append(found)
                    continue
                where, settled, stamp = found.where, found.settled, found.seen.stamp
                self.ledger.reject(
                    root=str(where.root),
                    rel_path=where.rel_path,
                    category=where.category,
                    size=settled.size,
                    mtime_ns=settled.mtime_ns,
                    reason=found.seen.problem,
                    ctime_ns=stamp.ctime_ns if stamp else None,
                    inode=stamp.inode if stamp else None,
                )
                self.counts.rejected += 1
                self._nothing_to_send(settled.size)
                log.warning("%s not uploaded: %s", where.rel_path, found.seen.problem)
            counts = self._pending_counts()  # before the new rows, so the +1 below is right
            outcomes = self.ledger.record_many(
                [_new_file(found) for found in images],
                skip_duplicates=self.config.skip_duplicates,
            )
        for found, outcome in zip(images, outcomes, strict=True):
            if outcome.new:
                self._added(found, outcome, counts)
            else:
                self._nothing_to_send(found.settled.size)

    def _added(self, found: _Checked, outcome: Outcome, counts: dict[str, int]) -> None:
        """Count and log one file the ledger took as new."""
        rel, category = found.where.rel_path, found.where.category
        previous = outcome.previous
        if previous is not None and previous.state == PENDING:
            # Counted for progress twice, as a pending row and as a file to look at: once now.
            self._nothing_to_send(previous.size)
        if outcome.row.state == DUPLICATE:
            self.counts.duplicates += 1
            self._nothing_to_send(found.settled.size)
            log.info("%s not uploaded: %s (skip_duplicates)", rel, outcome.row.reason)
            return
        self.counts.added += 1
        self._debouncer.arrived(category)
        counts[category] = counts.get(category, 0) + 1
        count = counts[category]
        needed = self._debouncer.needed(count)
        if not self._thresholds_apply:
            log.info("%s added — %d pending", rel, count)
        elif needed:
            log.info(
                "%s added — %d pending, %d more needed to reach the upload threshold (%d)",
                rel,
                count,
                needed,
                self.config.upload_threshold,
            )
        else:
            log.info(
                "%s added — %d pending, uploading after %g s without new files",
                rel,
                count,
                self.config.quiet_time,
            )

    def _nothing_to_send(self, size: int) -> None:
        """A file counted for ``--once`` progress turned out to need no upload."""
        if self._progress is not None:
            self._progress.add(total=(-1, -size))


def _recorded_as_is(
    settled: Settled[Location], recorded: tuple[int, int, int | None, int | None] | None
) -> bool:
    """Whether the ledger's row (its stamp) shows ``settled`` as it is: no need to read it.

    Size and mtime are what the gate saw; ctime and inode, when the row has them, take one
    more stat here, so a replacement that kept size and mtime (``cp -p``) is read.
    """
    if recorded is None or recorded[:2] != (settled.size, settled.mtime_ns):
        return False
    if recorded[2] is None:
        return True  # a row from before ctime and inode were kept: size and mtime decide
    try:
        st = os.stat(settled.key.path)
    except OSError:
        return False  # _inspect says what is wrong
    return unchanged(recorded, *Stamp.of(st))


def _new_file(found: _Checked) -> NewFile:
    """The ledger's view of a checked image."""
    stamp = found.seen.stamp
    return NewFile(
        str(found.where.root),
        found.where.rel_path,
        found.where.category,
        found.settled.size,
        found.settled.mtime_ns,
        found.seen.sha256 or "",
        content_type(found.seen.kind or "jpeg"),
        stamp.ctime_ns if stamp else None,
        stamp.inode if stamp else None,
    )
