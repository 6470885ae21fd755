"""Configuration: read the JSON file, check every key, and hold the result.

This is the only module that reads the configuration file or the environment (with
paiv_sync.credentials for the secrets). Everything else receives a frozen :class:`Config`.

The file format is the one of the old demo script (``credentials``, ``threshold``,
``dataset``, ``model``, ``folders``, ``categories`` …) plus optional keys described in
``docs/configuration.md``; every key and its default is in paiv_sync.configkeys. Keys starting
with ``_`` are ignored at any depth, so ``"_comment"`` works as a comment.

Validation never stops at the first problem: every problem found is reported at once, one
line each, ``<file name>: <key path>: <what is wrong>``. Unknown keys are warnings with a
did-you-mean suggestion. No message ever contains a password or an API key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from paiv_sync.configread import (
    MISSING,
    PLACEHOLDER,
    JsonObject,
    Report,
    Section,
    expand,
    is_number,
    json_problems,
    kind_of,
    read_bool,
    read_choice,
    read_int,
    read_number,
    read_string,
    shown,
    strip_private,
    take_out_placeholders,
)
from paiv_sync.credentials import normalize_base_url, read_credentials
from paiv_sync.ignore import check_patterns

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "normalize_base_url",
    "parse_config",
    "restart_needed",
]

logger = logging.getLogger(__name__)

# Keys whose readers check for a template placeholder themselves: the endpoint (its message
# says more), and the user name and secrets (a later source of the secret may override).
_OWN_PLACEHOLDER_CHECK: Final = frozenset(
    (
        "credentials.endpoint",
        "credentials.username",
        "credentials.password",
        "credentials.api_key",
        "credentials.password_file",
        "credentials.api_key_file",
    )
)

# The label used in messages when the data did not come from a file.
_NO_FILE_LABEL: Final = "<config>"


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
    ignore: tuple[str, ...]
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
    health_port: int | None = None  # serve /healthz and /metrics on health_host:PORT
    health_host: str = "127.0.0.1"
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
    "health_host",
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
) -> Config:
    """Read, parse and check the configuration file at ``path``.

    ``env`` is the environment to read secrets and state directories from (default:
    ``os.environ``). Relative paths in the file are resolved against the file's directory.

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
        raise ConfigError(
            [f"{label}: the file is empty; write a starting one with: paiv-sync init"]
        )
    try:
        data = json.loads(text, object_pairs_hook=JsonObject.from_pairs)
    except json.JSONDecodeError:
        raise ConfigError([f"{label}: {line}" for line in json_problems(text)]) from None
    try:
        mode: int | None = path.stat().st_mode if os.name == "posix" else None
    except OSError:
        mode = None
    config = _parse(
        data,
        source=path.resolve(),
        label=label,
        env=os.environ if env is None else env,
        file_mode=mode,
    )
    logger.debug("configuration loaded from %s", config.source)
    return config


def parse_config(
    data: Any,
    *,
    source: Path | None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Check an already-parsed configuration object (what ``json.load`` returns).

    ``source`` is the file it came from, if any: its name labels the messages and its
    directory anchors relative paths (without one, the current directory does).
    ``env`` is as for :func:`load_config`.

    Returns the checked :class:`Config`; raises :class:`ConfigError` listing every problem.
    """
    label = source.name if source is not None else _NO_FILE_LABEL
    return _parse(
        data,
        source=source.resolve() if source is not None else None,
        label=label,
        env=os.environ if env is None else env,
        file_mode=None,
    )


def _parse(
    data: Any,
    *,
    source: Path | None,
    label: str,
    env: Mapping[str, str],
    file_mode: int | None,
) -> Config:
    report = Report(label)
    if not isinstance(data, Mapping):
        raise ConfigError(
            [f"{label}: the top level must be a JSON object ({{…}}), not {kind_of(data)}"]
        )
    stripped: dict[str, Any] = strip_private(data, "", report)
    take_out_placeholders(stripped, report, _OWN_PLACEHOLDER_CHECK)
    base_dir = source.parent if source is not None else Path.cwd()
    top = Section(report, stripped, "")

    cred = top.section(
        "credentials",
        required_hint='give at least "endpoint" and a password or API key',
    )
    base_url, username, password, api_key, verify, timeout = read_credentials(
        cred, env=env, base_dir=base_dir, file_mode=file_mode, source=source
    )

    folders = _read_folders(top, base_dir, env)
    recursive = read_bool(top, "recursive")
    categories = _read_categories(top)

    threshold = top.section("threshold")
    upload_threshold = read_int(threshold, "upload")
    training_threshold = _read_training_threshold(threshold)
    threshold.finish()

    skip_duplicates = read_bool(top, "skip_duplicates")
    quiet_time = read_number(top, "time")
    max_delay = read_number(top, "max_delay", default=max(300.0, quiet_time))
    if top.has("max_delay") and max_delay < quiet_time:
        top.error("max_delay", f"must be at least time ({quiet_time:g}), got {max_delay:g}")
    batch_size = read_int(top, "batch_size", 1, 500)
    upload_workers = read_int(top, "upload_workers", 1, 16)
    settle_time = read_number(top, "settle_time")
    rescan_interval = _read_rescan_interval(top)
    extensions = _read_extensions(top)
    ignore = _read_ignore(top)
    max_file_size = read_int(top, "max_file_size")
    poll_interval = read_number(top, "poll_interval", strict=True)
    observer = read_choice(top, "observer")
    polling_interval = read_number(top, "polling_interval", strict=True)
    follow_symlinks = read_bool(top, "follow_symlinks")
    health_port = read_int(top, "health_port", 0, 65535) or None
    health_host = read_string(top, "health_host", top.default("health_host")) or "127.0.0.1"
    retry = top.section("retry")
    retry_initial = read_number(retry, "initial", strict=True)
    retry_maximum = read_number(retry, "maximum", strict=True)
    if retry_maximum < retry_initial:
        retry.error("maximum", f"must be at least retry.initial ({retry_initial:g})")
    retry.finish()

    dataset = top.section("dataset", required_hint='give at least "name"')
    dataset_name = read_string(dataset, "name")
    if dataset_name is None and not dataset.has("name"):
        dataset.missing("name", "the name of the dataset to upload to")
    dataset_action = read_choice(dataset, "action")
    dataset.finish()

    model = top.section("model")
    model_name = read_string(model, "name", dataset_name)
    model_action = read_choice(model, "action")
    strategy_value = model.get("strategy")
    strategy: dict[str, Any] = {}
    if isinstance(strategy_value, Mapping):
        strategy = dict(strategy_value)
    elif strategy_value is not MISSING:
        model.error("strategy", f"must be an object ({{…}}), got {kind_of(strategy_value)}")
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
        ignore=ignore,
        max_file_size=max_file_size,
        poll_interval=poll_interval,
        observer=observer,
        polling_interval=polling_interval,
        follow_symlinks=follow_symlinks,
        health_port=health_port,
        health_host=health_host,
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


def _read_training_threshold(threshold: Section) -> int:
    # The old script read "threshold.train"; accept it as an alias of "training".
    training = read_int(threshold, "training")
    if not threshold.has("train"):
        return training
    train = read_int(threshold, "train")
    if threshold.has("training"):
        if threshold.data["training"] != threshold.data["train"]:
            threshold.error(
                "train",
                f'is an alias of "training" and disagrees with it '
                f"({shown(threshold.data['train'])} vs {shown(threshold.data['training'])}); "
                "keep only one",
            )
        return training
    return train


def _read_rescan_interval(top: Section) -> float:
    default = float(top.default("rescan_interval"))
    value = top.get("rescan_interval")
    if value is MISSING:
        return default
    if is_number(value) and (value == 0 or value >= 10):
        return float(value)
    top.error("rescan_interval", f"must be 0 (off) or a number of at least 10, got {shown(value)}")
    return default


def _read_extensions(top: Section) -> tuple[str, ...]:
    default: tuple[str, ...] = top.default("extensions")
    value = top.get("extensions")
    if value is MISSING:
        return default
    if not isinstance(value, list) or not value:
        top.error("extensions", f'must be a non-empty list such as [".jpg"], got {shown(value)}')
        return default
    result: list[str] = []
    for index, item in enumerate(value):
        key = f"extensions[{index}]"
        text = item.strip().lower() if isinstance(item, str) else ""
        ext = text if text.startswith(".") else f".{text}"
        if len(ext) < 2 or any(c in ext[1:] for c in "./\\ ") or ext.isspace():
            top.report.error(
                top.key(key), f'must be a file extension such as ".jpg", got {shown(item)}'
            )
            continue
        if ext not in result:
            result.append(ext)
    return tuple(result) if result else default


def _read_ignore(top: Section) -> tuple[str, ...]:
    """The ``ignore`` patterns (gitignore syntax), each checked on its own."""
    value = top.get("ignore")
    if value is MISSING:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        top.error("ignore", f'must be a list of patterns such as ["rejects/"], got {shown(value)}')
        return ()
    for index, why in check_patterns(value):
        top.report.error(top.key(f"ignore[{index}]"), f"not a gitignore pattern ({why})")
    return tuple(p for p in value if p.strip())


def _read_folders(top: Section, base_dir: Path, env: Mapping[str, str]) -> tuple[Path, ...]:
    value = top.get("folders")
    items: list[tuple[str, Any]]
    if value is MISSING:
        top.missing("folders", 'list the folders to watch, e.g. ["/data/images"]')
        return ()
    if isinstance(value, str):
        items = [("folders", value)]
    elif isinstance(value, list):
        if not value:
            top.error("folders", "must list at least one folder")
        items = [(f"folders[{i}]", item) for i, item in enumerate(value)]
    else:
        top.error("folders", f"must be a list of folder paths, got {kind_of(value)}")
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
    top: Section, key: str, item: Any, base_dir: Path, env: Mapping[str, str]
) -> Path | None:
    """One entry of ``folders``: the existing folder it names (resolved), or None after an
    error."""
    if not isinstance(item, str) or not item.strip():
        top.report.error(key, f"must be a non-empty string (a folder path), got {shown(item)}")
        return None
    if PLACEHOLDER.match(item):
        top.report.error(
            key, f'still holds the template placeholder "{item.strip()}"; give a folder'
        )
        return None
    path = expand(item.strip(), base_dir, env)
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


def _read_categories(top: Section) -> dict[str, str]:
    sec = top.section("categories")
    result: dict[str, str] = {}
    for name, category in sec.data.items():
        sec.known.append(name)  # any folder name is a valid key
        if not name.strip():
            sec.report.error(sec.key(name), "the folder name must not be empty")
        elif not isinstance(category, str) or not category.strip():
            sec.error(name, f"must be a non-empty string (a category name), got {shown(category)}")
        else:
            result[name] = category
    return result


def _read_ledger(
    top: Section, source: Path | None, base_dir: Path, env: Mapping[str, str]
) -> tuple[Path, Path | None]:
    """The ledger's path, and the ledger shared before with another configuration, if any.

    The default name is ``<config name>-<digest of the config's absolute path>``, so that
    ``cam1/configuration.json`` and ``cam2/configuration.json`` never share a ledger. Earlier
    versions used ``<config name>.ledger.sqlite3``: such a file is kept by the configuration
    it records as its owner (or by the first one to run, when it records none).
    """
    value = top.get("ledger")
    if value is not MISSING:
        if isinstance(value, str) and value.strip():
            path = expand(value.strip(), base_dir, env)
            if path.is_dir():
                top.error("ledger", f"{path} is a folder; give the path of the ledger file")
            return path, None
        top.error("ledger", f"must be a non-empty string (a file path), got {shown(value)}")
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
