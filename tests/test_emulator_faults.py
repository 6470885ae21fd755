"""Fault injection in the MVI emulator: each kind, its counting, and reproducibility."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from paiv_sync.emulator import Emulator, EmulatorOptions, FaultOptions

TIMEOUT = 10
KEY = "test-api-key"
AUTH = {"X-Auth-Token": KEY}


def jpeg(tag: str) -> bytes:
    return b"\xff\xd8\xff\xe0" + tag.encode() + b"\x00" * 32


@pytest.fixture
def emu() -> Iterator[Emulator]:
    # API-key mode: no login request that the faults could hit.
    with Emulator(EmulatorOptions(api_keys=(KEY,), training_seconds=0.1)) as emulator:
        yield emulator


def create_dataset(emu: Emulator) -> str:
    response = requests.post(
        f"{emu.url}/datasets", json={"name": "ds"}, headers=AUTH, timeout=TIMEOUT
    )
    assert response.status_code == 200
    return str(response.json()["dataset_id"])


def upload(emu: Emulator, dataset_id: str, count: int, category: str = "c") -> requests.Response:
    files = [("files", (f"{category}{i}.jpg", jpeg(f"{category}{i}"))) for i in range(count)]
    return requests.post(
        f"{emu.url}/datasets/{dataset_id}/files",
        files=files,
        data={"category_name": category},
        headers=AUTH,
        timeout=TIMEOUT,
    )


def stored(emu: Emulator) -> list[dict[str, Any]]:
    return [f for d in emu.state()["datasets"] for f in d["files"]]


def test_error_faults_answer_5xx_with_a_fail_body(emu: Emulator) -> None:
    emu.set_faults(FaultOptions(error_rate=1.0, seed=1))
    statuses = set()
    for _ in range(12):
        response = requests.get(f"{emu.url}/datasets", headers=AUTH, timeout=TIMEOUT)
        statuses.add(response.status_code)
        assert response.json()["result"] == "fail"
    assert statuses <= {500, 502, 503, 504} and len(statuses) > 1
    assert emu.state()["faults"]["error"] == 12


def test_dropped_connections_get_no_answer_and_nothing_is_stored(emu: Emulator) -> None:
    dataset_id = create_dataset(emu)
    emu.set_faults(FaultOptions(drop_rate=1.0))
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{emu.url}/datasets", headers=AUTH, timeout=TIMEOUT)
    with pytest.raises(requests.ConnectionError):
        upload(emu, dataset_id, 3)
    assert stored(emu) == []
    assert emu.state()["faults"]["drop"] == 2


def test_store_then_drop_really_stores(emu: Emulator) -> None:
    dataset_id = create_dataset(emu)
    emu.set_faults(FaultOptions(store_then_drop_rate=1.0))
    with pytest.raises(requests.ConnectionError):
        upload(emu, dataset_id, 5, "a")
    with pytest.raises(requests.ConnectionError):
        upload(emu, dataset_id, 5, "b")
    files = stored(emu)
    assert sorted(f["original_file_name"] for f in files) == [
        f"{c}{i}.jpg" for c in "ab" for i in range(5)
    ]
    with pytest.raises(requests.ConnectionError):
        requests.post(
            f"{emu.url}/dltasks",
            json={"name": "m", "dataset_id": dataset_id, "usage": "cic", "action": "create"},
            headers=AUTH,
            timeout=TIMEOUT,
        )
    state = emu.state()
    assert len(state["tasks"]) == 1
    assert state["faults"]["store_then_drop"] == 3
    emu.set_faults(FaultOptions())
    listing = requests.get(f"{emu.url}/dltasks", headers=AUTH, timeout=TIMEOUT).json()
    assert [t["_id"] for t in listing] == [state["tasks"][0]["_id"]]


def test_rate_limit_answers_429_with_retry_after(emu: Emulator) -> None:
    emu.set_faults(FaultOptions(rate_limit_rate=1.0, retry_after=2.5))
    response = requests.get(f"{emu.url}/datasets", headers=AUTH, timeout=TIMEOUT)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "2.5"
    assert response.json()["result"] == "fail"
    emu.set_faults(FaultOptions(rate_limit_rate=1.0, retry_after=3))
    response = requests.get(f"{emu.url}/datasets", headers=AUTH, timeout=TIMEOUT)
    assert response.headers["Retry-After"] == "3"
    assert emu.state()["faults"]["rate_limit"] == 2


def test_latency_delays_the_answer(emu: Emulator) -> None:
    emu.set_faults(FaultOptions(latency=0.3, latency_rate=1.0))
    started = time.monotonic()
    response = requests.get(f"{emu.url}/datasets", headers=AUTH, timeout=TIMEOUT)
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.3
    assert emu.state()["faults"]["latency"] == 1


def test_fail_in_200_fails_the_whole_call_without_doing_it(emu: Emulator) -> None:
    emu.set_faults(FaultOptions(fail_in_200_rate=1.0))
    created = requests.post(
        f"{emu.url}/datasets", json={"name": "never"}, headers=AUTH, timeout=TIMEOUT
    )
    assert created.status_code == 200
    assert created.json()["result"] == "fail" and "dataset_id" not in created.json()
    listing = requests.get(f"{emu.url}/datasets", headers=AUTH, timeout=TIMEOUT)
    assert listing.status_code == 200 and listing.json()["result"] == "fail"
    assert emu.state()["datasets"] == []
    assert emu.state()["faults"]["fail_in_200"] == 2


@pytest.mark.parametrize("status", [400, 200])
def test_fail_in_200_fails_some_files_of_an_upload(emu: Emulator, status: int) -> None:
    # The product answers such an upload with a 400 [client]; the lenient option with a 200.
    emu.set_options(upload_failure_status=status)
    dataset_id = create_dataset(emu)
    emu.set_faults(FaultOptions(fail_in_200_rate=0.5, seed=3))
    response = upload(emu, dataset_id, 20)
    assert response.status_code == status
    assert response.json()["result"] == ("success" if status == 200 else "fail")
    entries = response.json()["resultList"]
    failed = [e for e in entries if e["result"] == "fail"]
    succeeded = [e for e in entries if e["result"] == "success"]
    assert failed and succeeded
    assert all(e["fault"] and e["original_file_name"] for e in failed)
    # Exactly the files reported as successes are on the server.
    assert sorted(f["_id"] for f in stored(emu)) == sorted(e["_id"] for e in succeeded)
    assert emu.state()["faults"]["fail_in_200"] == len(failed)


def outcomes(emu: Emulator, count: int) -> list[str]:
    """What ``count`` sequential calls got: a status code, ``fail200`` or ``dropped``."""
    seen = []
    for _ in range(count):
        try:
            response = requests.get(f"{emu.url}/datasets", headers=AUTH, timeout=TIMEOUT)
        except requests.ConnectionError:
            seen.append("dropped")
            continue
        body = response.json()
        failed = isinstance(body, dict) and body.get("result") == "fail"
        seen.append(
            "fail200" if response.status_code == 200 and failed else str(response.status_code)
        )
    return seen


MIXED = {
    "error_rate": 0.2,
    "drop_rate": 0.15,
    "rate_limit_rate": 0.15,
    "fail_in_200_rate": 0.2,
    "retry_after": 0,
}


def run_with_seed(seed: int) -> list[str]:
    faults = FaultOptions(seed=seed, **MIXED)
    with Emulator(EmulatorOptions(api_keys=(KEY,), faults=faults)) as emu:
        return outcomes(emu, 40)


def test_the_same_seed_gives_the_same_fault_sequence() -> None:
    first = run_with_seed(7)
    assert run_with_seed(7) == first
    assert run_with_seed(8) != first
    assert {"200", "fail200", "dropped", "429"} <= set(first)


def test_reset_and_set_faults_restart_the_seeded_sequence(emu: Emulator) -> None:
    emu.set_faults(FaultOptions(seed=11, **MIXED))
    first = outcomes(emu, 25)
    emu.reset()
    assert outcomes(emu, 25) == first
    emu.set_faults(FaultOptions(seed=11, **MIXED))
    assert outcomes(emu, 25) == first


def test_faults_are_set_over_http_and_validated(emu: Emulator) -> None:
    url = f"{emu.root_url}/_emulator/faults"
    assert requests.post(url, json={"error_rate": 1.0}, timeout=TIMEOUT).status_code == 200
    assert requests.get(f"{emu.url}/datasets", headers=AUTH, timeout=TIMEOUT).status_code >= 500
    for bad in ({"error_rate": 2}, {"colour": 1}, ["error_rate"], {"seed": "x"}):
        response = requests.post(url, json=bad, timeout=TIMEOUT)
        assert response.status_code == 400 and response.json()["result"] == "fail", bad
    # An empty object replaces the options with the defaults: no faults.
    assert requests.post(url, json={}, timeout=TIMEOUT).status_code == 200
    assert requests.get(f"{emu.url}/datasets", headers=AUTH, timeout=TIMEOUT).status_code == 200


def test_faults_never_touch_introspection(emu: Emulator) -> None:
    emu.set_faults(FaultOptions(error_rate=1.0, drop_rate=1.0, rate_limit_rate=1.0))
    for _ in range(5):
        response = requests.get(f"{emu.root_url}/_emulator/state", timeout=TIMEOUT)
        assert response.status_code == 200
    assert requests.post(f"{emu.root_url}/_emulator/reset", timeout=TIMEOUT).status_code == 200
    assert emu.state()["faults"] == dict.fromkeys(
        ("error", "drop", "store_then_drop", "rate_limit", "fail_in_200", "latency"), 0
    )


def test_invalid_fault_options_are_refused() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        FaultOptions(error_rate=1.5)
    with pytest.raises(ValueError, match="latency"):
        FaultOptions(latency=-1)


def test_a_fault_limit_ends_the_faults_after_that_many(emu: Emulator) -> None:
    emu.set_faults(FaultOptions(error_rate=1.0, limit=2))
    statuses = [
        requests.get(f"{emu.url}/datasets", headers=AUTH, timeout=TIMEOUT).status_code
        for _ in range(4)
    ]
    assert [s >= 500 for s in statuses] == [True, True, False, False]
    assert emu.state()["faults"]["error"] == 2
    # New options start a new count.
    dataset_id = create_dataset(emu)
    emu.set_faults(FaultOptions(fail_in_200_rate=1.0, limit=1))
    assert upload(emu, dataset_id, 3).status_code == 400
    assert len(stored(emu)) == 2
    with pytest.raises(ValueError, match="limit"):
        FaultOptions(limit=-1)
