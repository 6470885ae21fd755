"""The sd_notify client against real datagram sockets, as systemd would listen on them."""

from __future__ import annotations

import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from paiv_sync.sdnotify import Notifier

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs AF_UNIX sockets")


def _listener(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5.0)
    return sock


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A listening socket bound to a path; yields (NOTIFY_SOCKET value, socket)."""
    # AF_UNIX paths are limited to about 100 bytes; pytest's tmp_path can be longer.
    address = str(tmp_path / "notify")
    if len(address.encode()) > 100:
        pytest.skip("tmp_path is too long for an AF_UNIX socket path")
    sock = _listener(address)
    try:
        yield address, sock
    finally:
        sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    """A listening socket in Linux's abstract namespace; yields ("@name", socket)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("abstract sockets exist on Linux only")
    name = f"paiv-test-{secrets.token_hex(8)}"
    sock = _listener("\0" + name)
    try:
        yield "@" + name, sock
    finally:
        sock.close()


def _received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_disabled_without_notify_socket() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    notifier.ready()  # no exception, nothing to send to
    notifier.close()


def test_reads_os_environ_by_default(
    monkeypatch: pytest.MonkeyPatch, path_socket: tuple[str, socket.socket]
) -> None:
    address, sock = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with Notifier() as notifier:
        assert notifier.enabled
        notifier.ready()
        assert _received(sock) == "READY=1"


def test_every_message_arrives_on_a_path_socket(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    with Notifier({"NOTIFY_SOCKET": address}) as notifier:
        assert notifier.enabled
        assert notifier.notify("STATUS=hello") is True
        assert _received(sock) == "STATUS=hello"
        notifier.ready()
        assert _received(sock) == "READY=1"
        notifier.status("12 pending, 3 uploaded")
        assert _received(sock) == "STATUS=12 pending, 3 uploaded"
        notifier.watchdog()
        assert _received(sock) == "WATCHDOG=1"
        notifier.stopping()
        assert _received(sock) == "STOPPING=1"
        notifier.extend_timeout(90)
        assert _received(sock) == "EXTEND_TIMEOUT_USEC=90000000"


def test_every_message_arrives_on_an_abstract_socket(
    abstract_socket: tuple[str, socket.socket],
) -> None:
    address, sock = abstract_socket
    with Notifier({"NOTIFY_SOCKET": address}) as notifier:
        assert notifier.enabled
        notifier.ready()
        assert _received(sock) == "READY=1"
        notifier.status("idle")
        assert _received(sock) == "STATUS=idle"


def test_reloading_carries_a_monotonic_timestamp(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    before = time.monotonic_ns() // 1000
    with Notifier({"NOTIFY_SOCKET": address}) as notifier:
        notifier.reloading()
        lines = _received(sock).split("\n")
    after = time.monotonic_ns() // 1000
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_a_status_text_cannot_inject_other_assignments(
    path_socket: tuple[str, socket.socket],
) -> None:
    address, sock = path_socket
    with Notifier({"NOTIFY_SOCKET": address}) as notifier:
        notifier.status("uploading\nREADY=1")
        assert _received(sock) == "STATUS=uploading READY=1"


def _open_fds() -> int | None:
    fd_dir = Path("/proc/self/fd")
    return len(list(fd_dir.iterdir())) if fd_dir.is_dir() else None


def test_one_socket_is_kept_for_all_messages(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    with Notifier({"NOTIFY_SOCKET": address}) as notifier:
        notifier.ready()
        assert _received(sock) == "READY=1"
        fds_after_first = _open_fds()
        if fds_after_first is None:
            pytest.skip("no /proc/self/fd to count open sockets")
        for _ in range(50):
            notifier.watchdog()
            assert _received(sock) == "WATCHDOG=1"
        assert _open_fds() == fds_after_first


def test_a_manager_that_stops_reading_cannot_stall_the_service(
    path_socket: tuple[str, socket.socket],
) -> None:
    address, sock = path_socket
    with Notifier({"NOTIFY_SOCKET": address}, send_timeout=0.1) as notifier:
        # Nobody reads: the receive queue fills (10 datagrams by default on Linux) and the
        # next send is given up after the timeout instead of blocking.
        for _ in range(100):
            started = time.monotonic()
            sent = notifier.notify("WATCHDOG=1")
            elapsed = time.monotonic() - started
            if not sent:
                break
        else:
            pytest.skip("this kernel queued 100 datagrams; the queue never filled")
        assert elapsed < 2.0
        # Once the manager reads again, messages go through.
        while True:
            sock.settimeout(0.05)
            try:
                sock.recv(4096)
            except TimeoutError:
                break
        assert notifier.notify("READY=1") is True
        sock.settimeout(5.0)
        assert _received(sock) == "READY=1"


def test_a_vanished_socket_returns_false_and_recovers(tmp_path: Path) -> None:
    address = str(tmp_path / "notify")
    listener = _listener(address)
    notifier = Notifier({"NOTIFY_SOCKET": address})
    try:
        assert notifier.notify("READY=1") is True
        listener.close()
        Path(address).unlink()
        assert notifier.notify("WATCHDOG=1") is False
        notifier.watchdog()  # still no exception
        # systemd came back (e.g. after a daemon-reexec): sending works again.
        listener = _listener(address)
        assert notifier.notify("WATCHDOG=1") is True
        assert _received(listener) == "WATCHDOG=1"
    finally:
        notifier.close()
        listener.close()


def test_a_socket_that_never_existed_returns_false(tmp_path: Path) -> None:
    with Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing")}) as notifier:
        assert notifier.enabled
        assert notifier.notify("READY=1") is False


@pytest.mark.parametrize("value", ["", "relative/path", "@", "vsock:2:1234"])
def test_unusable_notify_socket_values_disable_notifications(value: str) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": value})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False


def test_close_then_notify_opens_a_new_socket(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    notifier.ready()
    notifier.close()
    notifier.close()  # twice is fine
    assert notifier.notify("WATCHDOG=1") is True
    notifier.close()
    assert [_received(sock), _received(sock)] == ["READY=1", "WATCHDOG=1"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert Notifier(env).watchdog_interval() == expected


def test_watchdog_interval_does_not_need_a_notify_socket() -> None:
    # systemd sets both, but the interval is defined by the WATCHDOG_* variables alone.
    assert Notifier({"WATCHDOG_USEC": "500000"}).watchdog_interval() == 0.25


def test_the_notifier_is_the_services_notify_callback(
    path_socket: tuple[str, socket.socket],
) -> None:
    address, sock = path_socket
    notify: Callable[[str], None]
    with Notifier({"NOTIFY_SOCKET": address}) as notify:
        notify("STATUS=3 pending")
        assert _received(sock) == "STATUS=3 pending"
