"""``--dry-run`` as a user runs it: the CLI as a subprocess against the emulator.

What it says per category is checked against what was put on disk and on the server; that
it changes nothing is checked against the emulator's request counts (GETs only) and the
ledger's rows before and after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from paiv_sync.api import MviClient, UploadPart
from paiv_sync.emulator import Emulator, EmulatorOptions
from paiv_sync.ledger import Ledger
from tests.e2e import server_count, write_image

KEY = "dry-run-key-1"
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PAIV_", "NOTIFY_", "WATCHDOG_"))}


@pytest.fixture
def keyed() -> Iterator[Emulator]:
    """An emulator in API-key mode: logging in is a GET too, so every write shows."""
    with Emulator(EmulatorOptions(port=0, api_keys=(KEY,), training_seconds=0.2)) as emu:
        yield emu


def paiv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paiv_sync", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=ENV,
    )


def _config(emulator: Emulator, root: Path, **changes: Any) -> Path:
    data: dict[str, Any] = {
        "credentials": {"endpoint": emulator.url, "api_key": KEY, "timeout": 5},
        "threshold": {"upload": 3, "training": 5},
        "settle_time": 0.1,
        "dataset": {"name": "dry"},
        "model": {"action": "retrain"},
        "folders": [str(root)],
        "ledger": str(root.parent / "ledger.sqlite3"),
    }
    data.update(changes)
    path = root.parent / "configuration.json"
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return path


def _rows(path: Path) -> list[tuple[Any, ...]]:
    with Ledger(path, readonly=True) as ledger:
        return ledger._query(
            "SELECT root, rel_path, state, sha256, updated FROM files ORDER BY 1, 2"
        )


def test_a_dry_run_says_what_would_happen_and_changes_nothing(keyed: Emulator, root: Path) -> None:
    for i in range(3):
        write_image(root / "forest" / f"f{i}.png", i)
    config = _config(keyed, root)
    first = paiv("--config", str(config), "--once")
    assert first.returncode == 0, first.stderr
    assert server_count(keyed) == 3
    # Since then: new images in two categories, one of them stored already by another
    # station, and a text file named like an image.
    for i in range(3, 5):
        write_image(root / "forest" / f"f{i}.png", i)
    write_image(root / "city" / "c0.png", 10)
    other = write_image(root / "city" / "shared.png", 11)
    (root / "city" / "notes.png").write_text("not an image\n")
    dataset_id = keyed.state()["datasets"][0]["_id"]
    with MviClient(keyed.url, api_key=KEY) as station:
        station.upload(
            dataset_id,
            [UploadPart(root / "city" / "shared.png", "shared.png", "image/png")],
            category_name="city",
            category_id=station.ensure_category(dataset_id, "city"),
        )
    assert len(other) > 0 and server_count(keyed) == 4
    ledger_before = _rows(root.parent / "ledger.sqlite3")
    requests_before = dict(keyed.state()["requests"])

    dry = paiv("--config", str(config), "--dry-run")

    assert dry.returncode == 0, dry.stderr
    out = dry.stdout
    assert f"dataset 'dry' (id {dataset_id})" in out
    assert "forest: would upload 2 files" in out
    assert "waits for the upload threshold (2 of 3; --once sends them now)" in out
    assert "  uploaded before: 3" in out
    assert "city: would upload 1 file " in out
    assert "  already in the dataset (same name and size): 1" in out
    assert "  would reject city/notes.png: " in out
    assert "training: not yet" in out  # 2 and 1 wait for their threshold: nothing is sent
    assert "dry run: nothing was uploaded, requested or recorded" in out
    requests_after = keyed.state()["requests"]
    made = {k: requests_after[k] - requests_before.get(k, 0) for k in requests_after}
    writes = {k: n for k, n in made.items() if n and not k.startswith("GET ")}
    assert writes == {}, f"the dry run sent {writes}"
    assert any(n for k, n in made.items() if k.startswith("GET "))
    assert server_count(keyed) == 4
    assert _rows(root.parent / "ledger.sqlite3") == ledger_before

    # With --once every pending file would go, and that reaches the training threshold.
    once = paiv("--config", str(config), "--dry-run", "--once")
    assert once.returncode == 0, once.stderr
    assert "waits for the upload threshold" not in once.stdout
    assert (
        "training: would start (6 uploads since the last training, threshold 5), retrain from "
        "a new model (none trained yet)"
    ) in once.stdout
    assert server_count(keyed) == 4


def test_a_dry_run_before_the_first_run_says_the_dataset_would_be_created(
    keyed: Emulator, root: Path
) -> None:
    write_image(root / "sea" / "s0.png", 1)
    config = _config(keyed, root, threshold={"upload": 1, "training": 100})
    dry = paiv("--config", str(config), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dataset 'dry': none yet; the run would create it" in dry.stdout
    assert "sea (a new category): would upload 1 file " in dry.stdout
    assert keyed.state()["datasets"] == []
    assert not (root.parent / "ledger.sqlite3").exists()


def test_a_dry_run_against_a_server_that_cannot_be_asked_exits_1(root: Path) -> None:
    write_image(root / "sea" / "s0.png", 1)
    data = {
        "credentials": {"endpoint": "http://127.0.0.1:9/api", "api_key": KEY, "timeout": 2},
        "dataset": {"name": "dry"},
        "folders": [str(root)],
        "ledger": str(root.parent / "ledger.sqlite3"),
        "retry": {"initial": 0.05, "maximum": 0.1},
    }
    path = root.parent / "configuration.json"
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    dry = paiv("--config", str(path), "--dry-run")
    assert dry.returncode == 1
    assert "server: cannot be asked (" in dry.stdout
    assert "sea: would upload 1 file " in dry.stdout
