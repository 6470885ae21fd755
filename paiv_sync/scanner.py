"""The scan: walk the roots and report every image file with its size and mtime.

Filesystem events are hints that can be lost; the scan is the truth. It runs at start-up, at a
regular interval and for a directory that was moved into a root, and the pipeline compares what
it finds with the ledger. It only lists directories and stats files (no opening, no hashing).
Files come in the order of their relative paths, the order of the ledger's index, so that the
start-up reconcile can merge the two streams instead of loading either into memory;
:func:`scan_stats` yields bare tuples for that, with no object built per file.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paiv_sync.layout import (
    IGNORED_NAMES,
    SKIP_EXTENSION,
    SKIP_IN_ROOT,
    SKIP_NESTED,
    SKIP_OUTSIDE,
    SKIP_UNDECODABLE,
    Layout,
    Location,
    Skip,
    ignored_skip,
    is_ignored_name,
    is_undecodable,
    rule_skip,
)

__all__ = [
    "SKIP_BROKEN_LINK",
    "SKIP_LINK_LOOP",
    "SKIP_LINK_OUTSIDE",
    "SKIP_NOT_REGULAR",
    "SKIP_SYMLINK",
    "Found",
    "scan",
    "scan_stats",
]

logger = logging.getLogger(__name__)

SKIP_SYMLINK = Skip("symbolic link, not followed", warn=True)
SKIP_LINK_OUTSIDE = Skip("symbolic link pointing outside its root folder", warn=True)
SKIP_BROKEN_LINK = Skip("broken symbolic link", warn=True)
SKIP_LINK_LOOP = Skip("folder already scanned (symbolic link loop)", warn=False)
SKIP_NOT_REGULAR = Skip("not a regular file", warn=False)

OnSkip = Callable[[Path, Skip], None]

# Extensions of the ignored system file names ("thumbs.db", "desktop.ini"): only a file with one
# of these needs the full name check after its extension was accepted.
_IGNORED_NAME_EXTENSIONS = frozenset(Path(name).suffix for name in IGNORED_NAMES)


@dataclass(frozen=True, slots=True)
class Found:
    """A file the scan found: where it belongs, and its stamp from one stat.

    Size, mtime, ctime and inode number tell its versions apart (see paiv_sync.stamps).
    """

    location: Location
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int


@dataclass(slots=True)
class _Dir:
    """A directory waiting on the walk's stack."""

    path: str
    prefix: str  # relative path of the directory with a trailing "/", "" for the root
    folder: str
    category: str
    depth: int  # 0 for the root, 1 for a category folder


class _Walk:
    """One scan of one root. Holds the settings so the hot loop reads locals, not arguments."""

    def __init__(
        self, layout: Layout, root: Path, follow_symlinks: bool, on_skip: OnSkip | None
    ) -> None:
        self.layout = layout
        self.root = root
        self.root_text = str(root)
        self.follow_symlinks = follow_symlinks
        self.on_skip = on_skip
        self.visited: set[tuple[int, int]] = set()
        self._real_root: str | None = None

    def skip(self, path: str, why: Skip) -> None:
        if self.on_skip is not None:
            self.on_skip(Path(path), why)

    def real_root(self) -> str:
        if self._real_root is None:
            self._real_root = os.path.realpath(self.root_text)
        return self._real_root

    def inside_root(self, path: str) -> bool:
        """Tell whether a symbolic link's final target lies inside this root."""
        target = os.path.realpath(path)
        real_root = self.real_root()
        return target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep)

    def first_visit(self, path: str, follow: bool) -> bool:
        """Record a directory's identity; False if it was already walked (a link loop)."""
        if not self.follow_symlinks:
            # Without following links a tree has no loops, so the extra stat is not needed.
            return True
        info = os.stat(path, follow_symlinks=follow)
        key = (info.st_dev, info.st_ino)
        if key in self.visited:
            return False
        self.visited.add(key)
        return True

    def child_dir(self, parent: _Dir, name: str, path: str) -> _Dir | None:
        """The stack entry for a subdirectory, or None when it must not be walked."""
        if is_ignored_name(name):
            self.skip(path, ignored_skip(name))
            return None
        if path in self.layout.root_strings:
            return None  # another configured root nested here: it is scanned as itself
        rules = self.layout.rules
        if rules.active:
            rule = rules.match(self.root_text, parent.prefix + name, is_dir=True, parents=False)
            if rule is not None:
                self.skip(path, rule_skip(rule))
                return None
        if parent.depth == 0:
            return _Dir(path, name + "/", name, self.layout.category_of(name), 1)
        if not self.layout.recursive:
            self.skip(path, SKIP_NESTED)
            return None
        return _Dir(
            path, parent.prefix + name + "/", parent.folder, parent.category, parent.depth + 1
        )

    def file_in_root(self, name: str, path: str) -> None:
        """A file directly in the root is never taken; say why when it looks like an image."""
        if self.on_skip is not None:
            self.skip(path, self.layout.classify_name(name) or SKIP_IN_ROOT)

    def symlink(self, parent: _Dir, name: str, path: str) -> Found | _Dir | None:
        """Apply the link rules: not followed by default; followed only inside the root."""
        if not self.follow_symlinks:
            self.skip(path, SKIP_SYMLINK)
            return None
        try:
            info = os.stat(path)
        except FileNotFoundError:
            self.skip(path, SKIP_BROKEN_LINK)
            return None
        if not self.inside_root(path):
            self.skip(path, SKIP_LINK_OUTSIDE)
            return None
        if stat.S_ISDIR(info.st_mode):
            child = self.child_dir(parent, name, path)
            if child is not None and not self.first_visit(path, follow=True):
                self.skip(path, SKIP_LINK_LOOP)
                return None
            return child
        if not stat.S_ISREG(info.st_mode):
            self.skip(path, SKIP_NOT_REGULAR)
            return None
        if parent.depth == 0:
            self.file_in_root(name, path)
            return None
        why = self.layout.classify_name(name)
        if why is not None:
            self.skip(path, why)
            return None
        rule = self.ignored_file(parent.prefix + name)
        if rule is not None:
            self.skip(path, rule_skip(rule))
            return None
        location = Location(self.root, parent.prefix + name, parent.folder, parent.category)
        return Found(location, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)

    def ignored_file(self, rel_path: str) -> str | None:
        """The user's rule that ignores the file ``rel_path`` (its folders were looked at)."""
        rules = self.layout.rules
        if not rules.active:
            return None
        return rules.match(self.root_text, rel_path, is_dir=False, parents=False)

    def list_dir(self, directory: _Dir) -> list[os.DirEntry[str]] | None:
        """List a directory in walk order; None (after a WARNING) when it cannot be read.

        Walk order is the order of the relative paths it produces (see :func:`scan`): a
        folder sorts as its name plus "/", so "a.png" comes before the folder "a" and the
        folder "a" after "a-b". Symbolic links, when followed, come last.
        """
        try:
            with os.scandir(directory.path) as listing:
                entries = list(listing)
        except FileNotFoundError:
            if directory.depth == 0:
                logger.warning(
                    "root folder %s is missing (unmounted?); will look again at the next scan",
                    directory.path,
                )
            else:
                logger.warning("folder %s vanished during the scan; skipped", directory.path)
            return None
        except NotADirectoryError:
            if directory.depth == 0:
                logger.warning(
                    "root folder %s is a file, not a folder; nothing to scan there",
                    directory.path,
                )
            else:
                logger.warning("%s is no longer a folder; skipped", directory.path)
            return None
        except PermissionError:
            logger.warning(
                "cannot read folder %s (permission denied); its files are skipped until its "
                "permissions allow the service's user to list it",
                directory.path,
            )
            return None
        except OSError as exc:
            # EIO, ESTALE and friends on network shares: skip this time, the next scan retries.
            logger.warning("cannot read folder %s: %s; skipped", directory.path, exc)
            return None
        if not all(entry.name.isascii() for entry in entries):
            # A name that is not UTF-8 cannot be recorded or sent: skip it (a folder with
            # all it holds), say so, and go on with the others.
            kept = []
            for entry in entries:
                if is_undecodable(entry.name):
                    self.skip(entry.path, SKIP_UNDECODABLE)
                else:
                    kept.append(entry)
            entries = kept
        entries.sort(key=_walk_key)
        if self.follow_symlinks:
            # Links after the real entries, so that a real folder is walked under its own
            # name and a link to it is the one reported as a repeat. Every real subfolder is
            # recorded before any is walked, for a link deeper down that points at one.
            links: list[os.DirEntry[str]] = []
            real: list[os.DirEntry[str]] = []
            for entry in entries:
                try:
                    is_link = entry.is_symlink()
                except OSError:
                    is_link = False
                (links if is_link else real).append(entry)
            entries = real + links
        return entries

    # One loop over every entry of every folder, kept whole on purpose: it runs a million
    # times on a large tree, and each helper call per entry shows in bench figure 3.
    def walk(self, top: _Dir, raw: bool) -> Iterator[Any]:  # noqa: C901
        """Walk from ``top`` in walk order with an explicit stack (no recursion limit).

        Yields :class:`Found` objects, or ``(rel_path, size, mtime_ns, ctime_ns, inode)``
        tuples when ``raw``.
        """
        entries = self.list_dir(top)
        if entries is None:
            return
        extensions = self.layout.extensions
        root = self.root
        ignored_name_extensions = _IGNORED_NAME_EXTENSIONS
        rules_active = self.layout.rules.active
        follow = self.follow_symlinks
        started = time.monotonic()
        count = 0
        # One frame per folder being walked: the folder, its entries, the next index, and the
        # subfolders already checked for loops (only when following links).
        frames: list[tuple[_Dir, list[os.DirEntry[str]], list[int], dict[str, _Dir]]] = [
            (top, entries, [0], self.checked_subdirs(top, entries) if follow else {})
        ]
        while frames:
            directory, entries, position, subdirs = frames[-1]
            depth = directory.depth
            prefix = directory.prefix
            folder = directory.folder
            category = directory.category
            index = position[0]
            total = len(entries)
            child: _Dir | None = None
            while index < total:
                entry = entries[index]
                index += 1
                name = entry.name
                try:
                    if name[0] == "." or name[-1] == "~":
                        self.skip(entry.path, ignored_skip(name))
                    elif entry.is_file(follow_symlinks=False):
                        if depth == 0:
                            self.file_in_root(name, entry.path)
                            continue
                        dot = name.rfind(".")
                        extension = name[dot:].lower() if dot > 0 else ""
                        if extension not in extensions or (
                            extension in ignored_name_extensions and is_ignored_name(name)
                        ):
                            if self.on_skip is not None:
                                self.skip(
                                    entry.path, self.layout.classify_name(name) or SKIP_EXTENSION
                                )
                            continue
                        if rules_active:
                            rule = self.ignored_file(prefix + name)
                            if rule is not None:
                                self.skip(entry.path, rule_skip(rule))
                                continue
                        try:
                            info = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue  # deleted since the listing: nothing to report
                        count += 1
                        if raw:
                            yield (
                                prefix + name,
                                info.st_size,
                                info.st_mtime_ns,
                                info.st_ctime_ns,
                                info.st_ino,
                            )
                        else:
                            yield Found(
                                Location(root, prefix + name, folder, category),
                                info.st_size,
                                info.st_mtime_ns,
                                info.st_ctime_ns,
                                info.st_ino,
                            )
                    elif entry.is_dir(follow_symlinks=False):
                        if follow:
                            child = subdirs.get(name)
                        else:
                            child = self.child_dir(directory, name, entry.path)
                        if child is not None:
                            break
                    elif entry.is_symlink():
                        result = self.symlink(directory, name, entry.path)
                        if isinstance(result, Found):
                            count += 1
                            if raw:
                                yield (
                                    result.location.rel_path,
                                    result.size,
                                    result.mtime_ns,
                                    result.ctime_ns,
                                    result.inode,
                                )
                            else:
                                yield result
                        elif result is not None:
                            child = result
                            break
                    else:
                        self.skip(entry.path, SKIP_NOT_REGULAR)
                except FileNotFoundError:
                    logger.debug("%s vanished during the scan", entry.path)
                except OSError as exc:
                    logger.warning("cannot check %s: %s; skipped", entry.path, exc)
            position[0] = index
            if child is None:
                frames.pop()
                continue
            child_entries = self.list_dir(child)
            if child_entries is not None:
                frames.append(
                    (
                        child,
                        child_entries,
                        [0],
                        self.checked_subdirs(child, child_entries) if follow else {},
                    )
                )
        logger.debug("scanned %s: %d files in %.2f s", top.path, count, time.monotonic() - started)

    def checked_subdirs(self, directory: _Dir, entries: list[os.DirEntry[str]]) -> dict[str, _Dir]:
        """With links followed: the real subfolders of ``directory`` to walk, by name.

        Each is recorded as visited before any of them is walked, so a link reached first
        (deeper down) that points at one of them is the one reported as a repeat.
        """
        result: dict[str, _Dir] = {}
        for entry in entries:
            name = entry.name
            try:
                if name[0] == "." or name[-1] == "~" or not entry.is_dir(follow_symlinks=False):
                    continue
                child = self.child_dir(directory, name, entry.path)
                if child is None:
                    continue
                if self.first_visit(entry.path, follow=False):
                    result[name] = child
                else:
                    self.skip(entry.path, SKIP_LINK_LOOP)
            except FileNotFoundError:
                logger.debug("%s vanished during the scan", entry.path)
            except OSError as exc:
                logger.warning("cannot check %s: %s; skipped", entry.path, exc)
        return result


def _walk_key(entry: os.DirEntry[str]) -> str:
    """Sort key giving the order of relative paths: a folder sorts as its name plus "/"."""
    try:
        if entry.is_dir(follow_symlinks=False):
            return entry.name + "/"
    except OSError:
        pass
    return entry.name


def _start_dir(walk: _Walk, layout: Layout, parts: list[str], start: str) -> _Dir | Found | None:
    """Prepare a scan of the subtree ``start`` (a folder or a single file below a root)."""
    for part in parts:
        if is_ignored_name(part):
            walk.skip(start, ignored_skip(part))
            return None
    for part in parts:
        if is_undecodable(part):
            walk.skip(start, SKIP_UNDECODABLE)
            return None
    if len(parts) > 1 and layout.rules.active:
        # The folders above it, as a walk from the root would have looked at them.
        rule = layout.rules.match(walk.root_text, "/".join(parts[:-1]), is_dir=True)
        if rule is not None:
            walk.skip(start, rule_skip(rule))
            return None
    try:
        info = os.stat(start, follow_symlinks=False)
    except FileNotFoundError:
        logger.debug("%s vanished before it could be scanned", start)
        return None
    parent_parts = parts[:-1]
    parent = _Dir(
        os.path.dirname(start),  # noqa: PTH120 - strings in the walk
        "".join(part + "/" for part in parent_parts),
        parent_parts[0] if parent_parts else "",
        layout.category_of(parent_parts[0]) if parent_parts else "",
        len(parent_parts),
    )
    name = parts[-1]
    if stat.S_ISLNK(info.st_mode):
        return walk.symlink(parent, name, start)
    if stat.S_ISDIR(info.st_mode):
        child = walk.child_dir(parent, name, start)
        if child is not None and not walk.first_visit(start, follow=False):
            return None
        return child
    if not stat.S_ISREG(info.st_mode):
        walk.skip(start, SKIP_NOT_REGULAR)
        return None
    located = layout.locate(start)
    if isinstance(located, Skip):
        walk.skip(start, located)
        return None
    return Found(located, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


def _scan_root(
    layout: Layout, root: Path, follow_symlinks: bool, on_skip: OnSkip | None, raw: bool
) -> Iterator[Any]:
    """The walk of one whole root (a generator: nothing happens until it is iterated)."""
    walk = _Walk(layout, root, follow_symlinks, on_skip)
    top = _Dir(str(root), "", "", "", 0)
    if follow_symlinks:
        # The walk itself reports a missing or unreadable root.
        with contextlib.suppress(OSError):
            walk.first_visit(top.path, follow=True)
    return walk.walk(top, raw)


def _scan_start(
    layout: Layout, start: Path, follow_symlinks: bool, on_skip: OnSkip | None
) -> Iterator[Found]:
    """Scan the subtree ``start`` (a folder or a single file)."""
    split = layout.split(start)
    if split is None:
        if on_skip is not None:
            on_skip(Path(start), SKIP_OUTSIDE)
        return
    root, parts = split
    if not parts:
        yield from _scan_root(layout, root, follow_symlinks, on_skip, raw=False)
        return
    walk = _Walk(layout, root, follow_symlinks, on_skip)
    start_text = os.path.join(str(root), *parts)
    try:
        first = _start_dir(walk, layout, parts, start_text)
    except OSError as exc:
        logger.warning("cannot scan %s: %s; skipped", start_text, exc)
        return
    if isinstance(first, Found):
        yield first
    elif first is not None:
        yield from walk.walk(first, raw=False)


def scan(
    layout: Layout,
    start: Path | None = None,
    *,
    follow_symlinks: bool = False,
    on_skip: OnSkip | None = None,
) -> Iterator[Found]:
    """Walk the roots (or one subtree) and yield every file the layout accepts.

    Takes the layout; ``start``, a folder or file below a root, to scan only that subtree (used
    when a folder was moved in); whether to follow symbolic links; and ``on_skip``, called with
    the path and the :class:`Skip` for each entry not taken (a skipped folder is reported once,
    not walked). Yields :class:`Found` root by root, each root's files in the order of their
    relative paths compared as strings (code point order, which is also the byte order of
    their UTF-8 and so the order of the ledger's index): depth-first with names sorted, a
    folder sorting as its name plus "/". When links are followed, the files reached through
    a link come after the real entries of the folder holding the link.

    Symbolic links are skipped unless ``follow_symlinks``; then a link whose target is inside
    the same root is taken (reported under the link's own path) and one pointing outside is
    skipped; a folder reached twice is walked once, so link loops end. A folder that cannot be
    read or vanishes is logged at WARNING and skipped, a missing root likewise; nothing raises.
    """
    if start is None:
        # chain, not nested generators: one Python frame per yielded file, not three, which
        # is measurable on a 100,000-file scan.
        return itertools.chain.from_iterable(
            _scan_root(layout, root, follow_symlinks, on_skip, raw=False) for root in layout.roots
        )
    return _scan_start(layout, start, follow_symlinks, on_skip)


def scan_stats(
    layout: Layout,
    root: Path,
    *,
    follow_symlinks: bool = False,
    on_skip: OnSkip | None = None,
) -> Iterator[tuple[str, int, int, int, int]]:
    """Walk one root like :func:`scan`, yielding ``(rel_path, size, mtime_ns, ctime_ns, inode)``.

    For reconciling a whole root with the ledger: no object is built per file, and the order
    is that of ``SELECT … ORDER BY rel_path``, so the two can be merged in one pass without
    holding either in memory (see :func:`scan` for the order and for what is skipped).
    ``root`` must be one of ``layout.roots``. Raises nothing; problems are logged.
    """
    return _scan_root(layout, root, follow_symlinks, on_skip, raw=True)
