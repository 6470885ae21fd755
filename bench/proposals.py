"""Proposed speed fixes in files this benchmark work does not own, applied to a copy.

``python -m bench.proposals DEST`` copies ``paiv_sync`` to ``DEST/paiv_sync``, applies the
proposals below and writes ``DEST/proposals.diff`` (the exact unified diff against the work
tree). Then ``PYTHONPATH=DEST python bench/run.py`` measures the patched copy. Each proposal is
a list of exact text replacements; one that no longer matches the work tree is reported (the
file changed since) and the others still apply.

- P1 ledger: commits of rows the disk can give back (a new pending file, a rejection, a batch's
  closing note) skip the fsync; durable commits stay durable and sync everything before them.
- P2 service: in a burst or ``--once``, dispatch full batches while the rest are still being
  admitted, so hashing and uploading overlap instead of following each other.
- P3 stability: a file whose mtime is already older than the settle time settles at the next
  look instead of after a full settle time (``--once`` over old files no longer waits).
- P4 service + ledger: the reconcile scan merges the disk (``scanner.scan_stats``, in rel_path
  order) with the ledger (``Ledger.iter_stats``, paged in the same order): flat memory instead
  of a dict and a set of every file.
- P5 watcher: ask inotify only for the events the handler uses, so the service's own reads of
  each new file (4 opens and closes) do not come back as 8 events through the observer thread.
- P6 ledger + service: admit a slice of settled files inside one (non-durable) transaction,
  each file's writes a savepoint in it: one commit and one lock hand-over per slice instead of
  per file. Needs P1 and P2.
"""

from __future__ import annotations

import difflib
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

Replacement = tuple[str, str]

_LEDGER_TRANSACTION_OLD = """    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
"""
_LEDGER_TRANSACTION_NEW = '''\
    def _transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction; ``durable=False`` commits without waiting for the disk.

        Only for rows the disk can give back: if a power cut loses such a commit, the next
        scan finds the file again. In WAL mode the next durable commit syncs every earlier
        one too, so a confirmed upload is never recorded before the rows it depends on.
        """
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")
'''
_LEDGER_NESTED_OLD = """\
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
"""
_LEDGER_NESTED_NEW = """\
        with self._lock:
            if self._db.in_transaction:
                # Inside batch(): a savepoint, committed (or not) with the batch.
                self._db.execute("SAVEPOINT one")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK TO one")
                    self._db.execute("RELEASE one")
                    raise
                self._db.execute("RELEASE one")
                return
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
"""
_LEDGER_BATCH = '''\
    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group the writes made inside (by this thread) into one non-durable transaction.

        Each write inside is a savepoint of it. Holds the ledger for the whole block: keep it
        short (a slice of files), with no network I/O inside.
        """
        with self._transaction(durable=False):
            yield

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:'''

_ITER_STATS = '''\
    def iter_stats(self, root: str, page: int = 5000) -> Iterator[tuple[str, int, int, str]]:
        """``(rel_path, size, mtime_ns, state)`` of every row under ``root``, by rel_path.

        Read ``page`` rows at a time (keyset paging on the (root, rel_path) index), so memory
        stays flat whatever the ledger's size; a row changed meanwhile may show either way.
        The order is SQLite's binary order, the same as :func:`paiv_sync.scanner.scan_stats`.
        """
        after = ""
        while True:
            rows = self._query(
                "SELECT rel_path, size, mtime_ns, state FROM files "
                "WHERE root = ? AND rel_path > ? ORDER BY rel_path LIMIT ?",
                (root, after, page),
            )
            yield from rows
            if len(rows) < page:
                return
            after = rows[-1][0]

    def stats_under(self, root: str) -> dict[str, tuple[int, int, str]]:'''


def _not_durable(method: str) -> Replacement:
    """Make the first transaction of ``method`` non-durable (found by its def line)."""
    return (f"@@{method}", "with self._transaction(durable=False) as db:")


PROPOSALS: dict[str, dict[str, list[Replacement]]] = {
    "P1 ledger: no fsync for rows the disk can give back": {
        "ledger.py": [
            (_LEDGER_TRANSACTION_OLD, _LEDGER_TRANSACTION_NEW),
            _not_durable("def record("),
            _not_durable("def reject("),
            _not_durable("def finish_batch("),
        ]
    },
    "P6 ledger + service: admit a slice per transaction": {
        "ledger.py": [
            (_LEDGER_NESTED_OLD, _LEDGER_NESTED_NEW),
            (
                "    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:",
                _LEDGER_BATCH,
            ),
        ],
        "service.py": [
            (
                """        slice_size = self.config.batch_size * self.config.upload_workers
        for admitted, settled in enumerate(self.gate.due(on_gone=self._gone), start=1):
            if self.stop_event.is_set():
                return
            self._admit(settled)
            if admitted % slice_size == 0:
                self._collect_uploads()
                self._dispatch(force=self.once)
""",
                """        assert self.ledger is not None
        slice_size = self.config.batch_size * self.config.upload_workers
        due = self.gate.due(on_gone=self._gone)
        for start in range(0, len(due), slice_size):
            with self.ledger.batch():
                for settled in due[start : start + slice_size]:
                    if self.stop_event.is_set():
                        return
                    self._admit(settled)
            self._collect_uploads()
            self._dispatch(force=self.once)
""",
            )
        ],
    },
    "P2 service: overlap admission and upload": {
        "service.py": [
            (
                """    def _admit_settled(self) -> None:
        for settled in self.gate.due(on_gone=self._gone):
            if self.stop_event.is_set():
                return
            self._admit(settled)
""",
                """    def _admit_settled(self) -> None:
        # In a burst (or --once) thousands of files settle at once: hand full batches to the
        # upload workers while the rest are still being hashed, so the two overlap.
        slice_size = self.config.batch_size * self.config.upload_workers
        for admitted, settled in enumerate(self.gate.due(on_gone=self._gone), start=1):
            if self.stop_event.is_set():
                return
            self._admit(settled)
            if admitted % slice_size == 0:
                self._collect_uploads()
                self._dispatch(force=self.once)
""",
            ),
            (
                """            self._admit_settled()
        self._dispatch(force=True)
        self._wait_uploads()
""",
                """            self._admit_settled()
        # Batches dispatched while admitting first: a category still in flight would be
        # skipped by the final dispatch.
        self._wait_uploads()
        self._dispatch(force=True)
        self._wait_uploads()
""",
            ),
        ]
    },
    "P3 stability: an old mtime settles at the next look": {
        "stability.py": [
            (
                """        stat: StatFn = os.stat,
    ) -> None:
        self._settle = settle_time
        self._clock = clock
""",
                """        stat: StatFn = os.stat,
        wall: Callable[[], float] | None = None,
    ) -> None:
        self._settle = settle_time
        self._clock = clock
        self._wall = wall
""",
            ),
            (
                """        if watch is None:
            self._watches[path] = _Watch(size, mtime_ns, now)
            heapq.heappush(self._heap, (now + self._settle, path))
""",
                """        if watch is None:
            since = now
            if self._wall is not None and self._wall() - mtime_ns / 1e9 >= self._settle:
                # Not written for the settle time already (its mtime says so): one more look,
                # at once, settles it. A start-up or --once over old files does not wait.
                since = now - self._settle
            self._watches[path] = _Watch(size, mtime_ns, since)
            heapq.heappush(self._heap, (since + self._settle, path))
""",
            ),
        ],
        "service.py": [
            (
                "self.gate = StabilityGate(config.settle_time, clock)",
                "self.gate = StabilityGate(config.settle_time, clock, wall=time.time)",
            ),
            (
                "self.gate = StabilityGate(new.settle_time, self._clock)",
                "self.gate = StabilityGate(new.settle_time, self._clock, wall=time.time)",
            ),
        ],
    },
    "P4 service + ledger: merge the scan with the ledger": {
        "ledger.py": [
            (
                "    def stats_under(self, root: str) -> dict[str, tuple[int, int, str]]:",
                _ITER_STATS,
            )
        ],
        "service.py": [
            (
                "from paiv_sync.scanner import SKIP_NOT_REGULAR, scan\n",
                "from paiv_sync.scanner import SKIP_NOT_REGULAR, scan, scan_stats\n",
            ),
            ("@@cut:            known = self.ledger.stats_under(str(root))", ""),
            (
                "    def _on_scan_skip(self, path: Path, skip: Skip) -> None:",
                '''    def _reconcile_root(self, root: Path) -> int:
        """Merge the scan of ``root`` with its ledger rows; return how many files were offered.

        Both streams come in rel_path order, so one pass compares them without holding either
        in memory: a file the ledger lacks or whose stat differs enters the gate; a pending
        row whose file is gone is forgotten. A file out of order (reached through a followed
        link) is looked up on its own.
        """
        assert self.ledger is not None
        root_text = str(root)
        known = self.ledger.iter_stats(root_text)
        row = next(known, None)
        gone: list[str] = []
        out_of_order: set[str] = set()
        previous = ""
        offered = 0
        for count, (rel, size, mtime_ns) in enumerate(
            scan_stats(
                self.layout,
                root,
                follow_symlinks=self.config.follow_symlinks,
                on_skip=self._on_scan_skip,
            ),
            start=1,
        ):
            if count % 4096 == 0:
                self._loop_beat = self._clock()  # a long scan is progress too
            if rel <= previous:
                out_of_order.add(rel)
                found = self.ledger.lookup(root_text, rel)
                if found is None or (found.size, found.mtime_ns) != (size, mtime_ns):
                    self.gate.offer(os.path.join(root_text, rel), size, mtime_ns)
                    offered += 1
                continue
            previous = rel
            while row is not None and row[0] < rel:
                if row[3] == states.PENDING:
                    gone.append(row[0])
                row = next(known, None)
            if row is not None and row[0] == rel:
                unchanged = row[1] == size and row[2] == mtime_ns
                row = next(known, None)
                if unchanged:
                    continue
            self.gate.offer(os.path.join(root_text, rel), size, mtime_ns)
            offered += 1
        while row is not None:
            if row[3] == states.PENDING:
                gone.append(row[0])
            row = next(known, None)
        if root.is_dir():  # vanished during the scan: do not take its files for deleted
            for rel in gone:
                if rel not in out_of_order:
                    self._forget(root_text, rel)
        return offered

    def _on_scan_skip(self, path: Path, skip: Skip) -> None:''',
            ),
        ],
    },
    "P5 watcher: only the inotify events the handler uses": {
        "watcher.py": [
            (
                "from watchdog.events import FileSystemEvent, FileSystemEventHandler\n",
                """from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
""",
            ),
            (
                "# Handler errors are logged with a traceback",
                """\
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

# Handler errors are logged with a traceback""",
            ),
            (
                "                    observer.schedule(self._handler, str(root), recursive=True)\n",
                """                    observer.schedule(
                        self._handler, str(root), recursive=True, event_filter=_EVENTS
                    )
""",
            ),
        ]
    },
}

# Applied in order: P6 builds on P1 and P2.
PROPOSALS = {title: PROPOSALS[title] for title in sorted(PROPOSALS)}


def _apply_one(text: str, old: str, new: str) -> str | None:
    """Apply one replacement; None when it does not match (exactly once)."""
    if old.startswith("@@cut:"):
        # Cut the old reconcile body: from this line up to the "scan found" summary line.
        start = text.find(old[len("@@cut:") :])
        end = text.find("        if offered:\n", start)
        if start < 0 or end < 0:
            return None
        return text[:start] + "            offered += self._reconcile_root(root)\n" + text[end:]
    if old.startswith("@@"):
        anchor = text.find(old[2:])
        plain = "with self._transaction() as db:"
        at = text.find(plain, anchor) if anchor >= 0 else -1
        if at < 0:
            return None
        return text[:at] + new + text[at + len(plain) :]
    if text.count(old) != 1:
        return None
    return text.replace(old, new)


def apply(dest: Path, chosen: set[str] | None = None) -> list[str]:
    """Copy the package to ``dest`` and apply the proposals; return problems (empty if none).

    ``chosen`` holds proposal ids ("P1" …); None applies all. Writes ``dest/proposals.diff``.
    """
    source = REPO / "paiv_sync"
    target = dest / "paiv_sync"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    problems: list[str] = []
    for title, files in PROPOSALS.items():
        if chosen is not None and title.split()[0] not in chosen:
            continue
        for name, replacements in files.items():
            path = target / name
            text = path.read_text()
            for old, new in replacements:
                changed = _apply_one(text, old, new)
                if changed is None:
                    problems.append(f"{title}: {name}: no longer matches: {old.strip()[:60]!r}")
                else:
                    text = changed
            path.write_text(text)
    diff: list[str] = []
    for path in sorted(target.rglob("*.py")):
        rel = path.relative_to(dest)
        before = (REPO / rel).read_text().splitlines(keepends=True)
        after = path.read_text().splitlines(keepends=True)
        diff += difflib.unified_diff(before, after, f"a/{rel}", f"b/{rel}")
    (dest / "proposals.diff").write_text("".join(diff))
    return problems


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("usage: python -m bench.proposals DEST [P1 P2 …]")
        return 2
    dest = Path(argv[0])
    chosen = set(argv[1:]) or None
    problems = apply(dest, chosen)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"patched copy in {dest / 'paiv_sync'}; diff in {dest / 'proposals.diff'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
