"""The folder rules: which path belongs to which category, and which are skipped and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from paiv_sync.layout import Layout, Location, Skip, is_ignored_name

ROOT = Path("/data/images")
OTHER = Path("/srv/other root")

IN_ROOT = "directly in a root folder, not in a category folder"
NESTED = "nested folder and recursive is off"
IGNORED = "ignored name"
EXTENSION = "extension not accepted"
OUTSIDE = "outside every root"


def make(recursive: bool) -> Layout:
    return Layout([ROOT, OTHER], recursive=recursive, categories={"Forest_Pics": "forest"})


CASES: list[tuple[str, bool, Location | Skip]] = [
    ("/data/images/forest/img1.jpg", False, Location(ROOT, "forest/img1.jpg", "forest", "forest")),
    ("/data/images/forest/img1.jpg", True, Location(ROOT, "forest/img1.jpg", "forest", "forest")),
    ("/data/images/img1.jpg", True, Skip(IN_ROOT, True)),
    ("/data/images/img1.jpg", False, Skip(IN_ROOT, True)),
    ("/data/images/forest/sub/img3.jpg", False, Skip(NESTED, True)),
    (
        "/data/images/forest/sub/deeper/img3.jpg",
        True,
        Location(ROOT, "forest/sub/deeper/img3.jpg", "forest", "forest"),
    ),
    ("/data/images/forest/.hidden.jpg", True, Skip(IGNORED, False)),
    ("/data/images/forest/.cache/img.jpg", True, Skip(IGNORED, False)),
    ("/data/images/.trash/img.jpg", True, Skip(IGNORED, False)),
    ("/data/images/forest/img.jpg~", True, Skip(IGNORED, False)),
    ("/data/images/forest/img.jpg.tmp", True, Skip(IGNORED, False)),
    ("/data/images/forest/img.jpg.part", True, Skip(IGNORED, False)),
    ("/data/images/forest/img.jpg.crdownload", True, Skip(IGNORED, False)),
    ("/data/images/forest/.img.jpg.swp", True, Skip(IGNORED, False)),
    (
        "/data/images/forest/Thumbs.db",
        True,
        Skip('ignored: "Thumbs.db" (Windows thumbnails), a built-in rule', False, True),
    ),
    (
        "/data/images/forest/desktop.ini",
        True,
        Skip('ignored: "desktop.ini" (Windows folder settings), a built-in rule', False, True),
    ),
    (
        "/data/images/forest/@eaDir/img.jpg",
        True,
        Skip('ignored: "@eaDir" (Synology thumbnails), a built-in rule', False, True),
    ),
    (
        "/data/images/#recycle/forest/img.jpg",
        True,
        Skip('ignored: "#recycle" (a NAS recycle bin), a built-in rule', False, True),
    ),
    (
        "/data/images/forest/._img.jpg",
        True,
        Skip('ignored: "._*" (macOS metadata beside a file), a built-in rule', False, True),
    ),
    ("/data/images/forest/old~/img.jpg", True, Skip(IGNORED, False)),
    (
        "/data/images/forest/IMG_0001.JPG",
        False,
        Location(ROOT, "forest/IMG_0001.JPG", "forest", "forest"),
    ),
    ("/data/images/forest/scan.Png", False, Location(ROOT, "forest/scan.Png", "forest", "forest")),
    (
        "/data/images/forest/photo.JPEG",
        False,
        Location(ROOT, "forest/photo.JPEG", "forest", "forest"),
    ),
    ("/data/images/forest/notes.txt", False, Skip(EXTENSION, False)),
    ("/data/images/forest/movie.gif", False, Skip(EXTENSION, False)),
    ("/data/images/forest/jpg", False, Skip(EXTENSION, False)),
    ("/data/images/notes.txt", False, Skip(EXTENSION, False)),
    (
        "/data/images/Forest_Pics/a.png",
        False,
        Location(ROOT, "Forest_Pics/a.png", "Forest_Pics", "forest"),
    ),
    ("/data/imagesX/forest/a.png", False, Skip(OUTSIDE, False)),
    ("/data/forest/a.png", False, Skip(OUTSIDE, False)),
    ("/tmp/a.png", False, Skip(OUTSIDE, False)),
    ("/data/images", False, Skip(OUTSIDE, False)),
    (
        "/srv/other root/défauts été/ñandú 1.jpg",
        False,
        Location(OTHER, "défauts été/ñandú 1.jpg", "défauts été", "défauts été"),
    ),
    ("/srv/other root/猫/写真.png", False, Location(OTHER, "猫/写真.png", "猫", "猫")),
    ("/data/images//forest/./a.jpg", False, Location(ROOT, "forest/a.jpg", "forest", "forest")),
]


@pytest.mark.parametrize(("path", "recursive", "expected"), CASES)
def test_locate(path: str, recursive: bool, expected: Location | Skip) -> None:
    assert make(recursive).locate(Path(path)) == expected


def test_locate_takes_strings_too() -> None:
    assert make(False).locate("/data/images/forest/a.jpg") == Location(
        ROOT, "forest/a.jpg", "forest", "forest"
    )


def test_root_of() -> None:
    layout = make(False)
    assert layout.root_of(Path("/data/images/forest/a.jpg")) == ROOT
    assert layout.root_of(Path("/data/images")) == ROOT
    assert layout.root_of(Path("/srv/other root/x")) == OTHER
    assert layout.root_of(Path("/srv/other")) is None


def test_nested_roots_the_innermost_wins() -> None:
    layout = Layout([Path("/a"), Path("/a/b")], recursive=True, categories={})
    assert layout.locate("/a/b/cat/x.jpg") == Location(Path("/a/b"), "cat/x.jpg", "cat", "cat")
    assert layout.locate("/a/c/x.jpg") == Location(Path("/a"), "c/x.jpg", "c", "c")


def test_configured_extensions_are_normalised() -> None:
    layout = Layout([ROOT], recursive=False, categories={}, extensions=["PNG", ".Tif"])
    assert isinstance(layout.locate("/data/images/c/a.png"), Location)
    assert isinstance(layout.locate("/data/images/c/a.TIF"), Location)
    assert layout.locate("/data/images/c/a.jpg") == Skip(EXTENSION, False)


def test_relative_roots_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    layout = Layout([Path("pics/")], recursive=False, categories={})
    assert layout.roots == (tmp_path / "pics",)
    assert layout.locate(tmp_path / "pics" / "cat" / "a.jpg") == Location(
        tmp_path / "pics", "cat/a.jpg", "cat", "cat"
    )


@pytest.mark.parametrize(
    ("name", "ignored"),
    [
        (".DS_Store", True),
        ("THUMBS.DB", True),
        ("Desktop.ini", True),
        ("x.TMP", True),
        ("a~", True),
        ("img.jpg", False),
        ("tmp", False),
        ("part.jpg", False),
        ("", False),
        ("@eaDir", True),
        ("$RECYCLE.BIN", True),
        ("System Volume Information", True),
        ("lost+found", True),
        ("#snapshot", True),
        ("recycle", False),
    ],
)
def test_is_ignored_name(name: str, ignored: bool) -> None:
    assert is_ignored_name(name) is ignored


def test_the_users_ignore_patterns_apply_below_every_root() -> None:
    layout = Layout(
        [ROOT, OTHER],
        recursive=True,
        categories={},
        ignore=["rejects/", "draft_*", "!draft_keep.jpg", "/city/old/"],
    )
    skip = layout.locate("/data/images/forest/rejects/a.jpg")
    assert skip == Skip('ignored by "rejects/" in ignore', False, True)
    assert layout.locate("/srv/other root/sea/draft_1.png") == Skip(
        'ignored by "draft_*" in ignore', False, True
    )
    assert isinstance(layout.locate("/data/images/forest/draft_keep.jpg"), Location)
    assert isinstance(layout.locate("/data/images/forest/city/old/a.jpg"), Location)
    assert isinstance(layout.locate("/data/images/city/old/a.jpg"), Skip)
    # As in git, a file in an ignored folder is not taken back by a later "!" pattern.
    kept_out = Layout([ROOT], recursive=True, categories={}, ignore=["rejects/", "!keep.jpg"])
    assert isinstance(kept_out.locate("/data/images/forest/rejects/keep.jpg"), Skip)


def test_paivignore_files_apply_below_their_folder(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "forest").mkdir(parents=True)
    (root / "city").mkdir()
    (root / ".paivignore").write_text("# taken from the camera station\n*_raw.png\n")
    (root / "forest" / ".paivignore").write_text("blurry/\n")
    layout = Layout([root], recursive=True, categories={})
    layout.rules.load(str(root))
    assert isinstance(layout.locate(root / "city" / "a_raw.png"), Skip)
    assert layout.locate(root / "forest" / "blurry" / "a.png") == Skip(
        f'ignored by "blurry/" in {root / "forest" / ".paivignore"}', False, True
    )
    assert isinstance(layout.locate(root / "city" / "blurry" / "a.png"), Location)
    (root / "forest" / ".paivignore").unlink()
    layout.rules.load(str(root))
    assert isinstance(layout.locate(root / "forest" / "blurry" / "a.png"), Location)
