"""Fixtures shared by the whole suite."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads running behind it (as watchdog's own suite does)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"


@pytest.fixture
def emulator() -> Iterator[object]:
    """A fresh emulator on a free loopback port, default options (user admin / passw0rd)."""
    from paiv_sync.emulator import Emulator, EmulatorOptions

    with Emulator(EmulatorOptions(port=0, training_seconds=0.5)) as emu:
        yield emu


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A watched root folder with three empty category folders: forest, city and sea."""
    folder = tmp_path / "images"
    for category in ("forest", "city", "sea"):
        (folder / category).mkdir(parents=True)
    return folder


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every paiv_sync log record, DEBUG included."""
    caplog.set_level(logging.DEBUG, logger="paiv_sync")
    return caplog
