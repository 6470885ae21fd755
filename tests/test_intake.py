"""Intake's admission, on a fake clock, real files and a real ledger: no threads, no HTTP.

A file offered to the gate, settled on the fake clock, then checked, hashed and recorded:
what the ledger holds afterwards is what is asserted. The rest (the watcher's events, the
uploads) is tested end to end elsewhere.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from paiv_sync import ledger as states
from paiv_sync.batcher import Debouncer
from paiv_sync.config import Config, parse_config
from paiv_sync.heartbeats import Heartbeats
from paiv_sync.images import make_png
from paiv_sync.intake import Intake
from paiv_sync.layout import Layout, Location
from paiv_sync.ledger import Ledger
from paiv_sync.pipeline import RunSummary
from paiv_sync.stability import StabilityGate

SETTLE = 2.0


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Parts:
    root: Path
    clock: _Clock
    ledger: Ledger
    gate: StabilityGate[Location]
    intake: Intake
    summary: RunSummary
    pending: dict[str, int] = field(default_factory=dict)
    slices: list[int] = field(default_factory=list)

    def settle(self) -> None:
        """Let every file offered settle: one look now, one after the settle time."""
        self.intake.admit_settled()
        self.clock.now += SETTLE + 0.1
        self.intake.admit_settled()

    def rows(self) -> dict[str, tuple[str, str | None]]:
        """``rel_path -> (state, reason)`` of every row the ledger holds for the root."""
        out: dict[str, tuple[str, str | None]] = {}
        for rel, *_ in self.ledger.iter_stats(str(self.root)):
            row = self.ledger.lookup(str(self.root), rel)
            assert row is not None
            out[rel] = (row.state, row.reason)
        return out


@pytest.fixture
def parts(root: Path) -> Iterator[_Parts]:
    made = _make(root)
    yield made
    made.ledger.close()


def _make(root: Path, ignore: tuple[str, ...] = ()) -> _Parts:
    data = {
        "credentials": {"endpoint": "http://127.0.0.1:9/api", "username": "u", "password": "p"},
        "threshold": {"upload": 3, "training": 1000},
        "settle_time": SETTLE,
        "batch_size": 2,
        "upload_workers": 1,
        "skip_duplicates": 1,
        "max_file_size": 4096,
        "dataset": {"name": "tests"},
        "folders": [str(root)],
        "ledger": str(root.parent / "state" / "ledger.sqlite3"),
    }
    config: Config = parse_config(data, source=None, env={})
    clock = _Clock()
    ledger = Ledger(config.ledger_path)
    layout = Layout(
        config.folders, recursive=True, categories={}, extensions=config.extensions, ignore=ignore
    )
    # The wall clock lies far in the past, so that no file written now looks long settled.
    gate: StabilityGate[Location] = StabilityGate(
        SETTLE, clock, wall=lambda: 0.0, path_of=lambda where: where.path
    )
    summary = RunSummary()
    pending: dict[str, int] = {}
    slices: list[int] = []
    intake = Intake(
        config,
        layout,
        gate,
        ledger,
        counts=summary,
        debouncer=Debouncer(threshold=3, quiet_time=10, max_delay=60, clock=clock),
        beats=Heartbeats(clock, stall_limit=60, job_limit=60),
        progress=None,
        stop_event=threading.Event(),
        clock=clock,
        thresholds_apply=True,
        pending_counts=lambda: pending,
        changed=lambda: None,
        between_slices=lambda: slices.append(len(gate)),
    )
    return _Parts(config.folders[0], clock, ledger, gate, intake, summary, pending, slices)


def _png(path: Path, seed: int) -> bytes:
    body = make_png(8, 8, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return body


def test_a_settled_image_is_recorded_pending_with_its_hash_and_category(parts: _Parts) -> None:
    body = _png(parts.root / "forest" / "a.png", 1)
    _png(parts.root / "city" / "sub" / "b.png", 2)
    assert parts.intake.scan_root(parts.root) == 2
    parts.intake.admit_settled()
    assert parts.rows() == {}, "recorded before the settle time"
    parts.clock.now += SETTLE + 0.1
    parts.intake.admit_settled()
    assert parts.rows() == {
        "city/sub/b.png": (states.PENDING, None),
        "forest/a.png": (states.PENDING, None),
    }
    row = parts.ledger.lookup(str(parts.root), "forest/a.png")
    assert row is not None and row.category == "forest"
    assert row.sha256 == hashlib.sha256(body).hexdigest()
    assert parts.summary.added == 2 and parts.pending == {"forest": 1, "city": 1}


def test_a_file_still_growing_is_not_recorded_until_it_holds_still(parts: _Parts) -> None:
    path = parts.root / "forest" / "a.png"
    body = _png(path, 1)
    parts.intake.take_hint(str(path), False)
    parts.clock.now += SETTLE / 2
    path.write_bytes(body[:20])  # rewritten (a different size) within the settle time
    parts.clock.now += SETTLE / 2 + 0.1
    parts.intake.admit_settled()
    assert parts.rows() == {}, "taken while it changed"
    path.write_bytes(body)
    parts.clock.now += SETTLE + 0.1
    parts.intake.admit_settled()
    parts.clock.now += SETTLE + 0.1
    parts.intake.admit_settled()
    assert parts.rows() == {"forest/a.png": (states.PENDING, None)}


def test_what_is_not_a_complete_image_is_rejected_with_its_reason(parts: _Parts) -> None:
    (parts.root / "forest" / "notes.png").write_text("not an image at all\n")
    body = _png(parts.root / "forest" / "cut.png", 1)
    (parts.root / "forest" / "cut.png").write_bytes(body[: len(body) // 2])
    (parts.root / "forest" / "huge.png").write_bytes(body + b"\0" * 5000)  # over max_file_size
    parts.intake.scan_root(parts.root)
    parts.settle()
    rows = parts.rows()
    assert {rel: state for rel, (state, _) in rows.items()} == {
        "forest/cut.png": states.REJECTED,
        "forest/huge.png": states.REJECTED,
        "forest/notes.png": states.REJECTED,
    }
    assert all(reason for _, reason in rows.values())
    assert parts.summary.rejected == 3 and parts.summary.added == 0


def test_the_same_content_twice_in_a_category_is_one_image_and_a_duplicate(
    parts: _Parts,
) -> None:
    body = _png(parts.root / "forest" / "a.png", 1)
    (parts.root / "forest" / "copy.png").write_bytes(body)
    (parts.root / "city" / "same.png").write_bytes(body)  # another category: an image there
    parts.intake.scan_root(parts.root)
    parts.settle()
    rows = {rel: state for rel, (state, _) in parts.rows().items()}
    assert rows["city/same.png"] == states.PENDING
    assert sorted([rows["forest/a.png"], rows["forest/copy.png"]]) == [
        states.DUPLICATE,
        states.PENDING,
    ]
    assert parts.summary.added == 2 and parts.summary.duplicates == 1


def test_a_recorded_file_is_not_read_again_until_it_changes(parts: _Parts) -> None:
    path = parts.root / "forest" / "a.png"
    _png(path, 1)
    parts.intake.scan_root(parts.root)
    parts.settle()
    assert parts.intake.scan_root(parts.root) == 0, "an unchanged file offered again"
    parts.intake.take_hint(str(path), False)  # an event for it: settles, then is seen as is
    parts.settle()
    assert parts.summary.added == 1
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: a new mtime
    _png(path, 2)  # and new content
    assert parts.intake.scan_root(parts.root) == 1
    parts.settle()
    row = parts.ledger.lookup(str(parts.root), "forest/a.png")
    assert row is not None and row.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_deleted_before_upload_is_forgotten_and_one_gone_before_its_check_too(
    parts: _Parts,
) -> None:
    kept = parts.root / "forest" / "a.png"
    gone = parts.root / "forest" / "b.png"
    _png(kept, 1)
    _png(gone, 2)
    parts.intake.scan_root(parts.root)
    parts.settle()
    assert len(parts.rows()) == 2
    gone.unlink()
    parts.intake.scan_root(parts.root)
    assert parts.rows() == {"forest/a.png": (states.PENDING, None)}
    late = parts.root / "forest" / "c.png"
    _png(late, 3)
    parts.intake.take_hint(str(late), False)
    late.unlink()  # gone while it settled
    parts.settle()
    assert parts.rows() == {"forest/a.png": (states.PENDING, None)}
    assert len(parts.gate) == 0


def test_a_root_that_vanished_during_the_scan_forgets_nothing(parts: _Parts) -> None:
    _png(parts.root / "forest" / "a.png", 1)
    parts.intake.scan_root(parts.root)
    parts.settle()
    moved = parts.root.with_name("elsewhere")
    parts.root.rename(moved)  # unmounted, say
    try:
        assert parts.intake.scan_root(parts.root) == 0
        assert parts.rows() == {"forest/a.png": (states.PENDING, None)}
    finally:
        moved.rename(parts.root)


def test_settled_files_are_recorded_in_slices_with_a_hand_over_between(parts: _Parts) -> None:
    for i in range(5):  # slices of batch_size x upload_workers = 2 files
        _png(parts.root / "forest" / f"{i}.png", i)
    parts.intake.scan_root(parts.root)
    parts.settle()
    assert len(parts.rows()) == 5
    assert len(parts.slices) == 3, "the upload workers were not handed each slice"


def test_files_of_the_gate_are_keyed_by_their_location_not_located_again(parts: _Parts) -> None:
    path = parts.root / "forest" / "a.png"
    _png(path, 1)
    parts.intake.take_hint(str(path), False)
    parts.intake.scan_root(parts.root)  # the same file from the scan: one entry, not two
    assert len(parts.gate) == 1
    where = Location(parts.root, "forest/a.png", "forest", "forest")
    assert where in parts.gate and where.path == str(path)


def test_nas_and_system_artefacts_are_never_taken_and_said_once(
    parts: _Parts, caplog: pytest.LogCaptureFixture
) -> None:
    _png(parts.root / "forest" / "a.png", 1)
    for i in range(3):  # a Synology's thumbnails of each image, a recycle bin, macOS metadata
        _png(parts.root / "forest" / "@eaDir" / "a.png" / f"SYNOPHOTO_THUMB_{i}.png", 10 + i)
    _png(parts.root / "#recycle" / "forest" / "old.png", 20)
    _png(parts.root / "forest" / "._a.png", 21)
    _png(parts.root / "lost+found" / "x" / "y.png", 22)
    caplog.set_level(logging.INFO, logger="paiv_sync")
    for _ in range(2):  # the start-up scan and a rescan
        parts.intake.scan_root(parts.root)
        parts.settle()
    assert parts.rows() == {"forest/a.png": (states.PENDING, None)}
    said = [r.getMessage() for r in caplog.records if "built-in rule" in r.getMessage()]
    assert len(said) == 4, said  # @eaDir, #recycle, ._a.png, lost+found: each once
    assert any('"@eaDir" (Synology thumbnails)' in line for line in said)
    assert all(r.levelno == logging.INFO for r in caplog.records if "built-in rule" in r.msg)


def test_ignore_patterns_and_paivignore_files_keep_files_out(root: Path) -> None:
    made = _make(root, ignore=("rejects/", "*_raw.png"))
    try:
        _png(root / "forest" / "a.png", 1)
        _png(root / "forest" / "rejects" / "b.png", 2)
        _png(root / "city" / "c_raw.png", 3)
        _png(root / "city" / "blurry" / "d.png", 4)
        _png(root / "city" / "e.png", 5)
        made.intake.scan_root(made.root)
        made.settle()
        assert set(made.rows()) == {"forest/a.png", "city/blurry/d.png", "city/e.png"}
        # A .paivignore written later: what it names and is still pending is not sent.
        (root / "city" / ".paivignore").write_text("blurry/\n")
        made.intake.take_hint(str(root / "city" / ".paivignore"), False)
        assert set(made.rows()) == {"forest/a.png", "city/e.png"}, "pending until a rescan"
        _png(root / "city" / "blurry" / "f.png", 6)
        made.intake.take_hint(str(root / "city" / "blurry" / "f.png"), False)
        made.intake.scan_root(made.root)
        made.settle()
        assert set(made.rows()) == {"forest/a.png", "city/e.png"}
        # And taken out again: the folder is looked at anew at once.
        (root / "city" / ".paivignore").unlink()
        made.intake.take_hint(str(root / "city" / ".paivignore"), False)
        made.settle()
        assert set(made.rows()) == {
            "forest/a.png",
            "city/e.png",
            "city/blurry/d.png",
            "city/blurry/f.png",
        }
    finally:
        made.ledger.close()


def test_a_long_scan_says_how_far_it_has_come(root: Path) -> None:
    made = _make(root)
    told: list[tuple[Path, int]] = []
    made.intake._scanning = lambda where, files: told.append((where, files))
    try:
        folder = root / "forest"
        for i in range(4100):
            (folder / f"{i}.png").write_bytes(b"")
        assert made.intake.scan_root(made.root) == 4100
    finally:
        made.ledger.close()
    assert told == [(made.root, 4096)]


def test_scan_notes_ask_systemd_for_time_until_ready(root: Path) -> None:
    from paiv_sync.service import Service

    config = _make(root)
    config.ledger.close()
    notes: list[str] = []
    service = Service(config.intake.config, notify=notes.append)
    service._scanning(root, 4096)
    service.ready.set()
    service._next_scan_note = 0.0
    service._scanning(root, 8192)
    assert notes == [
        f"STATUS=scanning {root}: 4096 files so far\nEXTEND_TIMEOUT_USEC=60000000",
        f"STATUS=scanning {root}: 8192 files so far",
    ]
