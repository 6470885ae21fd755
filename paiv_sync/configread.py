"""Reading a configuration object key by key, and collecting every problem on the way.

The pieces paiv_sync.config builds its reading from: a :class:`Report` of error and warning
lines, a :class:`Section` (one JSON object, which remembers the keys read so that the others
are warned about), and typed readers that return the value or, after reporting a problem,
the default from paiv_sync.configkeys. No message shows a value that may be a secret.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from paiv_sync.configkeys import ALIASES, CHOICES, KEYS, SECTIONS


class Missing:
    """The type of the marker for an absent key."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Final = Missing()


class Report:
    """Collects error and warning lines, each prefixed with the file's name."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.errors: list[str] = []
        self.warnings: list[str] = []
        # Keys whose value was a template placeholder, reported and taken out: not "missing".
        self.placeholders: set[str] = set()

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.label}: {key}: {message}")

    def warn(self, key: str, message: str) -> None:
        self.warnings.append(f"{self.label}: {key}: {message}")


def join_key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# The keys of each object, to point at the right place for a key put in the wrong one.
class Section:
    """One JSON object of the configuration, read key by key.

    Every key read is remembered so that :meth:`finish` can warn about the others.
    ``broken`` marks a section that is absent or of the wrong type (already reported): a
    required key missing from it is then not reported a second time.
    """

    def __init__(
        self, report: Report, data: Mapping[str, Any], path: str, *, broken: bool = False
    ) -> None:
        self.report = report
        self.data = data
        self.path = path
        self.broken = broken
        self.known: list[str] = []

    def key(self, name: str) -> str:
        return join_key(self.path, name)

    def default(self, name: str) -> Any:
        """The table's default of key ``name`` of this section (paiv_sync.configkeys)."""
        return KEYS[self.key(name)]

    def has(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str) -> Any:
        self.known.append(name)
        return self.data.get(name, MISSING)

    def error(self, name: str, message: str) -> None:
        self.report.error(self.key(name), message)

    def missing(self, name: str, hint: str) -> None:
        if not self.broken and self.key(name) not in self.report.placeholders:
            self.error(name, f"missing; {hint}")

    def section(self, name: str, *, required_hint: str | None = None) -> Section:
        """Return the sub-object ``name`` (an empty, broken one if absent or not an object)."""
        value = self.get(name)
        if value is MISSING:
            if required_hint is not None:
                self.missing(name, required_hint)
            return Section(self.report, {}, self.key(name), broken=required_hint is not None)
        if not isinstance(value, Mapping):
            self.error(name, f"must be an object ({{…}}), got {kind_of(value)}")
            return Section(self.report, {}, self.key(name), broken=True)
        return Section(self.report, value, self.key(name))

    def finish(self) -> None:
        """Warn about every key of this object that nothing read."""
        for name in self.data:
            if name in self.known:
                continue
            close = difflib.get_close_matches(name, self.known, n=1, cutoff=0.6)
            elsewhere = [
                join_key(section, name)
                for section, keys in SECTIONS.items()
                if section != self.path and name in keys
            ]
            # The exact name of a key of another section says more than a near miss here:
            # a top-level "upload" is "threshold.upload", not a misspelt "upload_workers".
            if elsewhere:
                hint = f' (it belongs in "{elsewhere[0]}")'
            elif close:
                hint = f' (did you mean "{close[0]}"?)'
            else:
                hint = ""
            self.report.warn(self.key(name), f"unknown key, ignored{hint}")


def kind_of(value: Any) -> str:
    """Describe a value's JSON type without showing it (safe for secrets)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


def shown(value: Any) -> str:
    """Show a (non-secret) value as it would appear in JSON, shortened."""
    if isinstance(value, (list, tuple, Mapping)):
        return kind_of(value)
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        # Overrides may hold any Python object, not only JSON values.
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


def choices_text(values: Iterable[str]) -> str:
    return ", ".join(f'"{v}"' for v in values)


# ---------------------------------------------------------------------------------------
# Typed readers: each returns the value, or the default after reporting a problem.


def read_bool(sec: Section, name: str) -> bool:
    default: bool = sec.default(name)
    value = sec.get(name)
    if value is MISSING:
        return default
    if isinstance(value, bool):
        return value
    # The old script's files say 1 and 0.
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    sec.error(name, f"must be true or false (1 or 0 also work), got {shown(value)}")
    return default


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_int(sec: Section, name: str, low: int = 1, high: int | None = None) -> int:
    default: int = sec.default(name)
    value = sec.get(name)
    if value is MISSING:
        return default
    if _is_int(value) and value >= low and (high is None or value <= high):
        return int(value)
    if high is not None:
        wanted = f"an integer from {low} to {high}"
    elif low == 1:
        wanted = "a positive integer"
    else:
        wanted = f"an integer of at least {low}"
    sec.error(name, f"must be {wanted}, got {shown(value)}")
    return default


def is_number(value: Any) -> bool:
    """Whether ``value`` is a finite JSON number (``true`` and ``false`` are not numbers)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_number(
    sec: Section,
    name: str,
    *,
    low: float = 0.0,
    strict: bool = False,
    default: float | None = None,
) -> float:
    """Read a number of seconds: at least ``low`` (greater than ``low`` when ``strict``).

    ``default`` for a key whose default is DERIVED in the table.
    """
    if default is None:
        default = float(sec.default(name))
    value = sec.get(name)
    if value is MISSING:
        return default
    if is_number(value) and (value > low if strict else value >= low):
        return float(value)
    bound = f"greater than {low:g}" if strict else f"of at least {low:g}"
    sec.error(name, f"must be a number {bound}, got {shown(value)}")
    return default


def read_string(sec: Section, name: str, default: str | None = None) -> str | None:
    """Read a non-empty string; None (or ``default``) when absent or invalid."""
    value = sec.get(name)
    if value is MISSING:
        return default
    if isinstance(value, str) and value.strip():
        return value
    sec.error(name, f"must be a non-empty string, got {shown(value)}")
    return default


def read_choice(sec: Section, name: str) -> str:
    choices = CHOICES[sec.key(name)]
    default: str = sec.default(name)
    value = sec.get(name)
    if value is MISSING:
        return default
    if isinstance(value, str):
        value = ALIASES.get(sec.key(name), {}).get(value, value)
    if isinstance(value, str) and value in choices:
        return value
    close = (
        difflib.get_close_matches(value, choices, n=1, cutoff=0.75)
        if isinstance(value, str)
        else []
    )
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    sec.error(name, f"must be one of {choices_text(choices)}, got {shown(value)}{hint}")
    return default


def expand(text: str, base_dir: Path, env: Mapping[str, str]) -> Path:
    """Expand ``~`` (with ``env``'s HOME) and anchor a relative path at ``base_dir``."""
    if text == "~" or text.startswith("~/"):
        home = env.get("HOME") or str(Path.home())
        text = home + text[1:]
    path = Path(text)
    if text.startswith("~"):
        # "~user/…"; for an unknown user keep the text: the existence check reports it.
        with contextlib.suppress(RuntimeError):
            path = path.expanduser()
    if not path.is_absolute():
        path = base_dir / path
    return Path(os.path.normpath(path))


# ---------------------------------------------------------------------------------------
# Reading the whole configuration


class JsonObject(dict[str, Any]):
    """A JSON object that remembers the keys the file gave more than once."""

    duplicates: tuple[str, ...] = ()

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> JsonObject:
        obj = cls(pairs)
        seen: set[str] = set()
        duplicates: list[str] = []
        for key, _ in pairs:
            if key in seen and key not in duplicates:
                duplicates.append(key)
            seen.add(key)
        obj.duplicates = tuple(duplicates)
        return obj


def strip_private(value: Any, path: str, report: Report) -> Any:
    """Copy ``value`` without the ``_``-keys of any object in it, at any depth."""
    if isinstance(value, Mapping):
        for key in getattr(value, "duplicates", ()):
            if not key.startswith("_"):
                report.warn(join_key(path, key), "given more than once; the last one is used")
        return {
            str(k): strip_private(v, join_key(path, str(k)), report)
            for k, v in value.items()
            if not str(k).startswith("_")
        }
    if isinstance(value, (list, tuple)):
        return [strip_private(v, f"{path}[{i}]", report) for i, v in enumerate(value)]
    return value


# A value such as "<dataset_name>" left over from a template.
PLACEHOLDER: Final = re.compile(r"^\s*<[^<>]*>\s*$")


def take_out_placeholders(data: dict[str, Any], report: Report, keep: frozenset[str]) -> None:
    """Report every object value that is still a template placeholder, and take it out.

    ``keep``: the keys whose readers say more (a secret a later source may override).
    """

    def walk(node: dict[str, Any], path: str) -> None:
        for name in list(node):
            value = node[name]
            key = join_key(path, name)
            if isinstance(value, dict):
                walk(value, key)
            elif isinstance(value, str) and PLACEHOLDER.match(value) and key not in keep:
                report.error(
                    key,
                    f'still holds the template placeholder "{value.strip()}"; give the real value',
                )
                report.placeholders.add(key)
                del node[name]

    walk(data, "")


def json_problems(text: str) -> list[str]:
    """What is wrong with JSON that does not parse, said so that it can be fixed at once.

    Every trailing comma (the commonest slip, which JSON forbids) is listed, each with its
    line; then the first other problem, if the text still does not parse without them.
    """
    problems: list[str] = []
    cleaned = list(text)
    for index in _trailing_commas(text):
        line = text.count("\n", 0, index) + 1
        start = text.rfind("\n", 0, index) + 1
        end = text.find("\n", index)
        if not text[index + 1 : len(text) if end < 0 else end].strip():
            where = f"at the end of line {line}"
        else:
            where = f"on line {line}, column {index - start + 1}"
        problems.append(f"not valid JSON: remove the trailing comma {where}")
        cleaned[index] = " "  # same length: the lines and columns below stay right
    try:
        json.loads("".join(cleaned))
    except json.JSONDecodeError as exc:
        problems.append(f"not valid JSON at line {exc.lineno}, column {exc.colno}: {_said(exc)}")
    return problems or ["not valid JSON"]


def _said(exc: json.JSONDecodeError) -> str:
    if exc.msg.startswith("Invalid control character"):
        return (
            "a string holds a raw tab or line break; write it as \\t or \\n, or close the "
            "string's quote before the line ends"
        )
    if exc.msg.startswith("Expecting property name enclosed in double quotes"):
        return "expected a key in double quotes (JSON has no comments and no single quotes)"
    return exc.msg


def _trailing_commas(text: str) -> list[int]:
    """The offsets of the commas followed (after white space) by a closing bracket."""
    found: list[int] = []
    in_string = escaped = False
    for index, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == ",":
            after = index + 1
            while after < len(text) and text[after] in " \t\r\n":
                after += 1
            if after < len(text) and text[after] in "}]":
                found.append(index)
    return found
