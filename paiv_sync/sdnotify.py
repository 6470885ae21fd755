"""The sd_notify protocol: tell systemd that the service is ready, alive, reloading or stopping.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for a socket in Linux's abstract
namespace) to a ``Type=notify`` service; the service sends newline-separated ``KEY=VALUE``
assignments to it as single datagrams. ``WATCHDOG_USEC`` (with ``WATCHDOG_PID``) says how often
systemd expects ``WATCHDOG=1``.

This is a small, dependency-free client of that protocol (libsystemd's ``sd_notify(3)`` does the
same). Outside systemd ``NOTIFY_SOCKET`` is unset and every call is a cheap no-op, so the service
can call it unconditionally. Nothing here raises: a service manager that has gone away must never
take the service down with it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)

# A send blocks only while the manager's receive queue is full. systemd reads its socket
# promptly, so a datagram that has not gone out in this time is dropped rather than let a
# stuck manager stall the service.
_SEND_TIMEOUT = 1.0


class Notifier:
    """A client of systemd's notification socket.

    Takes ``env``, the environment to read (default: ``os.environ``): ``NOTIFY_SOCKET``,
    ``WATCHDOG_USEC`` and ``WATCHDOG_PID``; and ``send_timeout``, the longest one message may
    wait for room in the manager's queue before it is given up. Safe to use from several
    threads. The instance itself is a ``Callable[[str], None]``, the shape the service expects
    of its ``notify`` callback: ``Service(config, notify=Notifier())``.
    """

    def __init__(
        self, env: Mapping[str, str] | None = None, *, send_timeout: float = _SEND_TIMEOUT
    ) -> None:
        env = os.environ if env is None else env
        self._send_timeout = send_timeout
        self._address = _parse_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _parse_positive_int(env.get("WATCHDOG_USEC", ""))
        watchdog_pid = env.get("WATCHDOG_PID", "")
        self._watchdog_pid = _parse_positive_int(watchdog_pid) if watchdog_pid else None
        self._watchdog_pid_given = bool(watchdog_pid)
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """True when a notification socket was given, i.e. the service runs under systemd."""
        return self._address is not None

    def notify(self, message: str) -> bool:
        """Send ``message`` (``KEY=VALUE`` lines) to systemd as one datagram.

        Returns True when it was sent, False when notifications are disabled or sending failed
        (the reason is logged at DEBUG). Never raises.
        """
        if self._address is None:
            return False
        data = message.encode("utf-8", errors="replace")
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._socket.settimeout(self._send_timeout)
                self._socket.sendto(data, self._address)
            except OSError as exc:
                log.debug(
                    "sd_notify: could not send %s to %s: %s",
                    _first_key(message),
                    _shown(self._address),
                    exc,
                )
                # A fresh socket next time, in case this one is what went wrong.
                self._close_locked()
                return False
        return True

    def __call__(self, message: str) -> None:
        """Send ``message`` like ``notify``, without a result (the service's callback type)."""
        self.notify(message)

    def ready(self) -> None:
        """Tell systemd that start-up is complete (``READY=1``)."""
        self.notify("READY=1")

    def stopping(self) -> None:
        """Tell systemd that the service is shutting down (``STOPPING=1``)."""
        self.notify("STOPPING=1")

    def reloading(self) -> None:
        """Tell systemd that the service is reloading its configuration; send ``ready`` after.

        ``MONOTONIC_USEC`` is what ``Type=notify-reload`` (systemd 253+) uses to match the
        message to its reload request; older versions ignore it.
        """
        # time.monotonic_ns() is CLOCK_MONOTONIC on Linux, the clock systemd expects here.
        self.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def status(self, text: str) -> None:
        """Set the one-line status shown by ``systemctl status`` (``STATUS=text``)."""
        # A newline would start a new assignment: a status text must not be able to say
        # READY=1 or anything else on the service's behalf.
        self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> None:
        """Tell systemd that the service is alive (``WATCHDOG=1``)."""
        self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask systemd for ``seconds`` more before the start or stop timeout hits.

        For a long start-up scan: send this regularly, each time for a little longer than the
        time until the next one (``EXTEND_TIMEOUT_USEC``).
        """
        self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """Return the seconds between ``watchdog`` pings, or None when systemd expects none.

        That is half of ``WATCHDOG_USEC``, when it is set and ``WATCHDOG_PID`` is unset or names
        this process (a child that inherited the variables must not ping for its parent).
        """
        if self._watchdog_usec is None:
            return None
        if self._watchdog_pid_given and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def close(self) -> None:
        """Close the socket; a later ``notify`` opens a new one."""
        with self._lock:
            self._close_locked()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _close_locked(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _parse_address(value: str) -> str | None:
    """Map ``$NOTIFY_SOCKET`` to a socket address for ``sendto``, or None when unusable."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Linux's abstract namespace: the name starts with a NUL byte instead of "@".
        return "\0" + value[1:]
    if value:
        # systemd 253+ may also pass "vsock:CID:PORT" (virtual machines); not supported here.
        log.debug("sd_notify: unsupported NOTIFY_SOCKET %r; notifications disabled", value)
    return None


def _parse_positive_int(value: str) -> int | None:
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number > 0 else None


def _first_key(message: str) -> str:
    """The name of a message's first assignment, for logs (never the values)."""
    return message.split("=", 1)[0].split("\n", 1)[0] or "an empty message"


def _shown(address: str) -> str:
    return "@" + address[1:] if address.startswith("\0") else address
