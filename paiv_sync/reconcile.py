"""The merge of a root's walk with its ledger rows, at start-up and at each rescan.

Both streams come in ``rel_path`` order (see :func:`paiv_sync.scanner.scan_stats` and
:meth:`paiv_sync.ledger.Ledger.iter_stats`), so one pass compares them without holding either
in memory. What the merge finds comes out as :class:`Change` values, for the caller to act on:

- ``OFFER``: a file the ledger lacks, or whose stamp differs from the row's (to be checked);
- ``FILL``: a file unchanged by size and mtime whose row has no ctime and inode yet (a row of
  an older ledger): record them;
- ``GONE``: a ``pending`` row whose file the walk did not find — at the end only, as a file
  reached out of order (through a followed link) may still show up.

A file out of order is compared with its own row, from ``lookup``. Nothing here touches the
disk, the ledger or the clock: it is a function of its inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from paiv_sync.ledger import PENDING
from paiv_sync.stamps import unchanged

OFFER = "offer"
FILL = "fill"
GONE = "gone"

# What the walk gives per file, and what the ledger gives per row.
Found = tuple[str, int, int, int, int]  # rel_path, size, mtime_ns, ctime_ns, inode
Known = tuple[str, int, int, str, int | None, int | None]  # rel_path, size, mtime, state, …
Recorded = tuple[int, int, int | None, int | None]  # size, mtime_ns, ctime_ns, inode


class Change(NamedTuple):
    """One finding of the merge: its kind, the file, and the walk's view of it (for OFFER and
    FILL; None for GONE)."""

    kind: str
    rel_path: str
    found: Found | None


def merge(
    found: Iterable[Found],
    known: Iterable[Known],
    lookup: Callable[[str], Recorded | None],
) -> Iterator[Change]:
    """Merge the walk ``found`` with the rows ``known``, both sorted by rel_path.

    ``lookup`` gives the recorded stamp of one rel_path (None when there is no row), for the
    files that come out of order.
    """
    rows = iter(known)
    row = next(rows, None)
    gone: list[str] = []
    out_of_order: set[str] = set()
    previous = ""
    for item in found:
        rel, size, mtime_ns, ctime_ns, inode = item
        if rel <= previous:
            out_of_order.add(rel)
            recorded = lookup(rel)
            if recorded is None or not unchanged(recorded, size, mtime_ns, ctime_ns, inode):
                yield Change(OFFER, rel, item)
            continue
        previous = rel
        while row is not None and row[0] < rel:
            if row[3] == PENDING:
                gone.append(row[0])
            row = next(rows, None)
        if row is not None and row[0] == rel:
            recorded = (row[1], row[2], row[4], row[5])
            row = next(rows, None)
            if unchanged(recorded, size, mtime_ns, ctime_ns, inode):
                if recorded[2] is None:
                    yield Change(FILL, rel, item)
                continue
        yield Change(OFFER, rel, item)
    while row is not None:
        if row[3] == PENDING:
            gone.append(row[0])
        row = next(rows, None)
    for rel in gone:
        if rel not in out_of_order:
            yield Change(GONE, rel, None)
