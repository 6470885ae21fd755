"""Exactly once through crashes: the CLI is killed with SIGKILL at random moments and restarted.

The CLI runs as a child process (``python -m paiv_sync --config cfg.json``) against an
emulator in this process, over loopback. Kills come at seeded random moments while files
arrive and while the server misbehaves; at the end ``--once`` finishes the work and the
server must hold every file exactly once. A training request caught by a kill must be looked
up on the server, never made twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from paiv_sync.emulator import Emulator, EmulatorOptions, FaultOptions
from paiv_sync.ledger import Ledger
from tests.e2e import config_for, running, server_files, sha, write_image
from tests.helpers import wait_until
from tests.test_exactly_once import assert_exactly_once, expected_files

REPO = Path(__file__).resolve().parent.parent


def write_config(path: Path, emulator: Emulator, root: Path, **changes: Any) -> Path:
    """Write a configuration for the CLI feeding ``emulator`` from ``root``; return its path."""
    data: dict[str, Any] = {
        "credentials": {
            "endpoint": emulator.url,
            "username": "admin",
            "password": "passw0rd",
            "timeout": 5,
        },
        "recursive": 1,
        "threshold": {"upload": 5, "training": 1000},
        "skip_duplicates": 1,
        "time": 0.2,
        "settle_time": 0.1,
        "poll_interval": 0.2,
        "rescan_interval": 0,
        "batch_size": 8,
        "dataset": {"name": "tests", "action": "append"},
        "model": {"name": "model", "action": "nothing"},
        "folders": [str(root)],
        "ledger": str(path.parent / "state" / "ledger.sqlite3"),
    }
    data.update(changes)
    path.write_text(json.dumps(data, indent=1))
    path.chmod(0o600)  # it holds a password
    return path


class Cli:
    """``paiv-sync`` as a child process, its output appended to one log file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, *args: str) -> Cli:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAIV_")}
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"---- start {self.starts} {' '.join(args)}\n".encode())
            self.process = subprocess.Popen(
                [sys.executable, "-m", "paiv_sync", "--config", str(self.config), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
            )
        return self

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or closed."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        with self.log.open("ab") as out:
            out.write(b"---- SIGKILL\n")

    def stop(self) -> int:
        """SIGTERM and wait; return the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def run_once(self, timeout: float = 60) -> int:
        """``--once`` to the end; return its exit code."""
        self.start("--once")
        assert self.process is not None
        return self.process.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ensure_dead(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def cli_log(tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / "cli.log"
    log.touch()
    yield log


def _uploaded(ledger_path: Path) -> dict[str, dict[str, int]]:
    with Ledger(ledger_path, readonly=True) as ledger:
        return ledger.counts()


UPLOADS = "POST /datasets/{id}/files"


def test_sigkill_at_random_moments_under_faults_then_exactly_once(
    root: Path, tmp_path: Path, cli_log: Path
) -> None:
    rng = random.Random(20261123)
    # Every kind of fault, lighter than in test_exactly_once: the CLI backs off from 1 s up, as
    # configured for production, and the point here is the kills.
    faults = FaultOptions(
        error_rate=0.05,
        drop_rate=0.03,
        store_then_drop_rate=0.08,
        rate_limit_rate=0.03,
        retry_after=0.1,
        latency=0.3,
        latency_rate=0.2,
        fail_in_200_rate=0.02,
        seed=11,
    )
    with Emulator(EmulatorOptions(port=0, token_lifetime=3.0, faults=faults)) as emulator:
        cli = Cli(write_config(tmp_path / "cfg.json", emulator, root), cli_log)
        stop_writing = threading.Event()

        def writer() -> None:
            # Files keep arriving, also while the service is dead.
            for i in range(180):
                if stop_writing.wait(0.03):
                    return
                write_image(root / ("forest", "city", "sea")[i % 3] / f"img{i:04d}.png", i)

        thread = threading.Thread(target=writer, name="test-writer")
        thread.start()
        kills = 0
        try:
            for _ in range(5):
                cli.start()
                # Somewhere between "starting up" and "in the middle of uploads".
                stop_writing.wait(rng.uniform(0.5, 2.5))
                cli.kill()
                kills += 1
            thread.join(30)
            assert not thread.is_alive()
            written = 180
            injected = emulator.state()["faults"]
            if not (injected["store_then_drop"] and injected["drop"]):
                # On a loaded machine the kills may come before enough uploads were made for
                # the rates to draw the dangerous faults. Aim them at uploads of a few more
                # files, and kill the service once the server really lost an answer.
                emulator.set_faults(
                    FaultOptions(drop_rate=0.3, store_then_drop_rate=0.5, seed=5, routes=(UPLOADS,))
                )
                for i in range(180, 192):
                    write_image(root / ("forest", "city", "sea")[i % 3] / f"img{i:04d}.png", i)
                written = 192
                cli.start()
                wait_until(
                    lambda: all(emulator.state()["faults"][k] for k in ("store_then_drop", "drop")),
                    timeout=60,
                    message="a dropped and a stored-then-dropped upload",
                )
                cli.kill()
                kills += 1
                injected = emulator.state()["faults"]
            # The server recovers; one --once settles what is in doubt and sends the rest.
            emulator.set_faults(FaultOptions())
            code = cli.run_once()
            assert code == 0, f"--once did not finish cleanly:\n{cli.output()[-4000:]}"
        finally:
            stop_writing.set()
            thread.join(30)
            cli.ensure_dead()
        expected = expected_files(root)
        assert sum(expected.values()) == written
        assert_exactly_once(emulator, expected)
    counts = _uploaded(tmp_path / "state" / "ledger.sqlite3")
    assert sum(c["uploaded"] for c in counts.values()) == written, counts
    assert kills >= 5
    assert injected["store_then_drop"] > 0 and injected["drop"] > 0, injected


def _fill(root: Path, start: int) -> list[bytes]:
    """Five new images in each of two categories (MVI's minimum for a training)."""
    return [
        write_image(root / category / f"{category}{start + i}.png", start * 10 + i + offset)
        for category, offset in (("forest", 0), ("city", 500))
        for i in range(5)
    ]


def test_kill_around_the_training_request_trains_once_per_threshold(
    root: Path, tmp_path: Path, cli_log: Path
) -> None:
    task_route = "POST /dltasks"
    with Emulator(EmulatorOptions(port=0, training_seconds=0.3)) as emulator:
        config = write_config(
            tmp_path / "cfg.json",
            emulator,
            root,
            threshold={"upload": 5, "training": 10},
            model={"name": "clf", "action": "retrain"},
        )
        cli = Cli(config, cli_log)
        ledger_path = tmp_path / "state" / "ledger.sqlite3"

        def tasks() -> list[dict[str, Any]]:
            return list(emulator.state()["tasks"])

        def requests_to(route: str) -> int:
            return int(emulator.state()["requests"].get(route, 0))

        try:
            # 1. The request never gets an answer (5xx: not carried out) and the service dies
            #    right after: the next start finds no such task and asks again, once.
            emulator.set_faults(FaultOptions(error_rate=1.0, routes=(task_route,)))
            cli.start()
            bodies = _fill(root, 0)
            wait_until(lambda: requests_to(task_route) >= 1, timeout=20)
            cli.kill()
            assert tasks() == []
            emulator.set_faults(FaultOptions())
            cli.start()
            wait_until(lambda: [t for t in tasks() if t["status"] == "trained"], timeout=20)
            cli.stop()
            assert len(tasks()) == 1

            # 2. The server takes the request and the service dies before the answer: the next
            #    start finds the task by its name and follows it instead of training again.
            emulator.set_faults(FaultOptions(latency=1.5, latency_rate=1.0, routes=(task_route,)))
            asked = requests_to(task_route)
            cli.start()
            bodies += _fill(root, 1)
            wait_until(lambda: requests_to(task_route) > asked, timeout=20)
            cli.kill()  # the server is still holding the request
            wait_until(lambda: len(tasks()) == 2, timeout=5)  # ... and carries it out
            emulator.set_faults(FaultOptions())
            cli.start()
            wait_until(lambda: all(t["status"] == "trained" for t in tasks()), timeout=20)
            with Ledger(ledger_path, readonly=True) as ledger:
                wait_until(lambda: ledger.open_trainings() == [], timeout=20)
                last = ledger.last_training()
            cli.stop()
        finally:
            cli.ensure_dead()
        state = emulator.state()
    assert len(state["tasks"]) == 2, state["tasks"]
    first, second = sorted(state["tasks"], key=lambda t: t["created_at"])
    assert second["pretrained_model"] == first["_id"]
    assert last is not None and last.task_id == second["_id"] and last.state == "trained"
    assert state["concurrent_trainings_max"] == 1
    assert_exactly_once(emulator, {(c, sha(b)): 1 for c, b in _categorised(bodies)})
    output = cli.output()
    assert "never reached the server" in output
    assert "had reached the server" in output


def _categorised(bodies: list[bytes]) -> list[tuple[str, bytes]]:
    """``_fill`` writes five forest then five city images each time."""
    return [("forest" if (i % 10) < 5 else "city", body) for i, body in enumerate(bodies)]


def test_files_in_doubt_after_a_crash_do_not_wait_for_the_threshold_again(
    emulator: Emulator, root: Path, tmp_path: Path
) -> None:
    # A flush of 5 files (the threshold) was on its way when the service was killed; the
    # server never got 2 of them. Back to ``pending`` at the next start, they must be sent
    # then -- not wait until 3 more files arrive in the category.
    ledger_path = tmp_path / "state" / "ledger.sqlite3"
    bodies = [write_image(root / "forest" / f"f{i}.png", i) for i in range(2)]
    with Ledger(ledger_path) as ledger:
        ids = []
        for i in range(2):
            path = root / "forest" / f"f{i}.png"
            st = path.stat()
            ids.append(
                ledger.record(
                    root=str(root),
                    rel_path=f"forest/f{i}.png",
                    category="forest",
                    size=st.st_size,
                    mtime_ns=st.st_mtime_ns,
                    sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                    content_type="image/png",
                    skip_duplicates=True,
                ).row.id
            )
        ledger.begin_batch("forest", "a dataset", ids)  # the POST in flight at the kill
    config = config_for(
        emulator, root, threshold={"upload": 5, "training": 1000}, ledger=str(ledger_path)
    )
    with running(config):
        wait_until(lambda: sum(server_files(emulator).values()) == 2, timeout=10)
    assert_exactly_once(emulator, {("forest", sha(b)): 1 for b in bodies})
