"""/healthz and /metrics of a running service, over real HTTP."""

from __future__ import annotations

from pathlib import Path

import requests

from paiv_sync.emulator import Emulator
from paiv_sync.health import HealthServer
from tests.e2e import config_for, running, server_count, write_image
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
