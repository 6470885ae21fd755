"""Exactly once when the file system misleads: lost events, and files that change under us.

Events are hints, the disk is the truth (design.md): a burst, files moved or copied in as a
tree, and a watcher whose events are all lost must still end with every file on the server
once -- found by the periodic rescan or by the scan at start-up. Files replaced, deleted,
renamed with their folder, or a root that vanishes and comes back must neither be lost nor
sent twice into one category.

The periodic rescan runs every ``rescan_interval`` seconds, at least 10; instead of waiting,
these tests give the service a clock they can move forward.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from paiv_sync.config import Config
from paiv_sync.emulator import Emulator, EmulatorOptions, FaultOptions
from paiv_sync.ledger import Ledger
from paiv_sync.service import Service
from tests.e2e import (
    FAST_RETRY,
    config_for,
    replace_keeping_size_and_mtime,
    running,
    server_files,
    sha,
    write_image,
)
from tests.helpers import wait_until
from tests.test_exactly_once import assert_exactly_once, expected_files, same_size_pngs


class Clock:
    """``time.monotonic`` that a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def jump(self, seconds: float) -> None:
        self.offset += seconds


class DeafService(Service):
    """A service whose file watcher loses every event, as inotify does when it overflows."""

    def __init__(self, config: Config, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.events_lost = 0

    def hint(self, path: str, is_dir: bool) -> None:
        self.events_lost += 1


@contextmanager
def serving(service: Service) -> Iterator[Service]:
    """Run ``service`` in a thread until the block ends."""
    thread = threading.Thread(target=service.run, name="test-service")
    thread.start()
    try:
        assert service.ready.wait(15), "service did not become ready"
        yield service
    finally:
        service.stop()
        thread.join(30)
        assert not thread.is_alive(), "service did not stop"


def uploaded(emulator: Emulator) -> int:
    return sum(server_files(emulator).values())


# -- events lost, late or in bulk -------------------------------------------------------


def test_a_burst_files_moved_in_and_a_tree_copied_in_arrive_once(
    emulator: Emulator, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    for i in range(30):
        write_image(outside / "moved" / f"m{i}.png", 1000 + i, via_rename=False)
        write_image(outside / "tree" / "sub" / f"t{i}.png", 2000 + i, via_rename=False)
    # Threshold 1: a pause in the burst flushes part of a category, and a tail below a higher
    # threshold would wait for more files (as it should) instead of ending the test.
    config = config_for(emulator, root, threshold={"upload": 1, "training": 1000}, time=0.2)
    with running(config):
        # As fast as Python can write: no temp-and-rename, no pause between files.
        for i in range(240):
            write_image(root / ("forest", "city", "sea")[i % 3] / f"b{i}.png", i, via_rename=False)
        for path in sorted((outside / "moved").iterdir()):
            path.replace(root / "city" / path.name)
        shutil.copytree(outside / "tree", root / "sea" / "copied")  # a whole tree at once
        shutil.copytree(outside / "tree", root / "newcat")  # ... and as a new category
        expected = expected_files(root)
        assert sum(expected.values()) == 330
        wait_until(lambda: uploaded(emulator) >= 330, timeout=40)
    assert_exactly_once(emulator, expected)


def test_every_hint_of_a_long_queue_is_taken(emulator: Emulator, root: Path) -> None:
    # One hint per file and no other event: a hint dropped between two turns of the pipeline
    # loop (it takes a bounded number per turn) would leave its file behind for good.
    config = config_for(emulator, root, threshold={"upload": 1, "training": 1000}, time=0)
    deaf = DeafService(config, retry=FAST_RETRY)
    with serving(deaf):
        paths = [root / "forest" / f"q{i}.png" for i in range(700)]
        bodies = [write_image(path, i) for i, path in enumerate(paths)]
        for path in paths:
            Service.hint(deaf, str(path), False)  # past the deaf watcher: straight to the inbox
        wait_until(lambda: uploaded(emulator) >= 700, timeout=60)
    assert_exactly_once(emulator, {("forest", sha(b)): 1 for b in bodies})


def test_lost_events_are_caught_by_the_periodic_rescan(emulator: Emulator, root: Path) -> None:
    clock = Clock()
    config = config_for(
        emulator, root, threshold={"upload": 3, "training": 1000}, rescan_interval=10
    )
    service = DeafService(config, retry=FAST_RETRY, clock=clock)
    with serving(service):
        bodies = [write_image(root / "forest" / f"f{i}.png", i) for i in range(6)]
        wait_until(lambda: service.events_lost >= 6, timeout=10)
        assert service.ledger is not None and service.ledger.counts() == {}
        clock.jump(11)  # the rescan is due
        wait_until(lambda: uploaded(emulator) == 6, timeout=15)
    assert_exactly_once(emulator, {("forest", sha(b)): 1 for b in bodies})


def test_lost_events_are_caught_by_the_scan_at_the_next_start(
    emulator: Emulator, root: Path
) -> None:
    config = config_for(emulator, root, threshold={"upload": 3, "training": 1000})
    deaf = DeafService(config, retry=FAST_RETRY)
    with serving(deaf):
        for i in range(4):
            write_image(root / "city" / f"c{i}.png", i)
        wait_until(lambda: deaf.events_lost >= 4, timeout=10)
    for i in range(4, 8):  # and more while nothing runs at all
        write_image(root / "city" / f"c{i}.png", i)
    with running(config):
        wait_until(lambda: uploaded(emulator) == 8, timeout=15)
    assert_exactly_once(emulator, expected_files(root))


# -- files that change under us ---------------------------------------------------------


def test_a_file_replaced_after_upload_is_a_new_image(emulator: Emulator, root: Path) -> None:
    config = config_for(emulator, root, threshold={"upload": 1, "training": 1000})
    path = root / "sea" / "wave.png"
    with running(config) as runner:
        ledger = runner.service.ledger
        assert ledger is not None
        first = write_image(path, 1)
        wait_until(lambda: uploaded(emulator) == 1)
        second = write_image(path, 2)  # the camera overwrote it with a new shot
        wait_until(lambda: uploaded(emulator) == 2)
        write_image(path, 2)  # the same shot copied over it again: not a new image
        touched = path.stat().st_mtime_ns

        def seen() -> bool:
            row = ledger.lookup(str(root), "sea/wave.png")
            return row is not None and row.mtime_ns == touched and row.state == "uploaded"

        wait_until(seen)
    assert_exactly_once(emulator, {("sea", sha(first)): 1, ("sea", sha(second)): 1})


def _overwrite_unseen(path: Path, body: bytes, elsewhere: Path) -> None:
    """Write ``body`` into the existing file and put its mtime back (``cp -p`` over it).

    Through a hard link in ``elsewhere``, a folder nobody watches: no event tells the service
    (a directory watch hears of writes made through its own entries only), and size and mtime
    are those it checked, so only the hash of what is sent can tell.
    """
    elsewhere.mkdir(parents=True, exist_ok=True)
    link = elsewhere / path.name
    os.link(path, link)
    replace_keeping_size_and_mtime(link, body, "cp-p")


def _checked_then_overwritten_unseen(
    ledger: Ledger, root: Path, tmp_path: Path, old: bytes, new: bytes
) -> bytes:
    """sea/wave.png holds ``old`` and is recorded so; then it is overwritten with ``new``
    unseen, and a second file completes a batch (threshold 2). Returns that file's body."""
    path = root / "sea" / "wave.png"
    path.write_bytes(old)
    wait_until(
        lambda: (row := ledger.lookup(str(root), "sea/wave.png")) and row.sha256 == sha(old),
        message="wave.png recorded with its first content",
    )
    _overwrite_unseen(path, new, tmp_path / "elsewhere")
    return write_image(root / "sea" / "b.png", 2)  # the threshold is reached: a batch


def test_a_file_overwritten_before_it_is_sent_is_sent_as_what_it_holds(
    emulator: Emulator, root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The file is checked and hashed, then overwritten in place with the same size and mtime
    # before its upload: the server must end up with what the file holds, and the ledger
    # must know it, not the content hashed before.
    old, new = same_size_pngs()
    config = config_for(emulator, root, threshold={"upload": 2, "training": 1000})
    with running(config) as runner:
        ledger = runner.service.ledger
        assert ledger is not None
        other = _checked_then_overwritten_unseen(ledger, root, tmp_path, old, new)
        wait_until(
            lambda: any(
                "changed while it was being sent" in r.getMessage() for r in caplog.records
            ),
            message="the upload of other content noticed",
        )
        third = write_image(root / "sea" / "c.png", 3)  # with it, wave.png is sent again

        def settled() -> bool:
            row = ledger.lookup(str(root), "sea/wave.png")
            return row is not None and row.state == "uploaded" and row.sha256 == sha(new)

        wait_until(settled, timeout=15, message="wave.png uploaded with what it holds")
        wait_until(lambda: uploaded(emulator) == 3, message="three files on the server")
    assert_exactly_once(
        emulator, {("sea", sha(new)): 1, ("sea", sha(other)): 1, ("sea", sha(third)): 1}
    )


def test_an_overwritten_upload_the_server_cannot_delete_is_kept_and_not_sent_twice(
    root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As above, on a server that refuses every DELETE: the copy it stored stays (and the log
    # says to delete it by hand); the file, holding just what was sent, is not sent again.
    old, new = same_size_pngs()
    faults = FaultOptions(error_rate=1.0, routes=("DELETE /datasets/{id}/files/{fid}",))
    with Emulator(EmulatorOptions(port=0, faults=faults)) as emulator:
        config = config_for(emulator, root, threshold={"upload": 2, "training": 1000})
        path = root / "sea" / "wave.png"
        with running(config) as runner:
            ledger = runner.service.ledger
            assert ledger is not None
            other = _checked_then_overwritten_unseen(ledger, root, tmp_path, old, new)
            said = wait_until(
                lambda: next(
                    (m for r in caplog.records if "could not be deleted" in (m := r.getMessage())),
                    None,
                ),
                timeout=30,  # five tries of the DELETE, with back-off
                message="the copy that could not be deleted named",
            )

            def settled() -> bool:
                row = ledger.lookup(str(root), "sea/wave.png")
                return (
                    row is not None
                    and row.state == "uploaded"
                    and row.sha256 == sha(new)
                    and row.mtime_ns == path.stat().st_mtime_ns
                )

            wait_until(settled, message="wave.png looked at again and found as sent")
        assert emulator.state()["faults"]["error"] > 0
        assert_exactly_once(emulator, {("sea", sha(new)): 1, ("sea", sha(other)): 1})
    assert "delete it in the MVI UI" in said


def test_a_file_deleted_before_upload_is_forgotten_and_said_so(
    emulator: Emulator, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="paiv_sync")
    config = config_for(emulator, root, threshold={"upload": 4, "training": 1000})
    with running(config) as runner:
        bodies = [write_image(root / "forest" / f"f{i}.png", i) for i in range(3)]
        ledger = runner.service.ledger
        assert ledger is not None
        wait_until(lambda: ledger.pending_counts().get("forest") == 3)
        (root / "forest" / "f1.png").unlink()
        bodies.append(write_image(root / "forest" / "f3.png", 3))
        wait_until(lambda: uploaded(emulator) == 3, timeout=15)
        wait_until(lambda: ledger.lookup(str(root), "forest/f1.png") is None)
    del bodies[1]
    assert_exactly_once(emulator, {("forest", sha(b)): 1 for b in bodies})
    assert any(
        "f1.png" in r.getMessage() and "deleted before upload; forgotten" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


def test_a_category_folder_renamed_or_deleted(
    emulator: Emulator, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="paiv_sync")
    clock = Clock()
    config = config_for(
        emulator, root, threshold={"upload": 3, "training": 1000}, rescan_interval=10
    )
    service = Service(config, retry=FAST_RETRY, clock=clock)
    with serving(service):
        ledger = service.ledger
        assert ledger is not None
        sent = [write_image(root / "forest" / f"f{i}.png", i) for i in range(3)]
        wait_until(lambda: uploaded(emulator) == 3)
        waiting = [write_image(root / "city" / f"c{i}.png", 10 + i) for i in range(2)]
        for i in range(2):
            write_image(root / "sea" / f"s{i}.png", 20 + i)
        wait_until(lambda: ledger.pending_counts() == {"city": 2, "sea": 2})
        # The user renames "city" (2 files waiting) to "town" and adds one: the threshold is
        # reached in "town"; and deletes "sea" with its 2 waiting files.
        (root / "city").rename(root / "town")
        waiting.append(write_image(root / "town" / "c2.png", 12))
        shutil.rmtree(root / "sea")
        wait_until(lambda: uploaded(emulator) == 6, timeout=15)
        clock.jump(11)  # the rescan notices what is gone
        wait_until(lambda: ledger.pending_counts() == {}, timeout=15)
        # "forest" renamed after its files were uploaded: they are labelled anew, "woods".
        (root / "forest").rename(root / "woods")
        wait_until(lambda: uploaded(emulator) == 9, timeout=15)
    expected = {("forest", sha(b)): 1 for b in sent}
    expected |= {("woods", sha(b)): 1 for b in sent}
    expected |= {("town", sha(b)): 1 for b in waiting}
    assert_exactly_once(emulator, expected)
    assert not any(category == "sea" for category, _ in server_files(emulator))
    forgotten = [r.getMessage() for r in caplog.records if "forgotten" in r.getMessage()]
    assert len(forgotten) == 4, forgotten  # 2 of "city" (now "town") and 2 of "sea"


def test_a_root_folder_removed_and_back(
    emulator: Emulator, root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="paiv_sync")
    clock = Clock()
    config = config_for(
        emulator, root, threshold={"upload": 2, "training": 1000}, rescan_interval=10
    )
    service = Service(config, retry=FAST_RETRY, clock=clock)
    away = tmp_path / "unmounted"
    with serving(service):
        for i in range(2):
            write_image(root / "forest" / f"f{i}.png", i)
        wait_until(lambda: uploaded(emulator) == 2)
        root.rename(away)  # unmounted
        clock.jump(11)
        wait_until(lambda: any("is missing" in r.getMessage() for r in caplog.records))
        for i in range(2):  # the share fills up meanwhile
            write_image(away / "city" / f"c{i}.png", 10 + i)
        away.rename(root)  # mounted again
        clock.jump(11)
        wait_until(lambda: uploaded(emulator) == 4, timeout=15)
        assert service.watcher is not None and service.watcher.is_alive()
        write_image(root / "sea" / "s0.png", 20)  # and watched again
        write_image(root / "sea" / "s1.png", 21)
        wait_until(lambda: uploaded(emulator) == 6, timeout=15)
    assert_exactly_once(emulator, expected_files(root))
