"""The emulator's command line (as a subprocess) and its TLS mode."""

from __future__ import annotations

import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from paiv_sync.emulator import Emulator, EmulatorOptions
from paiv_sync.emulator.cli import main

TIMEOUT = 10
LOGIN = {"grant_type": "password", "username": "admin", "password": "passw0rd"}


def read_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The first line the process prints, waiting at most ``timeout`` seconds."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError(f"no output within {timeout} s")
    return process.stdout.readline()


@pytest.fixture
def run_cli() -> Iterator[list[subprocess.Popen[str]]]:
    """Collects the CLI processes a test starts, and kills any still running at the end."""
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=TIMEOUT)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def start(processes: list[subprocess.Popen[str]], *args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "paiv_sync.emulator", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    processes.append(process)
    return process


def test_cli_prints_its_url_serves_and_exits_0_on_sigterm(
    run_cli: list[subprocess.Popen[str]],
) -> None:
    started = time.monotonic()
    process = start(
        run_cli,
        "--base-path",
        "/visual-insights/api",
        "--user",
        "alice:s3cret:with-colon",
        "--training-seconds",
        "0.1",
        "--seed",
        "5",
    )
    line = read_line(process, timeout=15)
    match = re.fullmatch(
        r"paiv-sync emulator serving (http://127\.0\.0\.1:\d+/visual-insights/api)\n", line
    )
    assert match, line
    url = match.group(1)
    assert time.monotonic() - started < 10
    with requests.Session() as session:
        refused = session.post(f"{url}/tokens", json=LOGIN, timeout=TIMEOUT)
        assert refused.status_code == 401  # --user replaces the default admin
        login = {**LOGIN, "username": "alice", "password": "s3cret:with-colon"}
        token = session.post(f"{url}/tokens", json=login, timeout=TIMEOUT).json()["token"]
        listing = session.get(f"{url}/datasets", headers={"X-Auth-Token": token}, timeout=TIMEOUT)
        assert listing.status_code == 200 and listing.json() == []
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=TIMEOUT) == 0
    assert process.stderr is not None
    assert "s3cret" not in process.stderr.read()


def test_cli_tls_prints_the_certificate_and_exits_0_on_sigint(
    run_cli: list[subprocess.Popen[str]],
) -> None:
    process = start(run_cli, "--tls", "--api-key", "k1")
    line = read_line(process, timeout=15)
    match = re.fullmatch(r"paiv-sync emulator serving (https://\S+) with certificate (\S+)\n", line)
    assert match, line
    url, cert = match.groups()
    assert Path(cert).is_file()
    response = requests.get(
        f"{url}/datasets", headers={"X-Auth-Token": "k1"}, verify=cert, timeout=TIMEOUT
    )
    assert response.status_code == 200
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=TIMEOUT) == 0
    assert not Path(cert).exists()  # the temporary certificate is cleaned up


@pytest.mark.parametrize(
    "argv",
    [["--error-rate", "2"], ["--user", "no-colon-secret"], ["--training-outcome", "maybe"]],
)
def test_cli_refuses_bad_arguments_with_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "no-colon-secret" not in capsys.readouterr().err


def test_help_marks_what_is_guessed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "[guess]" in out and "[doc]" in out and "--store-then-drop-rate" in out


def test_tls_mode_verifies_against_the_generated_certificate() -> None:
    with Emulator(EmulatorOptions(tls=True)) as emu:
        assert emu.url.startswith("https://127.0.0.1:")
        assert emu.cert_path is not None and emu.cert_path.is_file()
        cert = emu.cert_path
        with requests.Session() as session:
            response = session.post(
                f"{emu.url}/tokens", json=LOGIN, verify=str(cert), timeout=TIMEOUT
            )
            assert response.status_code == 200 and response.json()["result"] == "success"
            localhost = emu.root_url.replace("127.0.0.1", "localhost")
            state = session.get(f"{localhost}/_emulator/state", verify=str(cert), timeout=TIMEOUT)
            assert state.status_code == 200
        # Without the certificate the client must refuse the self-signed server.
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{emu.url}/datasets", timeout=TIMEOUT)
    assert not cert.exists()
