"""The watcher with a real watchdog observer on real folders; hints are read from a queue."""

from __future__ import annotations

import errno
import logging
import queue
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from paiv_sync.watcher import (
    Watcher,
    _parse_mount_output,
    _parse_proc_mounts,
    filesystem_type,
    is_network_filesystem,
    read_mount_table,
)
from tests.helpers import wait_until

# watchdog warns (RuntimeWarning, from its inotify reader thread) when a folder created in a
# burst (mkdir -p a/b/c) gets its watch registered twice, once by its own creation event and once
# by the walk of its parent; the watch is simply reused. Under filterwarnings=error that warning
# would be raised inside watchdog's thread and kill it, so it is ignored here.
pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")

Hint = tuple[str, bool]
TIMEOUT = 10.0

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify only")


class Hints:
    """The sink: a queue, as the service uses, with a way to wait for one expected hint."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Hint] = queue.Queue()
        self.seen: list[Hint] = []

    def __call__(self, path: str, is_dir: bool) -> None:
        self.queue.put_nowait((path, is_dir))

    def wait_for(self, path: Path, is_dir: bool = False, timeout: float = TIMEOUT) -> None:
        """Drain the queue until ``(path, is_dir)`` arrives; fail after ``timeout`` seconds."""
        wanted = (str(path), is_dir)
        if wanted in self.seen:
            return
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no hint {wanted} within {timeout} s; got {self.seen}")
            try:
                hint = self.queue.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(hint)
            if hint == wanted:
                return


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    (path / "cat").mkdir(parents=True)
    return path


@pytest.fixture
def hints() -> Hints:
    return Hints()


@pytest.fixture(params=["native", "polling"])
def watcher(request: pytest.FixtureRequest, root: Path, hints: Hints) -> Iterator[Watcher]:
    w = Watcher([root], hints, kind=request.param, polling_interval=0.05)
    w.start()
    try:
        yield w
    finally:
        w.stop()


def write(path: Path, data: bytes = b"data") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.write(data)
    return path


def test_kind_in_use(watcher: Watcher) -> None:
    assert watcher.kind_in_use == watcher.kind
    assert watcher.is_alive()


def test_created_file_is_hinted(watcher: Watcher, root: Path, hints: Hints) -> None:
    hints.wait_for(write(root / "cat" / "a.jpg"))


def test_file_in_a_nested_folder(watcher: Watcher, root: Path, hints: Hints) -> None:
    hints.wait_for(write(root / "cat" / "sub" / "deeper" / "c.jpg"))


def test_file_moved_in_from_outside(watcher: Watcher, root: Path, hints: Hints) -> None:
    staged = write(root.parent / "staging" / "x.jpg")
    target = root / "cat" / "x.jpg"
    staged.replace(target)
    hints.wait_for(target)


def test_renamed_inside_the_tree(watcher: Watcher, root: Path, hints: Hints) -> None:
    partial = write(root / "cat" / "y.jpg.part")
    hints.wait_for(partial)
    partial.replace(root / "cat" / "y.jpg")
    hints.wait_for(root / "cat" / "y.jpg")


def test_directory_tree_moved_in(watcher: Watcher, root: Path, hints: Hints) -> None:
    staging = root.parent / "staging" / "newcat"
    write(staging / "a.jpg")
    write(staging / "sub" / "b.jpg")
    staging.replace(root / "newcat")
    # The folder itself is the hint that matters: the pipeline scans it.
    hints.wait_for(root / "newcat", is_dir=True)


def test_created_directory_is_hinted(watcher: Watcher, root: Path, hints: Hints) -> None:
    (root / "forest").mkdir()
    hints.wait_for(root / "forest", is_dir=True)


def test_moves_to_hidden_names_are_still_forwarded(
    watcher: Watcher, root: Path, hints: Hints
) -> None:
    source = write(root / "cat" / "z.jpg")
    hints.wait_for(source)
    source.replace(root / "cat" / ".z.jpg")
    hints.wait_for(root / "cat" / ".z.jpg")


@linux_only
def test_close_after_write_is_hinted(root: Path, hints: Hints) -> None:
    with Watcher([root], hints, kind="native"):
        path = write(root / "cat" / "slow.jpg")
        # inotify keeps events in order: once a later file is hinted, every event of the first
        # one has been delivered too.
        hints.wait_for(write(root / "cat" / "sentinel.jpg"))
        hints.seen.clear()
        while not hints.queue.empty():
            hints.queue.get_nowait()
        # Opened for writing and closed without a write: the only event with a hint is the
        # close (IN_CLOSE_WRITE), which tells the pipeline the writer is done.
        path.open("ab").close()
        hints.wait_for(path, timeout=3.0)


@linux_only
def test_a_file_written_in_many_chunks_gives_a_few_hints(root: Path, hints: Hints) -> None:
    # A camera writing a large image in chunks: inotify's "modified" event comes once per
    # write, but the create and the close say all there is (the gate watches the size between).
    with Watcher([root], hints, kind="native"):
        path = root / "cat" / "big.jpg"
        with path.open("wb") as handle:
            for _ in range(200):
                handle.write(b"x" * 4096)
                handle.flush()
                time.sleep(0.001)  # let the reader take each event on its own
        hints.wait_for(write(root / "cat" / "sentinel.jpg"))
    assert hints.seen.count((str(path), False)) <= 3  # created, closed; not 200 writes


@pytest.mark.parametrize("kind", ["polling"])
def test_polling_still_sees_a_file_changed_in_place(root: Path, hints: Hints, kind: str) -> None:
    # No close events when polling: a file rewritten in place shows only as "modified".
    path = write(root / "cat" / "old.jpg", b"first")
    with Watcher([root], hints, kind=kind, polling_interval=0.05):
        # A file seen by a poll after the start: the snapshot it was compared with, and so
        # the one the next poll compares with, holds the old file.
        hints.wait_for(write(root / "cat" / "sentinel.jpg"), timeout=5.0)
        hints.seen.clear()
        while not hints.queue.empty():
            hints.queue.get_nowait()
        write(path, b"second, longer")
        hints.wait_for(path, timeout=5.0)


def test_a_failing_sink_does_not_kill_the_observer(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    received = Hints()
    failures = 3

    def sink(path: str, is_dir: bool) -> None:
        nonlocal failures
        if failures > 0:
            failures -= 1
            raise RuntimeError("queue exploded")
        received(path, is_dir)

    with (
        caplog.at_level(logging.ERROR, logger="paiv_sync.watcher"),
        Watcher([root], sink, kind="native") as w,
    ):
        for index in range(3):
            write(root / "cat" / f"bad{index}.jpg")
        wait_until(lambda: w.handler_errors >= 3, timeout=TIMEOUT)
        assert w.is_alive()
        later = write(root / "cat" / "later.jpg")
        received.wait_for(later)
        assert w.is_alive()
    errors = [r for r in caplog.records if r.name == "paiv_sync.watcher"]
    # Rate-limited: one report with its traceback, not one per event.
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert "queue exploded" in caplog.text


def test_stop_joins_every_thread(root: Path, hints: Hints) -> None:
    before = set(threading.enumerate())
    w = Watcher([root], hints, kind="native")
    w.start()
    assert len(set(threading.enumerate()) - before) >= 2  # dispatcher and emitter at least
    w.stop()
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not w.is_alive()
    w.stop()  # a second stop is harmless


def test_start_twice_is_an_error(root: Path, hints: Hints) -> None:
    with Watcher([root], hints, kind="native") as w, pytest.raises(RuntimeError):
        w.start()


def test_restart_gives_a_working_fresh_observer(root: Path, hints: Hints) -> None:
    with Watcher([root], hints, kind="native") as w:
        hints.wait_for(write(root / "cat" / "before.jpg"))
        w.restart()
        assert w.is_alive()
        hints.wait_for(write(root / "cat" / "after.jpg"))


@pytest.mark.parametrize("kind", ["native", "polling"])
def test_missing_root_is_left_out_until_a_restart(
    tmp_path: Path, root: Path, hints: Hints, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    missing = tmp_path / "unmounted"
    with caplog.at_level(logging.WARNING, logger="paiv_sync.watcher"):
        w = Watcher([missing, root], hints, kind=kind, polling_interval=0.05)
        w.start()
    try:
        assert f"root folder {missing} does not exist" in caplog.text
        assert w.missing_roots == (missing,)
        assert w.is_alive()
        hints.wait_for(write(root / "cat" / "a.jpg"))
        (missing / "cat").mkdir(parents=True)
        w.restart()
        assert not w.missing_roots
        hints.wait_for(write(missing / "cat" / "b.jpg"))
    finally:
        w.stop()


@pytest.mark.parametrize("kind", ["native", "polling"])
def test_deleted_root_shows_as_not_alive(tmp_path: Path, hints: Hints, kind: str) -> None:
    root = tmp_path / "volume"
    (root / "cat").mkdir(parents=True)
    with Watcher([root], hints, kind=kind, polling_interval=0.05) as w:
        assert w.is_alive()
        shutil.rmtree(root)
        wait_until(lambda: not w.is_alive(), timeout=TIMEOUT, message="watcher noticed")
        w.restart()
        assert w.is_alive()
        assert w.missing_roots == (root,)


def test_no_roots_at_all(tmp_path: Path, hints: Hints) -> None:
    with Watcher([tmp_path / "nothing"], hints) as w:
        assert w.is_alive()
        assert w.missing_roots == (tmp_path / "nothing",)


@linux_only
def test_queue_overflow_is_counted_and_asks_for_a_rescan(root: Path, hints: Hints) -> None:
    with Watcher([root], hints, kind="native") as w:
        assert w.events_lost == 0
        # watchdog reports IN_Q_OVERFLOW only through this warning; a real overflow needs more
        # events than the kernel queue holds (16384 by default), too slow for a unit test.
        logging.getLogger("watchdog.observers.inotify_c").warning(
            "Inotify queue overflowed; filesystem events were lost"
        )
        assert w.events_lost == 1
        hints.wait_for(root, is_dir=True)


class _FullInotifyObserver(PollingObserver):
    """Stands in for a native observer on a machine whose inotify watch limit is used up."""

    def schedule(self, *args: Any, **kwargs: Any) -> ObservedWatch:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")


class _LimitedWatcher(Watcher):
    """A real watcher whose native observer hits a kernel limit (the seam is our own)."""

    limit = errno.ENOSPC

    def _new_observer(self, kind: str) -> BaseObserver:
        if kind == "native":
            if self.limit == errno.EMFILE:
                raise OSError(errno.EMFILE, "inotify instance limit reached")
            return _FullInotifyObserver(timeout=0.05)
        return super()._new_observer(kind)


@pytest.mark.parametrize(
    ("limit", "setting"),
    [
        (errno.ENOSPC, "fs.inotify.max_user_watches"),
        (errno.EMFILE, "fs.inotify.max_user_instances"),
    ],
)
def test_inotify_limit_falls_back_to_polling(
    root: Path, hints: Hints, caplog: pytest.LogCaptureFixture, limit: int, setting: str
) -> None:
    watcher = _LimitedWatcher([root], hints, kind="native", polling_interval=0.05)
    watcher.limit = limit
    with caplog.at_level(logging.ERROR, logger="paiv_sync.watcher"), watcher:
        assert watcher.kind_in_use == "polling"
        assert watcher.is_alive()
        hints.wait_for(write(root / "cat" / "a.jpg"))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert setting in errors[0]
    assert "falling back to polling" in errors[0]


def test_invalid_arguments(root: Path, hints: Hints) -> None:
    with pytest.raises(ValueError, match="kind"):
        Watcher([root], hints, kind="magic")
    with pytest.raises(ValueError, match="interval"):
        Watcher([root], hints, kind="polling", polling_interval=0)


def test_auto_uses_native_on_a_local_disk(root: Path, hints: Hints) -> None:
    if is_network_filesystem(filesystem_type(root)):
        pytest.skip("the temporary folder is on a network file system here")
    with Watcher([root], hints, kind="auto") as w:
        assert w.kind_in_use == "native"
        hints.wait_for(write(root / "cat" / "a.jpg"))


# --- mount table parsing (pure functions, no observer) ----------------------------------------

PROC_MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
proc /proc proc rw,nosuid 0 0
server:/export /mnt/nas nfs4 rw,vers=4.2 0 0
//fileserver/share\\040name /mnt/My\\040Share cifs rw 0 0
user@host:/data /home/me/remote fuse.sshfs rw 0 0
tmpfs /mnt/nas/cache tmpfs rw 0 0
"""

MAC_MOUNT = """\
/dev/disk3s1s1 on / (apfs, sealed, local, read-only, journaled)
//user@nas/photos on /Volumes/photos (smbfs, nodev, nosuid, mounted by user)
nas:/export on /Volumes/nfs share (nfs, asynchronous)
"""


def test_parse_proc_mounts_unescapes_spaces() -> None:
    table = _parse_proc_mounts(PROC_MOUNTS)
    assert ("/mnt/My Share", "cifs") in table
    assert table[0] == ("/", "ext4")


def test_parse_mount_output_of_macos() -> None:
    assert _parse_mount_output(MAC_MOUNT) == [
        ("/", "apfs"),
        ("/Volumes/photos", "smbfs"),
        ("/Volumes/nfs share", "nfs"),
    ]


@pytest.mark.parametrize(
    ("path", "fstype", "network"),
    [
        ("/home/me/pictures", "ext4", False),
        ("/mnt/nas/cat", "nfs4", True),
        ("/mnt/nas", "nfs4", True),
        ("/mnt/nas/cache/x", "tmpfs", False),  # the longest mount point wins
        ("/mnt/nasty", "ext4", False),  # a prefix that is not a path component
        ("/mnt/My Share/defects", "cifs", True),
        ("/home/me/remote/cat", "fuse.sshfs", True),
    ],
)
def test_filesystem_type_uses_the_longest_mount_point(
    path: str, fstype: str, network: bool
) -> None:
    table = _parse_proc_mounts(PROC_MOUNTS)
    assert filesystem_type(Path(path), table) == fstype
    assert is_network_filesystem(fstype) is network


def test_network_types() -> None:
    for fstype in ("nfs", "NFS4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p"):
        assert is_network_filesystem(fstype), fstype
    local: list[str | None] = ["ext4", "xfs", "btrfs", "apfs", "overlay", "tmpfs", None, ""]
    for other in local:
        assert not is_network_filesystem(other), other


@linux_only
def test_read_mount_table_on_this_machine() -> None:
    table = read_mount_table()
    assert any(point == "/" for point, _ in table)
