"""The scan's order is the ledger's order: relative paths sorted as SQLite sorts them.

The start-up reconcile can then merge the scan with ``SELECT … ORDER BY rel_path`` in one pass,
holding neither in memory. Names are chosen to catch the usual traps: a folder whose name is a
prefix of a file's or of another folder's ("a" vs "a.png", "a-b", "a b"), upper case, accents
in both composed and decomposed form, and non-Latin scripts.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from paiv_sync.layout import Layout
from paiv_sync.scanner import scan, scan_stats

TRAPS = ["a", "a-b", "a.b", "a b", "ab", "A", "a0", "é", "e\u0301", "日本", "z"]


def _sqlite_order(paths: list[str]) -> list[str]:
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.execute("CREATE TABLE files (rel_path TEXT PRIMARY KEY)")
        db.executemany("INSERT INTO files VALUES (?)", [(p,) for p in paths])
        return [row[0] for row in db.execute("SELECT rel_path FROM files ORDER BY rel_path")]


def _tree(root: Path) -> set[str]:
    made = set()
    for first in TRAPS:
        for second in TRAPS:
            for leaf in ("x.jpg", "a.png", "a-b.png"):
                rel = f"{first}/{second}/{leaf}"
                (root / first / second).mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(b"x")
                made.add(rel)
            file_rel = f"{first}/{second}.png"  # a file named like the folder beside it
            (root / file_rel).write_bytes(b"y")
            made.add(file_rel)
    return made


def test_scan_yields_relative_paths_in_the_ledgers_order(tmp_path: Path) -> None:
    root = tmp_path / "root"
    made = _tree(root)
    layout = Layout([root], recursive=True, categories={})
    found = [rel for rel, *_stamp in scan_stats(layout, layout.roots[0])]
    assert set(found) == made
    assert found == _sqlite_order(found)
    assert found == sorted(found)


def test_scan_and_scan_stats_agree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _tree(root)
    layout = Layout([root], recursive=True, categories={})
    objects = list(scan(layout))
    tuples = list(scan_stats(layout, layout.roots[0]))
    assert [
        (f.location.rel_path, f.size, f.mtime_ns, f.ctime_ns, f.inode) for f in objects
    ] == tuples
    sizes = {rel: size for rel, size, *_rest in tuples}
    assert sizes["a/a.png"] == 1 and sizes["a/a-b/x.jpg"] == 1


def test_followed_links_come_after_the_real_entries(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "cat" / "sub").mkdir(parents=True)
    (root / "cat" / "sub" / "b.jpg").write_bytes(b"b")
    (root / "cat" / "z.jpg").write_bytes(b"z")
    (root / "cat" / "a-link.jpg").symlink_to(root / "cat" / "z.jpg")
    layout = Layout([root], recursive=True, categories={})
    found = [rel for rel, *_ in scan_stats(layout, layout.roots[0], follow_symlinks=True)]
    assert found == ["cat/sub/b.jpg", "cat/z.jpg", "cat/a-link.jpg"]
