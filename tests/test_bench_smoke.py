"""The benchmark harness on tiny sizes, so that it keeps working between full runs.

These tests assert what the harness must get right (the data it makes, the checks it applies,
the table it prints); they never assert a speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import ingest, startup
from bench.common import (
    EmulatorProcess,
    Figure,
    bench_config,
    make_image_tree,
    make_stat_tree,
    padded_png,
    percentile,
    upload_requests,
)
from bench.run import table
from paiv_sync.images import check_image


def test_generated_images_are_valid_distinct_and_sized(tmp_path: Path) -> None:
    paths = make_image_tree(tmp_path, 10, size=5_000)
    assert sorted({p.parent.name for p in paths}) == ["cat0", "cat1", "cat2", "cat3", "cat4"]
    assert all(check_image(p) is None for p in paths)
    assert all(4_000 <= p.stat().st_size <= 6_000 for p in paths)
    assert len({p.read_bytes() for p in paths}) == 10
    assert len(padded_png(1, 30_000)) == 30_000


def test_ingest_runs_and_checks_the_server(tmp_path: Path) -> None:
    source = tmp_path / "images"
    paths = make_image_tree(source, 12, size=3_000)
    with EmulatorProcess() as emulator:
        limit = ingest.baseline(emulator, paths)
        once, _ = ingest.paiv_once(emulator, source, tmp_path, len(paths))
        held = emulator.state()
    assert limit.files == once.files == 12
    assert sorted(f["original_file_name"] for d in held["datasets"] for f in d["files"]) == sorted(
        p.name for p in paths
    )
    assert set(once.phases) >= {"check + hash + ledger (admit)", "upload (dispatch + wait)"}


def test_watch_mode_run_uses_its_own_process_and_puts_the_files_back(tmp_path: Path) -> None:
    source = tmp_path / "images"
    paths = make_image_tree(source, 10, size=3_000)
    with EmulatorProcess() as emulator:
        watch = ingest.paiv_watch_cli(emulator, source, tmp_path, len(paths))
        held = emulator.state()
    assert watch.files == 10 and watch.client_cpu > 0
    assert sorted(f["original_file_name"] for d in held["datasets"] for f in d["files"]) == sorted(
        p.name for p in paths
    )
    assert all(p.exists() for p in paths)  # moved back for the next run


def _full_ledger(tmp_path: Path, emulator: EmulatorProcess, *, stale: int) -> Path:
    """A tree of 30 files and a ledger saying they are uploaded (``stale`` with a wrong mtime)."""
    root = tmp_path / "tree"
    make_stat_tree(root, 30, per_dir=3)
    config, data = bench_config(emulator.url, [root], tmp_path / "ledger.sqlite3")
    root_text = str(config.folders[0])
    stats = startup.tree_stats(root_text)
    for rel in sorted(stats)[:stale]:
        size, mtime_ns, ctime_ns, inode = stats[rel]
        stats[rel] = (size, mtime_ns - 1, ctime_ns, inode)
    dataset_id = startup.create_dataset(emulator.url)
    startup.build_ledger(config.ledger_path, root_text, stats, extra=5, dataset_id=dataset_id)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


def test_startup_with_a_full_ledger_redoes_nothing(tmp_path: Path) -> None:
    with EmulatorProcess() as emulator:
        result = startup.start_child(_full_ledger(tmp_path, emulator, stale=0), settle=0.3)
        sent = upload_requests(emulator.state())
    assert result["connected"]
    assert result["ready_seconds"] > 0
    assert result["peak_rss_at_ready"] >= result["rss_before"] > 0
    assert sent == 0


def test_startup_check_catches_a_file_taken_for_new(tmp_path: Path) -> None:
    # A ledger row whose mtime does not match makes the service look at the file again: the
    # benchmark must refuse to report such a start-up as clean.
    with EmulatorProcess() as emulator, pytest.raises(AssertionError, match="offered_at_ready"):
        startup.start_child(_full_ledger(tmp_path, emulator, stale=2), settle=0.3)


def test_table_and_percentiles() -> None:
    lines = table(
        [
            Figure(
                "ingest", 900.0, "files/s", baseline=1000.0, ratio=0.9, goal=">= 0.8x", met=True
            ),
            Figure("idle", 0.7, "% of a core", goal="< 0.5 %", met=False),
        ]
    )
    assert lines[0].startswith("| figure") and set(lines[1]) <= {"|", "-"}
    assert "| 900 files/s" in lines[2] and "0.90x" in lines[2] and "| yes" in lines[2]
    assert "NO" in lines[3]
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
