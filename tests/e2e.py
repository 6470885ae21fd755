"""Helpers for the end-to-end tests: a configuration for the emulator, a running service."""

from __future__ import annotations

import hashlib
import os
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from paiv_sync.config import Config, parse_config
from paiv_sync.emulator import Emulator
from paiv_sync.images import make_png
from paiv_sync.retry import RetryPolicy
from paiv_sync.service import Service

FAST_RETRY = RetryPolicy(initial=0.02, maximum=0.2, jitter=0.01)


def config_for(emulator: Emulator, root: Path, **changes: Any) -> Config:
    """A configuration that feeds ``emulator`` from ``root``, quick enough for tests.

    ``changes`` replace top-level keys (``threshold={"upload": 2}``, ``time=0.2``, …).
    """
    data: dict[str, Any] = {
        "credentials": {
            "endpoint": emulator.url,
            "username": "admin",
            "password": "passw0rd",
            "timeout": 5,
        },
        "recursive": 1,
        "threshold": {"upload": 3, "training": 1000},
        "skip_duplicates": 1,
        "time": 0.3,
        "settle_time": 0.1,
        "poll_interval": 0.1,
        "rescan_interval": 0,
        "dataset": {"name": "tests", "action": "append"},
        "model": {"name": "model", "action": "nothing"},
        "folders": [str(root)],
        "ledger": str(root.parent / "state" / "ledger.sqlite3"),
    }
    data.update(changes)
    return parse_config(data, source=None, env={})


def write_image(path: Path, seed: int, *, via_rename: bool = True) -> bytes:
    """Write a unique valid PNG at ``path`` (by default as a camera would: temp name, rename)."""
    body = make_png(16, 16, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if via_rename:
        temp = path.with_name(f".{path.name}.tmp")
        temp.write_bytes(body)
        temp.replace(path)
    else:
        path.write_bytes(body)
    return body


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def server_files(emulator: Emulator) -> Counter[tuple[str, str]]:
    """``(category name, sha256) -> copies`` over every dataset the emulator holds."""
    held: Counter[tuple[str, str]] = Counter()
    for dataset in emulator.state()["datasets"]:
        for item in dataset["files"]:
            held[(item["category_name"], item["sha256"])] += 1
    return held


def server_count(emulator: Emulator) -> int:
    return sum(server_files(emulator).values())


class RunningService:
    """A Service running in a background thread."""

    def __init__(self, config: Config, *, retry: RetryPolicy = FAST_RETRY) -> None:
        self.service = Service(config, retry=retry)
        self.codes: list[int] = []
        self.thread = threading.Thread(
            target=lambda: self.codes.append(self.service.run()), name="test-service"
        )

    def start(self) -> RunningService:
        self.thread.start()
        if not self.service.ready.wait(15):
            self.stop()
            raise AssertionError("service did not become ready")
        return self

    def stop(self) -> int:
        self.service.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "service did not stop"
        return self.codes[0] if self.codes else -1


@contextmanager
def running(config: Config, **kwargs: Any) -> Iterator[RunningService]:
    runner = RunningService(config, **kwargs).start()
    try:
        yield runner
    finally:
        runner.stop()


def replace_keeping_size_and_mtime(path: Path, body: bytes, how: str) -> None:
    """Replace ``path`` with ``body`` as ``cp -p`` (in place) or ``rsync -t`` (renamed) do."""
    st = path.stat()
    assert len(body) == st.st_size
    if how == "cp-p":
        with path.open("r+b") as handle:
            handle.write(body)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        temp = path.with_name(f".{path.name}.rsync")
        temp.write_bytes(body)
        os.utime(temp, ns=(st.st_atime_ns, st.st_mtime_ns))
        temp.replace(path)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
