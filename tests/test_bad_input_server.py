"""What paiv-sync does when the server misbehaves (docs/what-happens-when.md).

The real service in a thread, real folders and a real observer, real HTTP on loopback: to the
emulator, or to a tiny ``http.server`` that answers what a proxy or a web UI would. Each test
asserts what the server holds, what the ledger says and the line the user reads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from paiv_sync.api import MviClient, UploadPart
from paiv_sync.config import Config, parse_config
from paiv_sync.emulator import Emulator, EmulatorOptions, FaultOptions
from paiv_sync.service import Service
from tests.e2e import FAST_RETRY, config_for, server_count, server_files, sha, write_image
from tests.helpers import wait_until
from tests.test_bad_input_files import ledger_of, lines, service_running

PASSWORD = "Pw-7bX!q2-never-in-a-log"
API_KEY = "key-Qm83-zL0v-never-in-a-log"


def cfg(emulator: Emulator | str, root: Path, **credentials: Any) -> Config:
    """A quick configuration (threshold 1) for the emulator or an endpoint URL; ``credentials``
    replace keys of the credentials section (``api_key`` replaces the user and password)."""
    creds: dict[str, Any] = {
        "endpoint": emulator if isinstance(emulator, str) else emulator.url,
        "username": "admin",
        "password": "passw0rd",
        "timeout": 5,
    }
    if "api_key" in credentials:
        del creds["username"], creds["password"]
    creds.update(credentials)
    data: dict[str, Any] = {
        "credentials": creds,
        "threshold": {"upload": 1, "training": 1000},
        "time": 0.1,
        "settle_time": 0.05,
        "poll_interval": 0.1,
        "rescan_interval": 0,
        "dataset": {"name": "tests"},
        "model": {"name": "model", "action": "nothing"},
        "folders": [str(root)],
        "ledger": str(root.parent / "state" / "ledger.sqlite3"),
    }
    return parse_config(data, source=None, env={})


@contextmanager
def started(config: Config) -> Iterator[Service]:
    """Run a Service that may never connect; yield it once ready; stop it after."""
    service = Service(config, retry=FAST_RETRY)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(service.run()), name="test-service")
    thread.start()
    try:
        assert service.ready.wait(15), "service did not become ready"
        yield service
    finally:
        service.stop()
        thread.join(30)
        assert not thread.is_alive(), "service did not stop"
    assert codes == [0]


def cannot_use(logs: pytest.LogCaptureFixture, url: str, detail: str) -> bool:
    """Whether the service said it cannot use the server at ``url``, for ``detail``."""
    return any(
        line.startswith(f"cannot use the server at {url}: ")
        and detail in line
        and "files stay pending; trying again in" in line
        for line in lines(logs, logging.ERROR)
    )


# -- answers that are not the API --------------------------------------------------------


class _Canned(BaseHTTPRequestHandler):
    """Answers every request with the server's canned status, type and body."""

    protocol_version = "HTTP/1.0"  # one request per connection: no thread outlives the test

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        status, content_type, body = self.server.canned  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        return None


@contextmanager
def canned_server(status: int, content_type: str, body: bytes) -> Iterator[int]:
    """An HTTP server on a free loopback port answering everything the same; yields the port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    server.canned = (status, content_type, body)  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


NOT_THE_API = {
    "proxy-error-page": (
        502,
        "text/html",
        b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
        "answered POST /tokens with HTML, not JSON (HTTP 502) — a proxy error page?",
    ),
    "web-ui-login-page": (
        200,
        "text/html; charset=utf-8",
        b"<!DOCTYPE html><html><body><form>Log in</form></body></html>",
        "answered POST /tokens with HTML, not JSON (HTTP 200); is the endpoint the API's base "
        "URL (e.g. https://host/powerai-vision/api)?",
    ),
    "plain-text": (
        200,
        "text/plain",
        b"OK",
        "answered POST /tokens with a non-JSON body, not JSON (HTTP 200)",
    ),
}


@pytest.mark.parametrize("case", list(NOT_THE_API))
def test_server_answering_html_or_not_json(
    root: Path, logs: pytest.LogCaptureFixture, case: str
) -> None:
    status, content_type, body, said = NOT_THE_API[case]
    with canned_server(status, content_type, body) as port:
        url = f"http://127.0.0.1:{port}/api"
        with started(cfg(url, root)) as service:
            write_image(root / "forest" / "a.png", 1)
            wait_until(lambda: cannot_use(logs, url, said), timeout=10, message=said)
            wait_until(lambda: ledger_of(service).pending_counts() == {"forest": 1}, timeout=10)
            assert service.healthy()[0]
    assert "Traceback" not in logs.text


def test_endpoint_without_the_context_root(root: Path, logs: pytest.LogCaptureFixture) -> None:
    with Emulator(EmulatorOptions(port=0, base_path="/powerai-vision/api")) as emulator:
        wrong = emulator.root_url + "/api"  # the context root is missing
        with started(cfg(wrong, root)) as service:
            write_image(root / "forest" / "a.png", 1)
            said = "has no /tokens endpoint (HTTP 404): either the endpoint is wrong"
            wait_until(lambda: cannot_use(logs, wrong, said), timeout=10, message=said)
            wait_until(lambda: ledger_of(service).pending_counts() == {"forest": 1}, timeout=10)
        assert server_count(emulator) == 0
        # Fixed, the same ledger goes on: the pending file is uploaded.
        with service_running(cfg(emulator, root)):
            wait_until(lambda: server_count(emulator) == 1, timeout=10)


def test_https_endpoint_on_a_plain_http_server(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    url = emulator.url.replace("http://", "https://")
    with started(cfg(url, root)):
        said = "does not speak TLS on that port; if the server uses plain HTTP, write the "
        said += "endpoint with http:// instead of https://"
        wait_until(lambda: cannot_use(logs, url, said), timeout=10, message=said)
    assert server_count(emulator) == 0


# -- a server that hangs -----------------------------------------------------------------


def test_server_that_hangs_then_recovers(root: Path, logs: pytest.LogCaptureFixture) -> None:
    hang = FaultOptions(latency=1.5, latency_rate=1.0)
    with Emulator(EmulatorOptions(port=0, faults=hang)) as emulator:
        config = cfg(emulator, root, timeout=0.5)
        with started(config) as service:
            # At start: the login times out, the file waits.
            first = write_image(root / "forest" / "first.png", 1)
            said = "POST /tokens at "
            wait_until(
                lambda: (
                    cannot_use(logs, emulator.url, "no answer within 0.5 s")
                    and cannot_use(logs, emulator.url, said)
                ),
                timeout=15,
            )
            wait_until(lambda: ledger_of(service).pending_counts() == {"forest": 1}, timeout=10)
            emulator.set_faults(FaultOptions())
            wait_until(lambda: server_count(emulator) == 1, timeout=15)
            # During an upload: the answer never comes; the files are in doubt, then found on
            # the server by name and size and not sent a second time.
            emulator.set_faults(hang)
            second = write_image(root / "forest" / "second.png", 2)
            wait_until(
                lambda: any("may or may not have reached the server" in x for x in lines(logs)),
                timeout=15,
            )
            # Meanwhile the service goes on taking in files, also while it tries to reach the
            # server for a category it has not sent anything to yet.
            categories = "GET /datasets/{id}/categories"
            looked = emulator.state()["requests"].get(categories, 0)
            third = write_image(root / "city" / "third.png", 3)
            wait_until(lambda: ledger_of(service).lookup(str(root), "city/third.png"), timeout=10)
            wait_until(
                lambda: (
                    emulator.state()["in_flight"].get(categories, 0)
                    and emulator.state()["requests"].get(categories, 0) > looked
                ),
                message="the city flush begun, and hung",
            )
            fourth = write_image(root / "city" / "fourth.png", 4)
            wait_until(lambda: ledger_of(service).lookup(str(root), "city/fourth.png"), timeout=10)
            assert service.healthy()[0]
            # The server works through the request it got before it answers anything new.
            wait_until(lambda: server_count(emulator) == 2, timeout=10)
            emulator.set_faults(FaultOptions())
            wait_until(lambda: server_count(emulator) == 4, timeout=15)
            wait_until(lambda: ledger_of(service).counts()["forest"]["uploaded"] == 2, timeout=10)
        assert (
            "category 'forest': the server had stored 1 of 1 files of an unanswered upload; "
            "not sending those again"
        ) in lines(logs, logging.INFO)
        assert dict(server_files(emulator)) == {
            ("forest", sha(first)): 1,
            ("forest", sha(second)): 1,
            ("city", sha(third)): 1,
            ("city", sha(fourth)): 1,
        }
        assert emulator.state()["duplicates"] == []


def test_hung_upload_stored_after_the_comparison_is_not_sent_twice(
    root: Path, logs: pytest.LogCaptureFixture
) -> None:
    with Emulator(EmulatorOptions(port=0)) as emulator:
        with service_running(cfg(emulator, root, timeout=0.5)):
            write_image(root / "forest" / "first.png", 1)
            wait_until(lambda: server_count(emulator) == 1, timeout=10)
            emulator.set_faults(FaultOptions(latency=2.0, latency_rate=1.0))
            write_image(root / "forest" / "second.png", 2)
            wait_until(
                lambda: any("may or may not have reached the server" in x for x in lines(logs)),
                timeout=15,
            )
            # The server recovers while the hung POST is still being worked on.
            emulator.set_faults(FaultOptions())
            wait_until(lambda: server_count(emulator) >= 2, timeout=15)
            wait_until(lambda: not emulator.state()["in_flight"], message="the hung POST over")
        assert emulator.state()["duplicates"] == []


# -- TLS and credentials -----------------------------------------------------------------


def test_self_signed_certificate(root: Path, logs: pytest.LogCaptureFixture) -> None:
    with Emulator(EmulatorOptions(port=0, tls=True)) as emulator:
        assert emulator.cert_path is not None
        with started(cfg(emulator, root)) as service:
            body = write_image(root / "forest" / "a.png", 1)
            said = (
                "could not verify the TLS certificate of 127.0.0.1:"
                f"{emulator.root_url.rsplit(':', 1)[1]}; if the server uses a self-signed "
                "certificate, set credentials.verify to the path of its CA bundle (PEM file), "
                "or to false to skip the check (insecure)"
            )
            wait_until(lambda: cannot_use(logs, emulator.url, said), timeout=10, message=said)
            wait_until(lambda: ledger_of(service).pending_counts() == {"forest": 1}, timeout=10)
        assert server_count(emulator) == 0
        with service_running(cfg(emulator, root, verify=str(emulator.cert_path))):
            wait_until(lambda: server_count(emulator) == 1, timeout=10)
        assert dict(server_files(emulator)) == {("forest", sha(body)): 1}


def test_wrong_password(emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture) -> None:
    with started(cfg(emulator, root, password=PASSWORD)) as service:
        write_image(root / "forest" / "a.png", 1)
        said = (
            "refused the user name or password for user 'admin' (HTTP 401: Invalid username or "
            "password); check credentials.username and credentials.password"
        )
        wait_until(lambda: cannot_use(logs, emulator.url, said), timeout=10, message=said)
        wait_until(lambda: ledger_of(service).pending_counts() == {"forest": 1}, timeout=10)
        assert service.healthy()[0]
    assert server_count(emulator) == 0
    assert PASSWORD not in logs.text


def test_revoked_api_key(root: Path, logs: pytest.LogCaptureFixture) -> None:
    with Emulator(EmulatorOptions(port=0, api_keys=(API_KEY,), users={})) as emulator:
        config = cfg(emulator, root, api_key=API_KEY)
        with service_running(config) as service:
            sent = write_image(root / "forest" / "a.png", 1)
            wait_until(lambda: server_count(emulator) == 1, timeout=10)
            emulator.revoke_api_key(API_KEY)
            write_image(root / "forest" / "b.png", 2)
            said = (
                "the API key was rejected (revoked?) by the server at "
                f"{emulator.url} (HTTP 401); create a new one in the MVI UI and set "
                "credentials.api_key"
            )
            wait_until(lambda: f"uploads paused: {said}" in lines(logs), timeout=10)
            wait_until(lambda: cannot_use(logs, emulator.url, said), timeout=10)
            wait_until(lambda: ledger_of(service).pending_counts() == {"forest": 1}, timeout=10)
            assert service.healthy()[0]
        assert dict(server_files(emulator)) == {("forest", sha(sent)): 1}
    assert API_KEY not in logs.text


# -- the dataset ---------------------------------------------------------------------------


def test_dataset_deleted_on_the_server_while_running(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    with service_running(cfg(emulator, root)) as service:
        old = [write_image(root / "forest" / f"old{i}.png", i) for i in range(2)]
        wait_until(lambda: server_count(emulator) == 2, timeout=10)
        gone = service.dataset_id
        assert gone is not None
        emulator.delete_dataset(gone)
        new = write_image(root / "forest" / "new.png", 10)
        wait_until(lambda: server_count(emulator) == 3, timeout=15)
        wait_until(lambda: ledger_of(service).pending_counts() == {}, timeout=10)
        fresh = service.dataset_id
    (dataset,) = emulator.state()["datasets"]
    assert dataset["_id"] == fresh != gone and dataset["name"] == "tests"
    # Everything the folders hold is in the new dataset, once: the files the old one had were
    # reset to pending and uploaded again.
    assert dict(server_files(emulator)) == {
        **{("forest", sha(b)): 1 for b in old},
        ("forest", sha(new)): 1,
    }
    said = lines(logs, logging.INFO)
    assert any(x.startswith("the dataset is gone from the server (dataset ") for x in said)
    assert (
        f"dataset tests (id {gone}) that this service fed is gone from the server; its files "
        "will go into a new one"
    ) in said
    assert f"created dataset 'tests' (id {fresh})" in said
    assert "2 files uploaded to the previous dataset will be uploaded to the new one" in said


def test_dataset_replaced_by_a_new_one_of_the_same_name(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    with service_running(cfg(emulator, root)) as service:
        old = [write_image(root / "forest" / f"old{i}.png", i) for i in range(2)]
        wait_until(lambda: server_count(emulator) == 2, timeout=10)
        gone = service.dataset_id
        assert gone is not None
        # Someone deletes the dataset and makes a new one of that name in the MVI UI, and
        # uploads one of the images into it by hand.
        emulator.delete_dataset(gone)
        with MviClient(emulator.url, username="admin", password="passw0rd") as person:
            person.authenticate()
            replaced = person.create_dataset("tests")
            forest = person.ensure_category(replaced, "forest")
            part = UploadPart(root / "forest" / "old0.png", "old0.png", "image/png")
            person.upload(replaced, [part], category_name="forest", category_id=forest)
        new = write_image(root / "forest" / "new.png", 10)
        wait_until(lambda: server_count(emulator) == 3, timeout=15)
        # Wait for the final states: a row is ``uploading`` while its POST is answered.
        wait_until(
            lambda: (
                ledger_of(service).counts()["forest"]["uploaded"] == 2
                and ledger_of(service).counts()["forest"]["duplicate"] == 1
            ),
            timeout=15,
        )
        assert service.dataset_id == replaced
        counts = ledger_of(service).counts()["forest"]
    assert dict(server_files(emulator)) == {
        **{("forest", sha(b)): 1 for b in old},
        ("forest", sha(new)): 1,
    }
    assert counts["uploaded"] == 2 and counts["duplicate"] == 1
    assert f"using dataset 'tests' (id {replaced})" in lines(logs, logging.INFO)
    assert (
        "category 'forest': 1 pending files are already in the dataset (same name and size); "
        "skipping them (skip_duplicates)"
    ) in lines(logs, logging.INFO)


# -- starting and stopping -----------------------------------------------------------------


def test_connects_at_once_and_stops_at_once(emulator: Emulator, root: Path) -> None:
    # Before: the loop first waited up to a second for a file event before it connected, and
    # stop() was only seen when that wait ended.
    service = Service(cfg(emulator, root), retry=FAST_RETRY)
    thread = threading.Thread(target=service.run, name="test-service")
    thread.start()
    try:
        assert service.ready.wait(15)
        started_at = time.monotonic()
        wait_until(lambda: service.connected, timeout=10)
        assert time.monotonic() - started_at < 0.7
        beat = service.beats.last_loop
        wait_until(lambda: service.beats.last_loop != beat, timeout=5)  # a new wait has begun
        stopping_at = time.monotonic()
        service.stop()
        thread.join(10)
        assert time.monotonic() - stopping_at < 0.7
    finally:
        service.stop()
        thread.join(30)
    assert not thread.is_alive()


# -- secrets -------------------------------------------------------------------------------


def test_no_secret_in_any_log_line(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # everything, urllib3 included
    faults = FaultOptions(error_rate=0.3, seed=7)
    options = EmulatorOptions(port=0, users={"admin": PASSWORD}, token_lifetime=0.3, faults=faults)
    tokens: set[str] = set()
    with Emulator(options) as emulator:

        def all_uploaded() -> bool:
            # Remember every token the server issued, to look for it in the log afterwards.
            tokens.update(emulator._app.state._tokens)
            return server_count(emulator) == 8

        with service_running(cfg(emulator, root, password=PASSWORD)):
            for i in range(4):
                write_image(root / "forest" / f"f{i}.png", i)
                write_image(root / "city" / f"c{i}.png", 10 + i)
                time.sleep(0.15)  # spread over several token lifetimes, not a synchronisation
            wait_until(all_uploaded, timeout=30)
        state = emulator.state()
    assert state["tokens_issued"] >= 2 and state["faults"]["error"] >= 1
    assert tokens
    formatter = logging.Formatter()
    texts = []
    for record in caplog.records:
        texts.append(record.getMessage())
        texts.append(repr(record.args))
        if record.exc_info:
            texts.append(formatter.formatException(record.exc_info))
        if record.stack_info:
            texts.append(record.stack_info)
    assert len(texts) > 50
    for text in texts:
        assert PASSWORD not in text
        assert not any(token in text for token in tokens)


# -- the server fails files one by one (docs/what-happens-when.md, S4) ------------------

UPLOAD_ROUTE = "POST /datasets/{id}/files"
STORE_FAILURE = "Internal error while storing the file"


def _failed_files(emulator: Emulator) -> int:
    return int(emulator.state()["faults"].get("fail_in_200", 0))


def test_a_spell_of_server_failures_delays_files_but_rejects_none(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    emulator.set_faults(FaultOptions(fail_in_200_rate=1.0, routes=(UPLOAD_ROUTE,)))
    config = config_for(emulator, root, threshold={"upload": 10, "training": 1000})
    with service_running(config) as service:
        bodies = [write_image(root / "forest" / f"img{i}.png", i) for i in range(10)]
        # Every file failed six times over: more than a count of attempts would have allowed.
        wait_until(lambda: _failed_files(emulator) >= 60, timeout=30, message="60 failures")
        emulator.set_faults(FaultOptions())
        wait_until(lambda: server_count(emulator) == 10, timeout=30, message="10 stored")
        wait_until(
            lambda: ledger_of(service).counts()["forest"]["uploaded"] == 10,
            timeout=10,
            message="10 recorded as uploaded",
        )
        counts = ledger_of(service).counts()["forest"]
    assert counts["rejected"] == 0
    assert dict(server_files(emulator)) == {("forest", sha(b)): 1 for b in bodies}
    assert (
        f"forest/img0.png failed on the server ({STORE_FAILURE}); it is sent again while the "
        "server keeps storing other files (for up to 15 min)"
    ) in lines(logs)


def test_files_the_server_kept_failing_are_set_aside_and_sent_again_at_restart(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    from paiv_sync.filefaults import TRANSIENT_LIMIT
    from tests.test_bad_input_files import SkipClock

    emulator.set_faults(FaultOptions(fail_in_200_rate=1.0, routes=(UPLOAD_ROUTE,)))
    config = config_for(emulator, root, threshold={"upload": 2, "training": 1000})
    clock = SkipClock()
    with service_running(config, clock) as service:
        bodies = [write_image(root / "forest" / f"img{i}.png", i) for i in range(2)]
        # Sent a second time: the client has taken in the first failure (and its time).
        wait_until(lambda: _failed_files(emulator) >= 4, timeout=30, message="both failed twice")
        clock.advance(TRANSIENT_LIMIT + 1)  # the server has failed them for 15 minutes
        rejected = wait_until(
            lambda: len(rows := ledger_of(service).rejected()) == 2 and rows,
            timeout=30,
            message="both set aside as rejected",
        )
    assert {r.reason for r in rejected} == {
        f"the server failed it for 15 min ({STORE_FAILURE}); a restart or `paiv-sync retry` "
        "sends it again"
    }
    assert server_count(emulator) == 0
    emulator.set_faults(FaultOptions())
    with service_running(config) as service:
        wait_until(lambda: server_count(emulator) == 2, timeout=30, message="both stored")
        wait_until(
            lambda: ledger_of(service).counts()["forest"]["uploaded"] == 2,
            timeout=10,
            message="both recorded as uploaded",
        )
    assert dict(server_files(emulator)) == {("forest", sha(b)): 1 for b in bodies}
    assert "2 files the server failed to store before are sent again" in lines(logs, logging.INFO)


# -- answers lost while connecting (docs/what-happens-when.md, S6) -----------------------


@pytest.mark.parametrize(
    "route", ["POST /tokens", "POST /datasets"], ids=["login", "dataset-creation"]
)
def test_once_gets_through_dropped_connections_while_connecting(
    emulator: Emulator, root: Path, route: str
) -> None:
    emulator.set_faults(FaultOptions(drop_rate=1.0, routes=(route,), limit=2))
    body = write_image(root / "forest" / "a.png", 1)
    config = config_for(emulator, root)
    assert Service(config, once=True, retry=FAST_RETRY).run() == 0
    assert emulator.state()["faults"]["drop"] == 2
    assert dict(server_files(emulator)) == {("forest", sha(body)): 1}


def test_a_created_dataset_whose_answer_was_lost_is_used_not_created_again(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    # The server creates the dataset, then the connection drops before the answer.
    emulator.set_faults(FaultOptions(store_then_drop_rate=1.0, routes=("POST /datasets",), limit=1))
    body = write_image(root / "forest" / "a.png", 1)
    config = config_for(emulator, root, dataset={"name": "run", "action": "create"})
    assert Service(config, once=True, retry=FAST_RETRY).run() == 0
    datasets = emulator.state()["datasets"]
    assert emulator.state()["faults"]["store_then_drop"] == 1
    assert len(datasets) == 1, [d["name"] for d in datasets]
    assert [f["sha256"] for f in datasets[0]["files"]] == [sha(body)]
    assert any("was created although the answer was lost" in line for line in lines(logs, 20))


# -- intake goes on while the server is away (docs/what-happens-when.md, S7) --------------


def test_files_are_recorded_while_the_server_cannot_be_connected(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    config = config_for(emulator, root, threshold={"upload": 1, "training": 1000})
    first = write_image(root / "forest" / "first.png", 1)
    assert Service(config, once=True, retry=FAST_RETRY).run() == 0  # the dataset is remembered
    # Each look at the remembered dataset fails: connecting retries for as long as it lasts.
    emulator.set_faults(FaultOptions(error_rate=1.0, routes=("GET /datasets/{id}",)))
    with service_running(config, connected=False) as service:
        wait_until(lambda: emulator.state()["faults"]["error"] >= 3, message="connecting fails")
        bodies = [write_image(root / "city" / f"{i}.png", 10 + i) for i in range(5)]
        wait_until(
            lambda: ledger_of(service).pending_counts().get("city") == 5,
            message="the 5 new files recorded while the server is away",
        )
        assert server_count(emulator) == 1
        emulator.set_faults(FaultOptions())
        wait_until(lambda: server_count(emulator) == 6, timeout=30, message="all sent after")
    assert dict(server_files(emulator)) == {
        ("forest", sha(first)): 1,
        **{("city", sha(b)): 1 for b in bodies},
    }
