"""Filesystem events as hints: a watchdog observer that feeds paths to the pipeline.

The handler runs on watchdog's observer thread. It maps each event to a path and hands it to a
sink (the service passes a non-blocking queue put); it does no I/O of its own, never blocks and
never raises, because an exception there would kill the observer thread and silently stop every
later event. Events can still be lost (kernel queue overflow, network file systems, a root that
was unmounted); the periodic scan covers that, so a lost event delays a file, never loses it.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from paiv_sync.configkeys import OBSERVERS

__all__ = [
    "KINDS",
    "NETWORK_FILESYSTEMS",
    "Sink",
    "Watcher",
    "filesystem_type",
    "is_network_filesystem",
    "read_mount_table",
]

logger = logging.getLogger(__name__)

Sink = Callable[[str, bool], None]
"""Receives (absolute path, is_directory) for every hint; must not block."""

KINDS = OBSERVERS

# File systems on which inotify / FSEvents miss changes made by other hosts, so only polling
# sees them. FUSE types appear as "fuse.<name>".
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb",
        "smb3",
        "smbfs",
        "sshfs",
        "fuse.sshfs",
        "afs",
        "ceph",
        "fuse.ceph",
        "glusterfs",
        "fuse.glusterfs",
        "lustre",
        "gpfs",
        "davfs",
        "fuse.davfs2",
        "fuse.rclone",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "9p",
        "drvfs",
        "vboxsf",
        "ncpfs",
        "coda",
        "webdav",
        "afpfs",
    }
)

# The events the handler uses. Asking inotify for these only keeps out the open, access and
# close-without-write events that the service's own reading of every new file (image check,
# hash, upload) would otherwise send back through the observer thread: eight per file.
_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileMovedEvent,
    DirMovedEvent,
    FileModifiedEvent,
    FileClosedEvent,
]
# inotify also tells when a writer closes a file, which covers every write before it: without
# its "modified" events (one per write call, dozens for a camera writing a large image in
# chunks) nothing is missed, because the stability gate watches a new file's size and mtime
# until they hold still. FSEvents (macOS) and polling have no close event: they keep them.
_INOTIFY_EVENTS: list[type[FileSystemEvent]] = [e for e in _EVENTS if e is not FileModifiedEvent]

# Handler errors are logged with a traceback at most this often; the rest are only counted.
_ERROR_LOG_INTERVAL = 60.0


def is_network_filesystem(fstype: str | None) -> bool:
    """Tell whether a mount type (as in /proc/self/mounts or mount(8)) is a network one."""
    if not fstype:
        return False
    fstype = fstype.lower()
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith("nfs")


def _unescape_mount_field(field: str) -> str:
    r"""Undo the octal escapes of /proc/self/mounts (``\040`` for a space, ...)."""
    if "\\" not in field:
        return field
    out = []
    index = 0
    while index < len(field):
        chunk = field[index : index + 4]
        if len(chunk) == 4 and chunk[0] == "\\" and chunk[1:].isdigit():
            out.append(chr(int(chunk[1:], 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)


def _parse_proc_mounts(text: str) -> list[tuple[str, str]]:
    table = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            table.append((_unescape_mount_field(fields[1]), fields[2]))
    return table


def _parse_mount_output(text: str) -> list[tuple[str, str]]:
    """Parse BSD/macOS ``mount`` output: ``//srv/share on /Volumes/share (smbfs, nodev, …)``."""
    table = []
    for line in text.splitlines():
        device_and_point, paren, options = line.rpartition(" (")
        if not paren or " on " not in device_and_point:
            continue
        mount_point = device_and_point.split(" on ", 1)[1]
        table.append((mount_point, options.split(",", 1)[0].rstrip(")").strip()))
    return table


def read_mount_table() -> list[tuple[str, str]]:
    """Return ``(mount point, file-system type)`` pairs for this machine.

    Reads /proc/self/mounts on Linux and runs ``mount`` on macOS and the BSDs. Returns an empty
    list when neither works (the caller then assumes local disks); never raises.
    """
    try:
        if sys.platform.startswith("linux"):
            return _parse_proc_mounts(Path("/proc/self/mounts").read_text(errors="replace"))
        if sys.platform == "darwin" or "bsd" in sys.platform:
            result = subprocess.run(
                ["mount"], capture_output=True, text=True, timeout=5, check=False
            )
            return _parse_mount_output(result.stdout)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("cannot read the mount table: %s", exc)
    return []


def filesystem_type(path: Path, mounts: Iterable[tuple[str, str]] | None = None) -> str | None:
    """Return the type of the file system holding ``path`` (its longest matching mount point).

    Takes the path and optionally a mount table as from :func:`read_mount_table` (read when not
    given). Returns e.g. ``"ext4"`` or ``"nfs4"``, or None when no mount point matches.
    """
    table = read_mount_table() if mounts is None else mounts
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for mount_point, fstype in table:
        point = mount_point.rstrip("/") or "/"
        inside = target == point or target.startswith(point + "/") or point == "/"
        if inside and (best is None or len(point) > best[0]):
            best = (len(point), fstype)
    return None if best is None else best[1]


class _Hints(FileSystemEventHandler):
    """The watchdog handler: events in, ``sink(path, is_directory)`` out."""

    def __init__(self, sink: Sink) -> None:
        super().__init__()
        self._sink = sink
        self.events = 0
        self.errors = 0
        self._last_error_log = float("-inf")
        self._errors_not_logged = 0

    def dispatch(self, event: FileSystemEvent) -> None:
        """Forward one event; every exception is caught, counted and logged (rate-limited)."""
        try:
            self.events += 1
            kind = event.event_type
            if kind == "moved":
                destination = event.dest_path
                if destination:
                    self._sink(os.fsdecode(destination), event.is_directory)
            elif kind == "created":
                self._sink(os.fsdecode(event.src_path), event.is_directory)
            elif kind in ("modified", "closed") and not event.is_directory:
                self._sink(os.fsdecode(event.src_path), False)
            # Deletions, attribute changes, opens and directory "modified" events carry no
            # new file: ignored.
        except Exception:  # noqa: BLE001 - an exception here would kill the observer thread
            self._failed(event)

    def _failed(self, event: FileSystemEvent) -> None:
        # This must not raise either: logging itself is guarded.
        try:
            self.errors += 1
            now = time.monotonic()
            if now - self._last_error_log < _ERROR_LOG_INTERVAL:
                self._errors_not_logged += 1
                return
            self._last_error_log = now
            logger.error(
                "could not pass on the filesystem event %s for %s (%d more errors not shown "
                "since the last report); the next scan will pick the file up",
                event.event_type,
                event.src_path,
                self._errors_not_logged,
                exc_info=True,
            )
            self._errors_not_logged = 0
        except Exception:  # noqa: BLE001 - nothing left to report it with
            pass


# Watchers with a native observer, told when watchdog reports a kernel queue overflow.
_native_watchers: weakref.WeakSet[Watcher] = weakref.WeakSet()
_overflow_filter_lock = threading.Lock()
_overflow_filter_installed = False


class _OverflowFilter(logging.Filter):
    """Sees watchdog's "Inotify queue overflowed" warning, the only sign of lost events.

    watchdog handles IN_Q_OVERFLOW itself (it rebuilds its watches) and reports it only through
    this log record, so a logging filter is the one way to notice it without patching watchdog.
    The filter never suppresses the record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            if "overflow" in str(record.msg).lower():
                thread = threading.current_thread()
                watchers = list(_native_watchers)
                # The record comes from the kernel-queue reader thread of one observer; when
                # it cannot be matched, every native watcher rescans rather than none.
                owners = [watcher for watcher in watchers if watcher._reads_in(thread)]
                for watcher in owners or watchers:
                    watcher._on_overflow()
        except Exception:  # a logging filter must not break watchdog's thread
            logger.debug("overflow bookkeeping failed", exc_info=True)
        return True


def _install_overflow_filter() -> None:
    global _overflow_filter_installed
    with _overflow_filter_lock:
        if not _overflow_filter_installed:
            logging.getLogger("watchdog.observers.inotify_c").addFilter(_OverflowFilter())
            _overflow_filter_installed = True


class Watcher:
    """Watches the roots with a watchdog observer and sends path hints to a sink.

    Takes the roots, the sink, the kind of observer (``"auto"``: polling for roots on network
    file systems, native otherwise; ``"native"``; ``"polling"``) and the polling interval in
    seconds. Raises ValueError for an unknown kind or a non-positive interval.
    """

    def __init__(
        self,
        roots: Sequence[Path],
        sink: Sink,
        *,
        kind: str = "auto",
        polling_interval: float = 2.0,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"watcher kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if polling_interval <= 0:
            raise ValueError(f"polling interval must be positive, got {polling_interval!r}")
        self.roots: tuple[Path, ...] = tuple(
            Path(os.path.abspath(root))  # noqa: PTH100 - keep links as configured, like Layout
            for root in roots
        )
        self.kind = kind
        self.polling_interval = polling_interval
        self._sink = sink
        self._handler = _Hints(sink)
        self._lock = threading.RLock()
        self._observers: list[tuple[str, BaseObserver, tuple[Path, ...]]] = []
        self._missing: tuple[Path, ...] = ()
        self._started = False
        self._events_lost = 0

    # --- public state ---------------------------------------------------------------------

    @property
    def kind_in_use(self) -> str:
        """``"native"`` or ``"polling"``; ``"native+polling"`` when roots needed both."""
        with self._lock:
            kinds = sorted({kind for kind, _, _ in self._observers}, reverse=False)
        if not kinds:
            return "polling" if self.kind == "polling" else "native"
        return "+".join(kinds)

    @property
    def missing_roots(self) -> tuple[Path, ...]:
        """Roots that did not exist (or could not be watched) at the last start."""
        return self._missing

    @property
    def events_seen(self) -> int:
        """How many events the handler received."""
        return self._handler.events

    @property
    def handler_errors(self) -> int:
        """How many events the handler failed to pass on (each was logged or counted)."""
        return self._handler.errors

    @property
    def events_lost(self) -> int:
        """How many times the kernel reported dropped events (inotify queue overflow)."""
        return self._events_lost

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start watching every root that exists; a missing root is logged and left out.

        Raises RuntimeError if already started, and OSError only when no observer of any kind
        can be started.
        """
        with self._lock:
            if self._started:
                raise RuntimeError("watcher already started")
            self._start_observers()
            self._started = True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the observers and wait up to ``timeout`` seconds for their threads to end."""
        with self._lock:
            observers = self._observers
            self._observers = []
            self._started = False
            _native_watchers.discard(self)
        for _, observer, _ in observers:
            try:
                observer.stop()
            except Exception:  # stop the others whatever happens to one
                logger.exception("error while stopping the file watcher")
        deadline = time.monotonic() + timeout
        for _, observer, _ in observers:
            if observer.is_alive():
                observer.join(max(0.0, deadline - time.monotonic()))
            if observer.is_alive():
                logger.warning("the file watcher thread did not stop within %.1f s", timeout)

    def restart(self) -> None:
        """Stop the current observers and start fresh ones (roots and mounts are looked at
        again, so a root that came back is watched)."""
        with self._lock:
            self.stop()
            logger.info("restarting the file watcher")
            self.start()

    def is_alive(self) -> bool:
        """Tell whether watching works: started, and no observer or per-root thread has died.

        A root's thread ends when the root itself is deleted or unmounted; the supervisor then
        calls :meth:`restart`, which leaves the missing root out until it is back.
        """
        with self._lock:
            if not self._started:
                return False
            observers = list(self._observers)
        for _, observer, _ in observers:
            if not observer.is_alive():
                return False
            # The inotify observer reads the kernel queue in a thread of its own; if that died,
            # no event arrives any more although the observer looks alive.
            reader = getattr(observer, "_inotify_fd", None)
            if isinstance(reader, threading.Thread) and not reader.is_alive():
                return False
            try:
                emitters = list(observer.emitters)
            except RuntimeError:  # the set changed while copying: look again next time
                continue
            if not all(emitter.is_alive() for emitter in emitters):
                return False
        return True

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- internals ------------------------------------------------------------------------

    def _reads_in(self, thread: threading.Thread) -> bool:
        """Tell whether ``thread`` reads the kernel event queue for one of our observers."""
        # No lock: this runs on watchdog's reader thread, which stop() may be joining while
        # holding the lock. Reading the list reference is atomic.
        for kind, observer, _ in self._observers:
            # watchdog's inotify observer keeps its reader thread as `_inotify_fd`.
            if kind == "native" and getattr(observer, "_inotify_fd", None) is thread:
                return True
        return False

    def _on_overflow(self) -> None:
        """Count a kernel queue overflow and ask for a rescan of the natively watched roots."""
        roots = [root for kind, _, group in self._observers if kind == "native" for root in group]
        self._events_lost += 1
        logger.warning(
            "the kernel dropped file events (inotify queue overflow); asking for a rescan of %s",
            ", ".join(str(root) for root in roots) or "no root",
        )
        for root in roots:
            # A directory hint makes the pipeline scan that folder: here the whole root.
            self._sink(str(root), True)

    def _choose_kinds(self, roots: Sequence[Path]) -> dict[Path, str]:
        if self.kind != "auto":
            return dict.fromkeys(roots, self.kind)
        table = read_mount_table()
        kinds = {}
        for root in roots:
            fstype = filesystem_type(root, table)
            if is_network_filesystem(fstype):
                logger.info(
                    "%s is on a network file system (%s): watching it by polling every %.1f s, "
                    "because native change notification misses changes made by other hosts",
                    root,
                    fstype,
                    self.polling_interval,
                )
                kinds[root] = "polling"
            else:
                kinds[root] = "native"
        return kinds

    def _new_observer(self, kind: str) -> BaseObserver:
        if kind == "polling":
            return PollingObserver(timeout=self.polling_interval)
        return Observer()

    def _start_group(self, kind: str, roots: Sequence[Path]) -> list[Path]:
        """Start one observer for ``roots``; return the roots it watches.

        Raises OSError with errno ENOSPC or EMFILE when the inotify limits are reached (the
        observer is cleaned up first).
        """
        observer = self._new_observer(kind)
        events = _INOTIFY_EVENTS if type(observer).__name__ == "InotifyObserver" else _EVENTS
        watched: list[Path] = []
        try:
            observer.start()
            for root in roots:
                try:
                    observer.schedule(self._handler, str(root), recursive=True, event_filter=events)
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EMFILE):
                        raise
                    logger.warning(
                        "cannot watch root folder %s (%s); it will be picked up by the "
                        "periodic scan and watched after the next restart of the watcher",
                        root,
                        exc,
                    )
                else:
                    watched.append(root)
        except BaseException:
            observer.stop()
            if observer.is_alive():
                observer.join()
            raise
        self._observers.append((kind, observer, tuple(watched)))
        if kind == "native":
            _install_overflow_filter()
            _native_watchers.add(self)
        return watched

    def _start_observers(self) -> None:
        present: list[Path] = []
        missing: list[Path] = []
        for root in self.roots:
            if root.is_dir():
                present.append(root)
            else:
                missing.append(root)
                logger.warning(
                    "root folder %s does not exist (unmounted?); not watching it for now, "
                    "the periodic scan will look for it again",
                    root,
                )
        kinds = self._choose_kinds(present)
        watched: list[Path] = []
        for kind in ("native", "polling"):
            group = [root for root in present if kinds[root] == kind]
            if not group:
                continue
            try:
                watched += self._start_group(kind, group)
            except OSError as exc:
                if kind != "native" or exc.errno not in (errno.ENOSPC, errno.EMFILE):
                    raise
                setting = (
                    "fs.inotify.max_user_watches"
                    if exc.errno == errno.ENOSPC
                    else "fs.inotify.max_user_instances"
                )
                logger.error(
                    "the inotify limit is reached (%s); falling back to polling every %.1f s, "
                    "which costs more CPU and disk reads. Raise it, e.g. "
                    "`sudo sysctl %s=524288` (persist it in /etc/sysctl.d/)",
                    exc.strerror or exc,
                    self.polling_interval,
                    setting,
                )
                watched += self._start_group("polling", group)
        self._missing = tuple(missing) + tuple(r for r in present if r not in watched)
        logger.info(
            "watching %d of %d root folders (%s)", len(watched), len(self.roots), self.kind_in_use
        )
