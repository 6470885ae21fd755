"""Which file belongs to which category: the folder layout rules.

A watched root holds one folder per category (``root/<category>/img.jpg``). This module turns a
path into either a :class:`Location` (root, relative path, top-level folder, category) or a
:class:`Skip` that says why the file is not taken. It is pure string logic: no file is opened or
stat'ed, so it is cheap enough for every event and every file of a scan.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from paiv_sync.ignore import ARTEFACTS, IgnoreRules, artefact

if TYPE_CHECKING:
    from paiv_sync.config import Config

__all__ = [
    "DEFAULT_EXTENSIONS",
    "IGNORED_NAMES",
    "IGNORED_SUFFIXES",
    "SKIP_EXTENSION",
    "SKIP_IGNORED",
    "SKIP_IN_ROOT",
    "SKIP_NESTED",
    "SKIP_OUTSIDE",
    "SKIP_UNDECODABLE",
    "Layout",
    "Location",
    "Skip",
    "ignored_skip",
    "is_ignored_name",
    "is_undecodable",
    "layout_for",
    "rule_skip",
    "shown",
]

DEFAULT_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")

# Names that editors, browsers, sync tools and operating systems leave behind while a file is
# still being written or as metadata. Compared in lower case: Windows and macOS file systems
# are usually case-insensitive, so "THUMBS.DB" is the same file as "Thumbs.db".
IGNORED_SUFFIXES: tuple[str, ...] = (".tmp", ".part", ".crdownload", ".swp")
IGNORED_NAMES: frozenset[str] = frozenset({"thumbs.db", "desktop.ini"})


@dataclass(frozen=True, slots=True)
class Location:
    """Where an accepted file sits: its root, its path below it and its category.

    ``rel_path`` is POSIX-style (``"forest/sub/img3.jpg"``) whatever the platform, because it is
    what the ledger stores and shows.
    """

    root: Path
    rel_path: str
    folder: str
    category: str

    @property
    def path(self) -> str:
        """The file's path: its root joined with its relative path."""
        return os.path.join(self.root, self.rel_path)


@dataclass(frozen=True, slots=True)
class Skip:
    """Why a path is not taken, and whether a person should be told (``warn``).

    ``warn`` is True for mistakes a user can fix (an image directly in a root, a nested folder
    while ``recursive`` is off, a symbolic link) and False for expected noise (hidden and
    temporary files, other extensions, events for paths outside the roots).
    """

    reason: str
    warn: bool
    tell: bool = False  # an ignore rule matched: said once, at INFO, with the rule


# Skips are frozen values, so one instance of each is shared instead of building one per file.
SKIP_OUTSIDE = Skip("outside every root", warn=False)
SKIP_IGNORED = Skip("ignored name", warn=False)
SKIP_EXTENSION = Skip("extension not accepted", warn=False)
SKIP_IN_ROOT = Skip("directly in a root folder, not in a category folder", warn=True)
SKIP_NESTED = Skip("nested folder and recursive is off", warn=True)
SKIP_UNDECODABLE = Skip(
    "its name is not valid UTF-8 (written in an older encoding such as Latin-1); the ledger and "
    "the server take UTF-8 names only, so rename it (for example with convmv) to have it uploaded",
    warn=True,
)


def is_undecodable(name: str) -> bool:
    """Tell whether a name read from the disk holds bytes that are not UTF-8.

    Python reads such bytes as lone surrogates (``"caf\\udce9.png"``), which neither SQLite
    nor an HTTP header can carry. ASCII names, almost all of them, are answered at once.
    """
    if name.isascii():
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def shown(path: str) -> str:
    """A path as a log line can show it: bytes that are not UTF-8 as ``\xe9``."""
    if not is_undecodable(path):
        return path
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_ignored_name(name: str) -> bool:
    """Tell whether one path component is hidden, temporary or system metadata.

    Takes a single name (no separators). Returns True for ``.*``, ``*~``, ``*.tmp``, ``*.part``,
    ``*.crdownload``, ``*.swp`` and the system and NAS artefacts of paiv_sync.ignore
    (``Thumbs.db``, ``@eaDir``, ``$RECYCLE.BIN`` …; the suffixes and names compared
    case-insensitively); False otherwise, including for the empty string.
    """
    if not name:
        return False
    if name[0] == "." or name[-1] == "~":
        return True
    lower = name.lower()
    return lower.endswith(IGNORED_SUFFIXES) or lower in IGNORED_NAMES or lower in ARTEFACTS


_artefact_skips: dict[str, Skip] = {}


def ignored_skip(name: str) -> Skip:
    """The Skip for a name :func:`is_ignored_name` ignores: one that names the built-in rule
    for a system or NAS artefact (said once, at INFO), else the quiet SKIP_IGNORED."""
    rule = artefact(name)
    if rule is None:
        return SKIP_IGNORED
    skip = _artefact_skips.get(rule)
    if skip is None:
        if len(_artefact_skips) > 1000:
            _artefact_skips.clear()
        skip = _artefact_skips[rule] = Skip(f"ignored: {rule}, a built-in rule", False, True)
    return skip


def rule_skip(rule: str) -> Skip:
    """The Skip for a path one of the user's ignore rules matched (said once, at INFO)."""
    return Skip(f"ignored by {rule}", warn=False, tell=True)


def _normalise_extension(extension: str) -> str:
    extension = extension.strip().lower()
    if not extension.startswith("."):
        extension = "." + extension
    return extension


class Layout:
    """The folder rules for a set of roots.

    Takes the roots (made absolute and normalised, symbolic links are not resolved), whether
    files in nested folders below a category folder are taken (``recursive``), a map from
    top-level folder name to category name for folders whose category differs from their name,
    and the accepted extensions (case-insensitive, with or without the dot).
    """

    def __init__(
        self,
        roots: Sequence[Path],
        *,
        recursive: bool,
        categories: Mapping[str, str],
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        ignore: Sequence[str] = (),
    ) -> None:
        # abspath, not Path.resolve: roots stay "as configured" (symbolic links kept), only
        # made absolute and normalised, so they match the paths watchdog reports.
        self.roots: tuple[Path, ...] = tuple(
            Path(os.path.abspath(root))  # noqa: PTH100 - see above
            for root in roots
        )
        self.recursive = recursive
        self.categories: dict[str, str] = dict(categories)
        # An extension that is also a temporary suffix (".part") could never be taken, because
        # the ignore rule wins; dropping it here keeps the scanner's fast path exact.
        self.extensions: frozenset[str] = frozenset(
            ext for ext in map(_normalise_extension, extensions) if ext not in IGNORED_SUFFIXES
        )
        self._seps = (os.sep, os.altsep) if os.altsep else (os.sep,)
        # Longest root first, so a root nested inside another root owns its own files.
        self._root_strings: tuple[tuple[str, Path], ...] = tuple(
            sorted(((str(root), root) for root in self.roots), key=lambda p: -len(p[0]))
        )
        self.root_strings: frozenset[str] = frozenset(s for s, _ in self._root_strings)
        # The user's ignore rules; their .paivignore files are read by IgnoreRules.load.
        self.rules = IgnoreRules(ignore)

    def at(self, root: Path, rel_path: str) -> Location:
        """The location of ``rel_path`` (POSIX-style, already accepted) below ``root``."""
        folder = rel_path.split("/", 1)[0]
        return Location(root, rel_path, folder, self.categories.get(folder, folder))

    def category_of(self, folder: str) -> str:
        """Return the category for a top-level folder name (after the override map)."""
        return self.categories.get(folder, folder)

    def accepts_extension(self, name: str) -> bool:
        """Tell whether a file name ends in an accepted extension (case-insensitive)."""
        dot = name.rfind(".")
        return dot > 0 and name[dot:].lower() in self.extensions

    def classify_name(self, name: str) -> Skip | None:
        """Check one file name on its own: None when it may be taken, else the Skip for it."""
        if is_ignored_name(name):
            return SKIP_IGNORED
        if not self.accepts_extension(name):
            return SKIP_EXTENSION
        return None

    def split(self, path: Path | str) -> tuple[Path, list[str]] | None:
        """Split a path into its root and the components below that root.

        Takes an absolute path (a relative one is made absolute against the current directory).
        Returns ``(root, components)``, where components is empty for the root itself, or None
        when the path is in no root.
        """
        # Strings, not Path objects: this runs for every event and every file.
        text = os.fspath(path)
        if not os.path.isabs(text):  # noqa: PTH117 - string fast path
            text = os.path.abspath(text)  # noqa: PTH100 - string fast path
        elif "//" in text or "/." in text or text.endswith(self._seps):
            text = os.path.normpath(text)
        for root_text, root in self._root_strings:
            if text == root_text:
                return root, []
            if text.startswith(root_text) and text[len(root_text)] in self._seps:
                rest = text[len(root_text) + 1 :]
                if os.altsep:
                    rest = rest.replace(os.altsep, os.sep)
                return root, rest.split(os.sep)  # noqa: PTH206 - string fast path
            if root_text.endswith(self._seps) and text.startswith(root_text):
                # Only a file-system root such as "/" ends in a separator.
                return root, text[len(root_text) :].split(os.sep)  # noqa: PTH206 - as above
        return None

    def root_of(self, path: Path | str) -> Path | None:
        """Return the (innermost) root that contains ``path`` or is ``path``, else None."""
        found = self.split(path)
        return None if found is None else found[0]

    def locate(self, path: Path | str) -> Location | Skip:
        """Decide where a file path belongs, without touching the disk.

        Returns a :class:`Location` for a file that should be taken, else a :class:`Skip` whose
        reason is one of: outside every root, ignored name (any component below the root is
        hidden or temporary), a name that is not valid UTF-8, extension not accepted, directly
        in a root folder, nested folder and recursive is off.
        """
        found = self.split(path)
        if found is None or not found[1]:
            return SKIP_OUTSIDE
        root, parts = found
        for part in parts:
            if is_ignored_name(part):
                return ignored_skip(part)
        for part in parts:
            if is_undecodable(part):
                return SKIP_UNDECODABLE
        if not self.accepts_extension(parts[-1]):
            return SKIP_EXTENSION
        if len(parts) == 1:
            return SKIP_IN_ROOT
        if len(parts) > 2 and not self.recursive:
            return SKIP_NESTED
        rel_path = "/".join(parts)
        if self.rules.active:
            rule = self.rules.match(str(root), rel_path, is_dir=False)
            if rule is not None:
                return rule_skip(rule)
        folder = parts[0]
        return Location(root, rel_path, folder, self.categories.get(folder, folder))


def layout_for(config: Config) -> Layout:
    """The layout ``config`` describes, its roots' .paivignore files read."""
    layout = Layout(
        config.folders,
        recursive=config.recursive,
        categories=config.categories,
        extensions=config.extensions,
        ignore=config.ignore,
    )
    for root in layout.roots:
        layout.rules.load(str(root))
    return layout
