"""The command line as a user runs it: a subprocess, real files, the emulator over loopback."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from paiv_sync.emulator import Emulator
from tests.e2e import server_count, server_files, sha, write_image
from tests.helpers import wait_until

ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PAIV_", "NOTIFY_", "WATCHDOG_"))}


def paiv(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paiv_sync", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env or ENV,
        cwd=cwd,
    )


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for category in ("forest", "city"):
        (root / category).mkdir(parents=True)
    return root


def base_config(emulator: Emulator, root: Path, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "credentials": {
            "endpoint": emulator.url,
            "username": "admin",
            "password": "passw0rd",
            "timeout": 5,
        },
        "threshold": {"upload": 100, "training": 1000},
        "time": 0.2,
        "settle_time": 0.1,
        "dataset": {"name": "cli"},
        "model": {"name": "cli", "action": "nothing"},
        "folders": [str(root)],
        "ledger": str(root.parent / "ledger.sqlite3"),
    }
    data.update(changes)
    return data


# -- configuration errors: exit 2, one clear sentence each, no traceback ------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON"),
        ('{"threshold": {"upload": -3}}', "threshold.upload"),
        ('{"model": {"action": "sometimes"}}', "model.action"),
        ('{"folders": ["/no/such/folder/anywhere"]}', "/no/such/folder/anywhere"),
        ("[1, 2]", "object"),
    ],
)
def test_config_errors_exit_2_with_a_sentence(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "configuration.json"
    path.write_text(content)
    proc = paiv("--config", str(path))
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "configuration.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_file_and_missing_option(tmp_path: Path) -> None:
    proc = paiv("--config", str(tmp_path / "nope.json"))
    assert proc.returncode == 2 and "nope.json" in proc.stderr and "Traceback" not in proc.stderr
    proc = paiv()
    assert proc.returncode == 2 and "--config" in proc.stderr


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "configuration.json"
    path.write_text(
        json.dumps(
            {
                "credentials": {
                    "endpoint": "https://host",
                    "username": "u",
                    "password": "secret-pw",
                },
                "threshold": {"upload": "ten"},
                "dataset": {"name": "d", "action": "merge"},
                "folders": [str(tmp_path / "missing")],
            }
        )
    )
    proc = paiv("check", "--config", str(path))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("configuration.json: ")]
    assert len(lines) >= 3, proc.stderr
    assert "secret-pw" not in proc.stderr + proc.stdout


# -- commands ------------------------------------------------------------------------------


def test_demo_exits_0_and_shows_a_trained_model() -> None:
    proc = paiv("demo", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "trained" in proc.stdout
    assert "uploaded exactly once" in proc.stdout


def test_once_uploads_everything_then_nothing_twice(emulator: Emulator, tree: Path) -> None:
    bodies = [write_image(tree / "forest" / f"f{i}.png", i) for i in range(3)]
    bodies += [write_image(tree / "city" / f"c{i}.png", 10 + i) for i in range(2)]
    config = write_config(tree.parent / "configuration.json", base_config(emulator, tree))
    first = paiv("--config", str(config), "--once")
    assert first.returncode == 0, first.stderr
    assert server_count(emulator) == 5
    second = paiv("--config", str(config), "--once")
    assert second.returncode == 0, second.stderr
    held = server_files(emulator)
    assert sum(held.values()) == 5
    assert held[("forest", sha(bodies[0]))] == 1
    status = paiv("status", "--config", str(config))
    assert status.returncode == 0
    forest = next(line for line in status.stdout.splitlines() if line.startswith("forest"))
    assert forest.split()[3] == "3"  # uploaded
    as_json = paiv("status", "--config", str(config), "--json")
    assert as_json.returncode == 0, as_json.stderr
    facts = json.loads(as_json.stdout)
    assert facts["categories"]["forest"]["uploaded"] == 3
    assert facts["categories"]["city"]["uploaded"] == 2
    assert facts["totals"]["uploaded"] == 5 and facts["totals"]["pending"] == 0
    assert facts["dataset"]["name"] == "cli" and facts["dataset"]["id"]
    assert facts["rejected"] == [] and facts["kept"] == {}
    assert set(facts["training"]) == {"uploads_since_last", "threshold", "action", "last"}


def test_once_exits_1_when_the_server_is_unreachable(tree: Path) -> None:
    write_image(tree / "forest" / "a.png", 1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = {
        "credentials": {
            "endpoint": f"http://127.0.0.1:{port}/api",
            "username": "admin",
            "password": "passw0rd",
            "timeout": 2,
        },
        "dataset": {"name": "x"},
        "folders": [str(tree)],
        "ledger": str(tree.parent / "ledger.sqlite3"),
        "retry": {"initial": 0.1, "maximum": 0.2},
    }
    config = write_config(tree.parent / "configuration.json", data)
    proc = paiv("--config", str(config), "--once", timeout=120)
    assert proc.returncode == 1
    assert "127.0.0.1" in proc.stderr and "Traceback" not in proc.stderr
    # Five tries, as for every request under --once, then it gives up.
    assert proc.stderr.count("cannot use the server at") == 5


def test_check_reports_a_wrong_password_plainly(emulator: Emulator, tree: Path) -> None:
    data = base_config(emulator, tree)
    data["credentials"]["password"] = "wrong-password-123"
    config = write_config(tree.parent / "configuration.json", data)
    proc = paiv("check", "--config", str(config))
    assert proc.returncode == 1
    assert "refused the user name or password" in proc.stdout
    assert "wrong-password-123" not in proc.stdout + proc.stderr


def test_service_command_prints_a_filled_in_unit(emulator: Emulator, tree: Path) -> None:
    config = write_config(tree.parent / "configuration.json", base_config(emulator, tree))
    proc = paiv("service", "systemd", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "Type=notify" in proc.stdout
    assert str(config) in proc.stdout


# -- the foreground service: readiness, SIGHUP, SIGTERM ---------------------------------


class NotifySocket:
    """A real datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.path = path
        self.messages: list[str] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._read, name="test-notify")
        self.thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.extend(self.sock.recv(4096).decode().splitlines())
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.close()


def test_foreground_service_ready_reload_and_sigterm(
    emulator: Emulator, tree: Path, notify_socket: NotifySocket
) -> None:
    config_path = write_config(tree.parent / "configuration.json", base_config(emulator, tree))
    env = dict(ENV, NOTIFY_SOCKET=str(notify_socket.path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "paiv_sync", "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_until(lambda: "READY=1" in notify_socket.messages, timeout=20)
        for i in range(3):
            write_image(tree / "forest" / f"f{i}.png", i)
        # Threshold 100: nothing goes up. Lower it with a reload.
        wait_until(
            lambda: any(m.startswith("STATUS=3 pending") for m in notify_socket.messages),
            timeout=20,
        )
        assert server_count(emulator) == 0
        # An invalid new configuration is refused and the old one kept.
        config_path.write_text("{broken")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: notify_socket.messages.count("READY=1") >= 2, timeout=20)
        assert proc.poll() is None
        write_config(
            config_path, base_config(emulator, tree, threshold={"upload": 2, "training": 1000})
        )
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: server_count(emulator) == 3, timeout=20)
        proc.send_signal(signal.SIGTERM)
        try:
            _out, err = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
            raise AssertionError(f"no exit within 40 s of SIGTERM; its log:\n{err}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "the new configuration is invalid" in err
    messages = notify_socket.messages  # one per line of each datagram
    reloads = [i for i, m in enumerate(messages) if m == "RELOADING=1"]
    assert len(reloads) == 2
    assert all(messages[i + 1].startswith("MONOTONIC_USEC=") for i in reloads)
    statuses = [m for m in notify_socket.messages if m.startswith("STATUS=")]
    rejected = [i for i, m in enumerate(statuses) if "reload rejected" in m]
    assert rejected, statuses  # said while the old configuration ran on
    assert "reload rejected" not in statuses[-1]  # and no longer once a reload went through
    assert notify_socket.messages[-1] == "STOPPING=1"


def test_log_formats_json_and_journald(emulator: Emulator, tree: Path) -> None:
    config = write_config(tree.parent / "configuration.json", base_config(emulator, tree))
    proc = paiv("check", "--config", str(config), "--log-format", "json")
    assert proc.returncode == 0, proc.stderr
    entries = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    assert any(e["level"] == "info" and "authenticated as admin" in e["message"] for e in entries)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]) for e in entries)
    # Under journald: JOURNAL_STREAM names stderr's device and inode.
    read_end, write_end = os.pipe()
    info = os.fstat(write_end)
    with os.fdopen(read_end) as journal:
        done = subprocess.run(
            [sys.executable, "-m", "paiv_sync", "check", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=write_end,
            env=dict(ENV, JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}"),
            timeout=60,
            check=False,
        )
        os.close(write_end)
        lines = journal.read().splitlines()
    assert done.returncode == 0, lines
    assert any(line.startswith("<6>") and "authenticated as admin" in line for line in lines)
    # A JOURNAL_STREAM inherited by a process whose stderr is not the journal: plain lines.
    inherited = paiv("check", "--config", str(config), env=dict(ENV, JOURNAL_STREAM="8:1234"))
    assert inherited.returncode == 0, inherited.stderr
    assert not any(line.startswith("<") for line in inherited.stderr.splitlines())
    assert "authenticated as admin" in inherited.stderr


def test_every_line_of_a_journald_record_carries_its_priority() -> None:
    from paiv_sync.cli import _JournalFormatter

    record = logging.LogRecord(
        "paiv_sync.x", logging.ERROR, __file__, 1, "reload refused:\n%s", ("a: bad\nb: bad",), None
    )
    assert _JournalFormatter("%(message)s").format(record).splitlines() == [
        "<3>paiv_sync.x: reload refused:",
        "<3>  a: bad",
        "<3>  b: bad",
    ]


# -- one ledger per configuration (docs/what-happens-when.md, 26a and 26b) -----------------


def _station(tmp_path: Path, emulator: Emulator, name: str) -> tuple[Path, Path]:
    """``<name>/configuration.json`` feeding dataset ``name``, with the default ledger path."""
    root = tmp_path / name / "images"
    (root / "forest").mkdir(parents=True)
    data = base_config(
        emulator, root, dataset={"name": name}, threshold={"upload": 1, "training": 1000}
    )
    del data["ledger"]
    return write_config(tmp_path / name / "configuration.json", data), root


def _held(emulator: Emulator) -> dict[str, list[str]]:
    """``dataset name -> sorted sha256 of its files``."""
    return {
        d["name"]: sorted(f["sha256"] for f in d["files"]) for d in emulator.state()["datasets"]
    }


def _once(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = paiv("--config", str(config), "--once", env=env)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_two_configurations_of_one_file_name_keep_their_own_ledgers(
    tmp_path: Path, emulator: Emulator
) -> None:
    env = ENV | {"STATE_DIRECTORY": str(tmp_path / "state")}
    cam1, root1 = _station(tmp_path, emulator, "cam1")
    cam2, root2 = _station(tmp_path, emulator, "cam2")
    a = write_image(root1 / "forest" / "a.png", 1)
    b = write_image(root2 / "forest" / "b.png", 2)
    _once(cam1, env)
    _once(cam2, env)
    c = write_image(root1 / "forest" / "c.png", 3)
    _once(cam1, env)
    _once(cam2, env)
    assert _held(emulator) == {"cam1": sorted([sha(a), sha(c)]), "cam2": [sha(b)]}
    assert len(list((tmp_path / "state").glob("configuration-*.ledger.sqlite3"))) == 2


def test_a_ledger_refuses_another_dataset_until_rebound(tmp_path: Path, emulator: Emulator) -> None:
    env = ENV | {"STATE_DIRECTORY": str(tmp_path / "state")}
    cam1, root = _station(tmp_path, emulator, "cam1")
    a = write_image(root / "forest" / "a.png", 1)
    _once(cam1, env)
    data = json.loads(cam1.read_text())
    data["dataset"] = {"name": "renamed"}
    write_config(cam1, data)
    b = write_image(root / "forest" / "b.png", 2)
    proc = paiv("--config", str(cam1), "--once", env=env)
    assert proc.returncode == 2
    assert "records uploads to the dataset 'cam1', not 'renamed'" in proc.stderr
    assert "paiv-sync rebind" in proc.stderr and "Traceback" not in proc.stderr
    assert _held(emulator) == {"cam1": [sha(a)]}
    # The dataset was renamed on the server: rebind, and the ledger goes on feeding it.
    proc = paiv("rebind", "--config", str(cam1), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "dataset: cam1 -> renamed" in proc.stdout
    _once(cam1, env)
    assert _held(emulator) == {"cam1": sorted([sha(a), sha(b)])}


def test_a_ledger_of_an_earlier_version_is_kept_by_its_configuration(
    tmp_path: Path, emulator: Emulator
) -> None:
    import sqlite3

    state = tmp_path / "state"
    env = ENV | {"STATE_DIRECTORY": str(state)}
    cam1, root1 = _station(tmp_path, emulator, "cam1")
    a = write_image(root1 / "forest" / "a.png", 1)
    _once(cam1, env)
    # What an earlier version left: the ledger under the plain name, recording no owner.
    (ledger,) = state.glob("configuration-*.ledger.sqlite3")
    legacy = state / "configuration.ledger.sqlite3"
    ledger.rename(legacy)
    with contextlib.closing(sqlite3.connect(legacy)) as db, db:
        db.execute("DELETE FROM meta WHERE key = 'config_path'")
    db.close()
    b = write_image(root1 / "forest" / "b.png", 2)
    _once(cam1, env)
    assert _held(emulator) == {"cam1": sorted([sha(a), sha(b)])}  # a is not sent again
    assert not list(state.glob("configuration-*.ledger.sqlite3"))
    # Another configuration of the same name gets its own ledger, checked against its dataset.
    cam2, root2 = _station(tmp_path, emulator, "cam2")
    c = write_image(root2 / "forest" / "c.png", 3)
    proc = _once(cam2, env)
    assert "shared with another configuration of the same file name" in proc.stderr
    assert len(list(state.glob("configuration-*.ledger.sqlite3"))) == 1
    assert _held(emulator) == {"cam1": sorted([sha(a), sha(b)]), "cam2": [sha(c)]}


def test_retry_puts_rejected_files_back_in_line(tmp_path: Path, emulator: Emulator) -> None:
    from paiv_sync.ledger import REFUSED_PREFIX, Ledger

    root = tmp_path / "images"
    (root / "forest").mkdir(parents=True)
    config = write_config(tmp_path / "configuration.json", base_config(emulator, root))
    ledger_path = tmp_path / "ledger.sqlite3"
    with Ledger(ledger_path) as ledger:
        ids = []
        for name in ("failed.png", "refused.png"):
            outcome = ledger.record(
                root=str(root),
                rel_path=f"forest/{name}",
                category="forest",
                size=10,
                mtime_ns=1,
                sha256=name,
                content_type="image/png",
                skip_duplicates=False,
            )
            ids.append(outcome.row.id)
        ledger.begin_batch("forest", "d1", ids)
        ledger.mark_rejected(
            [
                (ids[0], "the server failed it for 15 min (Internal error)"),
                (ids[1], REFUSED_PREFIX + "not a supported image"),
            ]
        )
        ledger.reject(
            root=str(root),
            rel_path="forest/text.png",
            category="forest",
            size=4,
            mtime_ns=1,
            reason="not an image (starts with text)",
        )
        # While the service holds the ledger, retry says what to do instead.
        proc = paiv("retry", "--config", str(config))
        assert proc.returncode == 1 and "Stop the service first" in proc.stderr
    proc = paiv("retry", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "1 files will be sent again at the next run" in proc.stdout
    with Ledger(ledger_path, readonly=True) as ledger:
        assert [r.rel_path for r in ledger.pending()] == ["forest/failed.png"]
        assert {r.rel_path for r in ledger.rejected()} == {"forest/refused.png", "forest/text.png"}
    proc = paiv("retry", "--rejected", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert "1 files will be sent again" in proc.stdout
    assert "1 files rejected before upload will be checked again at the next scan" in proc.stdout
    with Ledger(ledger_path, readonly=True) as ledger:
        assert [r.rel_path for r in ledger.pending()] == ["forest/failed.png", "forest/refused.png"]
        assert ledger.rejected() == []


def test_status_says_which_pending_files_an_ignore_rule_keeps_out(
    emulator: Emulator, tree: Path
) -> None:
    from paiv_sync.ledger import Ledger

    data = base_config(emulator, tree)
    for i, rel in enumerate(("forest/a.png", "forest/rejects/b.png", "city/c.png")):
        write_image(tree / rel, i)
    with Ledger(Path(data["ledger"])) as ledger:  # pending, as an older run left them
        for i, rel in enumerate(("forest/a.png", "forest/rejects/b.png", "city/c.png")):
            ledger.record(
                root=str(tree),
                rel_path=rel,
                category=rel.split("/")[0],
                size=1,
                mtime_ns=1,
                sha256=f"h{i}",
                content_type="image/png",
                skip_duplicates=False,
            )
    (tree / "city" / ".paivignore").write_text("c.png\n")
    data["ignore"] = ["rejects/"]
    config = write_config(tree.parent / "configuration.json", data)
    status = paiv("status", "--config", str(config))
    assert status.returncode == 0, status.stderr
    said = next(line for line in status.stdout.splitlines() if line.startswith("ignored:"))
    assert said.startswith(
        "ignored: 2 pending files are kept out by an ignore rule now and will not be sent (first: "
    )
    assert (
        'forest/rejects/b.png, ignored by "rejects/" in ignore)' in said
        or f'city/c.png, ignored by "c.png" in {tree / "city" / ".paivignore"})' in said
    )


# -- init and finding the configuration ----------------------------------------------------


def test_init_writes_a_private_starting_configuration_that_check_accepts_once_filled(
    emulator: Emulator, tree: Path
) -> None:
    path = tree.parent / "conf" / "configuration.json"
    made = paiv(
        "init",
        str(path),
        "--endpoint",
        emulator.url,
        "--username",
        "admin",
        "--dataset",
        "parts",
        "--folder",
        str(tree),
    )
    assert made.returncode == 0, made.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    data = json.loads(path.read_text())
    assert data["credentials"]["endpoint"] == emulator.url and "port" not in data["credentials"]
    assert data["dataset"]["name"] == "parts" and data["folders"] == [str(tree)]
    assert "_batch_size" in data  # the optional keys are there to switch on
    # Only the password is left to give: check says so, and passes once it is given.
    check = paiv("check", "--config", str(path))
    assert check.returncode == 2
    assert check.stderr.strip().splitlines()[-1] == (
        "configuration.json: credentials.password: still holds the template placeholder; "
        "give the real value"
    )
    passed = paiv("check", "--config", str(path), env=ENV | {"PAIV_PASSWORD": "passw0rd"})
    assert passed.returncode == 0, passed.stdout + passed.stderr
    # It never overwrites.
    again = paiv("init", str(path), "--dataset", "other")
    assert again.returncode == 2 and "exists; not overwritten" in again.stderr
    assert json.loads(path.read_text())["dataset"]["name"] == "parts"


def test_init_for_an_api_key_leaves_no_password_keys(tmp_path: Path) -> None:
    path = tmp_path / "configuration.json"
    assert paiv("init", str(path), "--api-key").returncode == 0
    credentials = json.loads(path.read_text())["credentials"]
    assert "password" not in credentials and "username" not in credentials
    assert credentials["api_key"] == "<api_key>"


def test_without_config_the_usual_places_are_searched(emulator: Emulator, tree: Path) -> None:
    home = tree.parent / "home"
    home.mkdir()
    env = {k: v for k, v in ENV.items() if k not in ("PAIV_CONFIG", "XDG_CONFIG_HOME")}
    env["HOME"] = str(home)
    nowhere = tree.parent / "empty"
    nowhere.mkdir()
    missing = paiv("status", env=env, cwd=nowhere)
    assert missing.returncode == 2
    assert "no configuration found (looked for " in missing.stderr
    assert str(nowhere / "configuration.json") in missing.stderr
    assert str(home / ".config" / "paiv-sync" / "configuration.json") in missing.stderr
    assert "paiv-sync init" in missing.stderr
    # In the user's configuration folder (what the old script read, ./configuration.json,
    # would win over it).
    user_config = home / ".config" / "paiv-sync" / "configuration.json"
    user_config.parent.mkdir(parents=True)
    write_config(user_config, base_config(emulator, tree))
    found = paiv("check", env=env, cwd=nowhere)
    assert found.returncode == 0, found.stderr
    assert f"using the configuration {user_config} (found in" in found.stderr
    # $PAIV_CONFIG names the file to use, and its absence is the error.
    named = paiv("status", env=env | {"PAIV_CONFIG": str(tree.parent / "no.json")}, cwd=nowhere)
    assert named.returncode == 2
    assert f"the file {tree.parent / 'no.json'} does not exist" in named.stderr


# -- for scripts and terminals -------------------------------------------------------------


def test_status_into_a_closed_pipe_exits_quietly(emulator: Emulator, tree: Path) -> None:
    from paiv_sync.ledger import Ledger

    data = base_config(emulator, tree)
    Ledger(Path(data["ledger"])).close()
    config = write_config(tree.parent / "configuration.json", data)
    with subprocess.Popen(
        [sys.executable, "-m", "paiv_sync", "status", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # as `| head` does once it has its lines: every write now fails
        err = proc.stderr.read()
        assert proc.wait(timeout=30) == 0, err
    assert "BrokenPipe" not in err and "Traceback" not in err


def test_log_level_in_capitals_and_demo_with_a_config(emulator: Emulator, tree: Path) -> None:
    config = write_config(tree.parent / "configuration.json", base_config(emulator, tree))
    debug = paiv("--log-level", "DEBUG", "check", "--config", str(config))
    assert debug.returncode == 0, debug.stderr
    assert " DEBUG " in debug.stderr
    demo = paiv("demo", "--config", str(config))
    assert demo.returncode == 2
    assert "demo runs against its own emulator and takes no --config" in demo.stderr


def test_ctrl_c_during_once_exits_130(tree: Path) -> None:
    write_image(tree / "forest" / "a.png", 1)
    with socket.socket() as silent:  # accepts and never answers: --once is busy connecting
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        data = {
            "credentials": {
                "endpoint": f"http://127.0.0.1:{silent.getsockname()[1]}/api",
                "username": "admin",
                "password": "passw0rd",
                "timeout": 30,
            },
            "dataset": {"name": "x"},
            "folders": [str(tree)],
            "ledger": str(tree.parent / "ledger.sqlite3"),
        }
        config = write_config(tree.parent / "configuration.json", data)
        with subprocess.Popen(
            [sys.executable, "-m", "paiv_sync", "--config", str(config), "--once"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        ) as proc:
            silent.settimeout(30)
            connection, _ = silent.accept()  # it is running, and waiting for the server
            try:
                proc.send_signal(signal.SIGINT)
                _, err = proc.communicate(timeout=30)
            finally:
                connection.close()
    assert proc.returncode == 130, err
    assert "received SIGINT; stopping" in err


def test_a_restart_lists_the_datasets_categories_once_not_once_each(
    emulator: Emulator, tree: Path
) -> None:
    names = [f"cat{i}" for i in range(6)]
    for i, name in enumerate(names):
        write_image(tree / name / "a.png", i)
    config = write_config(tree.parent / "configuration.json", base_config(emulator, tree))
    assert paiv("--config", str(config), "--once").returncode == 0
    for i, name in enumerate(names):
        write_image(tree / name / "b.png", 100 + i)
    before = emulator.state()["requests"].get("GET /datasets/{id}/categories", 0)
    again = paiv("--config", str(config), "--once")
    assert again.returncode == 0, again.stderr
    assert server_count(emulator) == 12
    listings = emulator.state()["requests"].get("GET /datasets/{id}/categories", 0) - before
    # Before: one listing per category for the duplicate check and one per category again
    # to find its id (12 here; 400 with 200 categories).
    assert listings == 1
