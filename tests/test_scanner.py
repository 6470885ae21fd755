"""The scan on real folders: what it finds, what it skips and why, and how it survives trouble."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from paiv_sync.layout import Layout, Location, Skip
from paiv_sync.scanner import Found, scan

IN_ROOT = "directly in a root folder, not in a category folder"
NESTED = "nested folder and recursive is off"
SYMLINK = "symbolic link, not followed"


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


class Skips:
    """Collects on_skip calls as {path relative to base: Skip}."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.seen: dict[str, Skip] = {}

    def __call__(self, path: Path, skip: Skip) -> None:
        self.seen[path.relative_to(self.base).as_posix()] = skip


def rel_paths(found: Iterable[Found]) -> list[str]:
    return [f.location.rel_path for f in found]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    touch(root / "forest" / "b.jpg", b"bb")
    touch(root / "forest" / "a.PNG", b"a")
    touch(root / "forest" / "notes.txt")
    touch(root / "forest" / ".hidden.jpg")
    touch(root / "forest" / "upload.jpg.part")
    touch(root / "forest" / "Thumbs.db")
    touch(root / "forest" / "sub" / "deep" / "c.jpeg")
    touch(root / "forest" / "sub" / "d.jpg")
    touch(root / "forest" / ".cache" / "e.jpg")
    touch(root / "Sea Pics" / "wave 1.jpg")
    touch(root / "défauts" / "fissure é.png")
    touch(root / "stray.jpg")
    touch(root / "README.txt")
    touch(root / ".trash" / "old.jpg")
    (root / "empty").mkdir()
    return root


def test_recursive_scan_finds_every_image_with_its_stat(tree: Path) -> None:
    layout = Layout([tree], recursive=True, categories={"Sea Pics": "sea"})
    skips = Skips(tree)
    found = list(scan(layout, on_skip=skips))
    # Depth-first, names sorted, a folder's files before its subfolders.
    assert rel_paths(found) == [
        "Sea Pics/wave 1.jpg",
        "défauts/fissure é.png",
        "forest/a.PNG",
        "forest/b.jpg",
        "forest/sub/d.jpg",
        "forest/sub/deep/c.jpeg",
    ]
    by_path = {f.location.rel_path: f for f in found}
    assert by_path["Sea Pics/wave 1.jpg"].location == Location(
        tree, "Sea Pics/wave 1.jpg", "Sea Pics", "sea"
    )
    b = tree / "forest" / "b.jpg"
    assert by_path["forest/b.jpg"].size == 2
    assert by_path["forest/b.jpg"].mtime_ns == b.stat().st_mtime_ns
    # The scan and the event path agree on every file.
    for f in found:
        assert layout.locate(tree / f.location.rel_path) == f.location
    assert skips.seen == {
        "stray.jpg": Skip(IN_ROOT, True),
        "README.txt": Skip("extension not accepted", False),
        ".trash": Skip("ignored name", False),
        "forest/notes.txt": Skip("extension not accepted", False),
        "forest/.hidden.jpg": Skip("ignored name", False),
        "forest/upload.jpg.part": Skip("ignored name", False),
        "forest/Thumbs.db": Skip("ignored name", False),
        "forest/.cache": Skip("ignored name", False),
    }


def test_non_recursive_scan_reports_nested_folders_once(tree: Path) -> None:
    layout = Layout([tree], recursive=False, categories={})
    skips = Skips(tree)
    found = list(scan(layout, on_skip=skips))
    assert rel_paths(found) == [
        "Sea Pics/wave 1.jpg",
        "défauts/fissure é.png",
        "forest/a.PNG",
        "forest/b.jpg",
    ]
    assert skips.seen["forest/sub"] == Skip(NESTED, True)
    assert not any(path.startswith("forest/sub/") for path in skips.seen)


def test_scan_without_on_skip_and_order_is_stable(tree: Path) -> None:
    layout = Layout([tree], recursive=True, categories={})
    assert list(scan(layout)) == list(scan(layout))


def test_several_roots_and_a_missing_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = tmp_path / "one"
    second = tmp_path / "two"
    gone = tmp_path / "unmounted"
    touch(first / "cat" / "a.jpg")
    touch(second / "cat" / "b.jpg")
    layout = Layout([first, gone, second], recursive=False, categories={})
    with caplog.at_level(logging.WARNING, logger="paiv_sync.scanner"):
        found = list(scan(layout))
    assert [(f.location.root, f.location.rel_path) for f in found] == [
        (first, "cat/a.jpg"),
        (second, "cat/b.jpg"),
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"root folder {gone} is missing (unmounted?); will look again at the next scan"
    ]


def test_nested_root_files_belong_to_the_inner_root(tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    inner = outer / "inner"
    touch(outer / "cat" / "a.jpg")
    touch(inner / "cat" / "b.jpg")
    layout = Layout([outer, inner], recursive=True, categories={})
    found = list(scan(layout))
    assert [(f.location.root, f.location.rel_path) for f in found] == [
        (outer, "cat/a.jpg"),
        (inner, "cat/b.jpg"),
    ]


def test_start_scans_only_that_subtree(tree: Path) -> None:
    layout = Layout([tree], recursive=True, categories={})
    found = list(scan(layout, tree / "forest" / "sub"))
    assert rel_paths(found) == ["forest/sub/d.jpg", "forest/sub/deep/c.jpeg"]
    assert {f.location.folder for f in found} == {"forest"}
    # A category folder moved in as a whole.
    assert rel_paths(scan(layout, tree / "Sea Pics")) == ["Sea Pics/wave 1.jpg"]
    # A single file.
    assert rel_paths(list(scan(layout, tree / "forest" / "b.jpg"))) == ["forest/b.jpg"]
    # The root itself: everything.
    assert len(list(scan(layout, tree))) == 6


def test_start_that_is_skipped_or_gone(tree: Path, tmp_path: Path) -> None:
    layout = Layout([tree], recursive=False, categories={})
    skips = Skips(tmp_path)
    assert list(scan(layout, tree / "forest" / "sub", on_skip=skips)) == []
    assert list(scan(layout, tree / "forest" / ".cache", on_skip=skips)) == []
    assert list(scan(layout, tree / "stray.jpg", on_skip=skips)) == []
    assert list(scan(layout, tmp_path / "elsewhere", on_skip=skips)) == []
    assert list(scan(layout, tree / "forest" / "vanished", on_skip=skips)) == []
    assert skips.seen == {
        "root/forest/sub": Skip(NESTED, True),
        "root/forest/.cache": Skip("ignored name", False),
        "root/stray.jpg": Skip(IN_ROOT, True),
        "elsewhere": Skip("outside every root", False),
    }


def test_symlinks_are_not_followed_by_default(tmp_path: Path) -> None:
    root = tmp_path / "root"
    real = touch(root / "cat" / "real.jpg")
    (root / "cat" / "link.jpg").symlink_to(real)
    (root / "linked_cat").symlink_to(root / "cat")
    skips = Skips(root)
    found = list(scan(Layout([root], recursive=True, categories={}), on_skip=skips))
    assert rel_paths(found) == ["cat/real.jpg"]
    assert skips.seen == {"cat/link.jpg": Skip(SYMLINK, True), "linked_cat": Skip(SYMLINK, True)}


def test_followed_symlinks_stay_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = touch(tmp_path / "elsewhere" / "out.jpg", b"outside")
    real = touch(root / "cat" / "real.jpg", b"12345")
    (root / "cat" / "inside.jpg").symlink_to(real)
    (root / "cat" / "outside.jpg").symlink_to(outside)
    (root / "cat" / "broken.jpg").symlink_to(root / "nowhere.jpg")
    (root / "cat" / "outdir").symlink_to(outside.parent)
    skips = Skips(root)
    layout = Layout([root], recursive=True, categories={})
    found = list(scan(layout, follow_symlinks=True, on_skip=skips))
    # Links come after the real files of their folder.
    assert rel_paths(found) == ["cat/real.jpg", "cat/inside.jpg"]
    assert found[1].size == 5  # the target's size
    assert skips.seen == {
        "cat/outside.jpg": Skip("symbolic link pointing outside its root folder", True),
        "cat/outdir": Skip("symbolic link pointing outside its root folder", True),
        "cat/broken.jpg": Skip("broken symbolic link", True),
    }


def test_symlink_loop_ends_when_following(tmp_path: Path) -> None:
    root = tmp_path / "root"
    touch(root / "cat" / "a.jpg")
    touch(root / "cat" / "sub" / "b.jpg")
    (root / "cat" / "sub" / "loop").symlink_to(root / "cat")  # cat/sub/loop -> cat
    (root / "cat" / "self").symlink_to(".")
    (root / "alias").symlink_to("cat")  # a second name for a whole category folder
    skips = Skips(root)
    layout = Layout([root], recursive=True, categories={})
    found = list(scan(layout, follow_symlinks=True, on_skip=skips))
    # Each real folder is walked once, under its real name, though "alias" sorts first.
    assert rel_paths(found) == ["cat/a.jpg", "cat/sub/b.jpg"]
    loop = Skip("folder already scanned (symbolic link loop)", False)
    assert skips.seen == {"alias": loop, "cat/self": loop, "cat/sub/loop": loop}


def test_deep_tree_has_no_recursion_limit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    levels = sys.getrecursionlimit() + 50
    # Built and removed one level at a time: pathlib's mkdir(parents=True) and shutil.rmtree
    # (which pytest uses to clean old temporary folders) both recurse and would fail.
    chain = [root / "cat"]
    chain[0].mkdir(parents=True)
    for _ in range(levels):
        chain.append(chain[-1] / "d")
        chain[-1].mkdir()
    bottom = touch(chain[-1] / "bottom.jpg")
    try:
        found = list(scan(Layout([root], recursive=True, categories={})))
        assert rel_paths(found) == ["cat/" + "d/" * levels + "bottom.jpg"]
    finally:
        bottom.unlink()
        for folder in reversed(chain):
            folder.rmdir()


def test_folder_vanishing_mid_scan_is_logged_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    touch(root / "a" / "1.jpg")
    touch(root / "b" / "2.jpg")
    touch(root / "c" / "3.jpg")
    walk = scan(Layout([root], recursive=False, categories={}))
    with caplog.at_level(logging.WARNING, logger="paiv_sync.scanner"):
        first = next(walk)
        # "b" was listed in the root, but it is read only after "a": remove it in between.
        shutil.rmtree(root / "b")
        rest = list(walk)
    assert first.location.rel_path == "a/1.jpg"
    assert rel_paths(rest) == ["c/3.jpg"]
    assert [r.getMessage() for r in caplog.records] == [
        f"folder {root / 'b'} vanished during the scan; skipped"
    ]


def test_folder_replaced_by_a_file_mid_scan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    touch(root / "a" / "1.jpg")
    touch(root / "b" / "2.jpg")
    walk = scan(Layout([root], recursive=False, categories={}))
    with caplog.at_level(logging.WARNING, logger="paiv_sync.scanner"):
        next(walk)
        shutil.rmtree(root / "b")
        touch(root / "b")
        assert list(walk) == []
    assert "is no longer a folder" in caplog.text


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any folder")
def test_unreadable_folder_is_logged_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    touch(root / "a" / "1.jpg")
    touch(root / "b" / "2.jpg")
    (root / "a").chmod(0)
    try:
        with caplog.at_level(logging.WARNING, logger="paiv_sync.scanner"):
            found = list(scan(Layout([root], recursive=False, categories={})))
    finally:
        (root / "a").chmod(0o755)
    assert rel_paths(found) == ["b/2.jpg"]
    assert "permission denied" in caplog.text


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_special_files_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "root"
    touch(root / "cat" / "a.jpg")
    os.mkfifo(root / "cat" / "pipe.jpg")
    skips = Skips(root)
    found = list(scan(Layout([root], recursive=False, categories={}), on_skip=skips))
    assert rel_paths(found) == ["cat/a.jpg"]
    assert skips.seen == {"cat/pipe.jpg": Skip("not a regular file", False)}
