"""Listing parameters as MVI takes them: ``query`` terms, ``sortby``, ``skip`` and ``limit``.

What IBM's CLI sends and its tests expect (see docs/mvi-api.md): ``query`` is a comma-separated
list of ``field op value`` terms (``==``, ``!=``, ``>``, ``<``, ``>=``, ``<=``; a value is a quoted
string or an unquoted number); we also accept ``and`` between terms. ``metadata.<key>`` reads the
user metadata attached to a file. ``sortby`` is a comma-separated list of fields, each optionally
followed by ``DESC``; ``name`` stands for the object's name (``original_file_name`` for files).
Our older ``-field`` form for descending is still accepted.

Nothing here knows about HTTP: bad parameters raise :class:`ListingError` with the message
the emulator puts in its 400 answer.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}

# field, operator, value: a double- or single-quoted string, or a bare word (a number, or a
# string without spaces, which the CLI's users write for ids).
_TERM = re.compile(
    r"""\s*(?P<field>[A-Za-z_][\w.\-]*)\s*(?P<op>==|!=|>=|<=|>|<)\s*
        (?P<value>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s,]+)\s*""",
    re.VERBOSE,
)
_SEPARATOR = re.compile(r"\s*(?:,|\band\b)\s*", re.IGNORECASE)


class ListingError(ValueError):
    """A listing parameter cannot be understood; the message says which and why."""


@dataclass(frozen=True)
class Term:
    """One ``field op value`` condition of a query."""

    field: str
    op: str
    value: str | float

    def matches(self, view: Mapping[str, Any]) -> bool:
        """True when the object (its API view) satisfies the condition."""
        have = lookup(view, self.field)
        if have is None:
            return self.op == "!="
        want = self.value
        if isinstance(want, float):
            number = _as_number(have)
            if number is None:
                return self.op == "!="
            return _OPERATORS[self.op](number, want)
        return _OPERATORS[self.op](str(have), want)


def parse_query(text: str) -> list[Term]:
    """Parse ``query`` into its terms. Raises ListingError on anything that is not a term."""
    terms: list[Term] = []
    position = 0
    text = text.strip()
    while position < len(text):
        match = _TERM.match(text, position)
        if match is None:
            raise ListingError(
                f"query: expected terms of the form 'field op value' (op one of "
                f"{', '.join(_OPERATORS)}), got {text[position:]!r}"
            )
        raw = match.group("value")
        value: str | float
        if raw[:1] in "\"'":
            value = re.sub(r"\\(.)", r"\1", raw[1:-1])
        else:
            number = _as_number(raw)
            value = number if number is not None else raw
        terms.append(Term(match.group("field"), match.group("op"), value))
        position = match.end()
        separator = _SEPARATOR.match(text, position)
        if separator is not None and separator.end() > position:
            position = separator.end()
        elif position < len(text):
            raise ListingError(f"query: expected ',' or 'and' between terms at {text[position:]!r}")
    return terms


def lookup(view: Mapping[str, Any], field: str) -> Any:
    """The value of a (dotted) field in an object's view; ``metadata.k`` is user metadata."""
    if field.startswith("metadata."):
        metadata = view.get("user_metadata") or {}
        return metadata.get(field[len("metadata.") :])
    current: Any = view
    for part in field.split("."):
        if not isinstance(current, Mapping):
            return None
        current = current.get(part)
    return current


def parse_sortby(
    text: str, fields: Sequence[str], aliases: Mapping[str, str]
) -> list[tuple[str, bool]]:
    """``sortby`` as ``[(field, descending), …]``. Raises ListingError on an unknown field."""
    keys: list[tuple[str, bool]] = []
    for item in text.split(","):
        words = item.split()
        if not words:
            continue
        name, descending = words[0], False
        if name.startswith("-"):
            name, descending = name[1:], True
        if len(words) == 2 and words[1].upper() in ("DESC", "ASC"):
            descending = words[1].upper() == "DESC"
        elif len(words) != 1:
            raise ListingError(f"sortby: expected 'field' or 'field DESC', got {item.strip()!r}")
        name = aliases.get(name, name)
        if name not in fields:
            raise ListingError(f"sortby: unknown field {name!r}; one of {', '.join(fields)}")
        keys.append((name, descending))
    return keys


def non_negative_int(params: Mapping[str, str], name: str) -> int:
    """A paging parameter (absent or blank = 0). Raises ListingError when not a whole number."""
    raw = params.get(name, "").strip()
    if not raw:
        return 0
    if not raw.isdigit():
        raise ListingError(f"{name} must be a non-negative integer, got {raw!r}")
    return int(raw)


def apply(
    views: list[dict[str, Any]],
    params: Mapping[str, str],
    *,
    sortable: Sequence[str],
    aliases: Mapping[str, str],
    filters: Sequence[str] = (),
    newest_first: bool = True,
) -> list[dict[str, Any]]:
    """Filter, sort and page ``views`` (given oldest first) as ``params`` say.

    Without ``sortby`` the order is newest first (``newest_first``, as the product lists
    files, datasets and tasks), else oldest first; a sort keeps the upload order among equal
    values, as a database sorting on its insertion order would. ``filters`` names the
    parameters that must equal the field of the same name (``category_id``, ``parent_id``,
    ``status``). Raises ListingError on a bad parameter.
    """
    skip = non_negative_int(params, "skip")
    limit = non_negative_int(params, "limit")
    keys = parse_sortby(params.get("sortby", ""), sortable, aliases)
    terms = parse_query(params.get("query", ""))
    for name in filters:
        if name in params:
            wanted = params[name]
            views = [v for v in views if str(v.get(name) or "") == wanted]
    if terms:
        views = [v for v in views if all(t.matches(v) for t in terms)]
    if not keys and newest_first:
        views = views[::-1]
    # Python's sort is stable: sorting by the last key first gives a sort by all keys.
    for name, descending in reversed(keys):
        views.sort(key=functools.partial(_field_key, name), reverse=descending)
    views = views[skip:]
    return views[:limit] if limit else views


def _field_key(name: str, view: Mapping[str, Any]) -> tuple[int, float, str]:
    return _sort_key(view.get(name))


def _sort_key(value: Any) -> tuple[int, float, str]:
    # Numbers (sizes are strings on the product) by value, then text, then missing values.
    if value is None:
        return (2, 0.0, "")
    number = _as_number(value)
    if number is not None:
        return (0, number, "")
    return (1, 0.0, str(value))


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return None
