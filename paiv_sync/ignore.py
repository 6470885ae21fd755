"""What is never taken: the built-in rules for system and NAS artefacts, and the user's rules.

The built-in rules name the folders and files that operating systems and NAS boxes leave in a
share (a Synology's ``@eaDir`` thumbnails, recycle bins, ``.DS_Store``, AppleDouble ``._*``
files …), so that none of them becomes a category or an image. The user's rules are
gitignore patterns, matched by ``pathspec`` (the maintained implementation of gitignore's
rules): the configuration's ``ignore`` list applies below every root, and a ``.paivignore``
file in a root or in a category folder applies below that folder. As in git, a file inside an
ignored folder cannot be taken back by a later ``!`` pattern.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from pathspec import GitIgnoreSpec

log = logging.getLogger(__name__)

IGNORE_FILE: Final = ".paivignore"

# Lower-case names of system and NAS artefacts, and what each is (for the log line).
ARTEFACTS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "@eadir": "Synology thumbnails",
        "#recycle": "a NAS recycle bin",
        "#snapshot": "NAS snapshots",
        "$recycle.bin": "the Windows recycle bin",
        "system volume information": "Windows volume data",
        "lost+found": "file system recovery data",
        ".trashes": "the macOS trash",
        ".spotlight-v100": "the macOS search index",
        ".fseventsd": "the macOS file event log",
        ".ds_store": "macOS folder settings",
        "thumbs.db": "Windows thumbnails",
        "desktop.ini": "Windows folder settings",
    }
)
# AppleDouble files: the macOS metadata of a file, copied beside it onto a foreign disk.
APPLEDOUBLE_PREFIX: Final = "._"


def artefact(name: str) -> str | None:
    """The built-in rule one name (a single path component) falls under, or None."""
    what = ARTEFACTS.get(name.lower())
    if what is not None:
        return f'"{name}" ({what})'
    if name.startswith(APPLEDOUBLE_PREFIX) and len(name) > 2:
        return f'"{APPLEDOUBLE_PREFIX}*" (macOS metadata beside a file)'
    return None


def check_patterns(patterns: Sequence[str]) -> list[tuple[int, str]]:
    """The patterns gitignore cannot read: ``(index, why)`` for each."""
    problems: list[tuple[int, str]] = []
    for index, pattern in enumerate(patterns):
        try:
            GitIgnoreSpec.from_lines([pattern])
        except ValueError as exc:  # pathspec's GitWildMatchPatternError is a ValueError
            problems.append((index, str(exc)))
    return problems


@dataclass(frozen=True)
class _Rules:
    """The patterns of one source, and where they apply."""

    origin: str  # "ignore" (the configuration) or the path of a .paivignore file
    prefix: str  # the folder below the root they apply to: "" or "forest/"
    lines: tuple[str, ...]
    spec: GitIgnoreSpec


class IgnoreRules:
    """The user's ignore rules for a set of roots.

    ``load(root)`` (re)reads the ``.paivignore`` files of a root and its category folders; the
    pipeline calls it at each scan and when such a file changes. ``match`` tells whether a
    path below a root is ignored and by which pattern. Safe to read from one thread while
    another loads (each root's rules are replaced whole).
    """

    def __init__(self, patterns: Sequence[str] = ()) -> None:
        lines = tuple(patterns)
        self._config = (
            _Rules("ignore", "", lines, GitIgnoreSpec.from_lines(lines)) if lines else None
        )
        self._files: dict[str, tuple[_Rules, ...]] = {}
        # Whether there is any rule to match at all (else ``match`` is never needed): read
        # for every event and every file of a scan, so kept rather than worked out.
        self.active = self._config is not None

    def load(self, root: str) -> None:
        """Read the ``.paivignore`` of ``root`` and of each folder directly in it."""
        found: list[_Rules] = []
        rules = _read(os.path.join(root, IGNORE_FILE), "")
        if rules is not None:
            found.append(rules)
        try:
            with os.scandir(root) as entries:
                folders = sorted(e.name for e in entries if _is_dir(e))
        except OSError:
            folders = []  # the scan says why it cannot read the root
        for name in folders:
            rules = _read(os.path.join(root, name, IGNORE_FILE), name + "/")
            if rules is not None:
                found.append(rules)
        before = self._files.get(root, ())
        self._files[root] = tuple(found)
        self.active = self._config is not None or any(self._files.values())
        if [r.lines for r in before] != [r.lines for r in found]:
            for rules in found:
                log.info("ignore rules from %s: %s", rules.origin, ", ".join(rules.lines))

    def match(self, root: str, rel_path: str, *, is_dir: bool, parents: bool = True) -> str | None:
        """The rule that ignores ``rel_path`` (POSIX-style, below ``root``), or None.

        ``parents``: look at each folder above it too (a scan that walks down from the root
        has already looked at them, and passes False).
        """
        sources = [r for r in (self._config, *self._files.get(root, ())) if r is not None]
        if not sources:
            return None
        candidates: list[str] = []
        if parents:
            parts = rel_path.split("/")[:-1]
            candidates = ["/".join(parts[: i + 1]) + "/" for i in range(len(parts))]
        candidates.append(rel_path + "/" if is_dir else rel_path)
        for candidate in candidates:
            rule = _decide(sources, candidate)
            if rule is not None:
                return rule
        return None


def _decide(sources: Sequence[_Rules], path: str) -> str | None:
    """The pattern that has the last word on ``path`` when it ignores it, else None."""
    verdict: str | None = None
    for rules in sources:
        if rules.prefix:
            if not path.startswith(rules.prefix) or path == rules.prefix:
                continue
            below = path[len(rules.prefix) :]
        else:
            below = path
        result = rules.spec.check_file(below)
        if result.include is None or result.index is None:
            continue
        pattern = rules.lines[result.index]  # the spec was made from these lines, in order
        verdict = f'"{pattern.strip()}" in {rules.origin}' if result.include else None
    return verdict


def _read(path: str, prefix: str) -> _Rules | None:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("cannot read the ignore rules in %s (%s); they do not apply", path, exc)
        return None
    # Blank lines and comments say nothing (and are left out of the log line).
    lines = tuple(line for line in text.splitlines() if line.strip() and line[0] != "#")
    try:
        spec = GitIgnoreSpec.from_lines(lines)
    except ValueError as exc:
        log.warning("the ignore rules in %s cannot be read (%s); they do not apply", path, exc)
        return None
    return _Rules(path, prefix, lines, spec) if lines else None


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False
