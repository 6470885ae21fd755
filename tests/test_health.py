"""/healthz and /metrics of a running service, over real HTTP."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import requests

from paiv_sync.emulator import Emulator
from paiv_sync.health import HealthServer
from tests.e2e import config_for, running, server_count, sha, write_image
from tests.helpers import wait_until


def test_healthz_and_metrics_reflect_the_ledger(emulator: Emulator, tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "forest").mkdir(parents=True)
    config = config_for(emulator, root, threshold={"upload": 2, "training": 1000})
    with running(config) as runner:
        health = HealthServer(runner.service).start()
        try:
            with requests.Session() as http:
                ok = http.get(f"{health.url}/healthz", timeout=5)
                assert ok.status_code == 200 and ok.json()["status"] == "ok"
                write_image(root / "forest" / "a.png", 1)
                write_image(root / "forest" / "b.png", 2)
                wait_until(lambda: server_count(emulator) == 2, timeout=15)
                wait_until(lambda: runner.service.last_upload_time is not None, timeout=5)
                text = http.get(f"{health.url}/metrics", timeout=5).text
                missing = http.get(f"{health.url}/nothing", timeout=5)
        finally:
            health.stop()
    assert 'paiv_sync_files{category="forest",state="uploaded"} 2.0' in text
    assert "paiv_sync_uploads_total 2.0" in text
    assert "paiv_sync_server_connected 1.0" in text
    assert "paiv_sync_healthy 1.0" in text
    assert missing.status_code == 404


def test_health_port_comes_from_the_configuration(emulator: Emulator, tmp_path: Path) -> None:
    from paiv_sync.config import parse_config

    root = tmp_path / "images"
    root.mkdir()
    base = {
        "credentials": {"endpoint": emulator.url, "username": "a", "password": "b"},
        "dataset": {"name": "d"},
        "folders": [str(root)],
        "ledger": str(tmp_path / "l.sqlite3"),
    }
    assert parse_config(base, source=None, env={}).health_port is None
    assert parse_config({**base, "health_port": 9464}, source=None, env={}).health_port == 9464


def test_a_long_server_outage_is_not_taken_for_a_stuck_worker(
    emulator: Emulator, tmp_path: Path
) -> None:
    # The case a user met: systemd's watchdog killed the service during a 5-minute outage,
    # because an upload worker retrying a request looked as if it had stopped working.
    from paiv_sync.emulator import FaultOptions
    from tests.test_bad_input_files import SkipClock, ledger_of, service_running

    root = tmp_path / "images"
    (root / "forest").mkdir(parents=True)
    config = config_for(
        emulator, root, threshold={"upload": 1, "training": 1000}, skip_duplicates=0
    )
    clock = SkipClock()
    with service_running(config, clock) as service:
        assert service.healthy() == (True, "ok")
        emulator.set_faults(FaultOptions(error_rate=1.0))
        body = write_image(root / "forest" / "a.png", 1)
        # The worker is in the middle of retrying: the server has failed it a few times.
        wait_until(lambda: emulator.state()["faults"]["error"] >= 5, timeout=30)
        clock.advance(600)  # ten minutes of outage
        # Each retry is a sign of life: the next one makes the service healthy again.
        wait_until(lambda: service.healthy()[0], timeout=10, message="healthy while retrying")
        emulator.set_faults(FaultOptions())
        wait_until(lambda: server_count(emulator) == 1, timeout=30, message="a.png stored")
        wait_until(
            lambda: ledger_of(service).counts()["forest"]["uploaded"] == 1,
            timeout=10,
            message="a.png recorded as uploaded",
        )
    held = [f["sha256"] for d in emulator.state()["datasets"] for f in d["files"]]
    assert held == [sha(body)]


def test_an_outage_met_by_an_upload_shows_in_the_metrics_and_its_end_too(
    emulator: Emulator, tmp_path: Path
) -> None:
    # Measured before: with the server failing every upload, /metrics kept
    # server_connected 1 and counted no retry; only the connect step was looked at.
    from paiv_sync.emulator import FaultOptions

    root = tmp_path / "images"
    (root / "forest").mkdir(parents=True)
    config = config_for(emulator, root, threshold={"upload": 1, "training": 1000})
    with running(config) as runner:
        health = HealthServer(runner.service).start()
        try:
            with requests.Session() as http:

                def metrics() -> str:
                    return http.get(f"{health.url}/metrics", timeout=5).text

                write_image(root / "forest" / "a.png", 1)
                wait_until(lambda: server_count(emulator) == 1, timeout=15)
                wait_until(lambda: "paiv_sync_server_connected 1.0" in metrics(), timeout=10)
                emulator.set_faults(FaultOptions(error_rate=1.0))
                write_image(root / "forest" / "b.png", 2)
                wait_until(lambda: emulator.state()["faults"]["error"] >= 2, timeout=15)
                down = metrics()
                live = http.get(f"{health.url}/livez", timeout=5)
                ready = http.get(f"{health.url}/readyz", timeout=5)
                emulator.set_faults(FaultOptions())
                wait_until(lambda: server_count(emulator) == 2, timeout=30)
                wait_until(lambda: "paiv_sync_server_connected 1.0" in metrics(), timeout=10)
                ready_again = http.get(f"{health.url}/readyz", timeout=5)
        finally:
            health.stop()
    assert "paiv_sync_server_connected 0.0" in down
    # The process works (live), but cannot do its job (not ready), and says why.
    assert live.status_code == 200 and live.json()["status"] == "ok"
    assert ready.status_code == 503
    assert ready.json()["status"] == "not ready"
    assert any("is not reachable" in reason for reason in ready.json()["reasons"])
    assert ready_again.status_code == 200 and ready_again.json() == {
        "status": "ready",
        "reasons": [],
    }
    retried = [line for line in down.splitlines() if line.startswith("paiv_sync_retries_total")]
    assert retried and any('operation="upload"' in line for line in retried), down


def test_a_scrape_logs_nothing_and_health_host_is_read(
    emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from paiv_sync.config import parse_config

    root = tmp_path / "images"
    (root / "forest").mkdir(parents=True)
    config = config_for(emulator, root)
    caplog.set_level(logging.DEBUG)
    with running(config) as runner:
        health = HealthServer(runner.service).start()
        try:
            for path in ("/metrics", "/healthz", "/metrics"):
                assert requests.get(f"{health.url}{path}", timeout=5).status_code == 200
        finally:
            health.stop()
    assert not [r for r in caplog.records if r.name == "werkzeug"], "an access log line"
    base = {
        "credentials": {"endpoint": "https://h/api", "username": "u", "password": "p"},
        "dataset": {"name": "d"},
        "folders": [str(root)],
    }
    assert parse_config(base, source=None, env={}).health_host == "127.0.0.1"
    outside = parse_config({**base, "health_host": "0.0.0.0"}, source=None, env={})
    assert outside.health_host == "0.0.0.0"
