"""The service: opens the ledger, builds the pipeline, runs its threads and the loop, stops.

The pipeline's stages (paiv_sync.pipeline) do the work; this module is the wiring around
them. Threads: the watchdog observer only puts paths on ``inbox``; one pipeline thread (the
caller of ``run``) does every stat, hash and ledger write for incoming files and decides when
a category flushes; a small pool of upload workers sends batches; a connector thread connects;
one trainer thread starts and follows training tasks; one more pings systemd's watchdog. One
``threading.Event`` stops them all. Reload (SIGHUP) is read here and applied by the pipeline.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

from paiv_sync import ledger as states
from paiv_sync.config import Config, ConfigError, load_config
from paiv_sync.heartbeats import Heartbeats, ping_watchdog
from paiv_sync.layout import Location
from paiv_sync.ledger import Ledger, LedgerError, LedgerMismatch, LedgerWriteError
from paiv_sync.once import run_once
from paiv_sync.pipeline import (
    ONCE,
    WAKE_UP,
    WATCH,
    Inbox,
    Pipeline,
    RunSummary,
    make_client,
    report_kept,
    root_keys,
)
from paiv_sync.progress import ProgressCounter, ProgressHook
from paiv_sync.retry import RetryPolicy
from paiv_sync.stability import StabilityGate
from paiv_sync.watcher import Watcher

__all__ = ["RunSummary", "Service", "make_client"]

log = logging.getLogger(__name__)

Notify = Callable[[str], None]

# Seconds between two updates of systemd's STATUS= line.
_STATUS_EVERY = 5.0
# While a scan runs: seconds between two notes of how far it has come, and the start
# timeout extension each one asks systemd for (longer than the time until the next).
_SCAN_NOTE_EVERY = 5.0
_SCAN_EXTENSION = 60.0


def _no_notify(_message: str) -> None:
    return None


class Service:
    """One paiv-sync instance for one configuration.

    ``run()`` blocks until ``stop()`` (or, with ``once``, until the work at hand is done) and
    returns the process exit code. What it reports on (``ledger``, ``connected``, …) is there
    while it runs, and None or empty before.
    """

    def __init__(
        self,
        config: Config,
        *,
        once: bool = False,
        stop_event: threading.Event | None = None,
        notify: Notify = _no_notify,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        watchdog_interval: float | None = None,
        progress: ProgressHook | None = None,
    ) -> None:
        """Set up (nothing runs before ``run``).

        ``progress``, with ``once``: called with a :class:`Progress` after each batch, from an
        upload worker thread, so it must be quick and must not block; ignored without
        ``once``.
        """
        self.config = config
        self.once = once
        self.stop_event = stop_event or threading.Event()
        self.summary = RunSummary()
        self.inbox: Inbox = queue.SimpleQueue()
        self.ready = threading.Event()
        self._notify = notify
        self._retry = retry or RetryPolicy(
            initial=config.retry_initial,
            maximum=config.retry_maximum,
            jitter=min(1.0, config.retry_initial),
        )
        self._clock = clock
        self._watchdog_interval = watchdog_interval
        # Health, for the systemd watchdog: when the pipeline loop last turned, and when each
        # upload worker last showed progress (a request ended or a back-off wait began).
        self.beats = Heartbeats(
            clock,
            stall_limit=max(60.0, 2 * config.timeout),
            job_limit=3 * config.timeout + 2 * self._retry.maximum + 30,
        )
        self._progress = ProgressCounter(progress, clock) if once and progress else None
        self._pipeline: Pipeline | None = None
        self._reload_requested = threading.Event()
        self._next_status = 0.0
        self._status_text = ""
        self._reload_note = ""  # said in the status line after a rejected reload
        self._next_scan_note = 0.0

    # -- public --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask every thread to finish; ``run`` returns soon after. Safe from signal handlers."""
        self.stop_event.set()
        pipeline = self._pipeline
        if pipeline is not None:
            pipeline.trainer_wake.set()
        self.inbox.put(WAKE_UP)  # end the loop's wait for hints now, not a second later

    def request_reload(self) -> None:
        """Re-read the configuration file at the next turn of the loop (SIGHUP)."""
        self._reload_requested.set()
        self.inbox.put(WAKE_UP)

    def hint(self, path: str, is_dir: bool) -> None:
        """A path that may have changed (never blocks, never raises)."""
        self.inbox.put((path, is_dir))

    @property
    def ledger(self) -> Ledger | None:
        """The open ledger while the service runs."""
        return self._pipeline.ledger if self._pipeline is not None else None

    @property
    def connected(self) -> bool:
        """Whether the dataset is resolved and the last request to the server got an answer
        (not a 5xx): an outage shows here at its first failed request, whichever thread met it.
        """
        pipeline = self._pipeline
        return (
            pipeline is not None
            and pipeline.connection.connected
            and pipeline.client.reachable is not False
        )

    @property
    def request_retries(self) -> Mapping[str, int]:
        """Back-off waits in this process, by operation: of requests the client retried, and
        of the uploader between two tries of a batch (counted as uploads)."""
        pipeline = self._pipeline
        if pipeline is None:
            return {}
        counts = Counter(pipeline.client.retries)
        counts["upload"] += pipeline.upload_retries
        return dict(counts)

    @property
    def dataset_id(self) -> str | None:
        """The id of the dataset fed, once known."""
        return self._pipeline.connection.dataset_id if self._pipeline is not None else None

    @property
    def last_upload_time(self) -> float | None:
        """The wall clock time of the last upload the server confirmed (this process)."""
        return self._pipeline.dispatcher.last_upload_time if self._pipeline is not None else None

    @property
    def upload_retries(self) -> int:
        """Back-off waits of the upload workers in this process."""
        return self._pipeline.upload_retries if self._pipeline is not None else 0

    @property
    def watcher(self) -> Watcher | None:
        """The file watcher while it runs."""
        return self._pipeline.watcher if self._pipeline is not None else None

    @property
    def gate(self) -> StabilityGate[Location] | None:
        """The stability gate (the files seen that have not settled yet) while it runs."""
        return self._pipeline.gate if self._pipeline is not None else None

    def healthy(self) -> tuple[bool, str]:
        """Whether observer, pipeline and upload workers all work; and if not, why."""
        watcher = self.watcher
        if watcher is not None and not watcher.is_alive():
            return False, "the file watcher is not running"
        return self.beats.verdict()

    def readiness(self) -> list[str]:
        """Why the service cannot do its job now (empty when it can): not started, not
        healthy, the server unreachable, the ledger refusing writes."""
        pipeline = self._pipeline
        if pipeline is None or not self.ready.is_set():
            return ["starting: the start-up scan is not done"]
        reasons: list[str] = []
        ok, why = self.healthy()
        if not ok:
            reasons.append(why)
        if not self.connected:
            reasons.append(f"the server at {self.config.base_url} is not reachable")
        if pipeline.hold.down:
            reasons.append(f"the ledger {self.config.ledger_path} cannot be written")
        return reasons

    def status_line(self) -> str:
        """One line for systemd's STATUS=: pending and uploaded counts, training state."""
        ledger = self.ledger
        if ledger is None:
            return "starting"
        counts = ledger.counts()
        pending = sum(c.get(states.PENDING, 0) for c in counts.values())
        uploaded = sum(c.get(states.UPLOADED, 0) for c in counts.values())
        rejected = sum(c.get(states.REJECTED, 0) for c in counts.values())
        last = ledger.last_training()
        training = f"; last training {last.name}: {last.state}" if last else ""
        server = "" if self.connected else "; server not reachable"
        return (
            f"{pending} pending, {uploaded} uploaded, {rejected} rejected{training}{server}"
            f"{self._reload_note}"
        )

    # -- running -------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped (or until done, with ``once``); return the exit code."""
        try:
            ledger = _open_ledger(self.config)
        except _Exit as exit_:
            return exit_.code
        try:
            pipeline = Pipeline(
                self.config,
                ledger,
                mode=ONCE if self.once else WATCH,
                inbox=self.inbox,
                hint=self.hint,
                beats=self.beats,
                summary=self.summary,
                retry=self._retry,
                stop_event=self.stop_event,
                clock=self._clock,
                progress=self._progress,
                scanning=self._scanning,
            )
        except BaseException:
            ledger.close()
            raise
        self._pipeline = pipeline
        try:
            return self._run(pipeline)
        except LedgerWriteError as exc:
            log.error(
                "%s; paiv-sync stops (exit 1). Nothing is lost: what was not recorded is "
                "found again at the next start",
                exc,
            )
            return 1
        finally:
            self._notify("STOPPING=1")
            pipeline.close()

    def _run(self, pipeline: Pipeline) -> int:
        log.info(
            "watching %s; ledger %s",
            ", ".join(str(f) for f in self.config.folders),
            self.config.ledger_path,
        )
        if pipeline.mode.watch:
            # Watch first, then scan: a file written into a folder the scan has already
            # passed still raises an event (one seen twice is harmless: the gate dedups).
            pipeline.start_watcher()
        pipeline.scan_all()
        if pipeline.ledger.recovering:
            pipeline.record_everything_now()
        self.ready.set()
        self._notify("READY=1")
        if not pipeline.mode.watch:
            return run_once(pipeline)
        pipeline.start_trainer()
        pinger = None
        if self._watchdog_interval:
            pinger = threading.Thread(
                target=ping_watchdog,
                args=(self.stop_event, self._watchdog_interval, self.healthy, self._notify),
                name="paiv-watchdog",
                daemon=True,
            )
            pinger.start()
        try:
            pipeline.loop(before_turn=lambda: self._between_turns(pipeline))
        finally:
            self.stop_event.set()
            if pinger is not None:
                pinger.join(timeout=5)
        return 1 if pipeline.hold.fatal else 0

    def _scanning(self, root: Path, files: int) -> None:
        """A scan's progress: in the status line; before READY, more time to start too."""
        now = self._clock()
        if now < self._next_scan_note:
            return
        self._next_scan_note = now + _SCAN_NOTE_EVERY
        message = f"STATUS=scanning {root}: {files} files so far"
        if not self.ready.is_set():
            # A start-up scan of a million files outlasts systemd's start timeout: each note
            # asks for a little longer than the time until the next one.
            message += f"\nEXTEND_TIMEOUT_USEC={int(_SCAN_EXTENSION * 1_000_000)}"
        self._notify(message)

    def _between_turns(self, pipeline: Pipeline) -> None:
        if self._reload_requested.is_set():
            self._reload_requested.clear()
            self._reload(pipeline)
        now = self._clock()
        if now < self._next_status:
            return
        self._next_status = now + _STATUS_EVERY
        text = self.status_line()
        if text != self._status_text:
            self._status_text = text
            self._notify(f"STATUS={text}")

    def _reload(self, pipeline: Pipeline) -> None:
        """Apply a re-read configuration; keep the old one if the new one is invalid."""
        source = self.config.source
        if source is None:
            log.warning("reload requested, but this configuration has no file to re-read")
            return
        # MONOTONIC_USEC: what Type=notify-reload (systemd 253+) matches to its reload request.
        self._notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = load_config(source)
        except ConfigError as exc:
            log.error("reload: the new configuration is invalid; keeping the running one:\n%s", exc)
            # Said in the status line until a reload goes through (systemctl status shows it).
            self._reload_note = "; reload rejected, the running configuration kept (see the log)"
            self._next_status = 0.0
            self._notify("READY=1")
            return
        self._reload_note = ""
        self._next_status = 0.0
        for warning in new.warnings:
            log.warning("%s", warning)
        self.config = new
        pipeline.apply(new)
        log.info("reload: configuration %s applied", source)
        self._notify("READY=1")


class _Exit(Exception):
    """The service cannot start: ``code`` is the exit code (the reason is logged)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _open_ledger(config: Config) -> Ledger:
    """Open (or rebuild) the ledger and check that it belongs to ``config``."""
    try:
        ledger, _rebuilt = Ledger.open_or_recover(config.ledger_path)
    except LedgerError as exc:
        log.error("%s", exc)
        raise _Exit(1) from None
    try:
        ledger.check_binding(
            endpoint=config.base_url,
            dataset_name=config.dataset_name,
            config_path=_config_path(config),
        )
    except LedgerMismatch as exc:
        log.error("%s", exc)
        ledger.close()
        raise _Exit(2) from None
    ledger.only_roots(root_keys(config))
    report_kept(ledger)
    again, _ = ledger.retry_rejected()
    if again:
        log.info("%d files the server failed to store before are sent again", again)
    shared = config.ledger_shared_before
    if shared is not None and ledger.is_new():
        log.warning(
            "earlier versions kept this configuration's ledger in %s, shared with another "
            "configuration of the same file name; this one now has its own ledger, %s, and "
            "checks every file against the dataset before uploading, so that nothing the "
            "dataset holds is sent again",
            shared,
            config.ledger_path,
        )
        ledger.start_recovery()
    return ledger


def _config_path(config: Config) -> str | None:
    """The configuration file's absolute path (links kept), as the ledger records its owner."""
    if config.source is None:
        return None
    return str(Path(os.path.abspath(config.source)))  # noqa: PTH100 - as in config._read_ledger
