"""The service: builds the parts of the pipeline, runs their threads and the loop, stops them.

The parts: the watcher, intake (paiv_sync.intake: hints and scans to ledger rows), the
dispatcher (paiv_sync.dispatcher: pending files to the upload workers), the connection
(paiv_sync.connection: log in, the dataset), the uploader and the trainer. Threads: the
watchdog observer only puts paths on ``inbox``; one pipeline thread (the caller of ``run``)
does every stat, hash and ledger write for incoming files and decides when a category
flushes; a small pool of upload workers sends batches; a connector thread connects; one
trainer thread starts and follows training tasks. One ``threading.Event`` stops them all.
This module also holds what spans the parts: a ledger that cannot be written, reload, and
``--once``.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from paiv_sync import ledger as states
from paiv_sync.api import (
    MviClient,
    MviError,
)
from paiv_sync.batcher import Debouncer
from paiv_sync.config import Config
from paiv_sync.connection import Connection
from paiv_sync.dispatcher import Dispatcher
from paiv_sync.heartbeats import Heartbeats
from paiv_sync.intake import Intake
from paiv_sync.layout import Layout
from paiv_sync.ledger import (
    Ledger,
    LedgerError,
    LedgerMismatch,
    LedgerWriteError,
)
from paiv_sync.progress import ProgressCounter, ProgressHook
from paiv_sync.retry import RetryPolicy
from paiv_sync.stability import StabilityGate
from paiv_sync.trainer import Trainer
from paiv_sync.uploader import Uploader, UploadTags
from paiv_sync.watcher import Watcher

log = logging.getLogger(__name__)

Notify = Callable[[str], None]

# Put on the inbox to end the pipeline loop's wait at once (stop, reload).
_WAKE_UP = ("", False)


def make_client(
    config: Config,
    retry: RetryPolicy,
    *,
    stop_event: threading.Event | None = None,
    on_wait: Callable[[], None] | None = None,
) -> MviClient:
    """The MVI client for ``config``'s server and credentials."""
    return MviClient(
        config.base_url,
        username=config.username,
        password=config.password,
        api_key=config.api_key,
        verify=config.verify,
        timeout=config.timeout,
        retry=retry,
        stop_event=stop_event,
        on_wait=on_wait,
    )


# How long the ledger may refuse every write before the service stops, and the back-off between
# two tries meanwhile (its longest wait below the health check's stall limit of the loop).
LEDGER_GIVE_UP = 600.0
_LEDGER_RETRY = RetryPolicy(initial=1.0, maximum=30.0, jitter=0.0)
# Tries of each request (connecting included) under --once, which must end.
ONCE_TRIES = 5
# Path hints taken from the inbox per turn of the pipeline loop.
_HINTS_PER_TURN = 256


def _no_notify(_message: str) -> None:
    return None


@dataclass
class RunSummary:
    """What one run did; the CLI prints it for ``--once`` and the demo."""

    added: int = 0
    uploaded: int = 0
    rejected: int = 0
    duplicates: int = 0
    pending_left: int = 0
    trainings_started: list[str] = field(default_factory=list)


class Service:
    """One paiv-sync instance for one configuration.

    ``run()`` blocks until ``stop()`` (or, with ``once``, until the work at hand is done) and
    returns the process exit code.
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
        self._watchdog_interval = watchdog_interval
        self.once = once
        self.stop_event = stop_event or threading.Event()
        self.summary = RunSummary()
        self._notify = notify
        self._retry = retry or RetryPolicy(
            initial=config.retry_initial,
            maximum=config.retry_maximum,
            jitter=min(1.0, config.retry_initial),
        )
        self._clock = clock
        self.inbox: queue.SimpleQueue[tuple[str, bool]] = queue.SimpleQueue()
        self.layout = Layout(
            config.folders,
            recursive=config.recursive,
            categories=config.categories,
            extensions=config.extensions,
        )
        self.gate = StabilityGate(config.settle_time, clock, wall=time.time)
        self.debouncer = Debouncer(
            threshold=config.upload_threshold,
            quiet_time=config.quiet_time,
            max_delay=config.max_delay,
            clock=clock,
        )
        self.ledger: Ledger | None = None
        self.client: MviClient | None = None
        self.uploader: Uploader | None = None
        self.trainer: Trainer | None = None
        self.watcher: Watcher | None = None
        self.connection: Connection | None = None
        self.intake: Intake | None = None
        self.ready = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self.dispatcher: Dispatcher | None = None
        self._next_rescan = 0.0
        self._lost = threading.Event()  # set by an upload worker: reconnect / re-resolve
        self._trainer_wake = threading.Event()
        self._trainer_thread: threading.Thread | None = None
        self._watchdog_thread: threading.Thread | None = None
        # Health, for the systemd watchdog: when the pipeline loop last turned, and when each
        # upload worker last showed progress (a request ended or a back-off wait began).
        self.beats = Heartbeats(
            clock,
            stall_limit=max(60.0, 2 * config.timeout),
            job_limit=3 * config.timeout + 2 * self._retry.maximum + 30,
        )
        # A ledger that refuses writes (see _ledger_failed); guarded by _ledger_lock.
        self._ledger_down_since: float | None = None
        self._ledger_failures = 0
        self._ledger_blocked_until = 0.0
        self._ledger_said = 0.0
        self._fatal = False  # the service gave up: run() returns 1
        self._ledger_lock = threading.Lock()
        self._reload_requested = threading.Event()
        self.upload_retries = 0  # back-off waits of the upload workers, for /metrics
        self._next_status = 0.0
        self._status_text = ""
        self._progress = ProgressCounter(progress, clock) if once and progress else None

    # -- public --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask every thread to finish; ``run`` returns soon after. Safe from signal handlers."""
        self.stop_event.set()
        self._trainer_wake.set()
        self.inbox.put(_WAKE_UP)  # end the loop's wait for hints now, not a second later

    @property
    def connected(self) -> bool:
        """Whether the server is reachable and the dataset resolved."""
        return self.connection is not None and self.connection.connected

    @property
    def last_upload_time(self) -> float | None:
        """The wall clock time of the last upload the server confirmed (this process)."""
        return self.dispatcher.last_upload_time if self.dispatcher is not None else None

    @property
    def dataset_id(self) -> str | None:
        """The id of the dataset fed, once known."""
        return self.connection.dataset_id if self.connection is not None else None

    def request_reload(self) -> None:
        """Re-read the configuration file at the next turn of the loop (SIGHUP)."""
        self._reload_requested.set()
        self.inbox.put(_WAKE_UP)

    def healthy(self) -> tuple[bool, str]:
        """Whether observer, pipeline and upload workers all work; and if not, why."""
        if self.watcher is not None and not self.watcher.is_alive():
            return False, "the file watcher is not running"
        return self.beats.verdict()

    def hint(self, path: str, is_dir: bool) -> None:
        """A path that may have changed (the watcher's sink: never blocks, never raises)."""
        self.inbox.put((path, is_dir))

    def run(self) -> int:
        """Run until stopped (or until done, with ``once``); return the exit code."""
        try:
            self.ledger, _rebuilt = Ledger.open_or_recover(self.config.ledger_path)
        except LedgerError as exc:
            log.error("%s", exc)
            return 1
        try:
            self.ledger.check_binding(
                endpoint=self.config.base_url,
                dataset_name=self.config.dataset_name,
                config_path=_config_path(self.config),
            )
        except LedgerMismatch as exc:
            log.error("%s", exc)
            self.ledger.close()
            return 2
        self.ledger.only_roots(_root_keys(self.config))
        self._report_kept()
        again, _ = self.ledger.retry_rejected()
        if again:
            log.info("%d files the server failed to store before are sent again", again)
        shared = self.config.ledger_shared_before
        if shared is not None and self.ledger.is_new():
            log.warning(
                "earlier versions kept this configuration's ledger in %s, shared with another "
                "configuration of the same file name; this one now has its own ledger, %s, and "
                "checks every file against the dataset before uploading, so that nothing the "
                "dataset holds is sent again",
                shared,
                self.config.ledger_path,
            )
            self.ledger.start_recovery()
        try:
            self._build()
            log.info(
                "watching %s; ledger %s",
                ", ".join(str(f) for f in self.config.folders),
                self.config.ledger_path,
            )
            if not self.once:
                # Watch first, then scan: a file written into a folder the scan has already
                # passed still raises an event (one seen twice is harmless: the gate dedups).
                self._start_watcher()
            self._scan_all()
            if self.ledger.recovering:
                self._record_everything_now()
            self.ready.set()
            self._notify("READY=1")
            if self.once:
                return self._run_once()
            self._trainer_thread = threading.Thread(
                target=self._run_trainer, name="paiv-trainer", daemon=True
            )
            self._trainer_thread.start()
            if self._watchdog_interval:
                self._watchdog_thread = threading.Thread(
                    target=self._run_watchdog,
                    args=(self._watchdog_interval,),
                    name="paiv-watchdog",
                    daemon=True,
                )
                self._watchdog_thread.start()
            self._loop()
            return 1 if self._fatal else 0
        except LedgerWriteError as exc:
            log.error(
                "%s; paiv-sync stops (exit 1). Nothing is lost: what was not recorded is "
                "found again at the next start",
                exc,
            )
            return 1
        finally:
            self._notify("STOPPING=1")
            self._shutdown()

    # -- building and tearing down -------------------------------------------------------

    def _build(self) -> None:
        cfg = self.config
        assert self.ledger is not None
        self.client = make_client(
            cfg,
            self._retry
            if not self.once
            else RetryPolicy(
                initial=self._retry.initial, maximum=self._retry.maximum, max_attempts=ONCE_TRIES
            ),
            stop_event=self.stop_event,
            on_wait=self.beats.alive,
        )
        self.uploader = Uploader(
            self.client,
            self.ledger,
            retry=self._retry,
            stop_event=self.stop_event,
            sleep=self._upload_sleep,
            clock=self._clock,
            look_again=lambda path: self.hint(path, False),
        )
        self.uploader.tags = UploadTags(
            host=socket.gethostname(), instance=self.ledger.instance_id()
        )
        self.trainer = Trainer(
            self.client,
            self.ledger,
            model_name=cfg.model_name,
            action=cfg.model_action,
            threshold=cfg.training_threshold,
            strategy=cfg.strategy,
            stop_event=self.stop_event,
        )
        self.intake = self._new_intake()
        self.connection = Connection(
            cfg,
            self.client,
            self.ledger,
            self.uploader,
            self.trainer,
            retry=self._retry,
            stop_event=self.stop_event,
            lost=self._lost,
            clock=self._clock,
            on_connected=self._connected_now,
            job=self.beats.job,
            on_ledger_failure=self._ledger_failed,
            wake=lambda: self.inbox.put(_WAKE_UP),
        )
        self._pool = ThreadPoolExecutor(
            max_workers=cfg.upload_workers, thread_name_prefix="paiv-upload"
        )
        self.dispatcher = Dispatcher(
            cfg,
            self.ledger,
            self.uploader,
            self.debouncer,
            self._pool,
            tally=self.summary,
            progress=self._progress,
            beats=self.beats,
            stop_event=self.stop_event,
            lost=self._lost,
            clock=self._clock,
            connected=lambda: self.connected,
            may_write=lambda: self._ledger_down_since is None,
            on_ledger_failure=self._ledger_failed,
            on_uploaded=self._trainer_wake.set,
        )

    def _new_intake(self) -> Intake:
        """Intake for the configuration, layout and gate in force (built anew at a reload)."""
        assert self.ledger is not None
        return Intake(
            self.config,
            self.layout,
            self.gate,
            self.ledger,
            counts=self.summary,
            debouncer=self.debouncer,
            beats=self.beats,
            progress=self._progress,
            stop_event=self.stop_event,
            clock=self._clock,
            once=self.once,
            pending_counts=self._pending_counts,
            changed=self._pending_changed,
            between_slices=self._between_slices,
        )

    def _pending_changed(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.changed()

    def _start_watcher(self) -> None:
        self.watcher = Watcher(
            self.config.folders,
            self.hint,
            kind=self.config.observer,
            polling_interval=self.config.polling_interval,
        )
        self.watcher.start()
        log.info("file watcher running (%s events)", self.watcher.kind_in_use)

    def _shutdown(self) -> None:
        self.stop_event.set()
        self._trainer_wake.set()
        if self.watcher is not None:
            self.watcher.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._trainer_thread is not None:
            self._trainer_thread.join(timeout=self.config.timeout + 5)
        if self._watchdog_thread is not None:
            self._watchdog_thread.join(timeout=5)
        if self.connection is not None:
            self.connection.join(timeout=self.config.timeout + 5)
        if self.client is not None:
            self.client.close()
        if self.ledger is not None:
            try:
                self._sync_ledger()
            except LedgerError as exc:
                log.error("%s", exc)
            self.ledger.close()
            self.ledger = None

    # -- the main loop -------------------------------------------------------------------

    def _loop(self) -> None:
        self._next_rescan = self._clock() + self.config.rescan_interval
        while not self.stop_event.is_set():
            self.beats.loop()
            if self._ledger_held():
                continue
            try:
                self._turn()
            except LedgerWriteError as exc:
                self._ledger_failed(exc)

    def _turn(self) -> None:
        """One turn of the pipeline loop."""
        self._pump(self._wait_time())
        if self._reload_requested.is_set():
            self._reload_requested.clear()
            self._reload()
        self._report_status()
        self._supervise()
        self._ensure_connected()
        self._admit_settled()
        self._collect_uploads()
        self._resolve_orphans()
        self._dispatch(force=False)
        if self.config.rescan_interval and self._clock() >= self._next_rescan:
            self._next_rescan = self._clock() + self.config.rescan_interval
            log.debug("periodic rescan")
            self._scan_all()

    # -- a ledger that cannot be written -------------------------------------------------

    def _ledger_failed(self, exc: LedgerWriteError) -> None:
        """A write to the ledger failed: hold intake and uploads, back off, and say so.

        Called by the pipeline and by the upload workers. Nothing is lost meanwhile: a file
        not recorded is found again by the scan made once the ledger can be written, and an
        upload not recorded stays in doubt, to be settled against the server. After
        LEDGER_GIVE_UP seconds of failures the service stops (exit 1).
        """
        now = self._clock()
        with self._ledger_lock:
            self._ledger_failures += 1
            first = self._ledger_down_since is None
            if self._ledger_down_since is None:
                self._ledger_down_since = now
            down_for = now - self._ledger_down_since
            delay = _LEDGER_RETRY.delay(self._ledger_failures)
            self._ledger_blocked_until = max(self._ledger_blocked_until, now + delay)
            say = first or now - self._ledger_said >= 60.0
            if say:
                self._ledger_said = now
        if self.once:
            # --once must end: stop now rather than wait for the disk.
            if not self._fatal:
                self._fatal = True
                log.error(
                    "%s; paiv-sync --once stops (exit 1). Nothing is lost: what was not "
                    "recorded is found again by the next run",
                    exc,
                )
            self.stop_event.set()
            return
        if down_for >= LEDGER_GIVE_UP:
            if not self._fatal:
                self._fatal = True
                log.error(
                    "%s; the ledger has refused every write for %.0f min: paiv-sync stops "
                    "(exit 1). Nothing is lost: what was not recorded is found again at the "
                    "next start",
                    exc,
                    down_for / 60,
                )
            self.stop_event.set()
            return
        if say:
            log.error(
                "%s; nothing is recorded or sent meanwhile; trying again in %.0f s (paiv-sync "
                "stops if this lasts %.0f min)",
                exc,
                delay,
                LEDGER_GIVE_UP / 60,
            )

    def _ledger_held(self) -> bool:
        """Whether the pipeline waits for the ledger (after waiting a moment, if so).

        Once the back-off is over, one small write tells whether the ledger can be written
        again; then a scan takes in again what could not be recorded meanwhile.
        """
        assert self.ledger is not None
        if self._ledger_down_since is None:
            return False
        now = self._clock()
        if now < self._ledger_blocked_until:
            self.stop_event.wait(min(1.0, self._ledger_blocked_until - now))
            return True
        try:
            self.ledger.set_meta("last_write_check", str(time.time()))
            self._sync_ledger()
        except LedgerWriteError as exc:
            self._ledger_failed(exc)
            return True
        log.warning(
            "the ledger %s can be written again after %.0f s; going on, and rescanning so "
            "that no file is missed",
            self.ledger.path,
            now - self._ledger_down_since,
        )
        with self._ledger_lock:
            self._ledger_down_since = None
            self._ledger_failures = 0
        if self.dispatcher is not None:
            self.dispatcher.changed()
            self.dispatcher.look_for_orphans_now()
        try:
            self._scan_all()
        except LedgerWriteError as exc:
            self._ledger_failed(exc)
            return True
        return False

    def _wait_time(self) -> float:
        now = self._clock()
        wait = 1.0
        connection = self.connection
        if (
            connection is not None
            and not connection.trying
            and (self._lost.is_set() or not connection.connected)
        ):
            # Connecting (at start, or again after a failure) must not wait for a file event;
            # a connector at work wakes the loop when it is done.
            wait = min(wait, max(0.0, connection.next_try - now))
        due = self.gate.next_due()
        if due is not None:
            wait = min(wait, max(0.0, due - now))
        deadline = self.debouncer.next_deadline(self._pending_counts())
        if deadline is not None:
            wait = min(wait, max(0.0, deadline - now))
        if self.dispatcher is not None and self.dispatcher.inflight:
            wait = min(wait, 0.05)
        return max(wait, 0.005)

    def _pump(self, timeout: float) -> None:
        """Take path hints from the inbox: wait up to ``timeout`` for the first one."""
        try:
            item = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return
        self._take_hint(*item)
        # A bounded handful per turn: in a burst, files that have settled meanwhile are taken
        # in and sent while later events are still arriving, not after the last of them.
        for _ in range(_HINTS_PER_TURN - 1):
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            self._take_hint(*item)

    def _take_hint(self, path: str, is_dir: bool) -> None:
        if not path:
            return  # _WAKE_UP: only there to end the wait
        assert self.intake is not None
        self.intake.take_hint(path, is_dir)

    def _supervise(self) -> None:
        watcher = self.watcher
        if watcher is not None and not watcher.is_alive():
            log.error("the file watcher stopped; restarting it and rescanning so no file is missed")
            try:
                watcher.restart()
            except Exception:
                log.exception("could not restart the file watcher; relying on rescans")
            self._scan_all()

    # -- scanning ------------------------------------------------------------------------

    def _scan_all(self) -> None:
        """Reconcile the disk with the ledger: new or changed files enter the gate."""
        assert self.ledger is not None
        offered = 0
        for root in self.config.folders:
            if not root.is_dir():
                log.warning(
                    "root folder %s is missing (unmounted?); will look again at the next scan", root
                )
                continue
            assert self.intake is not None
            offered += self.intake.scan_root(root)
        if offered:
            log.info("scan found %d new or changed files", offered)
        watcher = self.watcher
        if watcher is not None and any(root.is_dir() for root in watcher.missing_roots):
            log.info("a root folder that was missing is back; watching it again")
            watcher.restart()

    def _record_everything_now(self) -> None:
        """After the ledger was rebuilt: record every file found before talking to the server.

        The ledger records them in doubt; resolving that at connect marks those the dataset
        already holds as uploaded instead of sending them again.
        """
        assert self.ledger is not None and self.intake is not None
        log.warning("ledger rebuilt: recording every file on disk before uploading anything")
        self.intake.admit_all()
        if not self.stop_event.is_set():
            self.ledger.end_recovery()

    # -- admitting settled files (see paiv_sync.intake) ----------------------------------

    def _admit_settled(self) -> None:
        assert self.intake is not None
        self.intake.admit_settled()

    def _between_slices(self) -> None:
        """Between two slices of files taken in: hand what is ready to the upload workers."""
        self._collect_uploads()
        self._dispatch(force=self.once)

    # -- connecting (see paiv_sync.connection) -------------------------------------------

    def _ensure_connected(self) -> bool:
        assert self.connection is not None
        return self.connection.ensure()

    def _connected_now(self, new_dataset: bool) -> None:
        """After each connect: compare with the dataset again if it is another, and go on."""
        assert self.dispatcher is not None
        if new_dataset:
            self.dispatcher.new_dataset()
        self.dispatcher.changed()
        self._trainer_wake.set()

    def _report_kept(self) -> None:
        """Say which folders no longer configured still have files that will not be sent."""
        assert self.ledger is not None
        for root, count in sorted(self.ledger.kept_counts().items()):
            log.warning(
                "%s is no longer in folders: its %d files not yet uploaded are kept in the "
                "ledger but not sent (put the folder back in folders to send them)",
                root,
                count,
            )

    def _run_watchdog(self, interval: float) -> None:
        """Ping systemd's watchdog while every part is healthy; withhold the ping otherwise."""
        complained = False
        while not self.stop_event.wait(interval):
            ok, why = self.healthy()
            if ok:
                self._notify("WATCHDOG=1")
                complained = False
            elif not complained:
                log.error("not healthy: %s; withholding the systemd watchdog ping", why)
                complained = True

    # -- status and reload ---------------------------------------------------------------

    def status_line(self) -> str:
        """One line for systemd's STATUS=: pending and uploaded counts, training state."""
        assert self.ledger is not None
        counts = self.ledger.counts()
        pending = sum(c.get(states.PENDING, 0) for c in counts.values())
        uploaded = sum(c.get(states.UPLOADED, 0) for c in counts.values())
        rejected = sum(c.get(states.REJECTED, 0) for c in counts.values())
        last = self.ledger.last_training()
        training = f"; last training {last.name}: {last.state}" if last else ""
        server = "" if self.connected else "; server not reachable"
        return f"{pending} pending, {uploaded} uploaded, {rejected} rejected{training}{server}"

    def _report_status(self) -> None:
        now = self._clock()
        if now < self._next_status:
            return
        self._next_status = now + 5.0
        text = self.status_line()
        if text != self._status_text:
            self._status_text = text
            self._notify(f"STATUS={text}")

    def _reload(self) -> None:
        """Apply a re-read configuration; keep the old one if the new one is invalid."""
        from paiv_sync.config import ConfigError, load_config

        source = self.config.source
        if source is None:
            log.warning("reload requested, but this configuration has no file to re-read")
            return
        self._notify("RELOADING=1")
        try:
            new = load_config(source)
        except ConfigError as exc:
            log.error("reload: the new configuration is invalid; keeping the running one:\n%s", exc)
            self._notify("READY=1")
            return
        for warning in new.warnings:
            log.warning("%s", warning)
        old = self.config
        needs_restart = [
            name
            for name in (
                "base_url",
                "username",
                "password",
                "api_key",
                "verify",
                "timeout",
                "ledger_path",
                "dataset_name",
                "dataset_action",
                "upload_workers",
            )
            if getattr(old, name) != getattr(new, name)
        ]
        if needs_restart:
            log.warning(
                "reload: %s changed; these take effect after a restart "
                "(systemctl restart), the rest is applied now",
                ", ".join(needs_restart),
            )
        self.config = new
        self.debouncer.threshold = new.upload_threshold
        self.debouncer.quiet_time = new.quiet_time
        self.debouncer.max_delay = new.max_delay
        if self.trainer is not None:
            self.trainer.threshold = new.training_threshold
            self.trainer.action = new.model_action
            self.trainer.model_name = new.model_name
            self.trainer.strategy = dict(new.strategy)
        self.layout = Layout(
            new.folders,
            recursive=new.recursive,
            categories=new.categories,
            extensions=new.extensions,
        )
        self.gate = StabilityGate(new.settle_time, self._clock, wall=time.time)
        if self.ledger is not None:
            self.intake = self._new_intake()
            self.ledger.only_roots(_root_keys(new))
            self._report_kept()
        if self.watcher is not None and (
            tuple(old.folders) != tuple(new.folders)
            or (old.observer, old.polling_interval) != (new.observer, new.polling_interval)
        ):
            self.watcher.stop()
            self._start_watcher()
        self._pending_changed()
        log.info("reload: configuration %s applied", source)
        self._scan_all()
        self._notify("READY=1")

    # -- uploading -----------------------------------------------------------------------

    def _pending_counts(self) -> dict[str, int]:
        assert self.dispatcher is not None
        return self.dispatcher.pending_counts()

    def _dispatch(self, *, force: bool) -> None:
        assert self.dispatcher is not None
        self.dispatcher.dispatch(force=force)

    def _resolve_orphans(self, *, now: bool = False) -> None:
        assert self.dispatcher is not None
        self.dispatcher.resolve_orphans(now=now)

    def _upload_sleep(self, seconds: float) -> None:
        """The uploader's back-off wait: a sign of life, and it ends at once on shutdown."""
        self.beats.alive()
        self.upload_retries += 1
        self.stop_event.wait(seconds)
        self.beats.alive()

    def _collect_uploads(self) -> None:
        assert self.dispatcher is not None
        if self.dispatcher.collect() and not self.once:
            # Uploads went quiet: make the last batches' "uploaded" durable now rather than
            # with the next batch (see Uploader._settle_results). --once syncs at the end.
            self._sync_ledger()

    def _sync_ledger(self) -> None:
        """Make the last writes durable and empty the write-ahead log (uploads are quiet).

        Raises LedgerWriteError when the disk refuses: the pipeline then holds (see
        _ledger_failed), as the next writes would fail too.
        """
        assert self.ledger is not None
        self.ledger.sync()
        self.ledger.checkpoint()

    def _wait_uploads(self) -> None:
        assert self.dispatcher is not None
        while self.dispatcher.inflight and not self.stop_event.is_set():
            time.sleep(0.02)
            self._collect_uploads()

    # -- training ------------------------------------------------------------------------

    def _run_trainer(self) -> None:
        assert self.trainer is not None
        while not self.stop_event.is_set() and not self.connected:
            self._trainer_wake.wait(1.0)
            self._trainer_wake.clear()
        self.trainer.run(self._trainer_wake, self.config.poll_interval)

    # -- once ----------------------------------------------------------------------------

    def _connect_once_mode(self) -> bool:
        """Connect for ``--once``: up to ONCE_TRIES tries with back-off, as for any request.

        A refused password or certificate is not tried again (it will not change by itself).
        """
        connection = self.connection
        assert connection is not None
        for attempt in range(1, ONCE_TRIES + 1):
            if connection.try_now():
                return True
            if connection.fatal or self.stop_event.is_set() or attempt == ONCE_TRIES:
                return False
            self.stop_event.wait(max(0.0, connection.next_try - self._clock()))
        return False

    def _run_once(self) -> int:
        assert self.ledger is not None and self.trainer is not None
        assert self.intake is not None and self.dispatcher is not None
        if not self._connect_once_mode():
            return 1
        if self._progress is not None:
            # Everything there may be to send, known now, so the rate and ETA hold from the
            # start: pending rows, and the files the scan found new or changed. A file looked
            # at that needs no upload (unchanged, a duplicate, not an image, gone) drops out.
            files, size = self.ledger.pending_totals()
            candidates, candidate_bytes = self.gate.totals()
            self._progress.start(total=(files + candidates, size + candidate_bytes))
        self.intake.admit_all()
        # Batches dispatched while admitting first: a category still in flight would be
        # skipped by the final dispatch.
        self._wait_uploads()
        self._dispatch(force=True)
        self._wait_uploads()
        for _ in range(3):
            # Files an upload left in doubt (the server failed mid-batch): settle them against
            # the server now, and send those it does not hold, rather than at the next run.
            # Files to look at again (overwritten while they were sent) are taken in likewise.
            if self._lost.is_set() or self.stop_event.is_set():
                break
            if not self.ledger.in_doubt() and self.inbox.empty():
                break
            while not self.inbox.empty():
                self._pump(0.0)
            self.intake.admit_all()
            self._resolve_orphans(now=True)
            while self.dispatcher.resolving and not self.stop_event.is_set():
                self.stop_event.wait(0.02)
                self._resolve_orphans()
            self._dispatch(force=True)
            self._wait_uploads()
        if self._fatal:
            return 1
        if self._progress is not None:
            self._progress.add(report=True)  # the final counts, after the last files dropped
        if self._lost.is_set():
            log.error("uploads stopped before everything was sent; see the errors above")
        before = self.ledger.last_training()
        try:
            self.trainer.step()
        except MviError as exc:
            log.error("training check failed: %s", exc)
        after = self.ledger.last_training()
        if after is not None and (before is None or after.id != before.id):
            self.summary.trainings_started.append(after.name)
        self.summary.pending_left = sum(self.ledger.pending_counts().values()) + len(
            self.ledger.in_doubt()
        )
        log.info(
            "done: %d added, %d uploaded, %d duplicates skipped, %d rejected, %d still pending",
            self.summary.added,
            self.summary.uploaded,
            self.summary.duplicates,
            self.summary.rejected,
            self.summary.pending_left,
        )
        return 1 if self.summary.pending_left or self.summary.rejected or self._lost.is_set() else 0


def _config_path(config: Config) -> str | None:
    """The configuration file's absolute path (links kept), as the ledger records its owner."""
    if config.source is None:
        return None
    return str(Path(os.path.abspath(config.source)))  # noqa: PTH100 - as in config._read_ledger


def _root_keys(config: Config) -> list[str]:
    """The configured roots as the ledger's rows name them (absolute, links kept)."""
    return [str(Path(os.path.abspath(folder))) for folder in config.folders]  # noqa: PTH100
