"""What paiv-sync does with bad files and odd folder layouts (docs/what-happens-when.md).

End to end: real folders, a real watchdog observer, real HTTP to the emulator. Each test asserts
what the server holds (``emulator.state()``), what the ledger says and the line the user reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from paiv_sync.config import Config
from paiv_sync.emulator import Emulator
from paiv_sync.images import make_jpeg, make_png
from paiv_sync.ledger import Ledger
from paiv_sync.service import Service
from tests.e2e import (
    FAST_RETRY,
    config_for,
    replace_keeping_size_and_mtime,
    server_count,
    server_files,
    sha,
    write_image,
)
from tests.helpers import wait_until
from tests.test_exactly_once import same_size_pngs

# -- helpers -----------------------------------------------------------------------------


class SkipClock:
    """The service's monotonic clock, which a test can move forward (to make a rescan due)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@contextmanager
def service_running(
    config: Config, clock: SkipClock | None = None, *, connected: bool = True
) -> Iterator[Service]:
    """Run a Service in a thread; yield it once it is ready (and, by default, connected);
    stop it after."""
    service = Service(config, retry=FAST_RETRY, clock=clock or time.monotonic)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(service.run()), name="test-service")
    thread.start()
    try:
        assert service.ready.wait(15), "service did not become ready"
        if connected:
            wait_until(lambda: service.connected, timeout=15, message="service connected")
        yield service
    finally:
        service.stop()
        thread.join(30)
        assert not thread.is_alive(), "service did not stop"
    assert codes == [0]


def ledger_of(service: Service) -> Ledger:
    assert service.ledger is not None
    return service.ledger


def rescan(service: Service, clock: SkipClock, caplog: pytest.LogCaptureFixture) -> None:
    """Make the periodic rescan due now and wait until it has run once more."""

    def scans() -> int:
        return sum(r.getMessage() == "periodic rescan" for r in caplog.records)

    before = scans()
    clock.advance(service.config.rescan_interval + 1)
    wait_until(lambda: scans() > before, timeout=10, message="a periodic rescan")
    # The scan runs right after its log line; the next loop turn shows it has finished.
    beat = service.beats.last_loop
    wait_until(lambda: service.beats.last_loop != beat, timeout=10, message="the loop turned")


def put(path: Path, data: bytes) -> bytes:
    """Write ``data`` at ``path`` atomically (a temporary hidden name, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    temp.replace(path)
    return data


def lines(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    """Every paiv-sync log line at ``level`` or above, as the user reads it."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= level and r.name.startswith("paiv_sync")
    ]


def held_names(emulator: Emulator) -> Counter[tuple[str, str]]:
    """``(category, original file name) -> copies`` over every dataset."""
    held: Counter[tuple[str, str]] = Counter()
    for dataset in emulator.state()["datasets"]:
        for item in dataset["files"]:
            held[(item["category_name"], item["original_file_name"])] += 1
    return held


def nonzero(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The ledger's per-category counts without the states at zero."""
    return {c: {s: n for s, n in row.items() if n} for c, row in counts.items()}


def cfg(emulator: Emulator, root: Path, **changes: Any) -> Config:
    """Upload every file at once (threshold 1), quickly; ``changes`` as for config_for."""
    base: dict[str, Any] = {
        "threshold": {"upload": 1, "training": 1000},
        "time": 0.1,
        "settle_time": 0.05,
    }
    base.update(changes)
    return config_for(emulator, root, **base)


# -- file contents -----------------------------------------------------------------------

BAD_CONTENT = {
    "empty": (b"", "empty file"),
    "text-named-jpg": (b"camera log: nothing to see\n", "not an image (starts with text)"),
    "truncated-jpeg": (make_jpeg(5)[:-40], "truncated JPEG (no end-of-image marker)"),
    "gif-named-png": (b"GIF89a" + bytes(range(64)), "not a JPEG or PNG image (looks like GIF)"),
    "over-size-limit": (make_png(200, 200, seed=5), "larger than the size limit (115 kB > 2 kB)"),
}


@pytest.mark.parametrize("case", list(BAD_CONTENT))
def test_bad_content_is_rejected_with_its_reason(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture, case: str
) -> None:
    data, reason = BAD_CONTENT[case]
    name = "bad.png" if case in ("gif-named-png", "over-size-limit") else "bad.jpg"
    config = cfg(emulator, root, max_file_size=2000)
    with service_running(config) as service:
        put(root / "forest" / name, data)
        wait_until(lambda: ledger_of(service).rejected(), timeout=10)
        # The service goes on: the next good file is uploaded.
        good = write_image(root / "forest" / "good.png", 1)
        wait_until(lambda: server_count(emulator) == 1, timeout=10)
        (row,) = ledger_of(service).rejected()
    assert dict(server_files(emulator)) == {("forest", sha(good)): 1}
    assert row.rel_path == f"forest/{name}"
    assert (row.reason or "").startswith(reason)
    assert any(line.startswith(f"forest/{name} not uploaded: {reason}") for line in lines(logs))


def test_rejected_file_fixed_in_place_is_uploaded(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    complete = make_jpeg(7)
    with service_running(cfg(emulator, root)) as service:
        put(root / "city" / "cam.jpg", complete[: len(complete) // 2])
        wait_until(lambda: ledger_of(service).rejected(), timeout=10)
        put(root / "city" / "cam.jpg", complete)  # the user copies the whole file again
        wait_until(lambda: server_count(emulator) == 1, timeout=10)
        assert ledger_of(service).rejected() == []
    assert dict(server_files(emulator)) == {("city", sha(complete)): 1}
    assert "city/cam.jpg not uploaded: truncated JPEG (no end-of-image marker)" in lines(logs)


def test_file_directly_in_a_root_is_skipped_with_a_warning(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    stray_at_start = write_image(root / "early.png", 1)
    with service_running(cfg(emulator, root)) as service:
        write_image(root / "stray.png", 2)
        wait_until(
            lambda: (
                f"{root / 'stray.png'} skipped: directly in a root folder, "
                "not in a category folder" in lines(logs)
            ),
            timeout=10,
        )
        # Moved into a category folder, it is taken.
        (root / "early.png").replace(root / "forest" / "early.png")
        wait_until(lambda: server_count(emulator) == 1, timeout=10)
        assert ledger_of(service).lookup(str(root), "stray.png") is None
    assert dict(server_files(emulator)) == {("forest", sha(stray_at_start)): 1}
    assert (
        f"{root / 'early.png'} skipped: directly in a root folder, not in a category folder"
        in lines(logs)
    )


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_called_jpg_is_skipped_not_waited_on(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    # Tests run as root, so chmod cannot make a file unreadable; a named pipe cannot be read
    # either (opening it waits for a writer forever), which is the honest equivalent here.
    os.mkfifo(root / "forest" / "at-start.jpg")
    with service_running(cfg(emulator, root)) as service:
        os.mkfifo(root / "forest" / "pipe.jpg")
        good = write_image(root / "forest" / "good.png", 1)
        wait_until(lambda: server_count(emulator) == 1, timeout=10)
        later = write_image(root / "forest" / "later.png", 2)  # the pipeline did not hang
        wait_until(lambda: server_count(emulator) == 2, timeout=10)
        assert ledger_of(service).lookup(str(root), "forest/pipe.jpg") is None
    assert dict(server_files(emulator)) == {("forest", sha(good)): 1, ("forest", sha(later)): 1}
    assert f"{root / 'forest' / 'pipe.jpg'} skipped: not a regular file" in " ".join(lines(logs))
    assert f"{root / 'forest' / 'at-start.jpg'} skipped: not a regular file" in " ".join(
        lines(logs)
    )


def _permissions_stop_reading() -> bool:
    """Whether a file without read permission is unreadable to this process (not so for root)."""
    probe = Path(tempfile.mkdtemp()) / "probe"
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        probe.read_bytes()
    except PermissionError:
        return True
    finally:
        probe.chmod(0o600)
        shutil.rmtree(probe.parent)
    return False


@pytest.mark.skipif(
    not _permissions_stop_reading(),
    reason="runs as root: file permissions cannot stop root from reading a file",
)
def test_unreadable_file_waits_until_it_can_be_read(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    config = cfg(emulator, root, rescan_interval=10)
    clock = SkipClock()
    locked = root / "forest" / "locked.png"
    body = write_image(locked, 1)
    locked.chmod(0)
    try:
        with service_running(config, clock) as service:
            wait_until(
                lambda: any("locked.png cannot be read" in line for line in lines(logs)),
                timeout=10,
            )
            assert server_count(emulator) == 0
            locked.chmod(0o644)
            rescan(service, clock, logs)
            wait_until(lambda: server_count(emulator) == 1, timeout=10)
    finally:
        locked.chmod(0o644)
    assert dict(server_files(emulator)) == {("forest", sha(body)): 1}


def test_file_deleted_before_upload_is_forgotten(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    config = cfg(emulator, root, threshold={"upload": 2, "training": 1000})
    with service_running(config) as service:
        write_image(root / "forest" / "a.png", 1)
        wait_until(lambda: ledger_of(service).pending_counts().get("forest") == 1, timeout=10)
        (root / "forest" / "a.png").unlink()
        b = write_image(root / "forest" / "b.png", 2)  # the second file: the batch goes
        wait_until(lambda: server_count(emulator) == 1, timeout=10)
        wait_until(lambda: not ledger_of(service).pending_counts(), timeout=10)
        assert ledger_of(service).lookup(str(root), "forest/a.png") is None
    assert dict(server_files(emulator)) == {("forest", sha(b)): 1}
    # The uploader notices at upload time (see the report: its line doubles the folder).
    said = "forest/a.png was deleted before upload; forgotten"
    assert any(line.endswith(said) for line in lines(logs))


def test_same_name_in_two_categories_goes_to_each(emulator: Emulator, root: Path) -> None:
    with service_running(cfg(emulator, root)):
        forest = write_image(root / "forest" / "img001.png", 1)
        city = write_image(root / "city" / "img001.png", 2)
        same = write_image(root / "forest" / "same.png", 3)
        (root / "city" / "same.png").write_bytes(same)  # same name AND same content
        wait_until(lambda: server_count(emulator) == 4, timeout=10)
    assert dict(server_files(emulator)) == {
        ("forest", sha(forest)): 1,
        ("city", sha(city)): 1,
        ("forest", sha(same)): 1,
        ("city", sha(same)): 1,
    }
    assert held_names(emulator)[("forest", "img001.png")] == 1
    assert held_names(emulator)[("city", "img001.png")] == 1


def test_unusual_names_arrive_once_each(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    names = {
        "été 日本 ü.png": "été 日本 ü.png",
        "with  spaces .png": "with  spaces .png",
        "UPPER.PNG": "UPPER.PNG",
        "new\nline.png": "new_line.png",  # a line break cannot travel in a multipart header
        'say "cheese".png': "say _cheese_.png",
        "back\\slash.png": "back_slash.png",
        "100%.png": "100%.png",
    }
    config = cfg(emulator, root, threshold={"upload": len(names), "training": 1000})
    bodies = {}
    with service_running(config) as service:
        for seed, name in enumerate(names):
            bodies[name] = write_image(root / "forest" / name, seed)
        wait_until(lambda: server_count(emulator) >= len(names), timeout=10)
        wait_until(lambda: ledger_of(service).counts()["forest"].get("uploaded") == 7, timeout=10)
        # Nothing more arrives: no upload was in doubt and sent again.
        threading.Event().wait(0.5)
    assert dict(server_files(emulator)) == {("forest", sha(b)): 1 for b in bodies.values()}
    assert dict(held_names(emulator)) == {("forest", wire): 1 for wire in names.values()}
    assert lines(logs) == []


def _undecodable_names_allowed(folder: Path) -> bool:
    """Whether this file system stores names that are not UTF-8 (Linux does, macOS does not)."""
    try:
        probe = os.fsencode(folder) + b"/probe\xe9"
        with open(probe, "wb"):
            pass
        os.unlink(probe)  # noqa: PTH108 - a bytes path, which Path cannot hold
    except OSError:
        return False
    return True


def test_names_that_are_not_utf8_are_skipped_and_the_others_go_on(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    if not _undecodable_names_allowed(root):
        pytest.skip("this file system refuses names that are not UTF-8")
    base = os.fsencode(root)
    # Latin-1 names, as old NAS shares and Samba mounts hold them: one file, one folder.
    with open(base + b"/forest/caf\xe9.png", "wb") as handle:
        handle.write(make_png(8, 8, seed=1))
    os.mkdir(base + b"/b\xe9ton")  # noqa: PTH102 - a bytes path
    with open(base + b"/b\xe9ton/x.png", "wb") as handle:
        handle.write(make_png(8, 8, seed=2))
    before = write_image(root / "forest" / "ok.png", 3)
    with service_running(cfg(emulator, root)) as service:
        wait_until(lambda: server_count(emulator) == 1, timeout=10, message="ok.png uploaded")
        # One created while the service runs, then a good one after it.
        with open(base + b"/city/cr\xe8me.png", "wb") as handle:
            handle.write(make_png(8, 8, seed=4))
        after = write_image(root / "city" / "ok.png", 5)
        wait_until(lambda: server_count(emulator) == 2, timeout=10, message="city/ok.png")
        wait_until(
            lambda: any("cr\\xe8me.png skipped" in line for line in lines(logs)),
            timeout=10,
            message="the warning for the file created at run time",
        )
        # The server holds it before the ledger records the answer: wait for the rows.
        counts = wait_until(
            lambda: (
                (c := nonzero(ledger_of(service).counts()))
                == {"forest": {"uploaded": 1}, "city": {"uploaded": 1}}
                and c
            ),
            timeout=10,
            message="both recorded as uploaded, nothing else recorded",
        )
    assert dict(server_files(emulator)) == {("forest", sha(before)): 1, ("city", sha(after)): 1}
    assert counts == {"forest": {"uploaded": 1}, "city": {"uploaded": 1}}
    skipped = sorted(line.split(" skipped: ")[0].rsplit("/", 2)[-2:][-1] for line in lines(logs))
    assert skipped == ["b\\xe9ton", "caf\\xe9.png", "cr\\xe8me.png"]
    assert all("not valid UTF-8" in line and "convmv" in line for line in lines(logs))


# -- links -------------------------------------------------------------------------------


def test_symlink_to_a_file_is_skipped_with_a_warning(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    target = write_image(root / "forest" / "real.png", 1)
    (root / "city" / "at-start.png").symlink_to(root / "forest" / "real.png")
    with service_running(cfg(emulator, root)) as service:
        (root / "city" / "link.png").symlink_to(root / "forest" / "real.png")
        wait_until(
            lambda: (
                f"{root / 'city' / 'link.png'} skipped: symbolic link, not followed" in lines(logs)
            ),
            timeout=10,
        )
        wait_until(lambda: server_count(emulator) == 1, timeout=10)
        assert ledger_of(service).lookup(str(root), "city/link.png") is None
    assert dict(server_files(emulator)) == {("forest", sha(target)): 1}
    assert f"{root / 'city' / 'at-start.png'} skipped: symbolic link, not followed" in lines(logs)


@pytest.mark.parametrize("follow", [0, 1])
def test_symlink_loops_end(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture, follow: int
) -> None:
    good = write_image(root / "forest" / "a.png", 1)
    (root / "forest" / "up").symlink_to("..")  # forest/up/forest/up/…
    (root / "forest" / "here").symlink_to(".")
    (root / "forest" / "self.jpg").symlink_to("self.jpg")  # a link to itself
    with service_running(cfg(emulator, root, follow_symlinks=follow)) as service:
        (root / "city" / "loop.jpg").symlink_to("loop.jpg")
        later = write_image(root / "city" / "b.png", 2)
        wait_until(lambda: server_count(emulator) == 2, timeout=10)
        assert service.healthy()[0]
    assert dict(server_files(emulator)) == {("forest", sha(good)): 1, ("city", sha(later)): 1}
    text = "\n".join(lines(logs))
    if follow:
        link = root / "forest" / "self.jpg"
        assert any(
            line.startswith(f"cannot check {link}: ")
            and "Too many levels of symbolic links" in line
            and line.endswith("; skipped")
            for line in lines(logs)
        )
    else:
        assert f"{root / 'forest' / 'up'} skipped: symbolic link, not followed" in text


@pytest.mark.parametrize("follow", [0, 1])
def test_symlink_out_of_the_root_is_not_followed(
    emulator: Emulator, root: Path, tmp_path: Path, logs: pytest.LogCaptureFixture, follow: int
) -> None:
    outside = tmp_path / "elsewhere"
    secret = write_image(outside / "private.png", 1)
    write_image(outside / "dir" / "deep.png", 2)
    (root / "forest" / "at-start.png").symlink_to(outside / "private.png")
    (root / "forest" / "linked-dir").symlink_to(outside / "dir")
    with service_running(cfg(emulator, root, follow_symlinks=follow)) as service:
        (root / "city" / "runtime.png").symlink_to(outside / "private.png")
        (root / "city" / "runtime-dir").symlink_to(outside / "dir")
        good = write_image(root / "city" / "good.png", 3)
        wait_until(lambda: server_count(emulator) == 1, timeout=10)
        why = "symbolic link pointing outside its root folder" if follow else "not followed"
        for path in (
            "forest/at-start.png",
            "forest/linked-dir",
            "city/runtime.png",
            "city/runtime-dir",
        ):
            wait_until(
                lambda path=path: any(
                    line.startswith(f"{root / path} skipped: ") and line.endswith(why)
                    for line in lines(logs)
                ),
                timeout=10,
                message=path,
            )
        threading.Event().wait(0.3)  # give a wrongly followed link the time to be uploaded
        assert ledger_of(service).lookup(str(root), "city/runtime.png") is None
    assert dict(server_files(emulator)) == {("city", sha(good)): 1}
    assert ("forest", sha(secret)) not in server_files(emulator)


def test_a_category_folder_linked_in_while_running_is_taken_at_once(
    emulator: Emulator, root: Path
) -> None:
    # follow_symlinks: a link created at run time to a folder inside the root (here a hidden
    # one, as a sync tool keeps its store) is walked when it appears, not at the next rescan
    # (the tests' configuration has none).
    store = root / ".store" / "harbour"
    bodies = [write_image(store / f"{i}.png", i) for i in range(3)]
    with service_running(cfg(emulator, root, follow_symlinks=1)):
        (root / "harbour").symlink_to(store, target_is_directory=True)
        wait_until(lambda: server_count(emulator) == 3, message="the linked folder's images")
    assert dict(server_files(emulator)) == {("harbour", sha(b)): 1 for b in bodies}


# -- names and folders that are not images -----------------------------------------------


def test_hidden_and_temporary_files_are_ignored_silently(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    ignored = [".x.jpg", "x.jpg~", "x.tmp", "x.part", "x.crdownload", "x.jpg.swp", "Thumbs.db"]
    for seed, name in enumerate(ignored):
        (root / "city" / name).write_bytes(make_png(8, 8, seed=100 + seed))
    with service_running(cfg(emulator, root)) as service:
        for seed, name in enumerate(ignored):
            (root / "forest" / name).write_bytes(make_png(8, 8, seed=seed))
        (root / "forest" / ".hidden").mkdir()
        (root / "forest" / ".hidden" / "x.png").write_bytes(make_png(8, 8, seed=50))
        good = write_image(root / "forest" / "good.png", 60)
        wait_until(lambda: server_count(emulator) == 1, timeout=10)
        threading.Event().wait(0.3)  # an ignored file would have been taken by now
        counts = nonzero(ledger_of(service).counts())
    assert dict(server_files(emulator)) == {("forest", sha(good)): 1}
    assert counts == {"forest": {"uploaded": 1}}
    assert lines(logs) == []


@pytest.mark.parametrize("recursive", [1, 0])
def test_nested_folders_follow_recursive(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture, recursive: int
) -> None:
    early = write_image(root / "forest" / "2024" / "jan" / "early.png", 1)
    with service_running(cfg(emulator, root, recursive=recursive)):
        late = write_image(root / "forest" / "2024" / "feb" / "late.png", 2)
        flat = write_image(root / "city" / "flat.png", 3)
        wait_until(lambda: server_count(emulator) == (3 if recursive else 1), timeout=10)
        threading.Event().wait(0.3)  # a nested file would have been taken by now
    if recursive:
        assert dict(server_files(emulator)) == {
            ("forest", sha(early)): 1,
            ("forest", sha(late)): 1,
            ("city", sha(flat)): 1,
        }
        assert lines(logs) == []
    else:
        assert dict(server_files(emulator)) == {("city", sha(flat)): 1}
        skipped = "skipped: nested folder and recursive is off"
        assert f"{root / 'forest' / '2024'} {skipped}" in lines(logs)  # at start: the folder
        late_path = root / "forest" / "2024" / "feb" / "late.png"
        assert f"{late_path} {skipped}" in lines(logs)  # at run time: the file


def test_folder_named_like_an_image_is_a_folder(emulator: Emulator, root: Path) -> None:
    with service_running(cfg(emulator, root)):
        inner = write_image(root / "forest" / "shot.jpg" / "inner.png", 1)
        wait_until(lambda: server_count(emulator) == 1, timeout=10)
    assert dict(server_files(emulator)) == {("forest", sha(inner)): 1}


# -- folders that change while the service runs ------------------------------------------


def test_category_folder_added_at_runtime(emulator: Emulator, root: Path) -> None:
    with service_running(cfg(emulator, root)):
        (root / "mountain").mkdir()
        bodies = [write_image(root / "mountain" / f"m{i}.png", i) for i in range(3)]
        wait_until(lambda: server_count(emulator) == 3, timeout=10)
    assert dict(server_files(emulator)) == {("mountain", sha(b)): 1 for b in bodies}
    (dataset,) = emulator.state()["datasets"]
    assert [c["name"] for c in dataset["categories"]] == ["mountain"]


def test_category_folder_renamed_at_runtime(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    config = cfg(emulator, root, threshold={"upload": 2, "training": 1000}, rescan_interval=10)
    clock = SkipClock()
    with service_running(config, clock) as service:
        first = [write_image(root / "forest" / f"f{i}.png", i) for i in range(2)]
        wait_until(lambda: server_count(emulator) == 2, timeout=10)
        waiting = write_image(root / "forest" / "waiting.png", 9)  # below the threshold
        wait_until(lambda: ledger_of(service).pending_counts().get("forest") == 1, timeout=10)
        (root / "forest").rename(root / "woods")
        wait_until(lambda: server_count(emulator) == 5, timeout=10)
        rescan(service, clock, logs)  # the rescan notices forest/ is gone
        wait_until(lambda: not ledger_of(service).pending_counts(), timeout=10)
        counts = nonzero(ledger_of(service).counts())
    held = server_files(emulator)
    # Under the new category: everything the folder holds, once.
    assert all(held[("woods", sha(b))] == 1 for b in [*first, waiting])
    # Under the old one: what was uploaded before the rename stays on the server.
    assert all(held[("forest", sha(b))] == 1 for b in first)
    assert ("forest", sha(waiting)) not in held
    assert counts == {"forest": {"uploaded": 2}, "woods": {"uploaded": 3}}
    assert "forest/waiting.png was deleted before upload; forgotten" in lines(logs)


def test_category_folder_deleted_at_runtime(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    config = cfg(emulator, root, threshold={"upload": 2, "training": 1000}, rescan_interval=10)
    clock = SkipClock()
    with service_running(config, clock) as service:
        sent = [write_image(root / "forest" / f"f{i}.png", i) for i in range(2)]
        wait_until(lambda: server_count(emulator) == 2, timeout=10)
        write_image(root / "forest" / "waiting.png", 9)
        wait_until(lambda: ledger_of(service).pending_counts().get("forest") == 1, timeout=10)
        shutil.rmtree(root / "forest")
        rescan(service, clock, logs)
        wait_until(lambda: not ledger_of(service).pending_counts(), timeout=10)
        # The other categories go on.
        city = [write_image(root / "city" / f"c{i}.png", 20 + i) for i in range(2)]
        wait_until(lambda: server_count(emulator) == 4, timeout=10)
    assert dict(server_files(emulator)) == {
        **{("forest", sha(b)): 1 for b in sent},
        **{("city", sha(b)): 1 for b in city},
    }
    assert "forest/waiting.png was deleted before upload; forgotten" in lines(logs)


def test_folder_removed_from_the_configuration_is_not_sent(
    emulator: Emulator, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    for folder in (kept, dropped):
        (folder / "forest").mkdir(parents=True)
    both = cfg(
        emulator,
        kept,
        folders=[str(kept), str(dropped)],
        threshold={"upload": 100, "training": 1000},
    )
    with service_running(both) as service:
        write_image(kept / "forest" / "a.png", 1)
        for seed in (2, 3):
            write_image(dropped / "forest" / f"d{seed}.png", seed)
        wait_until(
            lambda: ledger_of(service).pending_totals()[0] == 3,
            timeout=10,
            message="three files recorded, waiting for the upload threshold",
        )
    # The second folder is taken out of the configuration; --once sends what is pending.
    one = cfg(emulator, kept, folders=[str(kept)], threshold={"upload": 100, "training": 1000})
    assert Service(one, once=True, retry=FAST_RETRY).run() == 0
    assert {name for (_, name) in held_names(emulator)} == {"a.png"}
    assert (
        f"{dropped} is no longer in folders: its 2 files not yet uploaded are kept in the ledger "
        "but not sent (put the folder back in folders to send them)"
    ) in lines(logs)
    with Ledger(one.ledger_path) as ledger:
        ledger.only_roots([str(kept)])
        assert ledger.kept_counts() == {str(dropped): 2}


def test_root_removed_and_back(
    emulator: Emulator, root: Path, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    config = cfg(emulator, root, rescan_interval=10)
    clock = SkipClock()
    with service_running(config, clock) as service:
        before = write_image(root / "forest" / "before.png", 1)
        wait_until(lambda: server_count(emulator) == 1, timeout=10)
        shutil.rmtree(root)  # unmounted, or the share went away
        wait_until(lambda: any(f"root folder {root} " in line for line in lines(logs)), timeout=10)
        rescan(service, clock, logs)
        assert any(
            line == f"root folder {root} is missing (unmounted?); will look again at the next scan"
            for line in lines(logs)
        )
        # It comes back, with the old file (a fresh copy) and a new one.
        put(root / "forest" / "before.png", before)
        back = write_image(root / "city" / "back.png", 2)
        rescan(service, clock, logs)
        wait_until(lambda: server_count(emulator) == 2, timeout=10)
        # Watching works again: a file written now arrives without a rescan.
        after = write_image(root / "city" / "after.png", 3)
        wait_until(lambda: server_count(emulator) == 3, timeout=10)
        assert service.healthy()[0]
    assert dict(server_files(emulator)) == {
        ("forest", sha(before)): 1,
        ("city", sha(back)): 1,
        ("city", sha(after)): 1,
    }
    assert "a root folder that was missing is back; watching it again" in lines(logs, logging.INFO)


def test_file_changed_after_upload_is_uploaded_as_a_new_image(
    emulator: Emulator, root: Path
) -> None:
    with service_running(cfg(emulator, root)) as service:
        old = write_image(root / "forest" / "a.png", 1)
        wait_until(lambda: server_count(emulator) == 1, timeout=10)
        os.utime(root / "forest" / "a.png")  # touched, same content: nothing to send
        new = write_image(root / "forest" / "a.png", 2)
        wait_until(lambda: server_count(emulator) == 2, timeout=10)
        # The server holds it before the ledger records the answer: wait for the row.
        row = wait_until(
            lambda: (
                (r := ledger_of(service).lookup(str(root), "forest/a.png"))
                and r.state == "uploaded"
                and r
            ),
            timeout=10,
            message="the new content recorded as uploaded",
        )
    assert dict(server_files(emulator)) == {("forest", sha(old)): 1, ("forest", sha(new)): 1}
    assert row is not None and row.sha256 == sha(new) and row.state == "uploaded"


# -- a replacement that keeps size and mtime (docs/what-happens-when.md, 10b) ----------------


@pytest.mark.parametrize("how", ["cp-p", "rsync-t"])
def test_a_replacement_keeping_size_and_mtime_is_seen_while_watching(
    emulator: Emulator, root: Path, how: str
) -> None:
    path = root / "forest" / "a.png"
    old, new = same_size_pngs()
    path.write_bytes(old)
    with service_running(cfg(emulator, root)) as service:
        wait_until(
            lambda: (
                (r := ledger_of(service).lookup(str(root), "forest/a.png"))
                and r.state == "uploaded"
            ),
            message="the first version recorded as uploaded",
        )
        replace_keeping_size_and_mtime(path, new, how)
        wait_until(lambda: server_count(emulator) == 2, message="the new version stored")
    assert dict(server_files(emulator)) == {("forest", sha(old)): 1, ("forest", sha(new)): 1}


@pytest.mark.parametrize("how", ["cp-p", "rsync-t"])
def test_a_replacement_keeping_size_and_mtime_is_seen_at_the_next_start(
    emulator: Emulator, root: Path, how: str
) -> None:
    path = root / "forest" / "a.png"
    old, new = same_size_pngs()
    path.write_bytes(old)
    config = cfg(emulator, root)
    assert Service(config, once=True, retry=FAST_RETRY).run() == 0
    replace_keeping_size_and_mtime(path, new, how)
    assert Service(config, once=True, retry=FAST_RETRY).run() == 0
    assert dict(server_files(emulator)) == {("forest", sha(old)): 1, ("forest", sha(new)): 1}


def test_a_chmod_or_a_rename_back_sends_nothing_again(emulator: Emulator, root: Path) -> None:
    # Both change the ctime (and the rename the inode): one hash says the content is the same.
    path = root / "forest" / "a.png"
    body = write_image(path, 1)
    config = cfg(emulator, root)
    assert Service(config, once=True, retry=FAST_RETRY).run() == 0
    path.chmod(0o600)
    moved = path.with_name("b.tmp")
    shutil.copy2(path, moved)
    moved.replace(path)
    assert Service(config, once=True, retry=FAST_RETRY).run() == 0
    assert dict(server_files(emulator)) == {("forest", sha(body)): 1}
    with Ledger(config.ledger_path, readonly=True) as ledger:
        row = ledger.lookup(str(root), "forest/a.png")
    assert row is not None and row.state == "uploaded"
    assert (row.ctime_ns, row.inode) == (path.stat().st_ctime_ns, path.stat().st_ino)


def test_rows_of_an_older_ledger_get_their_ctime_and_inode_at_the_first_scan(
    emulator: Emulator, root: Path
) -> None:
    path = root / "forest" / "a.png"
    old, new = same_size_pngs()
    path.write_bytes(old)
    config = cfg(emulator, root)
    assert Service(config, once=True, retry=FAST_RETRY).run() == 0
    with (
        contextlib.closing(sqlite3.connect(config.ledger_path)) as db,
        db,
    ):  # as a ledger of an earlier version has them
        db.execute("UPDATE files SET ctime_ns = NULL, inode = NULL")
    assert Service(config, once=True, retry=FAST_RETRY).run() == 0  # size and mtime decide
    assert server_count(emulator) == 1
    with Ledger(config.ledger_path, readonly=True) as ledger:
        row = ledger.lookup(str(root), "forest/a.png")
    assert row is not None and (row.ctime_ns, row.inode) == (
        path.stat().st_ctime_ns,
        path.stat().st_ino,
    )
    replace_keeping_size_and_mtime(path, new, "cp-p")
    assert Service(config, once=True, retry=FAST_RETRY).run() == 0
    assert dict(server_files(emulator)) == {("forest", sha(old)): 1, ("forest", sha(new)): 1}


def test_two_services_with_their_own_ledgers_on_the_same_folder_are_told(
    emulator: Emulator, root: Path, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    first = cfg(emulator, root, ledger=str(tmp_path / "one" / "ledger.sqlite3"))
    second = cfg(emulator, root, ledger=str(tmp_path / "two" / "ledger.sqlite3"))
    with service_running(first), service_running(second):
        for i in range(4):
            write_image(root / "forest" / f"{i}.png", i)
        wait_until(
            lambda: any("another paiv-sync" in line for line in lines(logs, logging.WARNING)),
            message="the other service named",
        )
    said = next(line for line in lines(logs, logging.WARNING) if "another paiv-sync" in line)
    assert f"from {root / 'forest'} into dataset" in said
    assert "each image may reach the dataset twice" in said


def test_one_service_after_another_on_the_same_folder_is_not_taken_for_two(
    emulator: Emulator, root: Path, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    # A new ledger (moved, rebuilt, a new default path) is a new instance: the uploads of the
    # earlier one, made before this process started, are not another service at work.
    first = cfg(emulator, root, ledger=str(tmp_path / "one" / "ledger.sqlite3"))
    write_image(root / "forest" / "a.png", 1)
    assert Service(first, once=True, retry=FAST_RETRY).run() == 0
    second = cfg(emulator, root, ledger=str(tmp_path / "two" / "ledger.sqlite3"))
    write_image(root / "forest" / "b.png", 2)
    assert Service(second, once=True, retry=FAST_RETRY).run() == 0
    assert server_count(emulator) == 2  # a.png was found on the server: not sent again
    assert not any("another paiv-sync" in line for line in lines(logs, logging.WARNING))


def test_second_instance_on_the_same_ledger_refuses_to_start(
    emulator: Emulator, root: Path, logs: pytest.LogCaptureFixture
) -> None:
    config = cfg(emulator, root)
    with service_running(config):
        second = Service(config, retry=FAST_RETRY)
        assert second.run() == 1
        body = write_image(root / "forest" / "a.png", 1)
        wait_until(lambda: server_count(emulator) == 1, timeout=10)  # the first one goes on
    assert dict(server_files(emulator)) == {("forest", sha(body)): 1}
    assert any(
        "is in use by another paiv-sync process" in line and 'its own "ledger"' in line
        for line in lines(logs, logging.ERROR)
    )
