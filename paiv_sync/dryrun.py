"""``--dry-run``: what a run would do, found out without changing anything.

It walks the folders with the same rules as the service, reads the ledger without writing it
and asks the server with GET requests only (and, with a password, the login itself), then
prints, per category, what would be uploaded, what the dataset already holds, what would be
rejected and why, and whether a training would start and from which model. Nothing is
uploaded, no training is requested, no dataset or category is created, the ledger is left as
it was. Files not recorded yet are read and hashed, as the service would, to say which ones
it would reject.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from paiv_sync import ledger as states
from paiv_sync.api import MviClient, as_int, newest, wire_name
from paiv_sync.config import Config
from paiv_sync.errors import MviError
from paiv_sync.images import inspect_image
from paiv_sync.layout import layout_for
from paiv_sync.ledger import Ledger, LedgerError
from paiv_sync.pipeline import make_client
from paiv_sync.retry import RetryPolicy
from paiv_sync.scanner import scan
from paiv_sync.stamps import unchanged
from paiv_sync.trainer import base_model

log = logging.getLogger(__name__)

# Names shown per category and list; the counts cover the rest.
_SHOWN = 5
# Tries of each request: a dry run answers soon or says why not.
_TRIES = 3


@dataclass
class _Category:
    """What would become of one category's files."""

    send: list[tuple[str, int]] = field(default_factory=list)  # (rel_path, size)
    on_server: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (rel_path, why)
    duplicates: list[str] = field(default_factory=list)
    uploaded_before: int = 0


@dataclass
class _Server:
    """What the server said (``problem`` when it could not be asked)."""

    dataset: str = ""
    dataset_id: str | None = None
    category_ids: dict[str, str] = field(default_factory=dict)
    problem: str | None = None


def dry_run(config: Config, *, once: bool, out: TextIO) -> int:
    """Print what a run (``once``: a ``--once`` run) would do; 0, or 1 if the server could
    not be asked."""
    ledger = _open_ledger(config)
    try:
        plan = _plan_disk(config, ledger)
        client = make_client(config, RetryPolicy(initial=0.5, maximum=2.0, max_attempts=_TRIES))
        try:
            server = _ask_server(config, client, ledger, plan)
            _print(config, plan, server, ledger, once=once, out=out)
            if server.problem is None:
                _print_training(config, client, ledger, plan, server, once=once, out=out)
        finally:
            client.close()
    finally:
        if ledger is not None:
            ledger.close()
    print("dry run: nothing was uploaded, requested or recorded", file=out)
    return 0 if server.problem is None else 1


def _open_ledger(config: Config) -> Ledger | None:
    if not config.ledger_path.exists():
        return None
    try:
        return Ledger(config.ledger_path, readonly=True)
    except LedgerError as exc:
        log.warning("%s; the dry run takes every file for new", exc)
        return None


def _plan_disk(config: Config, ledger: Ledger | None) -> dict[str, _Category]:
    """Walk the folders: each file's fate by its ledger row, or by reading it."""
    layout = layout_for(config)
    plan: dict[str, _Category] = {}
    seen: dict[str, set[str]] = {}  # category -> contents met in this walk
    for root in layout.roots:
        for found in scan(layout, root, follow_symlinks=config.follow_symlinks):
            where = found.location
            entry = plan.setdefault(where.category, _Category())
            row = ledger.lookup(str(where.root), where.rel_path) if ledger else None
            if row is not None and unchanged(
                row.stamp, found.size, found.mtime_ns, found.ctime_ns, found.inode
            ):
                _known(entry, row.state, where.rel_path, found.size, row.reason)
                continue
            try:
                seen_now = inspect_image(where.path, config.max_file_size)
            except OSError as exc:
                entry.rejected.append((where.rel_path, f"cannot be read ({exc.strerror or exc})"))
                continue
            if seen_now.problem is not None:
                entry.rejected.append((where.rel_path, seen_now.problem))
                continue
            digest = seen_now.sha256 or ""
            contents = seen.setdefault(where.category, set())
            held = ledger is not None and ledger.holds_content(where.category, digest)
            if config.skip_duplicates and (digest in contents or held):
                entry.duplicates.append(where.rel_path)
                continue
            contents.add(digest)
            entry.send.append((where.rel_path, found.size))
    return plan


def _known(entry: _Category, state: str, rel: str, size: int, reason: str | None) -> None:
    if state == states.UPLOADED:
        entry.uploaded_before += 1
    elif state == states.DUPLICATE:
        entry.duplicates.append(rel)
    elif state == states.REJECTED:
        entry.rejected.append((rel, reason or "rejected"))
    else:  # pending, or in doubt: sent (or settled against the server) by the next run
        entry.send.append((rel, size))


def _ask_server(
    config: Config, client: MviClient, ledger: Ledger | None, plan: dict[str, _Category]
) -> _Server:
    """Log in, find the dataset and, per category, what of ours it holds already."""
    server = _Server(dataset=config.dataset_name)
    try:
        client.authenticate()
        known = ledger.get_meta("dataset_id") if ledger else None
        datasets = client.list_datasets()
        ours = [d for d in datasets if str(d.get("_id")) == known] if known else []
        named = [d for d in datasets if d.get("name") == config.dataset_name]
        chosen: Mapping[str, Any]
        if ours:
            chosen = ours[0]
        elif named and config.dataset_action == "append":
            chosen = newest(named)
        else:
            return server  # would be created: nothing there yet
        server.dataset_id = str(chosen.get("_id"))
        server.dataset = str(chosen.get("name", config.dataset_name))
        for item in client.list_categories(server.dataset_id):
            server.category_ids[str(item.get("name"))] = str(item.get("_id"))
        if config.skip_duplicates:
            for category, entry in plan.items():
                category_id = server.category_ids.get(category)
                if category_id is not None and entry.send:
                    _split_held(client, ledger, server.dataset_id, category, category_id, entry)
    except MviError as exc:
        server.problem = str(exc)
    return server


def _split_held(
    client: MviClient,
    ledger: Ledger | None,
    dataset_id: str,
    category: str,
    category_id: str,
    entry: _Category,
) -> None:
    """Move the files the category already holds (same name and size, beyond the copies this
    ledger put there) from ``send`` to ``on_server``, as the first upload would."""
    free: Counter[tuple[str, int]] = Counter()
    for item in client.iter_files(dataset_id, category_id=category_id):
        free[(str(item.get("original_file_name", "")), as_int(item.get("size")))] += 1
    if ledger is not None:
        for (name, size), count in ledger.uploaded_keys(category).items():
            free[(wire_name(name), size)] -= count
    keep: list[tuple[str, int]] = []
    for rel, size in entry.send:
        key = (wire_name(Path(rel).name), size)
        if free[key] > 0:
            free[key] -= 1
            entry.on_server.append(rel)
        else:
            keep.append((rel, size))
    entry.send = keep


def _print(
    config: Config,
    plan: dict[str, _Category],
    server: _Server,
    ledger: Ledger | None,
    *,
    once: bool,
    out: TextIO,
) -> None:
    if server.problem is not None:
        print(f"server: cannot be asked ({server.problem}); what the folders hold:", file=out)
    elif server.dataset_id is None:
        print(f"dataset {config.dataset_name!r}: none yet; the run would create it", file=out)
    else:
        print(f"dataset {server.dataset!r} (id {server.dataset_id})", file=out)
    pending = ledger.pending_counts() if ledger else {}
    for category in sorted(plan):
        entry = plan[category]
        size = sum(s for _, s in entry.send)
        when = ""
        if entry.send and not once and len(entry.send) < config.upload_threshold:
            when = (
                f"; waits for the upload threshold ({len(entry.send)} of "
                f"{config.upload_threshold}; --once sends them now)"
            )
        new_category = (
            " (a new category)"
            if server.problem is None and entry.send and category not in server.category_ids
            else ""
        )
        sending = f"would upload {_files(len(entry.send))} ({_size(size)})"
        print(f"{category}{new_category}: {sending}{when}", file=out)
        _names(out, "would upload", [r for r, _ in entry.send])
        if entry.on_server:
            print(
                f"  already in the dataset (same name and size): {len(entry.on_server)}", file=out
            )
            _names(out, "already there", entry.on_server)
        if entry.uploaded_before:
            print(f"  uploaded before: {entry.uploaded_before}", file=out)
        if entry.duplicates:
            print(
                f"  duplicates of other files (skip_duplicates): {len(entry.duplicates)}", file=out
            )
        for rel, why in entry.rejected[:_SHOWN]:
            print(f"  would reject {rel}: {why}", file=out)
        if len(entry.rejected) > _SHOWN:
            print(f"  … and {len(entry.rejected) - _SHOWN} more rejected", file=out)
    gone = sorted(set(pending) - set(plan))
    for category in gone:
        print(f"{category}: {pending[category]} pending files whose folder is gone", file=out)


def _files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"


def _names(out: TextIO, what: str, names: Iterable[str]) -> None:
    names = list(names)
    if not names:
        return
    shown = ", ".join(names[:_SHOWN])
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    print(f"  {what}: {shown}{more}", file=out)


def _size(size: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000  # type: ignore[assignment]
    return f"{size} bytes"


def _print_training(
    config: Config,
    client: MviClient,
    ledger: Ledger | None,
    plan: dict[str, _Category],
    server: _Server,
    *,
    once: bool,
    out: TextIO,
) -> None:
    if config.model_action == "nothing":
        print("training: off (model.action is nothing)", file=out)
        return
    sending = sum(
        len(e.send) for e in plan.values() if once or len(e.send) >= config.upload_threshold
    )
    since = (ledger.uploads_since_last_training() if ledger else 0) + sending
    if since < config.training_threshold:
        print(
            f"training: not yet ({since} of {config.training_threshold} uploads since the "
            "last training)",
            file=out,
        )
        return
    base = "a new model"
    if config.model_action == "retrain":
        base = _base_model(config, client, ledger, server) or "a new model (none trained yet)"
    print(
        f"training: would start ({since} uploads since the last training, threshold "
        f"{config.training_threshold}), {config.model_action} from {base}",
        file=out,
    )


def _base_model(
    config: Config, client: MviClient, ledger: Ledger | None, server: _Server
) -> str | None:
    if server.dataset_id is None:
        return None
    try:
        model_id = base_model(client, ledger, config.model_name, server.dataset_id)
    except MviError as exc:
        return f"the newest trained model of the dataset (its list failed: {exc})"
    return None if model_id is None else f"model {model_id}"
