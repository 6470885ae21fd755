"""The ledger: a SQLite database (WAL) that remembers every file seen and where it stands.

Nothing about a file lives only in RAM. Each row moves ``pending`` → ``uploading`` →
``uploaded``, or ends ``duplicate`` or ``rejected`` (with a reason). A row is ``uploading`` only
while its POST is in flight; rows found ``uploading`` at start-up are "in doubt" and are resolved
against what the server holds before anything is sent again.

One connection is shared by the service's threads behind a lock: every call is short (no network
I/O happens while the lock is held), and SQLite serialises writers anyway. The calls made for
every file work on whole slices and batches with set-based statements: each statement step lets
go of the interpreter lock, and a thread holding the ledger must then wait to get it back, so
the number of statements per lock hold, not their cost inside SQLite, sets the pace.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PENDING = "pending"
UPLOADING = "uploading"
UPLOADED = "uploaded"
DUPLICATE = "duplicate"
REJECTED = "rejected"
STATES = (PENDING, UPLOADING, UPLOADED, DUPLICATE, REJECTED)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id             INTEGER PRIMARY KEY,
    root           TEXT    NOT NULL,
    rel_path       TEXT    NOT NULL,
    category       TEXT    NOT NULL,
    upload_name    TEXT    NOT NULL,
    size           INTEGER NOT NULL,
    mtime_ns       INTEGER NOT NULL,
    sha256         TEXT,
    content_type   TEXT,
    state          TEXT    NOT NULL,
    reason         TEXT,
    attempts       INTEGER NOT NULL DEFAULT 0,
    batch_id       INTEGER,
    server_file_id TEXT,
    first_seen     REAL    NOT NULL,
    updated        REAL    NOT NULL,
    uploaded_at    REAL,
    ctime_ns       INTEGER,
    inode          INTEGER,
    UNIQUE (root, rel_path)
);
CREATE INDEX IF NOT EXISTS files_by_state ON files (state, category);
CREATE INDEX IF NOT EXISTS files_by_content ON files (category, sha256);
CREATE TABLE IF NOT EXISTS batches (
    id         INTEGER PRIMARY KEY,
    category   TEXT NOT NULL,
    dataset_id TEXT NOT NULL,
    started    REAL NOT NULL,
    finished   REAL,
    outcome    TEXT
);
CREATE TABLE IF NOT EXISTS trainings (
    id               INTEGER PRIMARY KEY,
    name             TEXT NOT NULL UNIQUE,
    model_name       TEXT NOT NULL,
    dataset_id       TEXT NOT NULL,
    pretrained_model TEXT,
    task_id          TEXT,
    state            TEXT NOT NULL,
    reason           TEXT,
    uploads_mark     INTEGER NOT NULL,
    requested_at     REAL NOT NULL,
    finished_at      REAL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS replaced_uploads (
    id             INTEGER PRIMARY KEY,
    category       TEXT    NOT NULL,
    upload_name    TEXT    NOT NULL,
    size           INTEGER NOT NULL,
    sha256         TEXT,
    server_file_id TEXT,
    replaced_at    REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS replaced_by_key ON replaced_uploads (category, upload_name, size);
"""

# How a server's refusal of one file (its type, size or content) is recorded: a restart and
# ``paiv-sync retry`` leave such rows alone, ``retry --rejected`` sends them again. Any other
# server-side rejection was the server failing: a restart sends the file again.
REFUSED_PREFIX = "refused by the server: "

# Training states kept in the ledger. ``requesting`` means the POST /dltasks may or may not have
# reached the server: it is resolved against the server's task list before anything else.
REQUESTING = "requesting"
TRAINING = "training"
TRAINED = "trained"
FAILED = "failed"


class LedgerError(Exception):
    """The ledger cannot be opened or used; the message says what to do."""


class LedgerLocked(LedgerError):
    """Another paiv-sync process holds the ledger."""


class LedgerCorrupt(LedgerError):
    """The ledger's database file is damaged (not a database, or malformed)."""


class LedgerWriteError(LedgerError):
    """A write to the ledger failed (a full or failing disk); nothing of it was kept."""


def disk_problem(path: Path, exc: BaseException) -> str:
    """Say what is wrong with the disk holding ``path`` after ``exc``, and what to do.

    SQLite reports a full disk as "database or disk is full" at best, and often as a bare
    "disk I/O error" (when it cannot grow its log): the free space tells the two apart.
    """
    folder = path.parent
    try:
        free: int | None = shutil.disk_usage(folder).free
    except OSError:
        free = None
    code = getattr(exc, "sqlite_errorcode", None)
    full = (
        getattr(exc, "errno", None) == errno.ENOSPC
        or (code is not None and code & 0xFF == _SQLITE_FULL)
        or (free is not None and free < _LOW_SPACE)
    )
    if full:
        left = f"{free:,} bytes free" if free is not None else "free space unknown"
        return (
            f"no space left on the device holding {folder} ({left}): free some space there, "
            'or move the ledger to a larger disk (the "ledger" key)'
        )
    reason = getattr(exc, "strerror", None) or str(exc)
    return f"{reason} (on the device holding {folder}); check that disk"


# SQLite's result code for a full disk, and the free space below which a failed write is put
# down to a full disk.
_SQLITE_FULL = 13
_LOW_SPACE = 1 << 20


class LedgerMismatch(LedgerError):
    """The ledger records another server or dataset than the configuration names."""


# SQLite's primary result codes for a damaged file: SQLITE_CORRUPT and SQLITE_NOTADB.
_CORRUPT_CODES = (11, 26)

# Why a row is in doubt after the ledger was rebuilt: the server may hold the file already.
RECOVERED_REASON = "ledger rebuilt: to be checked against the dataset before any upload"


def recorded_owner(path: Path) -> str | None:
    """The configuration file the ledger at ``path`` records as its own, or None.

    None too when it records none (written by an earlier version) or cannot be read: the
    ledger's own checks at open say what is wrong with it.
    """
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'config_path'").fetchone()
        finally:
            db.close()
    except (sqlite3.Error, OSError):
        return None
    return str(row[0]) if row else None


@dataclass(frozen=True)
class FileRow:
    """One file as the ledger knows it."""

    id: int
    root: str
    rel_path: str
    category: str
    upload_name: str
    size: int
    mtime_ns: int
    sha256: str | None
    content_type: str | None
    state: str
    reason: str | None
    attempts: int
    batch_id: int | None
    server_file_id: str | None
    ctime_ns: int | None = None  # with inode, see paiv_sync.stamps: None in rows recorded
    # before they were kept
    inode: int | None = None

    @property
    def stamp(self) -> tuple[int, int, int | None, int | None]:
        """``(size, mtime_ns, ctime_ns, inode)`` as recorded (see paiv_sync.stamps.unchanged)."""
        return (self.size, self.mtime_ns, self.ctime_ns, self.inode)

    @property
    def path(self) -> Path:
        """The file's absolute path on disk."""
        return Path(self.root, self.rel_path)

    @property
    def file_path(self) -> str:
        """:attr:`path` as a string, made without a Path (cheaper, for every file)."""
        return os.path.join(self.root, self.rel_path)


@dataclass(frozen=True)
class TrainingRow:
    """One training request this service made."""

    id: int
    name: str
    model_name: str
    dataset_id: str
    pretrained_model: str | None
    task_id: str | None
    state: str
    reason: str | None
    uploads_mark: int
    requested_at: float
    finished_at: float | None


@dataclass(frozen=True)
class Outcome:
    """What ``Ledger.record`` did with a file."""

    row: FileRow
    new: bool  # a new file, or new content at a known path
    previous: FileRow | None = None  # the row before, when new content replaced it


_FILE_COLUMNS = (
    "id, root, rel_path, category, upload_name, size, mtime_ns, sha256, content_type, state, "
    "reason, attempts, batch_id, server_file_id, ctime_ns, inode"
)
_TRAINING_COLUMNS = (
    "id, name, model_name, dataset_id, pretrained_model, task_id, state, reason, uploads_mark, "
    "requested_at, finished_at"
)


# fdatasync where the system has it (Linux); fsync elsewhere (macOS), as SQLite itself does.
_datasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)

# The size (bytes) the write-ahead log is cut back to after a checkpoint (see checkpoint).
_WAL_LIMIT = 1 << 20

# Host parameters per statement: below SQLITE_MAX_VARIABLE_NUMBER of SQLite before 3.32 (999).
_MAX_PARAMS = 900


def _marks(count: int) -> str:
    """``?, ?, …`` for ``count`` host parameters."""
    return ", ".join("?" * count)


# Statements that pick rows by id among rows of one state. "+state" (and "+root") keep SQLite
# from planning them on the state index, which at a million pending rows scans every pending
# row per batch; by id they are one rowid lookup per row (tests/test_ledger.py checks the plan).
def _in_state_by_id(marks: str) -> str:
    return f"WHERE +state = ? AND id IN ({marks})"


def _to_batch_sql(root_filter: str, count: int) -> str:
    unindexed_roots = root_filter.replace(" root IN ", " +root IN ")
    return (
        "UPDATE files SET state = ?, batch_id = ?, attempts = attempts + 1, updated = ? "
        f"WHERE +state = ?{unindexed_roots} AND id IN ({_marks(count)})"
    )


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _by_root(keys: Iterable[tuple[str, str]]) -> Iterator[tuple[str, Sequence[str]]]:
    """``(root, rel_path)`` keys as ``(root, rel_paths)`` in chunks one statement can take."""
    by_root: dict[str, list[str]] = {}
    for root, rel_path in keys:
        by_root.setdefault(root, []).append(rel_path)
    for root, rel_paths in by_root.items():
        for chunk in _chunks(rel_paths, _MAX_PARAMS):
            yield root, chunk


def _has_stamp_columns(db: sqlite3.Connection) -> bool:
    return "ctime_ns" in {row[1] for row in db.execute("PRAGMA table_info(files)")}


def _add_stamp_columns(db: sqlite3.Connection) -> None:
    """Give a ledger of an earlier version the ctime and inode columns (NULL in old rows)."""
    if not _has_stamp_columns(db):
        db.execute("BEGIN IMMEDIATE")
        db.execute("ALTER TABLE files ADD COLUMN ctime_ns INTEGER")
        db.execute("ALTER TABLE files ADD COLUMN inode INTEGER")
        db.execute("COMMIT")


@dataclass(frozen=True)
class NewFile:
    """A complete, hashed file for :meth:`Ledger.record_many`."""

    root: str
    rel_path: str
    category: str
    size: int
    mtime_ns: int
    sha256: str
    content_type: str
    ctime_ns: int | None = None  # with inode: see paiv_sync.stamps
    inode: int | None = None


# The states in which a row's content counts as in the dataset or on its way there.
_HELD_STATES = (PENDING, UPLOADING, UPLOADED)


class Ledger:
    """The SQLite ledger at ``path``, opened for exclusive use by this process.

    Raises LedgerLocked when another process has it open, LedgerError when the file or its
    folder cannot be created or read.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        readonly: bool = False,
        recover: bool = False,
    ) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.RLock()
        self._lock_file: Any = None
        self.rebuilt = False  # True when a corrupt database was moved aside (``recover``)
        self._recovering = False
        # The write-ahead log, opened once to sync it (it lives as long as the connection).
        self._wal_fd: int | None = None
        self._wal_guard = threading.Lock()
        self._root_filter = ""  # see only_roots
        self._root_args: tuple[str, ...] = ()
        if readonly:
            # For ``status`` while the service runs: no lock, no writes (WAL allows readers).
            if not path.exists():
                raise LedgerError(f"no ledger at {path}: the service has not run yet")
            try:
                self._db = sqlite3.connect(
                    f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False
                )
                self._db.execute("SELECT COUNT(*) FROM files").fetchone()
                if not _has_stamp_columns(self._db):
                    # A ledger not opened by this version yet: read it as if it had them
                    # (a temporary view, in memory, takes the table's name for this reader).
                    self._db.execute(
                        "CREATE TEMP VIEW files AS "
                        "SELECT *, NULL AS ctime_ns, NULL AS inode FROM main.files"
                    )
            except sqlite3.DatabaseError as exc:
                raise LedgerError(f"ledger {path} cannot be read: {exc}") from exc
            return
        self._lock_file = self._take_lock(path)
        try:
            try:
                self._db = self._connect(path)
            except LedgerCorrupt as exc:
                if not recover:
                    raise
                # The lock is still ours: nobody else can open the file while it moves aside.
                aside = self._move_aside(path)
                log.error(
                    "the ledger %s is corrupt (%s); it was moved aside to %s and a new one is "
                    "being built: every file on disk will be checked against the dataset "
                    "before anything is uploaded, so files the server already holds (same "
                    "name and size in the same category) are not sent again",
                    path,
                    exc.__cause__ or exc,
                    aside,
                )
                self._db = self._connect(path)
                self.set_meta("recovering", str(self._clock()))
                self.rebuilt = True
        except BaseException:
            self._release_lock()
            raise
        self._recovering = self.get_meta("recovering") is not None

    @classmethod
    def open_or_recover(
        cls, path: Path, *, clock: Callable[[], float] = time.time
    ) -> tuple[Ledger, bool]:
        """Open the ledger at ``path`` for this process; rebuild it when it is corrupt.

        A corrupt database (and its WAL) is moved aside to ``<path>.corrupt-<timestamp>`` and
        an empty ledger takes its place, in *recovery*: until ``end_recovery`` every file
        recorded is ``uploading`` (in doubt), so the uploader's ``resolve_in_doubt`` decides
        against the server which ones are already in the dataset. Returns the ledger and
        whether it was rebuilt now. Raises LedgerLocked when another process has it open,
        LedgerError when it cannot be created, read or moved aside.
        """
        ledger = cls(path, clock=clock, recover=True)
        return ledger, ledger.rebuilt

    def _connect(self, path: Path) -> sqlite3.Connection:
        """Open, set up and check the database; raise LedgerCorrupt or LedgerError."""
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(
                str(path), check_same_thread=False, isolation_level=None, timeout=30
            )
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit writes the log without waiting for the disk; a durable
            # transaction then syncs the log itself, after letting go of the ledger (see
            # _transaction). WAL with NORMAL never leaves a damaged database after a power cut.
            db.execute("PRAGMA synchronous=NORMAL")
            # After a checkpoint has gone through the whole log, cut the log file back to
            # this size: a small state disk must not fill with a log of past writes.
            db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
            # A damaged page can hide until the row on it is read: look at every page now,
            # while the file can still be set aside, rather than fail in the middle of a run.
            verdict = db.execute("PRAGMA quick_check(1)").fetchone()
            if verdict is None or verdict[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {verdict[0] if verdict else '?'}")
            db.executescript(_SCHEMA)
            _add_stamp_columns(db)
            self._db = db
            try:
                self._check_version()
            except LedgerError:
                db.close()
                raise
        except sqlite3.DatabaseError as exc:
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
            code = getattr(exc, "sqlite_errorcode", None)
            corrupt = (code is not None and code & 0xFF in _CORRUPT_CODES) or str(exc).startswith(
                ("integrity check", "file is not a database", "database disk image is malformed")
            )
            if corrupt:
                raise LedgerCorrupt(f"ledger {path} cannot be used: it is corrupt ({exc})") from exc
            raise LedgerError(f"ledger {path} cannot be used: {disk_problem(path, exc)}") from exc
        return db

    def _move_aside(self, path: Path) -> Path:
        """Rename the damaged database and its WAL/SHM files; return the new main name.

        Raises LedgerError when they cannot be renamed.
        """
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self._clock()))
        aside = Path(f"{path}.corrupt-{stamp}")
        extra = 1
        while aside.exists():
            extra += 1
            aside = Path(f"{path}.corrupt-{stamp}-{extra}")
        try:
            # The WAL goes along with its database (sqlite finds it as ``<name>-wal``): left in
            # place, it would be replayed into the new, empty ledger.
            for suffix in ("-wal", "-shm", ""):
                source = Path(f"{path}{suffix}")
                if source.exists():
                    source.rename(Path(f"{aside}{suffix}"))
        except OSError as exc:
            raise LedgerError(
                f"ledger {path} is corrupt and cannot be moved aside ({exc.strerror or exc}); "
                "move or delete it by hand"
            ) from exc
        return aside

    # -- opening and closing -------------------------------------------------------------

    @staticmethod
    def _take_lock(path: Path) -> Any:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = Path(f"{path}.lock").open("a+")  # noqa: SIM115 - held for the ledger's life
        except OSError as exc:
            raise LedgerError(
                f"cannot create the ledger at {path}: {exc.strerror or exc}; "
                'set "ledger" in the configuration to a writable path'
            ) from exc
        try:
            return Ledger._lock_as_ours(path, handle)
        except OSError as exc:
            with contextlib.suppress(OSError):
                handle.close()
            raise LedgerError(f"cannot open the ledger {path}: {disk_problem(path, exc)}") from exc

    @staticmethod
    def _lock_as_ours(path: Path, handle: Any) -> Any:
        """Lock the open lock file ``handle`` and write this process's pid into it."""
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise LedgerLocked(
                    f"ledger {path} is in use by another paiv-sync process (pid {holder}); "
                    'run one instance per configuration, or give each its own "ledger"'
                ) from exc
            raise LedgerError(f"cannot lock the ledger {path}: {exc}") from exc
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def _release_lock(self) -> None:
        if self._lock_file is None:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
        self._lock_file.close()

    def _check_version(self) -> None:
        found = self.get_meta("schema_version")
        if found is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif int(found) > SCHEMA_VERSION:
            raise LedgerError(
                f"ledger {self.path} was written by a newer paiv-sync (schema {found}); "
                "upgrade paiv-sync"
            )

    def close(self) -> None:
        """Close the database and release the lock."""
        with self._lock:
            self._db.close()
            with self._wal_guard:
                if self._wal_fd is not None:
                    os.close(self._wal_fd)
                    self._wal_fd = None
            self._release_lock()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction; ``durable=False`` commits without waiting for the disk.

        Only for rows the disk can give back: if a power cut loses such a commit, the next
        scan finds the file again. The log is written in order, so syncing it makes every
        earlier commit durable too: a confirmed upload is never recorded before the rows it
        depends on. Inside :meth:`batch` the writes simply join the batch's transaction.
        """
        with self._lock:
            if self._db.in_transaction:
                yield self._db
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                # A full or failing disk (SQLite rolls a failed COMMIT back itself).
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise LedgerWriteError(
                    f"cannot write the ledger {self.path}: {disk_problem(self.path, exc)}"
                ) from exc
        if durable:
            # Outside the lock: the other threads go on with the ledger while the disk works.
            # The caller returns only once the commit (and every earlier one) is on disk.
            self.sync()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group the writes made inside (by this thread) into one non-durable transaction.

        They commit together, or, when an exception leaves the block, none of them does. Holds
        the ledger for the whole block: keep it short (a slice of files), with no network I/O
        inside.
        """
        with self._transaction(durable=False):
            yield

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- meta ----------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """The stored value for ``key``, or None."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def delete_meta(self, key: str) -> None:
        """Forget the value stored under ``key`` (nothing happens when there is none)."""
        with self._transaction() as db:
            db.execute("DELETE FROM meta WHERE key = ?", (key,))

    def uploads_total(self) -> int:
        """How many files this ledger has ever seen confirmed by the server."""
        return int(self.get_meta("uploads_total") or 0)

    @property
    def recovering(self) -> bool:
        """True while a rebuilt ledger records new files as in doubt (see ``open_or_recover``).

        It stays true across restarts until ``end_recovery``.
        """
        return self._recovering

    def start_recovery(self) -> None:
        """Record every file found from now on as in doubt, as after a rebuild.

        For a new ledger whose files may already be in the dataset (see ``open_or_recover``).
        """
        self.set_meta("recovering", str(self._clock()))
        self._recovering = True

    def is_new(self) -> bool:
        """True while the ledger records no file and no dataset."""
        return (
            not self._query("SELECT 1 FROM files LIMIT 1") and self.get_meta("dataset_id") is None
        )

    def check_binding(self, *, endpoint: str, dataset_name: str, config_path: str | None) -> None:
        """Refuse a configuration for another server or dataset than this ledger fed.

        A ledger's rows say what one dataset holds: fed into another, they would keep its
        files from being sent (or send the wrong ones). Records ``config_path`` as the
        ledger's owner. Raises LedgerMismatch with what to do.
        """
        fed = self.get_meta("endpoint"), self.get_meta("dataset_config_name")
        wrong = []
        if fed[0] is not None and fed[0] != endpoint:
            wrong.append(f"the server {fed[0]}, not {endpoint}")
        if fed[1] is not None and fed[1] != dataset_name:
            wrong.append(f"the dataset {fed[1]!r}, not {dataset_name!r}")
        if wrong:
            raise LedgerMismatch(
                f"ledger {self.path} records uploads to {' and '.join(wrong)} as the "
                "configuration says. A ledger belongs to one dataset, so it is not used for "
                "another. If the server only has a new address, or the dataset was renamed on "
                "the server, run `paiv-sync rebind --config FILE` to keep this ledger. To feed "
                "the new dataset from scratch instead, give the configuration its own ledger "
                '(the "ledger" key): every file will be checked and uploaded there.'
            )
        if config_path is not None and self.get_meta("config_path") != config_path:
            self.set_meta("config_path", config_path)

    def bind(self, *, endpoint: str, dataset_name: str) -> None:
        """Record the server and the dataset name this ledger feeds."""
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [("endpoint", endpoint), ("dataset_config_name", dataset_name)],
            )

    def end_recovery(self) -> None:
        """Every file on disk has been recorded after a rebuild: new files are pending again."""
        with self._transaction() as db:
            db.execute("DELETE FROM meta WHERE key = 'recovering'")
        if self._recovering:
            log.info("ledger %s rebuilt: every file on disk is recorded", self.path)
        self._recovering = False

    # -- files ---------------------------------------------------------------------------

    def lookup(self, root: str, rel_path: str) -> FileRow | None:
        """The row for ``root``/``rel_path``, or None if never seen."""
        rows = self._query(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE root = ? AND rel_path = ?", (root, rel_path)
        )
        return FileRow(*rows[0]) if rows else None

    def known_stats(
        self, paths: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[int, int, int | None, int | None]]:
        """``(root, rel_path) -> (size, mtime_ns, ctime_ns, inode)`` recorded for ``paths``.

        Only paths seen before are in the answer; see paiv_sync.stamps.unchanged.

        One hold of the ledger and one statement per root (per few hundred paths) for the lot,
        instead of one :meth:`lookup` each.
        """
        found: dict[tuple[str, str], tuple[int, int, int | None, int | None]] = {}
        with self._lock:
            for root, chunk in _by_root(paths):
                for rel_path, size, mtime_ns, ctime_ns, inode in self._db.execute(
                    "SELECT rel_path, size, mtime_ns, ctime_ns, inode FROM files "
                    f"WHERE root = ? AND rel_path IN ({_marks(len(chunk))})",
                    (root, *chunk),
                ):
                    found[(root, rel_path)] = (int(size), int(mtime_ns), ctime_ns, inode)
        return found

    def get(self, file_id: int) -> FileRow | None:
        """The row with id ``file_id``, or None."""
        rows = self._query(f"SELECT {_FILE_COLUMNS} FROM files WHERE id = ?", (file_id,))
        return FileRow(*rows[0]) if rows else None

    def iter_stats(
        self, root: str, page: int = 5000
    ) -> Iterator[tuple[str, int, int, str, int | None, int | None]]:
        """``(rel_path, size, mtime_ns, state, ctime_ns, inode)`` of each row under ``root``.

        The rows come by rel_path, ``page`` at a time (keyset paging on the (root, rel_path)
        index), so memory stays flat whatever the ledger's size; a row changed meanwhile may
        show either way.
        The order is SQLite's binary order, the same as :func:`paiv_sync.scanner.scan_stats`.
        """
        after = ""
        while True:
            rows = self._query(
                "SELECT rel_path, size, mtime_ns, state, ctime_ns, inode FROM files "
                "WHERE root = ? AND rel_path > ? ORDER BY rel_path LIMIT ?",
                (root, after, page),
            )
            yield from rows
            if len(rows) < page:
                return
            after = rows[-1][0]

    def fill_stamps(self, root: str, stamps: Sequence[tuple[str, int, int]]) -> None:
        """Record ``(rel_path, ctime_ns, inode)`` for rows under ``root`` that have none yet.

        Rows from before ctime and inode were kept get them at the first scan that finds the
        file unchanged by size and mtime (see paiv_sync.stamps).
        """
        if not stamps:
            return
        with self._transaction(durable=False) as db:
            db.executemany(
                "UPDATE files SET ctime_ns = ?, inode = ? "
                "WHERE root = ? AND rel_path = ? AND ctime_ns IS NULL",
                [(ctime_ns, inode, root, rel) for rel, ctime_ns, inode in stamps],
            )

    def record(
        self,
        *,
        root: str,
        rel_path: str,
        category: str,
        size: int,
        mtime_ns: int,
        sha256: str,
        content_type: str,
        skip_duplicates: bool,
    ) -> Outcome:
        """Record one complete, hashed file: :meth:`record_many` of one."""
        item = NewFile(root, rel_path, category, size, mtime_ns, sha256, content_type)
        return self.record_many([item], skip_duplicates=skip_duplicates)[0]

    def record_many(self, items: Sequence[NewFile], *, skip_duplicates: bool) -> list[Outcome]:
        """Record complete, hashed files; return one outcome per item, in order.

        A known path with the same content only has its stat data refreshed (a ``touch`` or a
        copy with new times is not a new image). A known path with new content becomes a new
        ``pending`` image unless its previous POST is still in doubt; the server's copy of the
        old content is remembered, so that it is never taken for the new one. With
        ``skip_duplicates``, content that the category already holds (uploaded or on its way,
        an earlier item of the same call included) is recorded as ``duplicate``. While the
        ledger is ``recovering`` a new image is recorded ``uploading`` (in doubt) instead of
        ``pending``. The items are taken one after the other, as separate calls would take
        them, with a handful of statements for the lot: one commit, not durable (see
        :meth:`_transaction`).
        """
        now = self._clock()
        outcomes: list[Outcome] = []
        with self._transaction(durable=False) as db:
            known = self._rows_at(db, [(i.root, i.rel_path) for i in items])
            holders: dict[tuple[str, str], set[tuple[str, str]]] = {}
            replaced: set[tuple[str, str]] = set()
            if skip_duplicates:
                holders, replaced = self._content_holders(db, items)
            inserts: list[FileRow] = []  # written at the end, in a few statements
            to_insert: dict[tuple[str, str], int] = {}  # key -> index in inserts
            next_id = 0
            for item in items:
                key = (item.root, item.rel_path)
                old = known.get(key)
                if old is not None and old.sha256 == item.sha256:
                    known[key] = replace(
                        old,
                        size=item.size,
                        mtime_ns=item.mtime_ns,
                        ctime_ns=item.ctime_ns,
                        inode=item.inode,
                    )
                    if key in to_insert:
                        inserts[to_insert[key]] = known[key]
                    else:
                        db.execute(
                            "UPDATE files SET size = ?, mtime_ns = ?, ctime_ns = ?, inode = ?, "
                            "updated = ? WHERE id = ?",
                            (item.size, item.mtime_ns, item.ctime_ns, item.inode, now, old.id),
                        )
                    outcomes.append(Outcome(known[key], new=False))
                    continue
                if old is not None and old.state == UPLOADING:
                    # New content while the old one's POST is in doubt: leave the row (and its
                    # stat data) alone, so the next scan sees the change again once the batch
                    # is settled.
                    outcomes.append(Outcome(old, new=False))
                    continue
                if old is not None and old.state == UPLOADED:
                    # The dataset keeps the old content under the same name (and perhaps the
                    # same size): remember that copy, or reconciling could take it for the new
                    # content.
                    self._remember_replaced(db, old, now)
                    replaced.add((old.category, old.sha256 or ""))
                if old is not None:
                    holders.get((old.category, old.sha256 or ""), set()).discard(key)
                state, reason = self._state_of_new(
                    item, holders, replaced if skip_duplicates else None
                )
                if old is None:
                    if not next_id:
                        next_id = (
                            int(db.execute("SELECT COALESCE(MAX(id), 0) FROM files").fetchone()[0])
                            + 1
                        )
                    file_id = next_id
                    next_id += 1
                else:
                    file_id = old.id
                row = FileRow(
                    file_id,
                    item.root,
                    item.rel_path,
                    item.category,
                    item.rel_path.rsplit("/", 1)[-1],
                    item.size,
                    item.mtime_ns,
                    item.sha256,
                    item.content_type,
                    state,
                    reason,
                    0,
                    None,
                    None,
                    item.ctime_ns,
                    item.inode,
                )
                if old is None:
                    to_insert[key] = len(inserts)
                    inserts.append(row)
                elif key in to_insert:
                    inserts[to_insert[key]] = row  # the same path twice in one call
                else:
                    db.execute(
                        "UPDATE files SET category = ?, upload_name = ?, size = ?, mtime_ns = ?, "
                        "ctime_ns = ?, inode = ?, sha256 = ?, content_type = ?, state = ?, "
                        "reason = ?, attempts = 0, batch_id = NULL, server_file_id = NULL, "
                        "uploaded_at = NULL, updated = ? WHERE id = ?",
                        (
                            row.category,
                            row.upload_name,
                            row.size,
                            row.mtime_ns,
                            row.ctime_ns,
                            row.inode,
                            row.sha256,
                            row.content_type,
                            state,
                            reason,
                            now,
                            file_id,
                        ),
                    )
                known[key] = row
                if state in _HELD_STATES:
                    holders.setdefault((item.category, item.sha256), set()).add(key)
                outcomes.append(Outcome(row, new=True, previous=old))
            self._insert_rows(db, inserts, now)
        return outcomes

    @staticmethod
    def _remember_replaced(db: sqlite3.Connection, old: FileRow, now: float) -> None:
        """Keep what the dataset holds of ``old``, an uploaded row whose content is replaced."""
        db.execute(
            "INSERT INTO replaced_uploads (category, upload_name, size, sha256, "
            "server_file_id, replaced_at) VALUES (?, ?, ?, ?, ?, ?)",
            (old.category, old.upload_name, old.size, old.sha256, old.server_file_id, now),
        )

    def _state_of_new(
        self,
        item: NewFile,
        holders: dict[tuple[str, str], set[tuple[str, str]]],
        replaced: set[tuple[str, str]] | None,
    ) -> tuple[str, str | None]:
        """``(state, reason)`` of a new image: pending (in doubt while recovering), or, when
        duplicates are skipped (``replaced`` given), a duplicate of content already held."""
        if replaced is not None:
            content = (item.category, item.sha256)
            twins = holders.get(content, set()) - {(item.root, item.rel_path)}
            if twins:
                return DUPLICATE, f"same content as {min(twins)[1]}"
            if content in replaced:
                return DUPLICATE, "same content as a file since replaced by new content"
        return (UPLOADING, RECOVERED_REASON) if self._recovering else (PENDING, None)

    @staticmethod
    def _rows_at(
        db: sqlite3.Connection, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], FileRow]:
        """The rows at ``(root, rel_path)`` keys, those that exist."""
        found: dict[tuple[str, str], FileRow] = {}
        for root, chunk in _by_root(keys):
            for raw in db.execute(
                f"SELECT {_FILE_COLUMNS} FROM files "
                f"WHERE root = ? AND rel_path IN ({_marks(len(chunk))})",
                (root, *chunk),
            ):
                row = FileRow(*raw)
                found[(row.root, row.rel_path)] = row
        return found

    @staticmethod
    def _content_holders(
        db: sqlite3.Connection, items: Sequence[NewFile]
    ) -> tuple[dict[tuple[str, str], set[tuple[str, str]]], set[tuple[str, str]]]:
        """For the items' ``(category, sha256)``: the paths of rows holding that content
        (pending, uploading or uploaded), and the contents replaced after their upload."""
        by_category: dict[str, list[str]] = {}
        for item in items:
            by_category.setdefault(item.category, []).append(item.sha256)
        holders: dict[tuple[str, str], set[tuple[str, str]]] = {}
        replaced: set[tuple[str, str]] = set()
        for category, digests in by_category.items():
            for chunk in _chunks(sorted(set(digests)), _MAX_PARAMS - 4):
                marks = _marks(len(chunk))
                for root, rel_path, digest in db.execute(
                    "SELECT root, rel_path, sha256 FROM files WHERE category = ? "
                    f"AND sha256 IN ({marks}) AND state IN (?, ?, ?)",
                    (category, *chunk, *_HELD_STATES),
                ):
                    holders.setdefault((category, digest), set()).add((root, rel_path))
                for (digest,) in db.execute(
                    "SELECT DISTINCT sha256 FROM replaced_uploads WHERE category = ? "
                    f"AND sha256 IN ({marks})",
                    (category, *chunk),
                ):
                    replaced.add((category, digest))
        return holders, replaced

    @staticmethod
    def _insert_rows(db: sqlite3.Connection, rows: Sequence[FileRow], now: float) -> None:
        """Insert new rows (with the ids already given them) in a few multi-row statements."""
        columns = 15
        for chunk in _chunks(rows, _MAX_PARAMS // columns):
            values: list[Any] = []
            for r in chunk:
                values += (
                    r.id,
                    r.root,
                    r.rel_path,
                    r.category,
                    r.upload_name,
                    r.size,
                    r.mtime_ns,
                    r.sha256,
                    r.content_type,
                    r.state,
                    r.reason,
                    now,
                    now,
                    r.ctime_ns,
                    r.inode,
                )
            db.execute(
                "INSERT INTO files (id, root, rel_path, category, upload_name, size, mtime_ns, "
                "sha256, content_type, state, reason, first_seen, updated, ctime_ns, inode) "
                "VALUES " + ", ".join([f"({_marks(columns)})"] * len(chunk)),
                values,
            )

    def reject(
        self,
        *,
        root: str,
        rel_path: str,
        category: str,
        size: int,
        mtime_ns: int,
        reason: str,
        ctime_ns: int | None = None,
        inode: int | None = None,
    ) -> FileRow:
        """Record a file that will not be uploaded (not an image, too large, …) with why."""
        now = self._clock()
        with self._transaction(durable=False) as db:
            db.execute(
                "INSERT INTO files (root, rel_path, category, upload_name, size, mtime_ns, "
                "ctime_ns, inode, state, reason, first_seen, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (root, rel_path) DO UPDATE SET category = excluded.category, "
                "size = excluded.size, mtime_ns = excluded.mtime_ns, "
                "ctime_ns = excluded.ctime_ns, inode = excluded.inode, sha256 = NULL, "
                "state = excluded.state, reason = excluded.reason, updated = excluded.updated "
                "WHERE files.state != ?",
                (
                    root,
                    rel_path,
                    category,
                    Path(rel_path).name,
                    size,
                    mtime_ns,
                    ctime_ns,
                    inode,
                    REJECTED,
                    reason,
                    now,
                    now,
                    UPLOADING,
                ),
            )
            row = db.execute(
                f"SELECT {_FILE_COLUMNS} FROM files WHERE root = ? AND rel_path = ?",
                (root, rel_path),
            ).fetchone()
        return FileRow(*row)

    def retry_rejected(self, *, refused_too: bool = False) -> tuple[int, int]:
        """Give rejected files another chance; return ``(sent again, checked again)``.

        Files the server failed (not those it refused, whose reason starts with
        ``REFUSED_PREFIX``) go back to ``pending``; with ``refused_too`` the refused ones as
        well, and the files rejected here before upload (not an image, too large, …) are
        forgotten, so that the next scan checks them again.
        """
        now = self._clock()
        with self._transaction() as db:
            condition, args = "", [PENDING, now, REJECTED]
            if not refused_too:
                condition = " AND substr(reason, 1, ?) != ?"
                args += [len(REFUSED_PREFIX), REFUSED_PREFIX]
            again = db.execute(
                "UPDATE files SET state = ?, reason = NULL, batch_id = NULL, updated = ? "
                f"WHERE state = ? AND sha256 IS NOT NULL{condition}",
                args,
            ).rowcount
            checked = 0
            if refused_too:
                checked = db.execute(
                    "DELETE FROM files WHERE state = ? AND sha256 IS NULL", (REJECTED,)
                ).rowcount
        return again, checked

    def forget(self, file_id: int) -> bool:
        """Drop a row that never reached the server (its file was deleted); True if dropped."""
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM files WHERE id = ? AND state IN (?, ?)", (file_id, PENDING, REJECTED)
            )
            return cursor.rowcount > 0

    def only_roots(self, roots: Iterable[str] | None) -> None:
        """Hand out pending rows under these roots only (None: every root).

        A folder removed from the configuration keeps its rows, but none of its files is sent:
        :meth:`pending` and the counts made from it leave them out (see :meth:`kept_counts`).
        """
        if roots is None:
            self._root_filter, self._root_args = "", ()
            return
        chosen = tuple(dict.fromkeys(roots))
        self._root_filter = f" AND root IN ({_marks(len(chosen))})" if chosen else " AND 0"
        self._root_args = chosen

    def kept_counts(self) -> dict[str, int]:
        """``root -> rows not yet uploaded`` under roots left out by :meth:`only_roots`."""
        if not self._root_filter:
            return {}
        rows = self._query(
            "SELECT root, COUNT(*) FROM files WHERE state IN (?, ?) AND NOT "
            f"({self._root_filter[5:]}) GROUP BY root",
            (PENDING, UPLOADING, *self._root_args),
        )
        return {r[0]: int(r[1]) for r in rows}

    def pending(self, category: str | None = None, limit: int | None = None) -> list[FileRow]:
        """Rows waiting for upload, oldest first, optionally of one category."""
        sql = f"SELECT {_FILE_COLUMNS} FROM files WHERE state = ?{self._root_filter}"
        args: list[Any] = [PENDING, *self._root_args]
        if category is not None:
            sql += " AND category = ?"
            args.append(category)
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [FileRow(*r) for r in self._query(sql, args)]

    def pending_totals(self) -> tuple[int, int]:
        """``(number of pending files, their total size in bytes)``."""
        rows = self._query(
            f"SELECT COUNT(*), TOTAL(size) FROM files WHERE state = ?{self._root_filter}",
            (PENDING, *self._root_args),
        )
        return int(rows[0][0]), int(rows[0][1])

    def pending_counts(self) -> dict[str, int]:
        """``category -> number of pending files``."""
        rows = self._query(
            f"SELECT category, COUNT(*) FROM files WHERE state = ?{self._root_filter} "
            "GROUP BY category",
            (PENDING, *self._root_args),
        )
        return {r[0]: int(r[1]) for r in rows}

    def returned_counts(self) -> dict[str, int]:
        """``category -> pending files that were handed to the uploader before``.

        They passed the upload threshold once and came back (in doubt after a crash and not on
        the server, not sent at shutdown, paused uploads): they need not wait for it again.
        """
        rows = self._query(
            "SELECT category, COUNT(*) FROM files WHERE state = ? AND attempts > 0"
            f"{self._root_filter} GROUP BY category",
            (PENDING, *self._root_args),
        )
        return {r[0]: int(r[1]) for r in rows}

    def in_doubt(self) -> list[FileRow]:
        """Rows whose POST was in flight when the service stopped: the server may hold them."""
        rows = self._query(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE state = ? ORDER BY batch_id, id", (UPLOADING,)
        )
        return [FileRow(*r) for r in rows]

    def counts(self) -> dict[str, dict[str, int]]:
        """``category -> state -> count`` over every row."""
        result: dict[str, dict[str, int]] = {}
        for category, state, count in self._query(
            "SELECT category, state, COUNT(*) FROM files GROUP BY category, state"
        ):
            result.setdefault(category, dict.fromkeys(STATES, 0))[state] = int(count)
        return result

    def rejected(self) -> list[FileRow]:
        """Rows that will not be uploaded, with their reasons."""
        rows = self._query(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE state = ? ORDER BY id", (REJECTED,)
        )
        return [FileRow(*r) for r in rows]

    def holds_content(self, category: str, sha256: str) -> bool:
        """Whether a file of ``category`` with this content is pending, on its way or uploaded."""
        return bool(
            self._query(
                "SELECT 1 FROM files WHERE category = ? AND sha256 = ? "
                "AND state IN (?, ?, ?) LIMIT 1",
                (category, sha256, *_HELD_STATES),
            )
        )

    def uploaded_keys(self, category: str) -> dict[tuple[str, int], int]:
        """``(upload_name, size) -> how many`` copies this ledger put into ``category``.

        Counts the rows that are ``uploaded`` and the earlier contents of files replaced
        since they were uploaded (their copies stay in the dataset).
        """
        rows = self._query(
            "SELECT upload_name, size, COUNT(*) FROM ("
            "SELECT upload_name, size FROM files WHERE category = ? AND state = ? "
            "UNION ALL SELECT upload_name, size FROM replaced_uploads WHERE category = ?"
            ") GROUP BY upload_name, size",
            (category, UPLOADED, category),
        )
        return {(r[0], int(r[1])): int(r[2]) for r in rows}

    def known_server_ids(self, server_ids: Iterable[str]) -> set[str]:
        """Those of ``server_ids`` that this ledger recorded as a file it uploaded (earlier
        contents of replaced files included)."""
        wanted = list(dict.fromkeys(server_ids))
        known: set[str] = set()
        for chunk in _chunks(wanted, _MAX_PARAMS // 2):  # each id is sent twice
            marks = _marks(len(chunk))
            rows = self._query(
                f"SELECT server_file_id FROM files WHERE server_file_id IN ({marks}) "
                f"UNION SELECT server_file_id FROM replaced_uploads "
                f"WHERE server_file_id IN ({marks})",
                (*chunk, *chunk),
            )
            known.update(str(r[0]) for r in rows)
        return known

    def instance_id(self) -> str:
        """A random id of this ledger, made the first time it is asked for and kept."""
        value = self.get_meta("instance_id")
        if value is None:
            value = uuid.uuid4().hex[:12]
            self.set_meta("instance_id", value)
        return value

    # -- batches -------------------------------------------------------------------------

    def begin_batch(self, category: str, dataset_id: str, file_ids: Sequence[int]) -> int:
        """Mark ``file_ids`` as ``uploading`` in a new batch; return the batch id.

        Only rows still ``pending`` (under the roots of :meth:`only_roots`) join; the caller
        reads the batch back with ``batch_rows``.
        """
        now = self._clock()
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO batches (category, dataset_id, started) VALUES (?, ?, ?)",
                (category, dataset_id, now),
            )
            batch_id = int(cursor.lastrowid or 0)
            for chunk in _chunks(file_ids, _MAX_PARAMS):
                db.execute(
                    _to_batch_sql(self._root_filter, len(chunk)),
                    (UPLOADING, batch_id, now, PENDING, *self._root_args, *chunk),
                )
        return batch_id

    def batch_rows(self, batch_id: int) -> list[FileRow]:
        """The rows still ``uploading`` in ``batch_id``."""
        rows = self._query(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE batch_id = ? AND state = ? ORDER BY id",
            (batch_id, UPLOADING),
        )
        return [FileRow(*r) for r in rows]

    def mark_uploaded(
        self,
        results: Iterable[tuple[int, str | None]],
        *,
        durable: bool = True,
        finish_batch: int | None = None,
    ) -> int:
        """Rows the server confirmed: ``(file id, server file id or None)``; return how many.

        ``finish_batch`` closes that batch as ``done`` in the same commit (its last rows).

        Each counts as a new upload (towards training), except rows recorded while the
        ledger was rebuilt: those were in the dataset before. With ``durable=False`` the
        commit does not wait for the disk: the caller must make it durable soon (the next
        durable commit, ``begin_batch`` of the next batch included, or :meth:`sync`). Until
        then a power cut leaves the rows ``uploading`` (durably, from ``begin_batch``): in
        doubt, resolved against the server's list at the next start, never sent blind.
        """
        now = self._clock()
        server_ids = dict(results)
        with self._transaction(durable=durable) as db:
            changed = 0
            recovered = 0
            # Three host parameters per row: the id in the CASE, its server id, the id in IN.
            for chunk in _chunks(list(server_ids), _MAX_PARAMS // 3):
                marks = _marks(len(chunk))
                found = db.execute(
                    f"SELECT COUNT(*), TOTAL(reason = ?) FROM files {_in_state_by_id(marks)}",
                    (RECOVERED_REASON, UPLOADING, *chunk),
                ).fetchone()
                changed += int(found[0])
                recovered += int(found[1])
                cases = " ".join(["WHEN ? THEN ?"] * len(chunk))
                db.execute(
                    f"UPDATE files SET state = ?, server_file_id = CASE id {cases} END, "
                    f"uploaded_at = ?, reason = NULL, updated = ? {_in_state_by_id(marks)}",
                    (
                        UPLOADED,
                        *(v for fid in chunk for v in (fid, server_ids[fid])),
                        now,
                        now,
                        UPLOADING,
                        *chunk,
                    ),
                )
            total = self._uploads_total(db)
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('uploads_total', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(total + changed - recovered),),
            )
            if finish_batch is not None:
                db.execute(
                    "UPDATE batches SET finished = ?, outcome = 'done' WHERE id = ?",
                    (now, finish_batch),
                )
        return changed

    def sync(self) -> None:
        """Make every commit so far durable: sync the write-ahead log to the disk.

        Needs no hold of the ledger. SQLite syncs the log before each checkpoint copies it
        into the database, and the database after, so commits already checkpointed are on
        disk as well. Raises LedgerError when the disk refuses.
        """
        try:
            with self._wal_guard:
                if self._wal_fd is None:
                    self._wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
                fd = self._wal_fd
            _datasync(fd)
        except OSError as exc:
            raise LedgerWriteError(
                f"ledger {self.path}: cannot make the last changes durable: "
                f"{disk_problem(self.path, exc)}"
            ) from exc

    def sent_other_content(self, file_id: int, *, kept_as: str | None, sent_sha256: str) -> None:
        """The server stored other content than row ``file_id`` recorded (overwritten since).

        With ``kept_as`` None the server's copy was deleted: the row is dropped, and the file
        is taken in again as a new one. Otherwise the server keeps that copy (file id
        ``kept_as``): the row records it as uploaded with the hash of what was sent, and its
        stat data as unknown, so the next look at the file hashes it and sends its content.
        """
        now = self._clock()
        with self._transaction() as db:
            if kept_as is None:
                db.execute("DELETE FROM files WHERE id = ? AND state = ?", (file_id, UPLOADING))
                return
            db.execute(
                "UPDATE files SET state = ?, server_file_id = ?, sha256 = ?, mtime_ns = 0, "
                "uploaded_at = ?, reason = NULL, updated = ? WHERE id = ? AND state = ?",
                (UPLOADED, kept_as, sent_sha256, now, now, file_id, UPLOADING),
            )

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the database and cut the log back (when idle).

        SQLite's own checkpoints run every thousand pages and leave the file at its largest
        size; this one empties it. Raises LedgerWriteError when the disk refuses.
        """
        try:
            with self._lock:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError as exc:
            raise LedgerWriteError(
                f"cannot write the ledger {self.path}: {disk_problem(self.path, exc)}"
            ) from exc

    def mark_rejected(self, results: Iterable[tuple[int, str]]) -> None:
        """Rows the server refused for good: ``(file id, the server's reason)``."""
        now = self._clock()
        with self._transaction() as db:
            db.executemany(
                "UPDATE files SET state = ?, reason = ?, updated = ? WHERE id = ? AND state = ?",
                [(REJECTED, reason, now, fid, UPLOADING) for fid, reason in results],
            )

    def mark_duplicates(self, results: Iterable[tuple[int, str]]) -> None:
        """Pending rows whose content the dataset already holds: ``(file id, why)``."""
        now = self._clock()
        with self._transaction() as db:
            db.executemany(
                "UPDATE files SET state = ?, reason = ?, updated = ? WHERE id = ? AND state = ?",
                [(DUPLICATE, reason, now, fid, PENDING) for fid, reason in results],
            )

    def mark_pending(self, file_ids: Iterable[int], reason: str | None = None) -> None:
        """Rows the server surely did not store go back to ``pending`` (to be sent again)."""
        now = self._clock()
        with self._transaction() as db:
            db.executemany(
                "UPDATE files SET state = ?, batch_id = NULL, reason = ?, updated = ? "
                "WHERE id = ? AND state = ?",
                [(PENDING, reason, now, fid, UPLOADING) for fid in file_ids],
            )

    def finish_batch(self, batch_id: int, outcome: str) -> None:
        """Close ``batch_id`` with a one-word outcome."""
        with self._transaction(durable=False) as db:
            db.execute(
                "UPDATE batches SET finished = ?, outcome = ? WHERE id = ?",
                (self._clock(), outcome, batch_id),
            )

    def reset_for_new_dataset(self) -> int:
        """Make every uploaded or duplicate row pending again; return how many.

        Used when the dataset this ledger fed is gone or replaced: its files must go into the
        new one.
        """
        now = self._clock()
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE files SET state = ?, batch_id = NULL, server_file_id = NULL, "
                "uploaded_at = NULL, reason = NULL, attempts = 0, updated = ? "
                "WHERE state IN (?, ?, ?)",
                (PENDING, now, UPLOADED, DUPLICATE, UPLOADING),
            )
            db.execute("DELETE FROM trainings WHERE state = ?", (REQUESTING,))
            db.execute("DELETE FROM replaced_uploads")
            # Uploads to the dataset that is gone count for no training of the new one (the
            # total itself goes on: it is the uploads counter of the metrics).
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('uploads_mark_reset', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(self._uploads_total(db)),),
            )
            return cursor.rowcount

    # -- trainings -----------------------------------------------------------------------

    def uploads_since_last_training(self) -> int:
        """Files confirmed uploaded to this dataset since the last training request was made.

        Uploads to a dataset that is gone (see reset_for_new_dataset) do not count.
        """
        with self._lock:
            return self._uploads_total(self._db) - self._mark_before(self._db, None)

    def uploads_for(self, training: TrainingRow) -> int:
        """How many uploads ``training`` was asked for: those since the request before it."""
        with self._lock:
            return training.uploads_mark - self._mark_before(self._db, training.id)

    @staticmethod
    def _uploads_total(db: sqlite3.Connection) -> int:
        found = db.execute("SELECT value FROM meta WHERE key = 'uploads_total'").fetchone()
        return int(found[0]) if found else 0

    @staticmethod
    def _mark_before(db: sqlite3.Connection, training_id: int | None) -> int:
        """The uploads count from which the next training counts: that of the last request
        (before ``training_id``, if given), or of the last change of dataset if later."""
        sql = "SELECT MAX(uploads_mark) FROM trainings"
        args: tuple[int, ...] = ()
        if training_id is not None:
            sql, args = sql + " WHERE id < ?", (training_id,)
        mark = db.execute(sql, args).fetchone()[0] or 0
        reset = db.execute("SELECT value FROM meta WHERE key = 'uploads_mark_reset'").fetchone()
        return max(int(mark), int(reset[0]) if reset else 0)

    def training_requested(
        self, *, name: str, model_name: str, dataset_id: str, pretrained_model: str | None
    ) -> TrainingRow:
        """Record, before sending it, that a training request named ``name`` is being made."""
        now = self._clock()
        with self._transaction() as db:
            total = self._uploads_total(db)
            cursor = db.execute(
                "INSERT INTO trainings (name, model_name, dataset_id, pretrained_model, state, "
                "uploads_mark, requested_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, model_name, dataset_id, pretrained_model, REQUESTING, total, now),
            )
            training_id = int(cursor.lastrowid or 0)
        row = self.training(training_id)
        assert row is not None
        return row

    def training(self, training_id: int) -> TrainingRow | None:
        """The training row with this id, or None."""
        rows = self._query(
            f"SELECT {_TRAINING_COLUMNS} FROM trainings WHERE id = ?", (training_id,)
        )
        return TrainingRow(*rows[0]) if rows else None

    def training_started(self, training_id: int, task_id: str) -> None:
        """The server accepted the request and named the task ``task_id``."""
        with self._transaction() as db:
            db.execute(
                "UPDATE trainings SET task_id = ?, state = ? WHERE id = ?",
                (task_id, TRAINING, training_id),
            )

    def training_finished(self, training_id: int, state: str, reason: str | None = None) -> None:
        """The task ended (``trained`` or ``failed``), or the request was refused."""
        with self._transaction() as db:
            db.execute(
                "UPDATE trainings SET state = ?, reason = ?, finished_at = ? WHERE id = ?",
                (state, reason, self._clock(), training_id),
            )

    def training_withdrawn(self, training_id: int) -> None:
        """A request that never reached the server: forget it, so its uploads count again."""
        with self._transaction() as db:
            db.execute(
                "DELETE FROM trainings WHERE id = ? AND state = ?", (training_id, REQUESTING)
            )

    def open_trainings(self) -> list[TrainingRow]:
        """Requests in doubt and tasks still training, oldest first."""
        rows = self._query(
            f"SELECT {_TRAINING_COLUMNS} FROM trainings WHERE state IN (?, ?) ORDER BY id",
            (REQUESTING, TRAINING),
        )
        return [TrainingRow(*r) for r in rows]

    def last_training(self) -> TrainingRow | None:
        """The most recent training request, whatever its state."""
        rows = self._query(f"SELECT {_TRAINING_COLUMNS} FROM trainings ORDER BY id DESC LIMIT 1")
        return TrainingRow(*rows[0]) if rows else None

    def last_trained_task(self, model_name: str, dataset_id: str | None = None) -> str | None:
        """The task id of the newest ``trained`` model this service made for ``model_name``."""
        sql = (
            "SELECT task_id FROM trainings WHERE model_name = ? AND state = ? "
            "AND task_id IS NOT NULL"
        )
        args: list[Any] = [model_name, TRAINED]
        if dataset_id is not None:
            sql += " AND dataset_id = ?"
            args.append(dataset_id)
        rows = self._query(sql + " ORDER BY id DESC LIMIT 1", args)
        return str(rows[0][0]) if rows else None
