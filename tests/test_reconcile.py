"""The merge of a walk with the ledger's rows (paiv_sync.reconcile): a pure function, no I/O."""

from __future__ import annotations

import random

from paiv_sync.reconcile import FILL, GONE, OFFER, Change, Found, Known, Recorded, merge

PENDING, UPLOADED = "pending", "uploaded"


def _merge(
    found: list[Found], known: list[Known], extra: dict[str, Recorded] | None = None
) -> list[Change]:
    rows = {k[0]: (k[1], k[2], k[4], k[5]) for k in known} | (extra or {})
    return list(merge(found, known, rows.get))


def test_unchanged_files_give_nothing_and_new_or_changed_ones_are_offered() -> None:
    found = [
        ("a/1.png", 10, 1, 5, 100),  # as recorded
        ("a/2.png", 10, 2, 5, 101),  # new
        ("a/3.png", 11, 1, 5, 102),  # another size
        ("a/4.png", 10, 1, 6, 103),  # cp -p: same size and mtime, another ctime
        ("a/5.png", 10, 1, 5, 999),  # rsync -t: renamed into place, another inode
    ]
    known = [
        ("a/1.png", 10, 1, UPLOADED, 5, 100),
        ("a/3.png", 10, 1, UPLOADED, 5, 102),
        ("a/4.png", 10, 1, UPLOADED, 5, 103),
        ("a/5.png", 10, 1, UPLOADED, 5, 104),
    ]
    changes = _merge(found, known)
    assert [(c.kind, c.rel_path) for c in changes] == [
        (OFFER, "a/2.png"),
        (OFFER, "a/3.png"),
        (OFFER, "a/4.png"),
        (OFFER, "a/5.png"),
    ]
    assert changes[0].found == found[1]


def test_rows_of_an_older_ledger_are_filled_not_offered() -> None:
    found = [("a/1.png", 10, 1, 5, 100), ("a/2.png", 10, 1, 5, 101)]
    known = [("a/1.png", 10, 1, UPLOADED, None, None), ("a/2.png", 10, 9, UPLOADED, None, None)]
    changes = _merge(found, known)
    assert [(c.kind, c.rel_path) for c in changes] == [(FILL, "a/1.png"), (OFFER, "a/2.png")]
    assert changes[0].found == found[0]


def test_pending_rows_without_their_file_are_gone_at_the_end_only() -> None:
    found = [("a/2.png", 10, 1, 5, 100)]
    known = [
        ("a/1.png", 10, 1, PENDING, 5, 1),  # gone, pending: forgotten
        ("a/2.png", 10, 1, UPLOADED, 5, 100),
        ("a/3.png", 10, 1, UPLOADED, 5, 3),  # gone, uploaded: kept (the dataset holds it)
        ("a/4.png", 10, 1, PENDING, 5, 4),  # gone, after the last file found
    ]
    changes = _merge(found, known)
    assert [(c.kind, c.rel_path, c.found) for c in changes] == [
        (GONE, "a/1.png", None),
        (GONE, "a/4.png", None),
    ]


def test_a_file_out_of_order_is_compared_with_its_own_row_and_never_taken_for_gone() -> None:
    # Reached through a followed link after the real entries: "a/0-link.png" < "a/z.png".
    found = [("a/z.png", 10, 1, 5, 1), ("a/0-link.png", 10, 1, 5, 2), ("a/0-new.png", 3, 3, 3, 3)]
    known = [("a/0-link.png", 10, 1, PENDING, 5, 2), ("a/z.png", 10, 1, UPLOADED, 5, 1)]
    changes = _merge(found, known)
    assert [(c.kind, c.rel_path) for c in changes] == [(OFFER, "a/0-new.png")]


def test_the_merge_agrees_with_comparing_whole_sets() -> None:
    # Any sorted walk against any sorted ledger: the same verdicts as building both in memory.
    rng = random.Random(7)
    for _ in range(200):
        names = sorted({f"c/{rng.randrange(60):02d}.png" for _ in range(rng.randrange(40))})
        found: list[Found] = []
        known: list[Known] = []
        for name in names:
            stamp = (rng.randrange(3), rng.randrange(3), rng.randrange(3), rng.randrange(3))
            on_disk, in_ledger = rng.random() < 0.8, rng.random() < 0.7
            if on_disk:
                found.append((name, *stamp))
            if in_ledger:
                recorded = stamp if rng.random() < 0.6 else (stamp[0], stamp[1], None, None)
                if rng.random() < 0.3:
                    recorded = (stamp[0] + 1, *recorded[1:])
                state = rng.choice([PENDING, UPLOADED])
                known.append((name, recorded[0], recorded[1], state, recorded[2], recorded[3]))
        rows = {k[0]: k for k in known}
        expected: set[tuple[str, str]] = set()
        for rel, size, mtime, ctime, inode in found:
            row = rows.get(rel)
            if row is None or (row[1], row[2]) != (size, mtime):
                expected.add((OFFER, rel))
            elif row[4] is None:
                expected.add((FILL, rel))
            elif (row[4], row[5]) != (ctime, inode):
                expected.add((OFFER, rel))
        on_disk_names = {f[0] for f in found}
        expected |= {(GONE, k[0]) for k in known if k[3] == PENDING and k[0] not in on_disk_names}
        assert {(c.kind, c.rel_path) for c in _merge(found, known)} == expected
