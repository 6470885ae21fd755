"""Exactly once when the ledger itself is in trouble.

A state folder that cannot be written and a second instance on the same ledger are refused at
start with a clear message (exit 1). A corrupt database is moved aside and rebuilt: every file
on disk is checked against the dataset, and what the server already holds (same name and size
in the same category) becomes ``uploaded`` without being sent again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from paiv_sync.api import MviClient
from paiv_sync.emulator import Emulator, EmulatorOptions, FaultOptions
from paiv_sync.ledger import RECOVERED_REASON, Ledger, LedgerError
from paiv_sync.uploader import Uploader
from tests.e2e import FAST_RETRY, config_for, running, server_files, write_image
from tests.helpers import wait_until
from tests.test_exactly_once import assert_exactly_once, expected_files
from tests.test_exactly_once_crash import Cli, write_config

UPLOAD_ROUTE = "POST /datasets/{id}/files"


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAIV_")}
    return subprocess.run(
        [sys.executable, "-m", "paiv_sync", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


# -- refused at start ---------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_state_folder_is_a_clear_error_at_start(
    emulator: Emulator, root: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o555)
    try:
        done = _cli(write_config(tmp_path / "cfg.json", emulator, root), "--once")
    finally:
        state.chmod(0o755)
    assert done.returncode == 1, done.stderr
    assert f"cannot create the ledger at {state / 'ledger.sqlite3'}" in done.stderr
    assert "Traceback" not in done.stderr
    assert emulator.state()["requests"] == {}  # refused before talking to the server


def test_a_state_path_that_cannot_be_a_folder_is_a_clear_error_at_start(
    emulator: Emulator, root: Path, tmp_path: Path
) -> None:
    # The same refusal, in a way that also holds for root: the state "folder" is a file.
    (tmp_path / "state").write_text("not a folder")
    done = _cli(write_config(tmp_path / "cfg.json", emulator, root), "--once")
    assert done.returncode == 1, done.stderr
    assert "cannot create the ledger" in done.stderr
    assert 'set "ledger" in the configuration to a writable path' in done.stderr
    assert "Traceback" not in done.stderr
    assert emulator.state()["requests"] == {}


def test_a_second_instance_on_the_same_ledger_is_refused(
    emulator: Emulator, root: Path, tmp_path: Path
) -> None:
    config_path = write_config(tmp_path / "cfg.json", emulator, root)
    config = config_for(emulator, root, ledger=str(tmp_path / "state" / "ledger.sqlite3"))
    with running(config):
        body = write_image(root / "forest" / "a.png", 1)
        done = _cli(config_path)  # the service, not --once: it would run for ever
        assert done.returncode == 1, done.stderr
        assert "is in use by another paiv-sync process" in done.stderr
        assert f"(pid {os.getpid()})" in done.stderr
        assert "Traceback" not in done.stderr
    with running(config_for(emulator, root, threshold={"upload": 1, "training": 1000})):
        wait_until(lambda: sum(server_files(emulator).values()) == 1)
    assert_exactly_once(emulator, {("forest", hashlib.sha256(body).hexdigest()): 1})


# -- a corrupt ledger ---------------------------------------------------------------------


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "header":
        data[:100] = b"\xde\xad\xbe\xef" * 25  # "file is not a database"
    else:
        # Scribble over the middle pages (the tables' data): only reading them finds it.
        page = 4096
        for start in range(page, len(data) - page, page):
            data[start + 8 : start + 200] = os.urandom(192)
    path.write_bytes(bytes(data))


def _fill_and_upload(emulator: Emulator, root: Path, ledger: Path, count: int) -> None:
    config = config_for(
        emulator, root, threshold={"upload": 1, "training": 1000}, ledger=str(ledger)
    )
    with running(config):
        for i in range(count):
            write_image(root / ("forest", "city")[i % 2] / f"img{i:03d}.png", i)
        wait_until(lambda: sum(server_files(emulator).values()) == count, timeout=20)


@pytest.mark.parametrize("how", ["header", "pages"])
def test_a_corrupt_ledger_is_moved_aside_and_rebuilt_against_the_server(
    root: Path, tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="paiv_sync.ledger")
    path = tmp_path / "state" / "ledger.sqlite3"
    with Emulator(EmulatorOptions(port=0)) as emulator:
        _fill_and_upload(emulator, root, path, 40)
        _corrupt(path, how)
        with pytest.raises(LedgerError, match="corrupt"):  # without recovery: refused at once
            Ledger(path)
        for i in range(40, 43):  # new since the last run
            write_image(root / "city" / f"img{i:03d}.png", i)
        posts = emulator.state()["requests"][UPLOAD_ROUTE]

        ledger, rebuilt = Ledger.open_or_recover(path)
        try:
            assert rebuilt and ledger.recovering
            aside = list(path.parent.glob("ledger.sqlite3.corrupt-*"))
            assert [p.name for p in aside if not p.name.endswith(("-wal", "-shm"))], aside
            assert any(
                "corrupt" in r.getMessage() and "moved aside" in r.getMessage()
                for r in caplog.records
            )
            # The service's start-up scan records every file; while recovering, each is in
            # doubt ...
            for file in sorted(root.rglob("*.png")):
                rel = file.relative_to(root).as_posix()
                st = file.stat()
                row = ledger.record(
                    root=str(root),
                    rel_path=rel,
                    category=rel.split("/")[0],
                    size=st.st_size,
                    mtime_ns=st.st_mtime_ns,
                    sha256=hashlib.sha256(file.read_bytes()).hexdigest(),
                    content_type="image/png",
                    skip_duplicates=True,
                ).row
                assert row.state == "uploading" and row.reason == RECOVERED_REASON
            ledger.end_recovery()
            # ... and the usual resolution against the server decides.
            stop = threading.Event()
            with MviClient(
                emulator.url, username="admin", password="passw0rd", retry=FAST_RETRY
            ) as client:
                uploader = Uploader(client, ledger, retry=FAST_RETRY, stop_event=stop)
                uploader.dataset_id = emulator.state()["datasets"][0]["_id"]
                assert uploader.resolve_in_doubt() == 43
                counts = ledger.counts()
                assert counts["forest"]["uploaded"] == 20 and counts["city"]["uploaded"] == 20
                assert counts["city"]["pending"] == 3
                assert ledger.uploads_total() == 0  # nothing new went in: no training due
                uploader.upload_batch("city", [r.id for r in ledger.pending("city")])
            assert emulator.state()["requests"][UPLOAD_ROUTE] == posts + 1
        finally:
            ledger.close()
        assert_exactly_once(emulator, expected_files(root))
    reopened, again = Ledger.open_or_recover(path)
    with reopened:
        assert not again and not reopened.recovering


def test_a_rebuilt_ledger_still_recognises_names_per_category(root: Path, tmp_path: Path) -> None:
    # The same name and size in two categories: each category's copy is matched on its own.
    path = tmp_path / "state" / "ledger.sqlite3"
    with Emulator(EmulatorOptions(port=0)) as emulator:
        config = config_for(
            emulator, root, threshold={"upload": 1, "training": 1000}, ledger=str(path)
        )
        with running(config):
            write_image(root / "forest" / "same.png", 1)
            wait_until(lambda: sum(server_files(emulator).values()) == 1)
        _corrupt(path, "header")
        write_image(root / "city" / "same.png", 1)  # same bytes, other category
        ledger, rebuilt = Ledger.open_or_recover(path)
        with ledger:
            assert rebuilt
            for category in ("forest", "city"):
                file = root / category / "same.png"
                st = file.stat()
                ledger.record(
                    root=str(root),
                    rel_path=f"{category}/same.png",
                    category=category,
                    size=st.st_size,
                    mtime_ns=st.st_mtime_ns,
                    sha256=hashlib.sha256(file.read_bytes()).hexdigest(),
                    content_type="image/png",
                    skip_duplicates=True,
                )
            ledger.end_recovery()
            with MviClient(
                emulator.url, username="admin", password="passw0rd", retry=FAST_RETRY
            ) as client:
                uploader = Uploader(client, ledger, retry=FAST_RETRY, stop_event=threading.Event())
                uploader.dataset_id = emulator.state()["datasets"][0]["_id"]
                uploader.resolve_in_doubt()
                assert ledger.counts()["forest"]["uploaded"] == 1
                assert ledger.counts()["city"]["pending"] == 1
                uploader.upload_batch("city", [r.id for r in ledger.pending("city")])
        assert_exactly_once(emulator, expected_files(root))


def test_the_cli_rebuilds_a_corrupt_ledger_and_sends_only_what_is_new(
    root: Path, tmp_path: Path
) -> None:
    path = tmp_path / "state" / "ledger.sqlite3"
    with Emulator(EmulatorOptions(port=0, faults=FaultOptions())) as emulator:
        _fill_and_upload(emulator, root, path, 20)
        _corrupt(path, "pages")
        for i in range(20, 23):
            write_image(root / "city" / f"img{i:03d}.png", i)
        cli = Cli(write_config(tmp_path / "cfg.json", emulator, root), tmp_path / "cli.log")
        assert cli.run_once() == 0, cli.output()
        assert_exactly_once(emulator, expected_files(root))
        output = cli.output()
    assert "corrupt" in output and "moved aside" in output
    assert list(path.parent.glob("ledger.sqlite3.corrupt-*"))
    with Ledger(path, readonly=True) as ledger:
        counts = ledger.counts()
    assert counts["forest"]["uploaded"] == 10 and counts["city"]["uploaded"] == 13


# -- a full disk (docs/what-happens-when.md, 26c) ------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs mounted for the test (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` with one file; return it (delete it to free them)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"\0" * 4096
        while True:
            try:
                os.write(fd, block)
            except OSError:
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]
    finally:
        os.close(fd)
    return filler


def test_a_full_ledger_disk_holds_everything_then_goes_on(
    emulator: Emulator, root: Path, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger_path = small_disk / "state" / "ledger.sqlite3"
    config = config_for(
        emulator, root, threshold={"upload": 1, "training": 1000}, ledger=str(ledger_path)
    )
    with running(config) as runner:
        for i in range(3):
            write_image(root / "forest" / f"before{i}.png", i)
        wait_until(lambda: sum(server_files(emulator).values()) == 3, message="3 stored")
        logins = emulator.state()["requests"].get("POST /tokens", 0)
        filler = _fill(small_disk)
        for i in range(5):
            write_image(root / "city" / f"during{i}.png", 10 + i)

        def said(text: str) -> bool:
            return any(text in r.getMessage() for r in caplog.records)

        wait_until(
            lambda: said(
                f"cannot write the ledger {ledger_path}: no space left on the device holding "
                f"{ledger_path.parent}"
            ),
            timeout=30,
            message="the full disk said",
        )
        errors = sum(r.levelno >= logging.ERROR for r in caplog.records)
        filler.unlink()
        wait_until(lambda: said("can be written again"), timeout=60, message="recovery said")
        ledger = runner.service.ledger
        assert ledger is not None
        wait_until(
            lambda: sum(c.get("uploaded", 0) for c in ledger.counts().values()) == 8,
            timeout=30,
            message="all 8 recorded as uploaded",
        )
    # Held, not looping: no storm of logins and error lines while the disk was full.
    assert emulator.state()["requests"].get("POST /tokens", 0) - logins <= 1
    assert errors <= 3
    assert_exactly_once(emulator, expected_files(root))
    assert "Traceback" not in caplog.text
    # The write-ahead log is emptied when uploads go quiet: a small disk does not fill with it.
    wal = Path(f"{ledger_path}-wal")
    assert not wal.exists() or wal.stat().st_size <= 1 << 20


def test_an_upload_answered_while_the_ledger_disk_is_full_is_not_sent_twice(
    root: Path, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The server holds the upload 3 s; the disk fills meanwhile, so its answer cannot be
    # recorded: the rows stay "uploading" and are settled against the server later.
    faults = FaultOptions(latency=3.0, latency_rate=1.0, routes=(UPLOAD_ROUTE,), limit=1)
    ledger_path = small_disk / "state" / "ledger.sqlite3"
    with Emulator(EmulatorOptions(port=0, faults=faults)) as emulator:
        config = config_for(
            emulator, root, threshold={"upload": 4, "training": 1000}, ledger=str(ledger_path)
        )
        with running(config):
            for i in range(4):
                write_image(root / "forest" / f"{i}.png", i)
            wait_until(
                lambda: emulator.state()["faults"]["latency"] == 1,
                message="the upload held by the server",
            )
            filler = _fill(small_disk)
            wait_until(
                lambda: "cannot write the ledger" in caplog.text,
                timeout=30,
                message="the full disk said",
            )
            filler.unlink()
            wait_until(lambda: "can be written again" in caplog.text, timeout=60)

            def uploaded() -> int:
                with Ledger(ledger_path, readonly=True) as ledger:
                    return ledger.counts().get("forest", {}).get("uploaded", 0)

            wait_until(lambda: uploaded() == 4, timeout=30, message="the 4 rows settled")
        assert_exactly_once(emulator, expected_files(root))
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("reader", [False, True], ids=["at-open", "at-first-write"])
def test_once_on_a_full_ledger_disk_stops_with_exit_1_and_the_next_run_sends_the_rest(
    emulator: Emulator, root: Path, tmp_path: Path, small_disk: Path, reader: bool
) -> None:
    # Without a reader, opening the ledger fails (SQLite cannot create its shared-memory
    # file); with one holding that file open, the open succeeds and the first write fails.
    ledger_path = small_disk / "state" / "ledger.sqlite3"
    config = write_config(
        tmp_path / "cfg.json", emulator, root, ledger=str(ledger_path), threshold={"upload": 1}
    )
    for i in range(3):
        write_image(root / "forest" / f"before{i}.png", i)
    first = _cli(config, "--once")
    assert first.returncode == 0, first.stderr
    other = sqlite3.connect(ledger_path) if reader else None
    if other is not None:
        other.execute("SELECT count(*) FROM files").fetchone()
    filler = _fill(small_disk)
    for i in range(5):
        write_image(root / "city" / f"during{i}.png", 10 + i)
    held = _cli(config, "--once")
    assert held.returncode == 1, held.stderr
    assert f"no space left on the device holding {ledger_path.parent}" in held.stderr
    assert "Traceback" not in held.stderr
    assert sum(server_files(emulator).values()) <= 8
    if other is not None:
        assert "stops (exit 1). Nothing is lost" in held.stderr
        other.close()
    filler.unlink()
    last = _cli(config, "--once")
    assert last.returncode == 0, last.stderr
    assert_exactly_once(emulator, expected_files(root))
