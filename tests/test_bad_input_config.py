"""What paiv-sync does with a bad configuration (docs/what-happens-when.md).

The command line as a user runs it: a subprocess, a real configuration file, and for the
cases that get as far as the server, the emulator over loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from paiv_sync.emulator import Emulator
from paiv_sync.images import check_image

ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PAIV_", "NOTIFY_", "WATCHDOG_"))}


def paiv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paiv_sync", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=ENV,
    )


def good_config(emulator: Emulator | None, tmp_path: Path) -> dict[str, Any]:
    images = tmp_path / "images"
    (images / "forest").mkdir(parents=True, exist_ok=True)
    return {
        "credentials": {
            "endpoint": emulator.url if emulator else "https://mvi.example.com/api",
            "username": "admin",
            "password": "passw0rd",
        },
        "threshold": {"upload": 5, "training": 100},
        "dataset": {"name": "cfg"},
        "model": {"action": "nothing"},
        "folders": [str(images)],
        "ledger": str(tmp_path / "ledger.sqlite3"),
    }


def write(path: Path, content: str) -> Path:
    path.write_text(content)
    path.chmod(0o600)
    return path


def test_root_missing_at_start_exits_2(tmp_path: Path) -> None:
    data = good_config(None, tmp_path)
    missing = tmp_path / "not-mounted" / "images"
    data["folders"] = [data["folders"][0], str(missing)]
    config = write(tmp_path / "configuration.json", json.dumps(data))
    proc = paiv("--config", str(config))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"configuration.json: folders[1]: folder {missing} does not exist"
    ]
    assert not (tmp_path / "ledger.sqlite3").exists()  # nothing was started


def test_config_that_is_not_json_exits_2(tmp_path: Path) -> None:
    # A trailing comma, the most common slip when editing JSON by hand.
    text = json.dumps(good_config(None, tmp_path), indent=2).replace('"cfg"', '"cfg",')
    config = write(tmp_path / "configuration.json", text)
    proc = paiv("--config", str(config))
    assert proc.returncode == 2
    line = next(n for n, row in enumerate(text.splitlines(), 1) if '"cfg",' in row)
    assert proc.stderr.splitlines() == [
        f"configuration.json: not valid JSON: remove the trailing comma at the end of line {line}"
    ]


def test_every_trailing_comma_is_named_at_once_and_then_what_else_is_wrong(
    tmp_path: Path,
) -> None:
    text = json.dumps(good_config(None, tmp_path), indent=2)
    text = text.replace('"cfg"', '"cfg",').replace('"training": 100', '"training": 100,')
    text = text.replace('"nothing"', '"no\tthing"')  # a raw tab inside a string
    config = write(tmp_path / "configuration.json", text)
    proc = paiv("--config", str(config))
    assert proc.returncode == 2
    rows = text.splitlines()
    commas = [n for n, row in enumerate(rows, 1) if row.endswith(('"cfg",', '"training": 100,'))]
    assert len(commas) == 2
    lines = proc.stderr.splitlines()
    assert lines[:2] == [
        f"configuration.json: not valid JSON: remove the trailing comma at the end of line {n}"
        for n in sorted(commas)
    ]
    tab_line = next(n for n, row in enumerate(rows, 1) if "\t" in row)
    assert len(lines) == 3
    assert lines[2].startswith(f"configuration.json: not valid JSON at line {tab_line}, column ")
    assert lines[2].endswith(
        "a string holds a raw tab or line break; write it as \\t or \\n, or close the "
        "string's quote before the line ends"
    )
    assert "Traceback" not in proc.stderr


def test_config_with_wrong_types_reports_every_problem_at_once(tmp_path: Path) -> None:
    data = good_config(None, tmp_path)
    data["credentials"]["password"] = 98765432  # a number: its type is named, never its value
    data["threshold"] = {"upload": "ten", "training": 0}
    data["recursive"] = "yes"
    data["time"] = -1
    data["folders"] = str(tmp_path / "images")  # a string is accepted as one folder
    data["recusive"] = 1  # and a typo, reported along with the errors
    config = write(tmp_path / "configuration.json", json.dumps(data))
    proc = paiv("check", "--config", str(config))
    assert proc.returncode == 2
    problems = proc.stderr.splitlines()
    for expected in (
        "configuration.json: credentials.password: must be a string, got a number",
        'configuration.json: threshold.upload: must be a positive integer, got "ten"',
        "configuration.json: threshold.training: must be a positive integer, got 0",
        'configuration.json: recursive: must be true or false (1 or 0 also work), got "yes"',
        "configuration.json: time: must be a number of at least 0, got -1",
        'configuration.json: recusive: unknown key, ignored (did you mean "recursive"?)',
    ):
        assert expected in problems, proc.stderr
    assert "98765432" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_unknown_keys_are_warned_with_a_did_you_mean(emulator: Emulator, tmp_path: Path) -> None:
    data = good_config(emulator, tmp_path)
    data["recusive"] = 0
    data["threshold"]["uplaod"] = 3
    data["upload"] = 3  # right name, wrong place
    data["_comment"] = "keys starting with _ are comments"
    config = write(tmp_path / "configuration.json", json.dumps(data))
    proc = paiv("check", "--config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warnings = [
        line.split(" WARNING ", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if " WARNING " in line
    ]
    assert warnings == [
        'configuration.json: threshold.uplaod: unknown key, ignored (did you mean "upload"?)',
        'configuration.json: recusive: unknown key, ignored (did you mean "recursive"?)',
        'configuration.json: upload: unknown key, ignored (it belongs in "threshold.upload")',
    ]
    assert "authentication: ok" in proc.stdout


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_image_check_of_a_named_pipe_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    said: list[str | None] = []
    worker = threading.Thread(target=lambda: said.append(check_image(pipe)), name="test-check")
    worker.start()
    worker.join(5)
    if worker.is_alive():  # the check hangs in open(): give it a writer so the thread ends
        with pipe.open("wb"):
            time.sleep(0.1)
        worker.join(5)
        pytest.fail("check_image waited for a writer on a named pipe")
    assert said == ["not a regular file (a named pipe, socket or device)"]
