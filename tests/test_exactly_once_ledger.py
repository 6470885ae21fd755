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
import subprocess
import sys
import threading
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
