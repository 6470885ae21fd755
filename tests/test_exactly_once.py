"""Exactly once under server faults: every file written reaches its category once, no more.

The promise of design.md, checked against what the emulator really holds (content hashes per
category, and its own ``duplicates`` report). The first test runs the whole service with every
fault the emulator can inject at once; the others pin down, one by one, the ways a file could
be sent twice or lost that these faults uncovered, each at the point where it happened.

Shared helpers (``expected_files``, ``assert_exactly_once``) are used by the other
``test_exactly_once_*`` modules too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from paiv_sync.api import AmbiguousError, MviClient, UploadPart
from paiv_sync.emulator import Emulator, EmulatorOptions, FaultOptions
from paiv_sync.emulator.options import lenient
from paiv_sync.images import make_png
from paiv_sync.ledger import Ledger, Outcome
from paiv_sync.retry import RetryPolicy
from paiv_sync.trainer import Trainer
from paiv_sync.uploader import Uploader
from tests.e2e import FAST_RETRY, config_for, running, server_files, sha, write_image
from tests.helpers import wait_until

CATEGORIES = ("forest", "city", "sea")
UPLOAD_ROUTE = "POST /datasets/{id}/files"

# Every fault at once. Latency stays well under the client's read timeout: a request the
# server carries out after the client gave up on it cannot be told from a lost one (see the
# uploader's docstring), and that is a limit of the protocol, not something to test here.
FAULT_KINDS = ("error", "drop", "store_then_drop", "rate_limit", "fail_in_200", "latency")
ALL_FAULTS = FaultOptions(
    error_rate=0.2,
    drop_rate=0.05,
    store_then_drop_rate=0.05,
    rate_limit_rate=0.05,
    retry_after=0.05,
    latency=0.3,
    latency_rate=0.05,
    fail_in_200_rate=0.05,
)


# -- helpers shared by the exactly-once modules ------------------------------------------


def expected_files(root: Path) -> Counter[tuple[str, str]]:
    """``(category, sha256) -> copies`` for every image under ``root/<category>/``."""
    expected: Counter[tuple[str, str]] = Counter()
    for path in root.rglob("*.png"):
        if path.name.startswith("."):
            continue
        category = path.relative_to(root).parts[0]
        expected[(category, hashlib.sha256(path.read_bytes()).hexdigest())] += 1
    return expected


def assert_exactly_once(emulator: Emulator, expected: Mapping[tuple[str, str], int]) -> None:
    """Fail unless the server holds exactly ``expected``: no copy too many, none missing.

    ``expected`` maps ``(category, sha256)`` to the number of copies (1 for distinct files).
    """
    state = emulator.state()
    assert state["duplicates"] == [], f"the server holds duplicates: {state['duplicates']}"
    held = server_files(emulator)
    wanted = Counter(expected)
    missing = wanted - held
    extra = held - wanted
    assert not missing, f"{sum(missing.values())} files never reached the server: {missing}"
    assert not extra, f"{sum(extra.values())} copies the server should not hold: {extra}"
    assert len(state["datasets"]) == 1, "the files went into more than one dataset"


def same_size_pngs() -> tuple[bytes, bytes]:
    """Two different valid PNGs of exactly the same length (as two camera shots may be)."""
    by_size: dict[int, bytes] = {}
    for seed in range(1000, 2000):
        body = make_png(16, 16, seed=seed)
        twin = by_size.setdefault(len(body), body)
        if twin != body:
            return twin, body
    raise AssertionError("no two test images of the same size")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    for category in CATEGORIES:
        (folder / category).mkdir(parents=True)
    return folder


def server_options(kind: str, **changes: Any) -> EmulatorOptions:
    """The emulator as the product answers (``product``, the default) or as our older, kinder
    emulator did (``lenient``: per-file failures inside a 200, no transient 500s)."""
    if kind == "lenient":
        return lenient(port=0, **changes)
    return EmulatorOptions(port=0, **changes)


SERVER_KINDS = pytest.mark.parametrize("kind", ["product", "lenient"])


def ledger_states(ledger: Ledger) -> Counter[str]:
    """How many rows the ledger holds in each state, over every category."""
    totals: Counter[str] = Counter()
    for counts in ledger.counts().values():
        totals.update(counts)
    return totals


# -- the whole service, every fault at once -----------------------------------------------


@SERVER_KINDS
def test_every_server_fault_at_once_each_file_arrives_exactly_once(root: Path, kind: str) -> None:
    faults = dataclasses.replace(ALL_FAULTS, seed=4)
    # Tokens expire every second: re-logins (and their faults) happen throughout.
    options = server_options(kind, token_lifetime=1.0, faults=faults)
    with Emulator(options) as emulator:
        config = config_for(
            # Threshold 1: a pause in the burst (a loaded machine) flushes part of a category;
            # with a higher threshold its tail could stay below it and wait for more files.
            emulator,
            root,
            threshold={"upload": 1, "training": 1000},
            batch_size=8,
            time=0.2,
        )
        with running(config) as runner:
            for i in range(300):
                write_image(root / CATEGORIES[i % 3] / f"img{i:04d}.png", i)
            ledger = runner.service.ledger
            assert ledger is not None

            def uploaded() -> int:
                return sum(c.get("uploaded", 0) for c in ledger.counts().values())

            wait_until(
                lambda: uploaded() == 300,
                timeout=60,
                message="all 300 files uploaded according to the ledger",
            )
            injected = Counter(emulator.state()["faults"])
            missing = [kind for kind in FAULT_KINDS if not injected[kind]]
            if missing:
                # The draws follow the order in which requests arrive, which the threads
                # decide: a kind the rates did not draw is aimed at the uploads of 30 more
                # files, until each kind was injected at least once.
                aimed = {f"{kind}_rate": 0.3 for kind in missing}
                emulator.set_faults(
                    dataclasses.replace(
                        ALL_FAULTS,
                        **{f"{k}_rate": 0.0 for k in FAULT_KINDS if k not in missing},
                        **aimed,
                        seed=5,
                        routes=(UPLOAD_ROUTE,),
                    )
                )
                for i in range(300, 330):
                    write_image(root / CATEGORIES[i % 3] / f"img{i:04d}.png", i)
                wait_until(
                    lambda: all(emulator.state()["faults"][kind] for kind in missing),
                    timeout=60,
                    message=f"the kinds not drawn at first: {missing}",
                )
                injected += Counter(emulator.state()["faults"])
                emulator.set_faults(FaultOptions())
                wait_until(lambda: uploaded() == 330, timeout=60, message="the 30 more uploaded")
            expected = expected_files(root)
        assert_exactly_once(emulator, expected)
    # The run really went through every kind of fault, the dangerous ones included.
    for kind in FAULT_KINDS:
        assert injected[kind] > 0, f"no {kind} fault was injected: {injected}"


@SERVER_KINDS
def test_files_refused_inside_a_mixed_answer_are_settled_one_by_one(
    tmp_path: Path, kind: str
) -> None:
    # The case a new user met: the product answers a request in which some files failed with
    # a 400 carrying the per-file list, and stores the others. 200 images, 4 categories, 8 %
    # of the files refused per attempt: each must end on the server once, and no row may stay
    # "uploading" or pending while the service runs.
    root = tmp_path / "images"
    categories = ("forest", "city", "sea", "desert")
    faults = FaultOptions(fail_in_200_rate=0.08, seed=11, routes=(UPLOAD_ROUTE,))
    for category in categories:
        (root / category).mkdir(parents=True)
    with Emulator(server_options(kind, faults=faults)) as emulator:
        config = config_for(
            # Threshold 1: see the test above (batches of 10 still form during the burst).
            emulator,
            root,
            threshold={"upload": 1, "training": 1000},
            batch_size=10,
            time=0.2,
        )
        with running(config) as runner:
            for i in range(200):
                write_image(root / categories[i % 4] / f"img{i:04d}.png", 7000 + i)
            expected = expected_files(root)
            ledger = runner.service.ledger
            assert ledger is not None
            settled = wait_until(
                lambda: (
                    (states := ledger_states(ledger))["uploaded"] + states["rejected"] == 200
                    and states
                ),
                timeout=60,
                message="every file uploaded or rejected",
            )
            assert settled["uploading"] == 0 and settled["pending"] == 0
            # A failure to store a file is the server's, not the file's: none is set aside.
            assert settled["rejected"] == 0
        state = emulator.state()
        assert state["faults"]["fail_in_200"] > 0, "no file was refused: the test tested nothing"
        rejected = {(r.category, r.sha256) for r in ledger_rows_rejected(config)}
        held = server_files(emulator)
        assert state["duplicates"] == []
        assert held == Counter({key: n for key, n in expected.items() if key not in rejected})


def test_a_batch_in_doubt_is_looked_up_by_its_tag_not_fooled_by_a_look_alike(
    tmp_path: Path,
) -> None:
    # Another station put a different image of the same name and size into the category. By
    # name and size, our unanswered upload of img1.png would pass for stored and never be sent
    # again; asked for by its batch's tag, the server says it holds nothing of it.
    root = tmp_path / "images"
    (root / "forest").mkdir(parents=True)
    theirs, ours = same_size_pngs()
    with Emulator(EmulatorOptions(port=0)) as emulator:
        config = config_for(emulator, root, threshold={"upload": 1, "training": 1000})
        with running(config) as runner:
            ledger = runner.service.ledger
            assert ledger is not None
            write_image(root / "forest" / "a.png", 1)
            wait_until(lambda: sum(server_files(emulator).values()) == 1, message="first upload")
            (dataset,) = emulator.state()["datasets"]
            wait_until(lambda: ledger.get_meta(f"tags_supported:{dataset['_id']}") == "yes")
            elsewhere = tmp_path / "elsewhere" / "img1.png"
            elsewhere.parent.mkdir()
            elsewhere.write_bytes(theirs)
            with _client(emulator) as client:
                client.upload(
                    dataset["_id"], [_part(elsewhere)], category_name="forest", category_id=None
                )
            emulator.set_faults(FaultOptions(drop_rate=1.0, routes=(UPLOAD_ROUTE,)))
            (root / "forest" / "img1.png").write_bytes(ours)
            wait_until(lambda: emulator.state()["faults"]["drop"] >= 1, message="a lost answer")
            emulator.set_faults(FaultOptions())
            wait_until(
                lambda: server_files(emulator)[("forest", sha(ours))] == 1,
                timeout=20,
                message="our img1.png sent again and stored",
            )
        state = emulator.state()
    tagged = [f for f in state["datasets"][0]["files"] if f["user_metadata"]]
    assert {f["user_metadata"]["paiv_sync_folder"] for f in tagged} == {str(root / "forest")}
    assert all(f["user_metadata"]["paiv_sync_host"] for f in tagged)
    assert len(tagged) == 2 and sum(len(d["files"]) for d in state["datasets"]) == 3
    assert state["duplicates"] == []


def ledger_rows_rejected(config: Any) -> list[Any]:
    with Ledger(config.ledger_path) as ledger:
        return ledger.rejected()


def test_the_check_fails_when_the_server_holds_a_copy_twice(tmp_path: Path) -> None:
    # The assertion used everywhere here must be able to fail: send one file twice by hand.
    body = write_image(tmp_path / "forest" / "a.png", 1)
    with Emulator(EmulatorOptions(port=0)) as emulator, _client(emulator) as client:
        dataset = client.create_dataset("tests")
        for _ in range(2):
            client.upload(
                dataset,
                [_part(tmp_path / "forest" / "a.png")],
                category_name="forest",
                category_id=None,
            )
        assert emulator.state()["duplicates"][0]["count"] == 2
        with pytest.raises(AssertionError, match="duplicates"):
            assert_exactly_once(emulator, {("forest", sha(body)): 1})


def test_faults_aimed_at_one_route_leave_the_others_alone() -> None:
    # The tests below aim faults at one route (FaultOptions.routes) to hit one exact moment.
    faults = FaultOptions.from_mapping({"error_rate": 1.0, "routes": ["POST /dltasks"]})
    assert faults.routes == ("POST /dltasks",)
    with Emulator(EmulatorOptions(port=0, faults=faults)) as emulator, _client(emulator) as client:
        dataset = client.create_dataset("tests")  # not aimed at
        with pytest.raises(AmbiguousError):
            client.start_training(dataset, "model")
        assert emulator.state()["faults"]["error"] == 1
    with pytest.raises(ValueError, match="METHOD /path"):
        FaultOptions(routes=("dltasks",))


# -- the ways a file was sent twice or lost, one at a time ---------------------------------


def _client(emulator: Emulator, retry: RetryPolicy = FAST_RETRY) -> MviClient:
    return MviClient(emulator.url, username="admin", password="passw0rd", retry=retry, timeout=5)


def _part(path: Path) -> UploadPart:
    return UploadPart(path, path.name, "image/png")


def _record(ledger: Ledger, root: Path, rel: str, *, dup: bool = True) -> Outcome:
    path = root / rel
    st = path.stat()
    return ledger.record(
        root=str(root),
        rel_path=rel,
        category=rel.split("/")[0],
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        content_type="image/png",
        skip_duplicates=dup,
    )


class _Parts:
    """An emulator, a ledger, a client and an uploader feeding one dataset."""

    def __init__(self, tmp_path: Path, faults: FaultOptions | None = None) -> None:
        self.root = tmp_path / "images"
        self.stop = threading.Event()
        self.emulator = Emulator(EmulatorOptions(port=0, faults=faults or FaultOptions()))
        self.ledger = Ledger(tmp_path / "state" / "ledger.sqlite3")
        self.client: MviClient | None = None
        self.sleeps: list[float] = []
        self.on_sleep: list[object] = []

    def start(self) -> _Parts:
        self.emulator.start()
        self.client = _client(self.emulator)
        self.uploader = Uploader(
            self.client, self.ledger, retry=FAST_RETRY, stop_event=self.stop, sleep=self._sleep
        )
        self.uploader.dataset_id = self.client.create_dataset("tests")
        return self

    def _sleep(self, seconds: float) -> None:
        # The uploader's back-off: the moment between an unanswered POST and the next step.
        self.sleeps.append(seconds)
        while self.on_sleep:
            action = self.on_sleep.pop(0)
            assert callable(action)
            action()

    def send_pending(self, category: str) -> None:
        """What the service's next flush does: upload every pending file of ``category``."""
        rows = self.ledger.pending(category)
        if rows:
            self.uploader.upload_batch(category, [r.id for r in rows])

    def close(self) -> None:
        self.stop.set()
        if self.client is not None:
            self.client.close()
        self.ledger.close()
        self.emulator.stop()


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[_Parts]:
    made = _Parts(tmp_path).start()
    try:
        yield made
    finally:
        made.close()


def test_a_batch_in_flight_is_not_taken_for_in_doubt(parts: _Parts) -> None:
    # Bug: when one upload worker failed, the service reconnected and resolved every
    # ``uploading`` row against the server -- also those of a batch another worker was still
    # sending. Not yet stored, they went back to ``pending`` and were sent a second time.
    bodies = [write_image(parts.root / "forest" / f"a{i}.png", i) for i in range(3)]
    ids = [_record(parts.ledger, parts.root, f"forest/a{i}.png").row.id for i in range(3)]
    parts.emulator.set_faults(FaultOptions(latency=1.0, latency_rate=1.0, routes=(UPLOAD_ROUTE,)))
    worker = threading.Thread(target=parts.uploader.upload_batch, args=("forest", ids))
    worker.start()
    try:
        wait_until(lambda: parts.emulator.state()["requests"].get(UPLOAD_ROUTE), timeout=5)
        parts.uploader.resolve_in_doubt()  # a reconnect while the POST is on its way
    finally:
        worker.join(10)
    parts.send_pending("forest")
    assert_exactly_once(parts.emulator, {("forest", sha(b)): 1 for b in bodies})
    assert parts.ledger.counts()["forest"]["uploaded"] == 3


def test_a_file_touched_after_an_unanswered_upload_is_not_sent_again(parts: _Parts) -> None:
    # Bug: after a POST whose answer was lost, a file whose mtime changed (touch, a copy of the
    # same content over it) went back to ``pending`` before the server was asked, and the
    # unchanged content was sent a second time.
    body = write_image(parts.root / "forest" / "a.png", 1)
    row = _record(parts.ledger, parts.root, "forest/a.png").row
    parts.emulator.set_faults(FaultOptions(store_then_drop_rate=1.0, routes=(UPLOAD_ROUTE,)))
    path = parts.root / "forest" / "a.png"

    def touch() -> None:
        os.utime(path, ns=(row.mtime_ns + 10**9, row.mtime_ns + 10**9))
        parts.emulator.set_faults(FaultOptions())

    parts.on_sleep.append(touch)
    parts.uploader.upload_batch("forest", [row.id])
    # The pipeline sees the new mtime, hashes again: same content.
    assert not _record(parts.ledger, parts.root, "forest/a.png").new
    parts.send_pending("forest")
    assert_exactly_once(parts.emulator, {("forest", sha(body)): 1})
    assert parts.emulator.state()["faults"]["store_then_drop"] == 1


def test_new_content_of_the_same_name_and_size_is_not_taken_for_the_old(parts: _Parts) -> None:
    # Bug: the server lists files by name and size only. Once a file was replaced by new
    # content of the same size, the old copy on the server passed for the new one when an
    # upload of it went unanswered: the new image was marked uploaded and never sent.
    old, new = same_size_pngs()
    path = parts.root / "forest" / "shot.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(old)
    first = _record(parts.ledger, parts.root, "forest/shot.png").row
    parts.uploader.upload_batch("forest", [first.id])
    path.write_bytes(new)
    os.utime(path, ns=(first.mtime_ns + 10**9, first.mtime_ns + 10**9))
    assert _record(parts.ledger, parts.root, "forest/shot.png").new
    # The next POST gets a 5xx (nothing stored); the server must be asked before resending.
    parts.emulator.set_faults(FaultOptions(error_rate=1.0, routes=(UPLOAD_ROUTE,)))
    parts.on_sleep.append(lambda: parts.emulator.set_faults(FaultOptions()))
    parts.send_pending("forest")
    parts.send_pending("forest")
    assert_exactly_once(parts.emulator, {("forest", sha(old)): 1, ("forest", sha(new)): 1})


def test_new_content_of_the_same_name_and_size_is_no_server_duplicate_after_restart(
    root: Path,
) -> None:
    # The same confusion at start-up with skip_duplicates: the new content was recorded as
    # "already in the dataset" because the server held a file of that name and size.
    old, new = same_size_pngs()
    path = root / "forest" / "shot.png"
    with Emulator(EmulatorOptions(port=0)) as emulator:
        config = config_for(emulator, root, threshold={"upload": 1, "training": 1000})
        with running(config):
            path.write_bytes(old)
            wait_until(lambda: server_files(emulator)[("forest", sha(old))] == 1)
        path.write_bytes(new)
        with running(config) as runner:
            ledger = runner.service.ledger
            assert ledger is not None

            def settled() -> str | None:
                row = ledger.lookup(str(root), "forest/shot.png")
                if row is None or row.sha256 != sha(new) or row.state in ("pending", "uploading"):
                    return None
                return row.state

            state = wait_until(settled, timeout=15)
            assert state == "uploaded", ledger.lookup(str(root), "forest/shot.png")
        assert_exactly_once(emulator, {("forest", sha(old)): 1, ("forest", sha(new)): 1})


def test_a_refused_batch_is_sent_one_by_one_not_left_below_the_threshold(root: Path) -> None:
    # Bug: when the server refused a whole upload request (here: the re-login it needed
    # answered "result: fail"), all files but one went back to ``pending`` "for the next
    # flush" -- which, below the upload threshold, never came.
    with Emulator(EmulatorOptions(port=0)) as emulator:
        config = config_for(
            emulator, root, threshold={"upload": 4, "training": 1000}, time=0.1, skip_duplicates=0
        )
        slow = RetryPolicy(initial=0.3, maximum=1.0, jitter=0.0)
        with running(config, retry=slow):
            bodies = [write_image(root / "forest" / f"f{i}.png", i) for i in range(4)]
            wait_until(lambda: sum(server_files(emulator).values()) == 4, timeout=10)
            # The session token is revoked and the re-login fails once: the POST that needed
            # it is refused as a whole.
            logins = emulator.state()["requests"].get("POST /tokens", 0)
            emulator.revoke_tokens()
            emulator.set_faults(FaultOptions(fail_in_200_rate=1.0, routes=("POST /tokens",)))
            bodies += [write_image(root / "forest" / f"g{i}.png", 10 + i) for i in range(4)]
            wait_until(lambda: emulator.state()["requests"].get("POST /tokens", 0) > logins)
            emulator.set_faults(FaultOptions())
            wait_until(lambda: sum(server_files(emulator).values()) == 8, timeout=10)
        assert_exactly_once(emulator, {("forest", sha(b)): 1 for b in bodies})


def test_a_name_the_server_records_differently_is_still_recognised(parts: _Parts) -> None:
    # A double quote cannot travel in a multipart file name: the client sends (and the server
    # records) it as "_". After an unanswered upload the dataset's list must still be read
    # with the name as the server knows it, or the file is sent a second time.
    body = write_image(parts.root / "forest" / 'say "cheese".png', 1)
    row = _record(parts.ledger, parts.root, 'forest/say "cheese".png').row
    parts.emulator.set_faults(FaultOptions(store_then_drop_rate=1.0, routes=(UPLOAD_ROUTE,)))
    parts.on_sleep.append(lambda: parts.emulator.set_faults(FaultOptions()))
    parts.uploader.upload_batch("forest", [row.id])
    assert_exactly_once(parts.emulator, {("forest", sha(body)): 1})
    names = [f["original_file_name"] for f in parts.emulator.state()["datasets"][0]["files"]]
    assert names == ["say _cheese_.png"]


def test_a_timed_out_upload_that_the_server_stores_late_is_not_sent_again(
    tmp_path: Path,
) -> None:
    # The client gives up on a POST after its read timeout; the server is still working on
    # it and stores the file a little later. Listed at once, the dataset does not show it yet:
    # the uploader must look again for a while before sending the file a second time.
    root = tmp_path / "images"
    body = write_image(root / "forest" / "slow.png", 1)
    faults = FaultOptions(latency=1.2, latency_rate=1.0, routes=(UPLOAD_ROUTE,))
    with (
        Emulator(EmulatorOptions(port=0, faults=faults)) as emulator,
        Ledger(tmp_path / "state" / "ledger.sqlite3") as ledger,
        MviClient(
            emulator.url, username="admin", password="passw0rd", retry=FAST_RETRY, timeout=0.5
        ) as client,
    ):
        uploader = Uploader(client, ledger, retry=FAST_RETRY, stop_event=threading.Event())
        uploader.dataset_id = client.create_dataset("tests")
        row = _record(ledger, root, "forest/slow.png").row
        report = uploader.upload_batch("forest", [row.id])
        assert report.uploaded == 1
        assert emulator.state()["requests"][UPLOAD_ROUTE] == 1
        assert_exactly_once(emulator, {("forest", sha(body)): 1})


def test_a_timed_out_training_request_the_server_carries_out_late_trains_once(
    tmp_path: Path,
) -> None:
    # The same for POST /dltasks: looked up too soon, the task would pass for never made.
    for i in range(10):
        write_image(tmp_path / "up" / ("forest", "city")[i % 2] / f"f{i}.png", i)
    faults = FaultOptions(latency=1.2, latency_rate=1.0, routes=("POST /dltasks",))
    options = EmulatorOptions(port=0, training_seconds=0.2, faults=faults)
    with (
        Emulator(options) as emulator,
        Ledger(tmp_path / "state" / "ledger.sqlite3") as ledger,
        MviClient(
            emulator.url, username="admin", password="passw0rd", retry=FAST_RETRY, timeout=0.5
        ) as client,
    ):
        dataset = client.create_dataset("tests")
        for category in ("forest", "city"):
            parts = [_part(p) for p in sorted((tmp_path / "up" / category).iterdir())]
            client.upload(dataset, parts, category_name=category, category_id=None)
        ledger.set_meta("uploads_total", "10")  # as if this service had uploaded them
        trainer = Trainer(
            client,
            ledger,
            model_name="clf",
            action="train",
            threshold=10,
            strategy={},
            stop_event=threading.Event(),
        )
        trainer.dataset_id = dataset
        assert trainer.step() is not None  # asked; no answer within the timeout
        wait_until(lambda: trainer.step() is None, timeout=15)  # found, followed to the end
        tasks = emulator.state()["tasks"]
    assert len(tasks) == 1, tasks
    assert tasks[0]["status"] == "trained" and tasks[0]["name"].startswith("clf-")
