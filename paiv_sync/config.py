"""Configuration: read the JSON file, check every key, and hold the result.

This is the only module that reads the configuration file or the environment. Everything
else receives a frozen :class:`Config`.

The file format is the one of the old demo script (``credentials``, ``threshold``,
``dataset``, ``model``, ``folders``, ``categories`` …) plus optional keys described in
``docs/configuration.md``. Keys starting with ``_`` are ignored at any depth, so
``"_comment"`` works as a comment.

Validation never stops at the first problem: every problem found is reported at once, one
line each, ``<file name>: <key path>: <what is wrong>``. Unknown keys are warnings with a
did-you-mean suggestion. No message ever contains a password or an API key.

Secrets are looked up in this order, the first one found wins: an explicit override (the
``overrides`` argument, e.g. from the command line), the environment (``PAIV_PASSWORD`` /
``PAIV_API_KEY``), a systemd credential (``$CREDENTIALS_DIRECTORY/password`` /
``api_key``), a file named by ``credentials.password_file`` / ``api_key_file``, and last
the plain value in the configuration file.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "normalize_base_url",
    "parse_config",
    "restart_needed",
]

logger = logging.getLogger(__name__)

DEFAULT_EXTENSIONS: Final = (".jpg", ".jpeg", ".png")
DATASET_ACTIONS: Final = ("append", "create")
MODEL_ACTIONS: Final = ("train", "retrain", "nothing")
OBSERVERS: Final = ("auto", "native", "polling")

# Environment variables and systemd credential names for the two kinds of secret.
PASSWORD_ENV: Final = "PAIV_PASSWORD"
API_KEY_ENV: Final = "PAIV_API_KEY"

# The label used in messages when the data did not come from a file.
_NO_FILE_LABEL: Final = "<config>"

# A value such as "<password>" left over from the template.
_PLACEHOLDER = re.compile(r"^\s*<[^<>]*>\s*$")


class ConfigError(Exception):
    """The configuration cannot be used.

    ``problems`` holds one full line per error (``<file>: <key path>: <what is wrong>``);
    ``str()`` joins them with newlines. ``warnings`` holds the warning lines found on the
    way (unknown keys with their did-you-mean, …): show them too, since a misspelt key is
    often the cause of an error.
    """

    problems: tuple[str, ...]
    warnings: tuple[str, ...]

    def __init__(self, problems: Iterable[str], warnings: Iterable[str] = ()) -> None:
        self.problems = tuple(problems)
        self.warnings = tuple(warnings)
        super().__init__(*self.problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


@dataclass(frozen=True)
class Config:
    """A checked configuration. Paths are absolute; mappings are read-only.

    ``strategy`` is a read-only view: pass ``dict(config.strategy)`` where a real dict is
    needed (for instance to serialise it as JSON).
    """

    source: Path | None
    base_url: str
    username: str | None
    password: str | None = field(repr=False)
    api_key: str | None = field(repr=False)
    verify: bool | str
    timeout: float
    folders: tuple[Path, ...]
    recursive: bool
    categories: Mapping[str, str]
    upload_threshold: int
    training_threshold: int
    skip_duplicates: bool
    quiet_time: float
    max_delay: float
    batch_size: int
    upload_workers: int
    settle_time: float
    rescan_interval: float
    extensions: tuple[str, ...]
    max_file_size: int
    poll_interval: float
    observer: str
    polling_interval: float
    follow_symlinks: bool
    dataset_name: str
    dataset_action: str
    model_name: str
    model_action: str
    strategy: Mapping[str, Any]
    ledger_path: Path
    warnings: tuple[str, ...]
    # The ledger this configuration shared, by the default path of earlier versions, with
    # another configuration of the same file name (see _read_ledger); None otherwise.
    ledger_shared_before: Path | None = None
    health_port: int | None = None  # serve /healthz and /metrics on 127.0.0.1:PORT
    retry_initial: float = 1.0  # first back-off wait, seconds
    retry_maximum: float = 60.0  # cap of the exponential back-off, seconds

    @property
    def auth_mode(self) -> str:
        """Return ``"api_key"`` when an API key is configured, else ``"password"``."""
        return "api_key" if self.api_key is not None else "password"

    def category_for(self, folder_name: str) -> str:
        """Return the dataset category for a folder name: its override in ``categories``,
        or the folder name itself."""
        return self.categories.get(folder_name, folder_name)


# What a reload cannot apply to a running service: the link to the server (its client, the
# dataset resolved for it, the upload pool sized for it) and the ledger, all built once at
# start. Every other setting is applied at once by a reload (see Pipeline.apply).
RESTART_KEYS: Final = (
    "base_url",
    "username",
    "password",
    "api_key",
    "verify",
    "timeout",
    "ledger_path",
    "dataset_name",
    "dataset_action",
    "upload_workers",
    "health_port",
    "retry_initial",
    "retry_maximum",
)


def restart_needed(old: Config, new: Config) -> list[str]:
    """The settings that differ between ``old`` and ``new`` and only a restart applies."""
    return [name for name in RESTART_KEYS if getattr(old, name) != getattr(new, name)]


# ---------------------------------------------------------------------------------------
# Public entry points


def load_config(
    path: Path,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read, parse and check the configuration file at ``path``.

    ``env`` is the environment to read secrets and state directories from (default:
    ``os.environ``). ``overrides`` maps dotted key paths (``"credentials.password"``,
    ``"threshold.upload"``, ``"ledger"``) to values that replace the file's; a value of
    ``None`` means "not given". Relative paths in the file are resolved against the file's
    directory.

    Returns the checked :class:`Config`. Raises :class:`ConfigError` listing every problem
    (a missing or unreadable file, invalid JSON or a top level that is not an object is a
    single problem).
    """
    label = path.name or str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{label}: the file {path} does not exist"]) from None
    except OSError as exc:
        raise ConfigError([f"{label}: cannot read {path}: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8-sig")  # -sig: tolerate the BOM some Windows editors write
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"{label}: the file is not UTF-8 text (bad byte at offset {exc.start})"]
        ) from None
    if not text.strip():
        raise ConfigError([f"{label}: the file is empty; copy configuration.json.template"])
    try:
        data = json.loads(text, object_pairs_hook=_JsonObject.from_pairs)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [f"{label}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"]
        ) from None
    try:
        mode: int | None = path.stat().st_mode if os.name == "posix" else None
    except OSError:
        mode = None
    config = _parse(
        data,
        source=path.resolve(),
        label=label,
        env=os.environ if env is None else env,
        overrides=overrides or {},
        file_mode=mode,
    )
    logger.debug("configuration loaded from %s", config.source)
    return config


def parse_config(
    data: Any,
    *,
    source: Path | None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Check an already-parsed configuration object (what ``json.load`` returns).

    ``source`` is the file it came from, if any: its name labels the messages and its
    directory anchors relative paths (without one, the current directory does).
    ``env`` and ``overrides`` are as for :func:`load_config`.

    Returns the checked :class:`Config`; raises :class:`ConfigError` listing every problem.
    """
    label = source.name if source is not None else _NO_FILE_LABEL
    return _parse(
        data,
        source=source.resolve() if source is not None else None,
        label=label,
        env=os.environ if env is None else env,
        overrides=overrides or {},
        file_mode=None,
    )


class _UrlError(ValueError):
    """A problem with the endpoint; ``key`` says which credentials key it concerns."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def normalize_base_url(endpoint: str, port: str | int | None) -> str:
    """Turn the configured endpoint (and optional port) into one API base URL.

    The result has the scheme, host, optional port and context root, ends in ``/api`` and
    has no trailing slash, no doubled slash and no doubled ``/api``:
    ``("https://host/powerai-vision", 8000)`` → ``"https://host:8000/powerai-vision/api"``.

    Raises ValueError with a sentence a user can act on: no or unsupported scheme, no host,
    a user name, password, query or fragment in the URL, a bad port, or a port in the
    endpoint that differs from ``port``. The message never repeats a user name or password
    found in the URL.
    """
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise _UrlError("endpoint", "the endpoint must be a non-empty URL such as https://host/api")
    text = endpoint.strip()
    # Look for credentials in the URL before any message repeats the URL.
    authority = text.split("://", 1)[1] if "://" in text else text
    if "@" in authority.split("/", 1)[0]:
        raise _UrlError(
            "endpoint",
            "the endpoint must not contain a user name or password; "
            "put them in credentials.username and credentials.password",
        )
    if "?" in text or "#" in text:
        raise _UrlError("endpoint", "the endpoint must not contain a query (?…) or fragment (#…)")
    if "://" not in text:
        raise _UrlError(
            "endpoint",
            f'the endpoint "{text}" has no scheme; write it as "https://{text.lstrip("/")}"',
        )
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _UrlError(
            "endpoint",
            f'the endpoint must start with https:// or http://, not "{parts.scheme}://"',
        )
    host = parts.hostname
    if not host:
        raise _UrlError("endpoint", f'the endpoint "{text}" has no host name')
    if _PLACEHOLDER.match(host) or "<" in text or ">" in text:
        raise _UrlError(
            "endpoint", f'the endpoint "{text}" still holds a template placeholder; give the URL'
        )
    try:
        url_port = parts.port
    except ValueError:
        raise _UrlError("endpoint", f'the endpoint "{text}" has an invalid port') from None
    key_port = _check_port(port)
    if url_port is not None and key_port is not None and url_port != key_port:
        raise _UrlError(
            "port",
            f"the port {key_port} differs from the port {url_port} in the endpoint; "
            "give the port in one place only",
        )
    final_port = url_port if url_port is not None else key_port
    # Brackets come off an IPv6 literal in urlsplit's hostname; put them back.
    netloc = f"[{host}]" if ":" in host else host
    if final_port is not None:
        netloc = f"{netloc}:{final_port}"
    segments = [s for s in parts.path.split("/") if s]
    # Users paste the base with or without "/api" (sometimes twice); keep exactly one.
    while segments and segments[-1] == "api":
        segments.pop()
    segments.append("api")
    return f"{scheme}://{netloc}/{'/'.join(segments)}"


def _check_port(port: str | int | None) -> int | None:
    """Return the port as an int (None when not given); raise _UrlError when invalid."""
    if port is None:
        return None
    if isinstance(port, str) and port.strip() == "":
        return None
    if isinstance(port, bool):
        value = None
    elif isinstance(port, int):
        value = port
    elif isinstance(port, str) and port.strip().isdigit():
        value = int(port.strip())
    else:
        value = None
    if value is None or not 1 <= value <= 65535:
        raise _UrlError("port", f"must be a port number from 1 to 65535, got {_shown(port)}")
    return value


# ---------------------------------------------------------------------------------------
# Collecting problems


class _Missing:
    """The type of the marker for an absent key."""

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Final = _Missing()


class _Report:
    """Collects error and warning lines, each prefixed with the file's name."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.label}: {key}: {message}")

    def warn(self, key: str, message: str) -> None:
        self.warnings.append(f"{self.label}: {key}: {message}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# The keys of each object, to point at the right place for a key put in the wrong one.
_SECTION_KEYS: Final[Mapping[str, frozenset[str]]] = {
    "": frozenset(
        [
            "credentials",
            "recursive",
            "threshold",
            "skip_duplicates",
            "time",
            "dataset",
            "model",
            "folders",
            "categories",
            "ledger",
            "batch_size",
            "upload_workers",
            "settle_time",
            "max_delay",
            "rescan_interval",
            "extensions",
            "max_file_size",
            "poll_interval",
            "observer",
            "polling_interval",
            "follow_symlinks",
            "health_port",
            "retry",
        ]
    ),
    "credentials": frozenset(
        [
            "endpoint",
            "port",
            "username",
            "password",
            "password_file",
            "api_key",
            "api_key_file",
            "verify",
            "timeout",
        ]
    ),
    "threshold": frozenset(("upload", "training", "train")),
    "dataset": frozenset(("name", "action")),
    "model": frozenset(("name", "action", "strategy")),
    "retry": frozenset(("initial", "maximum")),
}


class _Section:
    """One JSON object of the configuration, read key by key.

    Every key read is remembered so that :meth:`finish` can warn about the others.
    ``broken`` marks a section that is absent or of the wrong type (already reported): a
    required key missing from it is then not reported a second time.
    """

    def __init__(
        self, report: _Report, data: Mapping[str, Any], path: str, *, broken: bool = False
    ) -> None:
        self.report = report
        self.data = data
        self.path = path
        self.broken = broken
        self.known: list[str] = []

    def key(self, name: str) -> str:
        return _join(self.path, name)

    def has(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str) -> Any:
        self.known.append(name)
        return self.data.get(name, _MISSING)

    def error(self, name: str, message: str) -> None:
        self.report.error(self.key(name), message)

    def missing(self, name: str, hint: str) -> None:
        if not self.broken:
            self.error(name, f"missing; {hint}")

    def section(self, name: str, *, required_hint: str | None = None) -> _Section:
        """Return the sub-object ``name`` (an empty, broken one if absent or not an object)."""
        value = self.get(name)
        if value is _MISSING:
            if required_hint is not None:
                self.missing(name, required_hint)
            return _Section(self.report, {}, self.key(name), broken=required_hint is not None)
        if not isinstance(value, Mapping):
            self.error(name, f"must be an object ({{…}}), got {_kind(value)}")
            return _Section(self.report, {}, self.key(name), broken=True)
        return _Section(self.report, value, self.key(name))

    def finish(self) -> None:
        """Warn about every key of this object that nothing read."""
        for name in self.data:
            if name in self.known:
                continue
            close = difflib.get_close_matches(name, self.known, n=1, cutoff=0.6)
            elsewhere = [
                _join(section, name)
                for section, keys in _SECTION_KEYS.items()
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


def _kind(value: Any) -> str:
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


def _shown(value: Any) -> str:
    """Show a (non-secret) value as it would appear in JSON, shortened."""
    if isinstance(value, (list, tuple, Mapping)):
        return _kind(value)
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        # Overrides may hold any Python object, not only JSON values.
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


def _choices(values: Iterable[str]) -> str:
    return ", ".join(f'"{v}"' for v in values)


# ---------------------------------------------------------------------------------------
# Typed readers: each returns the value, or the default after reporting a problem.


def _bool(sec: _Section, name: str, default: bool) -> bool:
    value = sec.get(name)
    if value is _MISSING:
        return default
    if isinstance(value, bool):
        return value
    # The old script's files say 1 and 0.
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    sec.error(name, f"must be true or false (1 or 0 also work), got {_shown(value)}")
    return default


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(sec: _Section, name: str, default: int, low: int = 1, high: int | None = None) -> int:
    value = sec.get(name)
    if value is _MISSING:
        return default
    if _is_int(value) and value >= low and (high is None or value <= high):
        return int(value)
    if high is not None:
        wanted = f"an integer from {low} to {high}"
    elif low == 1:
        wanted = "a positive integer"
    else:
        wanted = f"an integer of at least {low}"
    sec.error(name, f"must be {wanted}, got {_shown(value)}")
    return default


def _number(
    sec: _Section, name: str, default: float, *, low: float = 0.0, strict: bool = False
) -> float:
    """Read a number of seconds: at least ``low`` (greater than ``low`` when ``strict``)."""
    value = sec.get(name)
    if value is _MISSING:
        return default
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if strict else value >= low)
    ):
        return float(value)
    bound = f"greater than {low:g}" if strict else f"of at least {low:g}"
    sec.error(name, f"must be a number {bound}, got {_shown(value)}")
    return default


def _string(sec: _Section, name: str, default: str | None = None) -> str | None:
    """Read a non-empty string; None (or ``default``) when absent or invalid."""
    value = sec.get(name)
    if value is _MISSING:
        return default
    if isinstance(value, str) and value.strip():
        return value
    sec.error(name, f"must be a non-empty string, got {_shown(value)}")
    return default


def _choice(sec: _Section, name: str, choices: tuple[str, ...], default: str) -> str:
    value = sec.get(name)
    if value is _MISSING:
        return default
    if isinstance(value, str) and value in choices:
        return value
    close = (
        difflib.get_close_matches(value, choices, n=1, cutoff=0.75)
        if isinstance(value, str)
        else []
    )
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    sec.error(name, f"must be one of {_choices(choices)}, got {_shown(value)}{hint}")
    return default


def _expand(text: str, base_dir: Path, env: Mapping[str, str]) -> Path:
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


class _JsonObject(dict[str, Any]):
    """A JSON object that remembers the keys the file gave more than once."""

    duplicates: tuple[str, ...] = ()

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> _JsonObject:
        obj = cls(pairs)
        seen: set[str] = set()
        duplicates: list[str] = []
        for key, _ in pairs:
            if key in seen and key not in duplicates:
                duplicates.append(key)
            seen.add(key)
        obj.duplicates = tuple(duplicates)
        return obj


def _strip(value: Any, path: str, report: _Report) -> Any:
    """Copy ``value`` without the ``_``-keys of any object in it, at any depth."""
    if isinstance(value, Mapping):
        for key in getattr(value, "duplicates", ()):
            if not key.startswith("_"):
                report.warn(_join(path, key), "given more than once; the last one is used")
        return {
            str(k): _strip(v, _join(path, str(k)), report)
            for k, v in value.items()
            if not str(k).startswith("_")
        }
    if isinstance(value, (list, tuple)):
        return [_strip(v, f"{path}[{i}]", report) for i, v in enumerate(value)]
    return value


# Overrides of these keys take part in the secret precedence instead of replacing the
# file's value (an override must beat the environment, which beats the file).
_SECRET_OVERRIDES: Final = ("credentials.password", "credentials.api_key")


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any], report: _Report) -> None:
    for dotted, value in overrides.items():
        if value is None or dotted in _SECRET_OVERRIDES:
            continue
        names = dotted.split(".")
        if not all(names):
            report.error(dotted, "invalid override key (expected a dotted path like a.b)")
            continue
        node = data
        for name in names[:-1]:
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                break  # the section's wrong type is reported by the validation
            node = child
        else:
            node[names[-1]] = value


def _parse(
    data: Any,
    *,
    source: Path | None,
    label: str,
    env: Mapping[str, str],
    overrides: Mapping[str, Any],
    file_mode: int | None,
) -> Config:
    report = _Report(label)
    if not isinstance(data, Mapping):
        raise ConfigError(
            [f"{label}: the top level must be a JSON object ({{…}}), not {_kind(data)}"]
        )
    stripped: dict[str, Any] = _strip(data, "", report)
    _apply_overrides(stripped, overrides, report)
    base_dir = source.parent if source is not None else Path.cwd()
    top = _Section(report, stripped, "")

    cred = top.section(
        "credentials",
        required_hint='give at least "endpoint" and a password or API key',
    )
    base_url, username, password, api_key, verify, timeout = _read_credentials(
        cred, env=env, overrides=overrides, base_dir=base_dir, file_mode=file_mode, source=source
    )

    folders = _read_folders(top, base_dir, env)
    recursive = _bool(top, "recursive", True)
    categories = _read_categories(top)

    threshold = top.section("threshold")
    upload_threshold = _int(threshold, "upload", 10)
    training_threshold = _read_training_threshold(threshold)
    threshold.finish()

    skip_duplicates = _bool(top, "skip_duplicates", True)
    quiet_time = _number(top, "time", 10.0)
    max_delay = _number(top, "max_delay", max(300.0, quiet_time), low=0.0)
    if top.has("max_delay") and max_delay < quiet_time:
        top.error("max_delay", f"must be at least time ({quiet_time:g}), got {max_delay:g}")
    batch_size = _int(top, "batch_size", 20, 1, 500)
    upload_workers = _int(top, "upload_workers", 2, 1, 16)
    settle_time = _number(top, "settle_time", 2.0)
    rescan_interval = _read_rescan_interval(top)
    extensions = _read_extensions(top)
    max_file_size = _int(top, "max_file_size", 104857600)
    poll_interval = _number(top, "poll_interval", 10.0, strict=True)
    observer = _choice(top, "observer", OBSERVERS, "auto")
    polling_interval = _number(top, "polling_interval", 2.0, strict=True)
    follow_symlinks = _bool(top, "follow_symlinks", False)
    health_port = _int(top, "health_port", 0, 0, 65535) or None
    retry = top.section("retry")
    retry_initial = _number(retry, "initial", 1.0, strict=True)
    retry_maximum = _number(retry, "maximum", 60.0, strict=True)
    if retry_maximum < retry_initial:
        retry.error("maximum", f"must be at least retry.initial ({retry_initial:g})")
    retry.finish()

    dataset = top.section("dataset", required_hint='give at least "name"')
    dataset_name = _string(dataset, "name")
    if dataset_name is None and not dataset.has("name"):
        dataset.missing("name", "the name of the dataset to upload to")
    dataset_action = _choice(dataset, "action", DATASET_ACTIONS, "append")
    dataset.finish()

    model = top.section("model")
    model_name = _string(model, "name", dataset_name)
    model_action = _choice(model, "action", MODEL_ACTIONS, "retrain")
    strategy_value = model.get("strategy")
    strategy: dict[str, Any] = {}
    if isinstance(strategy_value, Mapping):
        strategy = dict(strategy_value)
    elif strategy_value is not _MISSING:
        model.error("strategy", f"must be an object ({{…}}), got {_kind(strategy_value)}")
    model.finish()

    ledger_path, ledger_shared_before = _read_ledger(top, source, base_dir, env)
    top.finish()

    if report.errors:
        raise ConfigError(report.errors, report.warnings)
    # Every None below was reported above, so these only narrow the types.
    assert base_url is not None and dataset_name is not None and model_name is not None
    return Config(
        source=source,
        base_url=base_url,
        username=username,
        password=password,
        api_key=api_key,
        verify=verify,
        timeout=timeout,
        folders=folders,
        recursive=recursive,
        categories=MappingProxyType(categories),
        upload_threshold=upload_threshold,
        training_threshold=training_threshold,
        skip_duplicates=skip_duplicates,
        quiet_time=quiet_time,
        max_delay=max_delay,
        batch_size=batch_size,
        upload_workers=upload_workers,
        settle_time=settle_time,
        rescan_interval=rescan_interval,
        extensions=extensions,
        max_file_size=max_file_size,
        poll_interval=poll_interval,
        observer=observer,
        polling_interval=polling_interval,
        follow_symlinks=follow_symlinks,
        health_port=health_port,
        retry_initial=retry_initial,
        retry_maximum=retry_maximum,
        dataset_name=dataset_name,
        dataset_action=dataset_action,
        model_name=model_name,
        model_action=model_action,
        strategy=MappingProxyType(strategy),
        ledger_path=ledger_path,
        ledger_shared_before=ledger_shared_before,
        warnings=tuple(report.warnings),
    )


def _read_credentials(
    cred: _Section,
    *,
    env: Mapping[str, str],
    overrides: Mapping[str, Any],
    base_dir: Path,
    file_mode: int | None,
    source: Path | None,
) -> tuple[str | None, str | None, str | None, str | None, bool | str, float]:
    """Return base URL, username, password, API key, verify and timeout."""
    base_url = _read_base_url(cred)
    username = _string(cred, "username")
    if username is not None and _PLACEHOLDER.match(username):
        cred.error("username", "still holds the template placeholder; give the real user name")
        username = None

    password, password_from = _read_secret(
        cred, "password", PASSWORD_ENV, env=env, overrides=overrides, base_dir=base_dir
    )
    api_key, api_key_from = _read_secret(
        cred, "api_key", API_KEY_ENV, env=env, overrides=overrides, base_dir=base_dir
    )
    if password_from == "" or api_key_from == "":
        pass  # a secret was given but is unusable, already reported; more would be noise
    elif password_from and api_key_from:
        cred.report.error(
            cred.path,
            f"both a password (from {password_from}) and an API key (from {api_key_from}) "
            "are set; keep only one",
        )
    elif password_from is None and api_key_from is None and not cred.broken:
        cred.report.error(
            cred.path,
            "no password and no API key; set credentials.password (or password_file, "
            f"${PASSWORD_ENV}) with a username, or credentials.api_key (or api_key_file, "
            f"${API_KEY_ENV}) for MVI 8.x",
        )
    elif password_from and username is None and not cred.has("username"):
        cred.missing("username", "a password needs a user name (an API key does not)")

    if file_mode is not None and file_mode & 0o077:
        _warn_plaintext_secrets(cred, file_mode, source)
    verify = _read_verify(cred, base_dir, env)
    timeout = _number(cred, "timeout", 30.0, strict=True)
    cred.finish()
    return base_url, username, password, api_key, verify, timeout


def _read_base_url(cred: _Section) -> str | None:
    """The API's base URL from ``endpoint`` (and ``port``), or None after an error."""
    endpoint = cred.get("endpoint")
    port_value = cred.get("port")
    port: str | int | None = None
    port_ok = True
    if isinstance(port_value, (str, int)) and not isinstance(port_value, bool):
        port = port_value
    elif port_value is not _MISSING and port_value is not None:
        cred.error("port", f"must be a port number from 1 to 65535, got {_shown(port_value)}")
        port_ok = False
    if endpoint is _MISSING:
        cred.missing("endpoint", 'the server URL, e.g. "https://host/powerai-vision/api"')
    elif not isinstance(endpoint, str):
        cred.error("endpoint", f"must be a string (a URL), got {_shown(endpoint)}")
    if isinstance(endpoint, str) and port_ok:
        try:
            return normalize_base_url(endpoint, port)
        except _UrlError as exc:
            cred.error(exc.key, str(exc))
    return None


def _warn_plaintext_secrets(cred: _Section, file_mode: int, source: Path | None) -> None:
    """A password or API key written in a file that group or others can read: say so."""
    for name, env_var in (("password", PASSWORD_ENV), ("api_key", API_KEY_ENV)):
        value = cred.data.get(name)
        if isinstance(value, str) and value.strip() and not _PLACEHOLDER.match(value):
            where = source if source is not None else "the file"
            cred.report.warn(
                cred.key(name),
                f"a plaintext secret in a file that group or others can access "
                f"(mode {file_mode & 0o777:04o}); run chmod 600 {where}, or move it to "
                f"{name}_file or ${env_var}",
            )


def _read_secret(
    cred: _Section,
    name: str,
    env_var: str,
    *,
    env: Mapping[str, str],
    overrides: Mapping[str, Any],
    base_dir: Path,
) -> tuple[str | None, str | None]:
    """Find one secret by precedence; return (value, where it came from).

    Returns (None, None) when no source gives one, and (None, "") when the winning source
    is unusable (already reported). Messages name the source but never the value.
    """
    file_name = f"{name}_file"
    value = cred.get(name)
    if value is not _MISSING and not isinstance(value, str):
        # Say the type, never the value: this may be a password.
        cred.error(name, f"must be a string, got {_kind(value)}")
        value = _MISSING
    file_value = cred.get(file_name)
    if file_value is not _MISSING and not (isinstance(file_value, str) and file_value.strip()):
        cred.error(file_name, f"must be a non-empty string (a file path), got {_shown(file_value)}")
        file_value = _MISSING

    override = overrides.get(f"credentials.{name}")
    if override is not None:
        if isinstance(override, str) and override.strip():
            return _unless_placeholder(cred, name, override.strip(), "the override")
        cred.error(name, f"the override must be a non-empty string, got {_kind(override)}")
        return None, ""

    from_env = env.get(env_var, "").strip()
    if from_env:
        return _unless_placeholder(cred, name, from_env, f"${env_var}")

    cred_dir = env.get("CREDENTIALS_DIRECTORY", "")
    if cred_dir:
        systemd_file = Path(cred_dir) / name
        if systemd_file.is_file():
            where = f"$CREDENTIALS_DIRECTORY/{name}"
            return _secret_from_file(cred, name, systemd_file, where)

    if isinstance(file_value, str):
        path = _expand(file_value, base_dir, env)
        return _secret_from_file(cred, file_name, path, f"credentials.{file_name}")

    if isinstance(value, str) and value.strip():
        return _unless_placeholder(cred, name, value.strip(), f"credentials.{name}")
    return None, None


def _secret_from_file(
    cred: _Section, key: str, path: Path, where: str
) -> tuple[str | None, str | None]:
    try:
        content = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        cred.error(key, f"the file {path} does not exist")
        return None, ""
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        cred.error(key, f"cannot read {path}: {reason}")
        return None, ""
    if not content:
        cred.error(key, f"the file {path} is empty")
        return None, ""
    return _unless_placeholder(cred, key, content, where, f"the file {path}")


def _unless_placeholder(
    cred: _Section, key: str, secret: str, where: str, origin: str | None = None
) -> tuple[str | None, str | None]:
    """Return (secret, where), or report a template placeholder and return (None, "").

    ``origin`` names where the value was read, for the message (default: ``where``).
    """
    if not _PLACEHOLDER.match(secret):
        return secret, where
    origin = origin or where
    if origin == cred.key(key):
        cred.error(key, "still holds the template placeholder; give the real value")
    else:
        cred.error(key, f"{origin} holds a template placeholder; give the real value")
    # "" (not None): a secret was given, so "no password and no API key" would mislead.
    return None, ""


def _read_verify(cred: _Section, base_dir: Path, env: Mapping[str, str]) -> bool | str:
    value = cred.get("verify")
    if value is _MISSING or value is True:
        return True
    if value is False:
        return False
    if isinstance(value, str) and value.strip():
        path = _expand(value.strip(), base_dir, env)
        if not path.exists():
            cred.error("verify", f"the CA bundle {path} does not exist")
            return True
        return str(path.resolve())
    cred.error("verify", f"must be true, false or the path of a CA bundle, got {_shown(value)}")
    return True


def _read_training_threshold(threshold: _Section) -> int:
    # The old script read "threshold.train"; accept it as an alias of "training".
    training = _int(threshold, "training", 100)
    if not threshold.has("train"):
        return training
    train = _int(threshold, "train", 100)
    if threshold.has("training"):
        if threshold.data["training"] != threshold.data["train"]:
            threshold.error(
                "train",
                f'is an alias of "training" and disagrees with it '
                f"({_shown(threshold.data['train'])} vs {_shown(threshold.data['training'])}); "
                "keep only one",
            )
        return training
    return train


def _read_rescan_interval(top: _Section) -> float:
    value = top.get("rescan_interval")
    if value is _MISSING:
        return 300.0
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value == 0 or value >= 10)
    ):
        return float(value)
    top.error("rescan_interval", f"must be 0 (off) or a number of at least 10, got {_shown(value)}")
    return 300.0


def _read_extensions(top: _Section) -> tuple[str, ...]:
    value = top.get("extensions")
    if value is _MISSING:
        return DEFAULT_EXTENSIONS
    if not isinstance(value, list) or not value:
        top.error("extensions", f'must be a non-empty list such as [".jpg"], got {_shown(value)}')
        return DEFAULT_EXTENSIONS
    result: list[str] = []
    for index, item in enumerate(value):
        key = f"extensions[{index}]"
        text = item.strip().lower() if isinstance(item, str) else ""
        ext = text if text.startswith(".") else f".{text}"
        if len(ext) < 2 or any(c in ext[1:] for c in "./\\ ") or ext.isspace():
            top.report.error(
                top.key(key), f'must be a file extension such as ".jpg", got {_shown(item)}'
            )
            continue
        if ext not in result:
            result.append(ext)
    return tuple(result) if result else DEFAULT_EXTENSIONS


def _read_folders(top: _Section, base_dir: Path, env: Mapping[str, str]) -> tuple[Path, ...]:
    value = top.get("folders")
    items: list[tuple[str, Any]]
    if value is _MISSING:
        top.missing("folders", 'list the folders to watch, e.g. ["/data/images"]')
        return ()
    if isinstance(value, str):
        items = [("folders", value)]
    elif isinstance(value, list):
        if not value:
            top.error("folders", "must list at least one folder")
        items = [(f"folders[{i}]", item) for i, item in enumerate(value)]
    else:
        top.error("folders", f"must be a list of folder paths, got {_kind(value)}")
        return ()

    found: list[tuple[str, Path]] = []
    for key, item in items:
        resolved = _read_folder(top, key, item, base_dir, env)
        if resolved is None:
            continue
        same = [other for other, seen in found if seen == resolved]
        if same:
            top.report.error(key, f"folder {resolved} is the same as {same[0]}; list it once")
        else:
            found.append((key, resolved))

    # Nested folders would see every file twice (and under two category names).
    for i, (key_a, a) in enumerate(found):
        for key_b, b in found[i + 1 :]:
            if b.is_relative_to(a):
                top.report.error(key_b, f"folder {b} is inside {key_a} ({a}); watch only one")
            elif a.is_relative_to(b):
                top.report.error(key_a, f"folder {a} is inside {key_b} ({b}); watch only one")
    return tuple(path for _, path in found)


def _read_folder(
    top: _Section, key: str, item: Any, base_dir: Path, env: Mapping[str, str]
) -> Path | None:
    """One entry of ``folders``: the existing folder it names (resolved), or None after an
    error."""
    if not isinstance(item, str) or not item.strip():
        top.report.error(key, f"must be a non-empty string (a folder path), got {_shown(item)}")
        return None
    path = _expand(item.strip(), base_dir, env)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:
        top.report.error(key, f"cannot access folder {path}: {exc.strerror or exc}")
        return None
    if not exists:
        top.report.error(key, f"folder {path} does not exist")
    elif not is_dir:
        top.report.error(key, f"{path} is not a folder")
    else:
        return path.resolve()
    return None


def _read_categories(top: _Section) -> dict[str, str]:
    sec = top.section("categories")
    result: dict[str, str] = {}
    for name, category in sec.data.items():
        sec.known.append(name)  # any folder name is a valid key
        if not name.strip():
            sec.report.error(sec.key(name), "the folder name must not be empty")
        elif not isinstance(category, str) or not category.strip():
            sec.error(name, f"must be a non-empty string (a category name), got {_shown(category)}")
        else:
            result[name] = category
    return result


def _read_ledger(
    top: _Section, source: Path | None, base_dir: Path, env: Mapping[str, str]
) -> tuple[Path, Path | None]:
    """The ledger's path, and the ledger shared before with another configuration, if any.

    The default name is ``<config name>-<digest of the config's absolute path>``, so that
    ``cam1/configuration.json`` and ``cam2/configuration.json`` never share a ledger. Earlier
    versions used ``<config name>.ledger.sqlite3``: such a file is kept by the configuration
    it records as its owner (or by the first one to run, when it records none).
    """
    value = top.get("ledger")
    if value is not _MISSING:
        if isinstance(value, str) and value.strip():
            path = _expand(value.strip(), base_dir, env)
            if path.is_dir():
                top.error("ledger", f"{path} is a folder; give the path of the ledger file")
            return path, None
        top.error("ledger", f"must be a non-empty string (a file path), got {_shown(value)}")
    folder = _state_folder(env)
    if source is None:
        return folder / "paiv-sync.ledger.sqlite3", None
    absolute = str(Path(os.path.abspath(source)))  # noqa: PTH100 - as given, links kept
    digest = hashlib.sha256(absolute.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    own = folder / f"{source.stem}-{digest}.ledger.sqlite3"
    legacy = folder / f"{source.stem}.ledger.sqlite3"
    if own.exists() or not legacy.exists():
        return own, None
    from paiv_sync.ledger import recorded_owner

    owner = recorded_owner(legacy)
    if owner is None or owner == absolute:
        return legacy, None
    return own, legacy


def _state_folder(env: Mapping[str, str]) -> Path:
    """Where default ledgers live (see docs/configuration.md, "State")."""
    # systemd's StateDirectory= may list several directories, colon-separated.
    state_dir = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state_dir:
        return Path(state_dir)
    xdg = env.get("XDG_STATE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "paiv-sync"
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "state" / "paiv-sync"
