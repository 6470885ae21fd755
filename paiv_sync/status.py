"""``paiv-sync status``: where every category's files stand, from the ledger (read-only).

Safe while the service runs: the ledger is opened read-only, and the folders are not walked
(only the ignore rules are read, to say which pending files a rule now keeps out). With
``--json`` the same facts come as one JSON object, whose fields README.md describes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from paiv_sync.config import Config
from paiv_sync.ledger import Ledger


def _report_ruled_out(config: Config, ledger: Ledger) -> None:
    """Say which pending files an ignore rule keeps out now (the next scan drops them)."""
    from paiv_sync.layout import Skip, layout_for

    layout = layout_for(config)
    ruled_out = [
        (row, skip)
        for row in ledger.pending()
        if isinstance(skip := layout.locate(row.file_path), Skip) and skip.tell
    ]
    if ruled_out:
        row, skip = ruled_out[0]
        print(
            f"ignored: {len(ruled_out)} pending files are kept out by an ignore rule now and "
            f"will not be sent (first: {row.rel_path}, {skip.reason})"
        )


def _status_json(config: Config, ledger: Ledger) -> dict[str, Any]:
    """What ``status --json`` prints: a stable schema (README.md, "status --json")."""
    from paiv_sync import ledger as states

    counts = ledger.counts()
    totals = {state: sum(c.get(state, 0) for c in counts.values()) for state in states.STATES}
    ledger.only_roots(str(Path(os.path.abspath(f))) for f in config.folders)  # noqa: PTH100
    last = ledger.last_training()
    return {
        "ledger": str(config.ledger_path),
        "dataset": {"name": config.dataset_name, "id": ledger.get_meta("dataset_id")},
        "categories": {
            category: {state: by_state.get(state, 0) for state in states.STATES}
            for category, by_state in sorted(counts.items())
        },
        "totals": totals,
        "kept": dict(sorted(ledger.kept_counts().items())),
        "rejected": [{"path": r.rel_path, "reason": r.reason} for r in ledger.rejected()],
        "training": {
            "uploads_since_last": ledger.uploads_since_last_training(),
            "threshold": config.training_threshold,
            "action": config.model_action,
            "last": None
            if last is None
            else {
                "name": last.name,
                "task_id": last.task_id,
                "state": last.state,
                "reason": last.reason,
            },
        },
    }


def status_command(config: Config, *, as_json: bool = False) -> int:
    """``paiv-sync status``: where every category's files stand, read from the ledger."""
    from paiv_sync import ledger as states
    from paiv_sync.ledger import Ledger, LedgerError

    try:
        ledger = Ledger(config.ledger_path, readonly=True)
    except LedgerError as exc:
        print(f"status: {exc}", file=sys.stderr)
        return 1
    if as_json:
        try:
            print(json.dumps(_status_json(config, ledger), indent=2, ensure_ascii=False))
        finally:
            ledger.close()
        return 0
    try:
        dataset = ledger.get_meta("dataset_id")
        print(f"ledger: {config.ledger_path}")
        print(f"dataset: {config.dataset_name} (id {dataset or 'not resolved yet'})")
        counts = ledger.counts()
        columns = states.STATES
        width = max([len("category"), *(len(c) for c in counts)])
        print(f"{'category':<{width}}  " + "  ".join(f"{c:>9}" for c in columns))
        totals = dict.fromkeys(columns, 0)
        for category in sorted(counts):
            row = counts[category]
            for c in columns:
                totals[c] += row.get(c, 0)
            print(f"{category:<{width}}  " + "  ".join(f"{row.get(c, 0):>9}" for c in columns))
        print(f"{'total':<{width}}  " + "  ".join(f"{totals[c]:>9}" for c in columns))
        ledger.only_roots(str(Path(os.path.abspath(f))) for f in config.folders)  # noqa: PTH100
        for root, kept in sorted(ledger.kept_counts().items()):
            print(f"kept: {kept} files under {root}, no longer in folders: not sent")
        _report_ruled_out(config, ledger)
        for rejected in ledger.rejected()[:50]:
            print(f"rejected: {rejected.rel_path}: {rejected.reason}")
        print(
            f"uploads since the last training: {ledger.uploads_since_last_training()} "
            f"(threshold {config.training_threshold}, action {config.model_action})"
        )
        last = ledger.last_training()
        if last is None:
            print("last training: none")
        else:
            detail = f" ({last.reason})" if last.reason else ""
            print(f"last training: {last.name} (task {last.task_id or '?'}): {last.state}{detail}")
    finally:
        ledger.close()
    return 0
