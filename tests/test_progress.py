"""Progress of ``--once`` (issue 6): the service's reports add up, the CLI shows them."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

from paiv_sync.emulator import Emulator
from paiv_sync.images import make_png
from paiv_sync.progress import Progress, ProgressLine, format_progress
from paiv_sync.service import Service
from tests.e2e import FAST_RETRY, config_for, running, server_count
from tests.helpers import wait_until

ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PAIV_", "NOTIFY_", "WATCHDOG_"))}


def _write(path: Path, seed: int, size: int = 16) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = make_png(size, size, seed=seed)
    path.write_bytes(body)
    return len(body)


def test_reports_add_up_to_the_total(emulator: Emulator, tmp_path: Path) -> None:
    root = tmp_path / "images"
    sizes = [
        _write(root / category / f"{category}{i}.png", seed=100 * n + i, size=8 + i)
        for n, category in enumerate(("forest", "city"))
        for i in range(13)
    ]
    # Not an image: rejected while admitted, so neither counted nor done.
    (root / "city" / "notes.png").write_text("not a picture")
    config = config_for(emulator, root, batch_size=4, skip_duplicates=0)
    reports: list[Progress] = []
    service = Service(config, once=True, retry=FAST_RETRY, progress=reports.append)

    assert service.run() == 1  # 1: a file was rejected
    assert server_count(emulator) == len(sizes)
    assert reports, "no progress reported"
    last = reports[-1]
    assert (last.files_done, last.files_total) == (len(sizes), len(sizes))
    assert (last.bytes_done, last.bytes_total) == (sum(sizes), sum(sizes))
    assert len(reports) >= len(sizes) // 4  # one report per batch of 4 at least
    for before, after in itertools.pairwise(reports):
        assert after.files_done > before.files_done
        assert after.bytes_done > before.bytes_done
        assert after.elapsed >= before.elapsed
    assert all(r.files_done <= r.files_total and r.bytes_done <= r.bytes_total for r in reports)


def test_pending_rows_of_an_earlier_run_count(emulator: Emulator, tmp_path: Path) -> None:
    root = tmp_path / "images"
    first = [_write(root / "sea" / f"s{i}.png", seed=i) for i in range(3)]
    config = config_for(emulator, root, skip_duplicates=0)
    # Recorded but not uploaded: below the upload threshold of a watching service.
    waiting = config_for(emulator, root, skip_duplicates=0, threshold={"upload": 100})
    with running(waiting) as runner:
        ledger = runner.service.ledger
        assert ledger is not None
        wait_until(lambda: ledger.pending_counts().get("sea") == 3, timeout=10)
    assert server_count(emulator) == 0
    added = _write(root / "sea" / "new.png", seed=50)
    reports: list[Progress] = []

    assert Service(config, once=True, retry=FAST_RETRY, progress=reports.append).run() == 0
    assert reports[-1].files_done == reports[-1].files_total == 4
    assert reports[-1].bytes_done == reports[-1].bytes_total == sum(first) + added


def test_the_total_is_known_at_the_start_and_files_that_need_no_upload_leave_it(
    emulator: Emulator, tmp_path: Path
) -> None:
    root = tmp_path / "images"
    sizes = [_write(root / "forest" / f"f{i:02d}.png", seed=i, size=8 + i) for i in range(12)]
    twin = root / "forest" / "copy.png"  # the same image as f00: a duplicate
    twin.write_bytes((root / "forest" / "f00.png").read_bytes())
    (root / "city").mkdir()
    (root / "city" / "notes.png").write_text("not a picture")  # rejected
    victims = [root / "forest" / "f10.png", root / "forest" / "f11.png"]
    config = config_for(emulator, root, batch_size=2, upload_workers=1)
    reports: list[Progress] = []

    def delete_late_files(progress: Progress) -> None:
        # Deleted once the run is under way: before their turn to be sent.
        if not reports:
            for victim in victims:
                victim.unlink()
        reports.append(progress)

    service = Service(config, once=True, retry=FAST_RETRY, progress=delete_late_files)
    assert service.run() == 1  # 1: a file was rejected
    sent = len(sizes) - len(victims)
    assert server_count(emulator) == sent
    # The first report already knows every file there may be to send (14 looked at, at most),
    # and the total only ever drops: a duplicate, a text file, two deleted files drop out.
    assert sent <= reports[0].files_total <= 14
    totals = [r.files_total for r in reports]
    assert totals == sorted(totals, reverse=True)
    last = reports[-1]
    assert (last.files_done, last.files_total) == (sent, sent)
    assert last.bytes_done == last.bytes_total == sum(sizes[:-2])


def test_a_pending_file_changed_since_counts_once(emulator: Emulator, tmp_path: Path) -> None:
    root = tmp_path / "images"
    for i in range(3):
        _write(root / "sea" / f"s{i}.png", seed=i)
    waiting = config_for(emulator, root, skip_duplicates=0, threshold={"upload": 100})
    with running(waiting) as runner:
        ledger = runner.service.ledger
        assert ledger is not None
        wait_until(lambda: ledger.pending_counts().get("sea") == 3, timeout=10)
    changed = _write(root / "sea" / "s0.png", seed=99, size=20)  # pending, and now different
    reports: list[Progress] = []
    config = config_for(emulator, root, skip_duplicates=0)

    assert Service(config, once=True, retry=FAST_RETRY, progress=reports.append).run() == 0
    assert server_count(emulator) == 3
    assert reports[-1].files_done == reports[-1].files_total == 3
    others = sum((root / "sea" / f"s{i}.png").stat().st_size for i in (1, 2))
    assert reports[-1].bytes_done == reports[-1].bytes_total == changed + others


def test_a_failing_display_does_not_stop_the_uploads(emulator: Emulator, tmp_path: Path) -> None:
    root = tmp_path / "images"
    for i in range(5):
        _write(root / "forest" / f"f{i}.png", seed=i)
    config = config_for(emulator, root, batch_size=2)

    def broken(_progress: Progress) -> None:
        raise RuntimeError("display gone")

    assert Service(config, once=True, retry=FAST_RETRY, progress=broken).run() == 0
    assert server_count(emulator) == 5


def test_format_progress() -> None:
    line = format_progress(Progress(250, 1000, 7_500_000, 30_000_000, 2.0))
    assert line == "250/1,000 files (25 %), 7.5/30.0 MB, 125 files/s, 3.8 MB/s, ETA 0:06"
    assert "(99 %)" in format_progress(Progress(999, 1000, 1, 2, 1.0))
    assert "ETA ?" in format_progress(Progress(0, 10, 0, 100, 1.0))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_every_tenth_or_every_few_seconds() -> None:
    out = io.StringIO()
    clock = _Clock()
    line = ProgressLine(out, tty=False, every=5.0, clock=clock)
    for done in range(1, 101):
        clock.now = done * 0.01
        line(Progress(done, 100, done, 100, clock.now))
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # the first report, then one per tenth
    assert lines[-1].startswith("progress: 100/100 files (100 %)")
    line(Progress(100, 120, 100, 120, 2.0))  # more files admitted: no new tenth, too soon
    assert len(out.getvalue().splitlines()) == 11
    clock.now = 7.5
    line(Progress(101, 120, 101, 120, 7.5))  # five seconds on
    assert len(out.getvalue().splitlines()) == 12
    line(Progress(102, 120, 102, 120, 7.6))
    line.finish()  # the last report, not shown yet
    assert out.getvalue().splitlines()[-1].startswith("progress: 102/120 files (85 %)")
    line.finish()
    assert len(out.getvalue().splitlines()) == 13


def test_terminal_line_is_redrawn_in_place() -> None:
    out = io.StringIO()
    line = ProgressLine(out, tty=True)
    line(Progress(1, 2, 10, 20, 1.0))
    line.clear()  # a log line is about to be written
    line(Progress(2, 2, 20, 20, 2.0))
    line.finish()
    text = out.getvalue()
    assert "\n" not in text[:-1]
    assert text.endswith("2/2 files (100 %), 0.0/0.0 MB, 1 files/s, 0.0 MB/s, ETA 0:00\n")
    assert text.count("\r") == 4  # two draws, one clear, the final draw


def test_cli_once_prints_a_final_100_percent_line(emulator: Emulator, tmp_path: Path) -> None:
    root = tmp_path / "images"
    for i in range(7):
        _write(root / "forest" / f"f{i}.png", seed=i)
    config = tmp_path / "configuration.json"
    config.write_text(
        json.dumps(
            {
                "credentials": {
                    "endpoint": emulator.url,
                    "username": "admin",
                    "password": "passw0rd",
                    "timeout": 5,
                },
                "settle_time": 0.1,
                "batch_size": 3,
                "dataset": {"name": "cli"},
                "model": {"name": "cli", "action": "nothing"},
                "folders": [str(root)],
                "ledger": str(tmp_path / "ledger.sqlite3"),
            }
        )
    )
    config.chmod(0o600)
    proc = subprocess.run(
        [sys.executable, "-m", "paiv_sync", "--config", str(config), "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=ENV,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("progress: ")]
    assert progress, proc.stderr
    assert progress[-1].startswith("progress: 7/7 files (100 %)")
    assert "\r" not in proc.stderr  # not a terminal: plain lines only
