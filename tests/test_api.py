"""The MVI client against the emulator (and a tiny misbehaving server) over real loopback HTTP."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from paiv_sync import __version__
from paiv_sync.api import (
    AmbiguousError,
    AuthError,
    FileResult,
    MviClient,
    MviError,
    NotFoundError,
    RequestError,
    TlsError,
    TransientError,
    UploadPart,
)
from paiv_sync.emulator import Emulator, EmulatorOptions, FaultOptions
from paiv_sync.retry import RetryPolicy
from tests.helpers import wait_until

PASSWORD = "passw0rd"
API_KEY = "key-5ecret-d0-not-log"
FAST = RetryPolicy(initial=0.01, maximum=0.05, jitter=0.01, max_attempts=30)
FEW = RetryPolicy(initial=0.01, maximum=0.05, jitter=0.01, max_attempts=3)


# --------------------------------------------------------------------------- helpers


def make_png(seed: int) -> bytes:
    """A small valid PNG (1x1 grey pixel plus a seed-dependent text chunk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"tEXt", b"seed\x00" + str(seed).encode())
        + chunk(b"IDAT", zlib.compress(bytes([0, seed % 256])))
        + chunk(b"IEND", b"")
    )


def write_pngs(folder: Path, count: int, start: int = 0, prefix: str = "img") -> list[UploadPart]:
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for seed in range(start, start + count):
        path = folder / f"{prefix}{seed}.png"
        path.write_bytes(make_png(seed))
        parts.append(UploadPart(path=path, name=path.name, content_type="image/png"))
    return parts


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def client_for(emu: Emulator, **kwargs: Any) -> MviClient:
    options: dict[str, Any] = {
        "username": "admin",
        "password": PASSWORD,
        "retry": FAST,
        "timeout": 5.0,
    }
    options.update(kwargs)
    if "api_key" in kwargs:
        options.pop("username")
        options.pop("password")
    return MviClient(emu.url, **options)


def server_files(emu: Emulator, dataset_id: str) -> list[dict[str, Any]]:
    for dataset in emu.state()["datasets"]:
        if dataset["_id"] == dataset_id:
            files: list[dict[str, Any]] = dataset["files"]
            return files
    raise AssertionError(f"dataset {dataset_id} not on the server")


def request_count(emu: Emulator, key: str) -> int:
    counts: dict[str, int] = emu.state()["requests"]
    return counts.get(key, 0)


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def emu(emulator: Emulator) -> Emulator:
    return emulator


@pytest.fixture
def client(emu: Emulator) -> Iterator[MviClient]:
    with client_for(emu) as mvi:
        yield mvi


# --------------------------------------------------------------------------- happy paths


def test_login_and_datasets(
    emu: Emulator, client: MviClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="paiv_sync.api")
    client.authenticate()
    assert f"authenticated as admin at {emu.url}" in caplog.messages

    first = client.create_dataset("cats")
    second = client.create_dataset("dogs")

    listed = client.list_datasets()
    assert {d["_id"]: d["name"] for d in listed} == {first: "cats", second: "dogs"}
    assert client.get_dataset(first)["name"] == "cats"
    assert {d["name"] for d in emu.state()["datasets"]} == {"cats", "dogs"}


def test_categories_and_ensure_category(emu: Emulator, client: MviClient) -> None:
    dataset = client.create_dataset("d")
    forest = client.create_category(dataset, "forest")
    assert [(c["_id"], c["name"]) for c in client.list_categories(dataset)] == [(forest, "forest")]

    assert client.ensure_category(dataset, "forest") == forest
    sea = client.ensure_category(dataset, "sea")
    lists_before = request_count(emu, "GET /datasets/{id}/categories")
    assert client.ensure_category(dataset, "sea") == sea  # cached: no new request
    assert request_count(emu, "GET /datasets/{id}/categories") == lists_before

    (on_server,) = emu.state()["datasets"]
    assert sorted(c["name"] for c in on_server["categories"]) == ["forest", "sea"]


def test_ensure_category_after_an_ambiguous_create_does_not_create_twice(
    emu: Emulator, client: MviClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="paiv_sync.api")
    dataset = client.create_dataset("d")
    names = [f"category-{i}" for i in range(8)]
    # Requests are processed and then their answer is lost: for a create, the client cannot
    # know it worked and must look the category up instead of creating it a second time.
    emu.set_faults(FaultOptions(store_then_drop_rate=0.4, seed=1))
    ids = {name: client.ensure_category(dataset, name) for name in names}
    emu.set_faults(FaultOptions())

    assert any(m.startswith("creating category") for m in caplog.messages)  # the path ran
    (on_server,) = emu.state()["datasets"]
    assert sorted((c["name"], c["_id"]) for c in on_server["categories"]) == sorted(ids.items())
    assert request_count(emu, "POST /datasets/{id}/categories") == len(names)


def test_upload_list_and_page_files(emu: Emulator, client: MviClient, tmp_path: Path) -> None:
    dataset = client.create_dataset("d")
    forest = client.ensure_category(dataset, "forest")
    parts = write_pngs(tmp_path / "forest", 5)

    results = client.upload(dataset, parts, category_name="forest", category_id=forest)

    assert [r.name for r in results] == [p.name for p in parts]
    assert all(r.ok and r.file_id and r.fault is None for r in results)
    held = server_files(emu, dataset)
    assert sorted(
        (f["original_file_name"], f["sha256"], f["category_name"]) for f in held
    ) == sorted((p.name, sha256(p.path), "forest") for p in parts)
    assert {f["_id"] for f in held} == {r.file_id for r in results}

    listed = client.list_files(dataset)
    assert sorted(f["original_file_name"] for f in listed) == sorted(p.name for p in parts)
    assert len(client.list_files(dataset, category_id=forest)) == 5
    assert [
        f["original_file_name"]
        for f in client.list_files(dataset, query='original_file_name == "img3.png"')
    ] == ["img3.png"]
    assert len(client.list_files(dataset, limit=2, skip=4)) == 1

    pages_before = request_count(emu, "GET /datasets/{id}/files")
    paged = list(client.iter_files(dataset, page_size=2))
    assert sorted(f["_id"] for f in paged) == sorted(f["_id"] for f in listed)
    assert request_count(emu, "GET /datasets/{id}/files") - pages_before == 3  # 2 + 2 + 1


def test_upload_by_category_name_only(emu: Emulator, client: MviClient, tmp_path: Path) -> None:
    dataset = client.create_dataset("d")
    parts = write_pngs(tmp_path / "sea", 2)

    results = client.upload(dataset, parts, category_name="sea", category_id=None)

    assert all(r.ok for r in results)
    assert {f["category_name"] for f in server_files(emu, dataset)} == {"sea"}


def test_upload_tells_the_hash_of_what_was_sent_and_a_file_can_be_deleted(
    emu: Emulator, client: MviClient, tmp_path: Path
) -> None:
    dataset = client.create_dataset("d")
    parts = write_pngs(tmp_path / "sea", 3)

    results = client.upload(dataset, parts, category_name="sea", category_id=None)

    assert [r.sent_sha256 for r in results] == [sha256(Path(p.path)) for p in parts]
    held = {f["_id"]: f["sha256"] for f in server_files(emu, dataset)}
    assert sorted(held.values()) == sorted(r.sent_sha256 for r in results)
    gone = results[0].file_id
    assert gone is not None
    client.delete_file(dataset, gone)
    client.delete_file(dataset, gone)  # gone already: no error
    assert {f["_id"] for f in server_files(emu, dataset)} == set(held) - {gone}


def test_upload_reports_a_per_file_failure_inside_a_200(
    emu: Emulator, client: MviClient, tmp_path: Path
) -> None:
    dataset = client.create_dataset("d")
    parts = write_pngs(tmp_path, 2)
    text = tmp_path / "notes.png"
    text.write_text("not an image at all\n")
    parts.insert(1, UploadPart(path=text, name=text.name, content_type="image/png"))

    results = client.upload(dataset, parts, category_name="c", category_id=None)

    assert [(r.name, r.ok) for r in results] == [
        ("img0.png", True),
        ("notes.png", False),
        ("img1.png", True),
    ]
    refused = results[1]
    assert refused.file_id is None and refused.fault
    assert sorted(f["original_file_name"] for f in server_files(emu, dataset)) == [
        "img0.png",
        "img1.png",
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_upload_closes_the_files(emu: Emulator, client: MviClient, tmp_path: Path) -> None:
    dataset = client.create_dataset("d")
    parts = write_pngs(tmp_path, 4)

    def open_here() -> list[str]:
        fds = Path("/proc/self/fd")
        targets = []
        for fd in fds.iterdir():
            try:
                targets.append(str(fd.readlink()))
            except OSError:
                continue
        return [t for t in targets if t.startswith(str(tmp_path))]

    client.upload(dataset, parts, category_name="c", category_id=None)

    assert open_here() == []


def test_upload_of_a_missing_file_raises_oserror_and_sends_nothing(
    emu: Emulator, client: MviClient, tmp_path: Path
) -> None:
    dataset = client.create_dataset("d")
    parts = write_pngs(tmp_path, 1)
    parts.append(UploadPart(path=tmp_path / "gone.png", name="gone.png", content_type="image/png"))

    with pytest.raises(FileNotFoundError):
        client.upload(dataset, parts, category_name="c", category_id=None)

    assert request_count(emu, "POST /datasets/{id}/files") == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
def test_a_file_that_changes_while_sent_abandons_the_upload(
    emu: Emulator, client: MviClient, tmp_path: Path
) -> None:
    dataset = client.create_dataset("d")
    parts = write_pngs(tmp_path, 1)
    # stat says 0 bytes, reading gives more: like a file still being written.
    growing = Path("/proc/self/status")
    parts.append(UploadPart(path=growing, name="growing.png", content_type="image/png"))

    with pytest.raises(OSError, match="grew while it was being uploaded"):
        client.upload(dataset, parts, category_name="c", category_id=None)

    assert server_files(emu, dataset) == []


def test_training_start_poll_and_list(emu: Emulator, client: MviClient, tmp_path: Path) -> None:
    dataset = client.create_dataset("d")
    for name in ("forest", "sea"):
        parts = write_pngs(tmp_path / name, 5, prefix=name)
        client.upload(dataset, parts, category_name=name, category_id=None)

    task = client.start_training(dataset, "model-1")
    assert client.get_task(task)["status"] in ("training", "trained")
    wait_until(lambda: client.get_task(task)["status"] == "trained", timeout=10)
    assert [t["_id"] for t in client.list_tasks(status="trained")] == [task]

    again = client.start_training(
        dataset, "model-2", pretrained_model=task, strategy={"max_iter": 100}
    )
    assert {t["_id"] for t in client.list_tasks()} == {task, again}
    on_server = {t["_id"]: t for t in emu.state()["tasks"]}
    assert on_server[again]["pretrained_model"] == task
    assert on_server[again]["strategy"] == {"max_iter": 100}
    assert on_server[again]["usage"] == "cic" and on_server[again]["action"] == "create"


def test_training_refused_when_the_dataset_is_too_small(
    emu: Emulator, client: MviClient, tmp_path: Path
) -> None:
    dataset = client.create_dataset("d")
    client.upload(dataset, write_pngs(tmp_path, 2), category_name="c", category_id=None)

    with pytest.raises(RequestError) as caught:
        client.start_training(dataset, "too-early")

    assert caught.value.status == 400
    assert caught.value.fault and caught.value.fault in str(caught.value)
    assert emu.state()["tasks"] == []


def test_deleted_dataset_is_not_found(emu: Emulator, client: MviClient) -> None:
    dataset = client.create_dataset("d")
    emu.delete_dataset(dataset)

    with pytest.raises(NotFoundError, match=f"dataset {dataset} does not exist"):
        client.get_dataset(dataset)
    with pytest.raises(NotFoundError):
        client.list_files(dataset)
    with pytest.raises(NotFoundError):
        client.get_task("no-such-task")


# --------------------------------------------------------------------------- faults


def test_5xx_on_get_is_retried_to_success(
    emu: Emulator, client: MviClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="paiv_sync.api")
    client.create_dataset("d")
    emu.set_faults(FaultOptions(error_rate=0.5, seed=7))

    for _ in range(6):
        assert [d["name"] for d in client.list_datasets()] == ["d"]

    assert emu.state()["faults"]["error"] > 0
    assert any("GET /datasets failed (HTTP 5" in m for m in caplog.messages)


def test_dropped_connections_on_get_are_retried(emu: Emulator, client: MviClient) -> None:
    client.create_dataset("d")
    emu.set_faults(FaultOptions(drop_rate=0.5, seed=3))

    for _ in range(6):
        assert len(client.list_datasets()) == 1

    assert emu.state()["faults"]["drop"] > 0


def test_429_honours_retry_after(emu: Emulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="paiv_sync.api")
    with client_for(emu, retry=FEW) as mvi:
        mvi.authenticate()
        emu.set_faults(FaultOptions(rate_limit_rate=1.0, retry_after=0.2))
        started = time.monotonic()
        with pytest.raises(TransientError) as caught:
            mvi.list_datasets()
        elapsed = time.monotonic() - started

    assert caught.value.status == 429
    assert caught.value.retry_after == pytest.approx(0.2)
    retries = [m for m in caplog.messages if "GET /datasets failed (HTTP 429)" in m]
    assert len(retries) == 2 and all("retrying in 0.2 s" in m for m in retries)
    assert elapsed >= 0.4  # the server's 0.2 s, not the policy's 0.01 s


def test_upload_is_resent_after_429_and_stored_once(
    emu: Emulator, client: MviClient, tmp_path: Path
) -> None:
    dataset = client.create_dataset("d")
    parts = write_pngs(tmp_path, 3)
    emu.set_faults(FaultOptions(rate_limit_rate=0.6, retry_after=0.01, seed=11))

    results = client.upload(dataset, parts, category_name="c", category_id=None)

    emu.set_faults(FaultOptions())
    assert all(r.ok for r in results)
    assert emu.state()["faults"]["rate_limit"] > 0
    assert sorted(f["original_file_name"] for f in server_files(emu, dataset)) == [
        p.name for p in parts
    ]
    assert emu.state()["duplicates"] == []


def test_store_then_drop_on_upload_is_ambiguous_and_not_resent(
    emu: Emulator, client: MviClient, tmp_path: Path
) -> None:
    dataset = client.create_dataset("d")
    parts = write_pngs(tmp_path, 3)
    emu.set_faults(FaultOptions(store_then_drop_rate=1.0))

    with pytest.raises(AmbiguousError) as caught:
        client.upload(dataset, parts, category_name="c", category_id=None)

    emu.set_faults(FaultOptions())
    assert "may have" in str(caught.value)
    assert request_count(emu, "POST /datasets/{id}/files") == 1  # sent once, never resent
    held = server_files(emu, dataset)
    assert sorted(f["sha256"] for f in held) == sorted(sha256(p.path) for p in parts)
    # The caller reconciles with the listing before sending again.
    assert sorted(f["original_file_name"] for f in client.list_files(dataset)) == [
        p.name for p in parts
    ]


def test_dropped_create_is_ambiguous_and_not_resent(emu: Emulator, client: MviClient) -> None:
    client.authenticate()
    emu.set_faults(FaultOptions(drop_rate=1.0))

    with pytest.raises(AmbiguousError):
        client.create_dataset("d")

    emu.set_faults(FaultOptions())
    assert request_count(emu, "POST /datasets") == 1


def test_5xx_on_training_start_is_ambiguous(
    emu: Emulator, client: MviClient, tmp_path: Path
) -> None:
    dataset = client.create_dataset("d")
    emu.set_faults(FaultOptions(error_rate=1.0))

    with pytest.raises(AmbiguousError) as caught:
        client.start_training(dataset, "m")

    emu.set_faults(FaultOptions())
    assert caught.value.status is not None and caught.value.status >= 500
    assert request_count(emu, "POST /dltasks") == 1


def test_server_not_listening_names_the_host() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    with (
        MviClient(url, username="admin", password=PASSWORD, retry=FEW) as mvi,
        pytest.raises(TransientError) as caught,
    ):
        mvi.list_datasets()
    assert not isinstance(caught.value, AmbiguousError)
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "refused" in str(caught.value)


def test_timeout_via_latency_is_transient(emu: Emulator) -> None:
    with client_for(emu, timeout=0.3, retry=RetryPolicy(max_attempts=1)) as mvi:
        mvi.authenticate()
        emu.set_faults(FaultOptions(latency=1.0, latency_rate=1.0))
        with pytest.raises(TransientError, match=r"no answer within 0\.3 s"):
            mvi.list_datasets()
        emu.set_faults(FaultOptions())


# --------------------------------------------------------------------------- authentication


def test_revoked_token_is_renewed_once(emu: Emulator, client: MviClient, tmp_path: Path) -> None:
    dataset = client.create_dataset("d")
    emu.revoke_tokens()

    results = client.upload(dataset, write_pngs(tmp_path, 2), category_name="c", category_id=None)

    assert all(r.ok for r in results)
    assert len(server_files(emu, dataset)) == 2
    assert emu.state()["tokens_issued"] == 2
    emu.revoke_tokens()
    assert len(client.list_datasets()) == 1
    assert emu.state()["tokens_issued"] == 3


def test_threads_sharing_a_client_renew_a_revoked_token_once(
    emu: Emulator, client: MviClient, tmp_path: Path
) -> None:
    dataset = client.create_dataset("d")
    emu.revoke_tokens()
    batches = [write_pngs(tmp_path / f"t{i}", 3, start=10 * i) for i in range(4)]
    results: list[list[FileResult]] = []
    errors: list[BaseException] = []

    def upload(parts: list[UploadPart]) -> None:
        try:
            results.append(client.upload(dataset, parts, category_name="c", category_id=None))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(parts,)) for parts in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert all(r.ok for batch in results for r in batch)
    held = sorted(f["sha256"] for f in server_files(emu, dataset))
    assert held == sorted(sha256(p.path) for parts in batches for p in parts)
    assert emu.state()["tokens_issued"] == 2  # one login, one renewal shared by all threads


def test_token_expiry_mid_run_reauthenticates(tmp_path: Path) -> None:
    with Emulator(EmulatorOptions(token_lifetime=0.2)) as emu, client_for(emu) as mvi:
        dataset = mvi.create_dataset("d")
        # Keep working until the first token has expired and been replaced.
        wait_until(
            lambda: mvi.get_dataset(dataset) and emu.state()["tokens_issued"] >= 2, timeout=10
        )
        results = mvi.upload(dataset, write_pngs(tmp_path, 2), category_name="c", category_id=None)
        assert all(r.ok for r in results)
        assert len(server_files(emu, dataset)) == 2


def test_wrong_password_is_a_clear_auth_error() -> None:
    with Emulator(EmulatorOptions()) as emu, client_for(emu, password="wrong-pass") as mvi:
        with pytest.raises(AuthError) as caught:
            mvi.authenticate()
        with pytest.raises(AuthError):
            mvi.list_datasets()  # not retried: a wrong password does not heal
    message = str(caught.value)
    assert "user name or password" in message and "'admin'" in message
    assert "credentials.password" in message
    assert "wrong-pass" not in message
    assert emu.state()["requests"].get("POST /tokens") == 2


def test_api_key_mode(emu_api_key: Emulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="paiv_sync.api")
    with client_for(emu_api_key, api_key=API_KEY) as mvi:
        mvi.authenticate()
        dataset = mvi.create_dataset("d")
        assert [d["_id"] for d in mvi.list_datasets()] == [dataset]

        emu_api_key.revoke_api_key(API_KEY)
        with pytest.raises(AuthError, match=r"API key was rejected \(revoked\?\)"):
            mvi.list_datasets()
    assert f"using an API key at {emu_api_key.url}" in caplog.messages
    assert emu_api_key.state()["tokens_issued"] == 0


def test_password_against_an_api_key_server_suggests_an_api_key(emu_api_key: Emulator) -> None:
    with client_for(emu_api_key) as mvi, pytest.raises(AuthError, match=r"credentials\.api_key"):
        mvi.authenticate()


@pytest.fixture
def emu_api_key() -> Iterator[Emulator]:
    with Emulator(EmulatorOptions(api_keys=(API_KEY,))) as emu:
        yield emu


def test_no_secret_in_logs_or_errors(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[BaseException] = []
    tokens: set[str] = set()

    with Emulator(EmulatorOptions(token_lifetime=60)) as emu:
        with client_for(emu) as mvi:
            mvi.authenticate()
            tokens.add(str(mvi._token))  # white-box: the only way to know the token's value
            dataset = mvi.create_dataset("d")
            emu.revoke_tokens()
            mvi.upload(dataset, write_pngs(tmp_path, 2), category_name="c", category_id=None)
            tokens.add(str(mvi._token))
            emu.set_faults(FaultOptions(error_rate=0.5, drop_rate=0.2, seed=5))
            for _ in range(4):
                mvi.list_datasets()
            emu.set_faults(FaultOptions(store_then_drop_rate=1.0))
            with pytest.raises(AmbiguousError) as ambiguous:
                mvi.create_dataset("e")
            errors.append(ambiguous.value)
            emu.set_faults(FaultOptions())
        with client_for(emu, password="wr0ng-" + PASSWORD) as bad:
            with pytest.raises(AuthError) as refused:
                bad.authenticate()
            errors.append(refused.value)

    with (
        Emulator(EmulatorOptions(api_keys=(API_KEY,))) as emu,
        client_for(emu, api_key=API_KEY) as mvi,
    ):
        mvi.authenticate()
        emu.revoke_api_key(API_KEY)
        with pytest.raises(AuthError) as revoked:
            mvi.list_datasets()
        errors.append(revoked.value)

    assert len(tokens) == 2 and all(len(t) >= 8 for t in tokens)
    secrets = {PASSWORD, API_KEY, *tokens}
    texts = [caplog.text]
    texts += [r.getMessage() for r in caplog.records]
    for error in errors:
        texts += [str(error), repr(error), repr(error.__cause__), repr(error.__context__)]
    for secret in secrets:
        for text in texts:
            assert secret not in text
    assert any(
        r.levelno == logging.DEBUG and "GET /datasets -> 200" in r.getMessage()
        for r in caplog.records
    )


# --------------------------------------------------------------------------- TLS


def test_tls_verification(tmp_path: Path) -> None:
    with Emulator(EmulatorOptions(tls=True)) as emu:
        assert emu.cert_path is not None
        with client_for(emu) as strict, pytest.raises(TlsError) as caught:
            strict.authenticate()
        assert "credentials.verify" in str(caught.value)
        with client_for(emu, verify=str(emu.cert_path)) as mvi:
            mvi.authenticate()
            assert mvi.list_datasets() == []
        with client_for(emu, verify=False) as insecure:
            insecure.create_dataset("d")
            assert len(insecure.list_datasets()) == 1


def test_missing_ca_bundle_is_reported() -> None:
    with pytest.raises(TlsError, match="does not exist"):
        MviClient("https://127.0.0.1/api", api_key=API_KEY, verify="/nonexistent/ca.pem")


def test_plain_http_server_with_https_url() -> None:
    with Emulator(EmulatorOptions()) as emu:
        url = emu.url.replace("http://", "https://")
        with (
            MviClient(url, username="admin", password=PASSWORD, retry=FEW) as mvi,
            pytest.raises(TlsError, match="http://"),
        ):
            mvi.authenticate()


# --------------------------------------------------------------------------- a broken proxy


class _ProxyHandler(BaseHTTPRequestHandler):
    """Issues tokens, then answers everything else with an HTML 502 page, like a proxy."""

    seen: list[dict[str, str]]

    def do_POST(self) -> None:
        self.seen.append(dict(self.headers))
        length = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(length)
        if self.path.endswith("/tokens"):
            self._send(200, "application/json", json.dumps({"result": "success", "token": "t0k"}))
        else:
            self._html()

    def do_GET(self) -> None:
        self.seen.append(dict(self.headers))
        self._html()

    def _html(self) -> None:
        self._send(502, "text/html", "<html><body><h1>502 Bad Gateway</h1></body></html>")

    def _send(self, status: int, content_type: str, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def proxy() -> Iterator[tuple[str, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []
    handler = type("Handler", (_ProxyHandler,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="html-proxy"
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_html_error_page_is_explained(proxy: tuple[str, list[dict[str, str]]]) -> None:
    url, seen = proxy
    with MviClient(url, username="admin", password=PASSWORD, retry=FEW) as mvi:
        with pytest.raises(TransientError) as on_get:
            mvi.list_datasets()
        with pytest.raises(AmbiguousError) as on_post:
            mvi.create_dataset("d")

    message = str(on_get.value)
    assert (
        "with HTML, not JSON (HTTP 502)" in message and "HTTP 502" in message and "proxy" in message
    )
    assert on_get.value.status == 502
    assert not isinstance(on_get.value, AmbiguousError)
    assert "may have processed" in str(on_post.value)
    assert len(seen) == 1 + 3 + 1  # login, 3 GET attempts, 1 POST never resent
    assert all(h["User-Agent"] == f"paiv-sync/{__version__}" for h in seen)
    assert all(h.get("X-Auth-Token") == "t0k" for h in seen[1:])


# --------------------------------------------------------------------------- the object itself


def test_credentials_must_be_one_kind() -> None:
    with pytest.raises(ValueError, match="not both"):
        MviClient("http://h/api", username="u", password="p", api_key="k")
    with pytest.raises(ValueError, match="user name and password"):
        MviClient("http://h/api", username="u")


def test_results_are_frozen() -> None:
    result = FileResult(name="a.png", ok=True, file_id="1", fault=None)
    with pytest.raises(AttributeError):
        result.ok = False  # type: ignore[misc]
    assert issubclass(AmbiguousError, TransientError) and issubclass(TransientError, MviError)


def test_newest_reads_epoch_ms_epoch_seconds_and_iso_and_keeps_the_first_on_a_tie() -> None:
    from paiv_sync.api import newest

    # As strings, "2024-…" sorts above "1714…" and "9…" above "1…": the times must be read.
    items = [
        {"_id": "iso", "created_at": "2024-05-01T12:00:00.000Z"},
        {"_id": "ms", "created_at": 1714564800500},  # half a second later, in epoch ms
        {"_id": "seconds", "created_at": 999999999},  # 2001
        {"_id": "none"},
    ]
    assert newest(items)["_id"] == "ms"
    assert newest([{"_id": "a", "created_at": 5}, {"_id": "b", "created_at": 5}])["_id"] == "a"
