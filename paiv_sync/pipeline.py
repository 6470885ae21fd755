"""The pipeline: the stages built for one open ledger, and the loop that turns them.

Stages, in the order a file meets them: the watcher (paths on the inbox), intake
(paiv_sync.intake: hints and scans to ledger rows), the dispatcher (paiv_sync.dispatcher:
pending rows to the upload workers), the uploader and the trainer; the connection
(paiv_sync.connection) links the last two to the dataset, and the ledger hold
(paiv_sync.ledgerhold) pauses them all while the ledger cannot be written. Every part is built
in ``__init__``, so none is ever missing. :class:`Mode` says how the same stages run: watching
until stopped, or ``--once`` (take in what is there, send it, end; see paiv_sync.once).
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

from paiv_sync.api import MviClient
from paiv_sync.batcher import Debouncer
from paiv_sync.config import Config, restart_needed
from paiv_sync.connection import Connection
from paiv_sync.dispatcher import Dispatcher
from paiv_sync.heartbeats import Heartbeats
from paiv_sync.intake import Intake
from paiv_sync.layout import Layout, Location, layout_for
from paiv_sync.ledger import Ledger, LedgerWriteError
from paiv_sync.ledgerhold import LEDGER_GIVE_UP, LedgerHold
from paiv_sync.progress import ProgressCounter
from paiv_sync.retry import RetryPolicy
from paiv_sync.stability import StabilityGate
from paiv_sync.tags import UploadTags
from paiv_sync.trainer import Trainer
from paiv_sync.uploader import Uploader
from paiv_sync.watcher import Watcher

log = logging.getLogger(__name__)

# Put on the inbox to end the pipeline loop's wait at once (stop, reload).
WAKE_UP = ("", False)
# Seconds a stop waits for a connector thread still at work.
_CONNECTOR_GRACE = 5.0
# Path hints taken from the inbox per turn of the pipeline loop.
_HINTS_PER_TURN = 256

Inbox = queue.SimpleQueue[tuple[str, bool]]


@dataclass(frozen=True)
class Mode:
    """How the stages run.

    ``watch``: watch the folders and turn the loop until stopped (else: take in what is there,
    send it, end). ``request_tries``: tries of each request, connecting included (None: until
    it succeeds). ``ledger_give_up``: seconds a ledger that refuses writes is waited for.
    ``flush_whole``: send every pending file as soon as it is recorded, whatever the upload
    threshold and quiet time say.
    """

    watch: bool
    request_tries: int | None
    ledger_give_up: float
    flush_whole: bool


WATCH = Mode(watch=True, request_tries=None, ledger_give_up=LEDGER_GIVE_UP, flush_whole=False)
# --once must end: a few tries of each request, and no wait for a full disk.
ONCE = Mode(watch=False, request_tries=5, ledger_give_up=0.0, flush_whole=True)


@dataclass
class RunSummary:
    """What one run did; the CLI prints it for ``--once`` and the demo."""

    added: int = 0
    uploaded: int = 0
    rejected: int = 0
    duplicates: int = 0
    pending_left: int = 0
    trainings_started: list[str] = field(default_factory=list)


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


class Pipeline:
    """The stages for ``config`` over ``ledger``, run on the caller's thread by ``loop``.

    ``hint(path, is_dir)`` puts a path that may have changed on ``inbox`` (the watcher's sink);
    ``beats``, ``summary`` and ``stop_event`` are the service's (its health check, its run
    summary, its stop).
    """

    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        *,
        mode: Mode,
        inbox: Inbox,
        hint: Callable[[str, bool], None],
        beats: Heartbeats,
        summary: RunSummary,
        retry: RetryPolicy,
        stop_event: threading.Event,
        clock: Callable[[], float],
        progress: ProgressCounter | None,
        scanning: Callable[[Path, int], None] | None = None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.mode = mode
        self.inbox = inbox
        self._hint = hint
        self.beats = beats
        self.summary = summary
        self.stop_event = stop_event
        self.progress = progress
        self._scanning = scanning
        self.clock = clock
        self.lost = threading.Event()  # set by an upload worker: reconnect / re-resolve
        self.trainer_wake = threading.Event()
        self.upload_retries = 0  # back-off waits of the upload workers, for /metrics
        self.watcher: Watcher | None = None  # started by start_watcher (watch mode)
        self._trainer_thread: threading.Thread | None = None
        self._next_rescan = 0.0
        requests_retry = retry
        if mode.request_tries is not None:
            requests_retry = RetryPolicy(
                initial=retry.initial, maximum=retry.maximum, max_attempts=mode.request_tries
            )
        self.client = make_client(
            config, requests_retry, stop_event=stop_event, on_wait=beats.alive
        )
        self.uploader = Uploader(
            self.client,
            ledger,
            retry=retry,
            stop_event=stop_event,
            sleep=self._upload_sleep,
            clock=clock,
            look_again=lambda path: hint(path, False),
            tags=UploadTags(host=socket.gethostname(), instance=ledger.instance_id()),
        )
        self.trainer = Trainer(
            self.client,
            ledger,
            model_name=config.model_name,
            action=config.model_action,
            threshold=config.training_threshold,
            strategy=config.strategy,
            stop_event=stop_event,
        )
        self.hold = LedgerHold(
            ledger,
            give_up=mode.ledger_give_up,
            stop_event=stop_event,
            clock=clock,
            back=self._ledger_back,
        )
        self.debouncer = Debouncer(
            threshold=config.upload_threshold,
            quiet_time=config.quiet_time,
            max_delay=config.max_delay,
            clock=clock,
        )
        self._pool = ThreadPoolExecutor(
            max_workers=config.upload_workers, thread_name_prefix="paiv-upload"
        )
        self.dispatcher = Dispatcher(
            config,
            ledger,
            self.uploader,
            self.debouncer,
            self._pool,
            tally=summary,
            progress=progress,
            beats=beats,
            stop_event=stop_event,
            lost=self.lost,
            clock=clock,
            connected=lambda: self.connection.connected,
            may_write=lambda: not self.hold.down,
            on_ledger_failure=self.hold.failed,
            on_uploaded=self.trainer_wake.set,
        )
        self.layout, self.gate, self.intake = self._intake_for(config)
        self.connection = Connection(
            config,
            self.client,
            ledger,
            self.uploader,
            self.trainer,
            retry=retry,
            stop_event=stop_event,
            lost=self.lost,
            clock=clock,
            on_connected=self._connected_now,
            job=beats.job,
            on_ledger_failure=self.hold.failed,
            wake=lambda: inbox.put(WAKE_UP),
        )

    def _intake_for(self, config: Config) -> tuple[Layout, StabilityGate[Location], Intake]:
        """Layout, gate and intake for ``config`` (built anew at a reload)."""
        # The .paivignore files are read before any event is taken (each scan reads again).
        layout = layout_for(config)
        gate: StabilityGate[Location] = StabilityGate(
            config.settle_time, self.clock, wall=time.time, path_of=lambda where: where.path
        )
        intake = Intake(
            config,
            layout,
            gate,
            self.ledger,
            counts=self.summary,
            debouncer=self.debouncer,
            beats=self.beats,
            progress=self.progress,
            stop_event=self.stop_event,
            clock=self.clock,
            thresholds_apply=not self.mode.flush_whole,
            pending_counts=self.dispatcher.pending_counts,
            changed=self.dispatcher.changed,
            between_slices=self._between_slices,
            scanning=self._scanning,
        )
        return layout, gate, intake

    # -- threads -------------------------------------------------------------------------

    def start_watcher(self) -> None:
        """Watch the folders: hints go to the inbox."""
        self.watcher = Watcher(
            self.config.folders,
            self._hint,
            kind=self.config.observer,
            polling_interval=self.config.polling_interval,
        )
        self.watcher.start()
        log.info("file watcher running (%s events)", self.watcher.kind_in_use)

    def start_trainer(self) -> None:
        """Start the trainer thread: it starts and follows training tasks once connected."""
        self._trainer_thread = threading.Thread(
            target=self._run_trainer, name="paiv-trainer", daemon=True
        )
        self._trainer_thread.start()

    def _run_trainer(self) -> None:
        while not self.stop_event.is_set() and not self.connection.connected:
            self.trainer_wake.wait(1.0)
            self.trainer_wake.clear()
        self.trainer.run(self.trainer_wake, self.config.poll_interval)

    def close(self) -> None:
        """Stop every thread, make the ledger durable and close it."""
        self.stop_event.set()
        self.trainer_wake.set()
        if self.watcher is not None:
            self.watcher.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._trainer_thread is not None:
            self._trainer_thread.join(timeout=self.config.timeout + 5)
        # A try still at work is in a request that may take its timeout to end; its thread
        # is a daemon, and what it did not record is settled at the next start.
        self.connection.join(timeout=_CONNECTOR_GRACE)
        self.client.close()
        try:
            self.sync_ledger()
        except LedgerWriteError as exc:
            log.error("%s", exc)
        self.ledger.close()

    # -- the loop ------------------------------------------------------------------------

    def loop(self, before_turn: Callable[[], None]) -> None:
        """Turn until stopped; ``before_turn`` runs first in each turn (reload, status)."""
        self._next_rescan = self.clock() + self.config.rescan_interval
        while not self.stop_event.is_set():
            self.beats.loop()
            if self.hold.held():
                continue
            try:
                self.pump(self._wait_time())
                before_turn()
                self._turn()
            except LedgerWriteError as exc:
                self.hold.failed(exc)

    def _turn(self) -> None:
        self._supervise()
        self.ensure_connected()
        self.admit_settled()
        self.collect_uploads()
        self.dispatcher.resolve_orphans()
        self.dispatch(force=False)
        if self.config.rescan_interval and self.clock() >= self._next_rescan:
            self._next_rescan = self.clock() + self.config.rescan_interval
            log.debug("periodic rescan")
            self.scan_all()

    def _wait_time(self) -> float:
        now = self.clock()
        wait = 1.0
        connection = self.connection
        if not connection.trying and (self.lost.is_set() or not connection.connected):
            # Connecting (at start, or again after a failure) must not wait for a file event;
            # a connector at work wakes the loop when it is done.
            wait = min(wait, max(0.0, connection.next_try - now))
        due = self.gate.next_due()
        if due is not None:
            wait = min(wait, max(0.0, due - now))
        deadline = self.debouncer.next_deadline(self.dispatcher.pending_counts())
        if deadline is not None:
            wait = min(wait, max(0.0, deadline - now))
        if self.dispatcher.inflight:
            wait = min(wait, 0.05)
        return max(wait, 0.005)

    def pump(self, timeout: float) -> None:
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
        if path:  # WAKE_UP is only there to end the wait
            self.intake.take_hint(path, is_dir)

    def _supervise(self) -> None:
        watcher = self.watcher
        if watcher is not None and not watcher.is_alive():
            log.error("the file watcher stopped; restarting it and rescanning so no file is missed")
            try:
                watcher.restart()
            except Exception:
                log.exception("could not restart the file watcher; relying on rescans")
            self.scan_all()

    # -- the stages' steps (bench/ingest.py times them by these names) -------------------

    def scan_all(self) -> None:
        """Reconcile the disk with the ledger: new or changed files enter the gate."""
        offered = 0
        for root in self.config.folders:
            if not root.is_dir():
                log.warning(
                    "root folder %s is missing (unmounted?); will look again at the next scan", root
                )
                continue
            offered += self.intake.scan_root(root)
        if offered:
            log.info("scan found %d new or changed files", offered)
        watcher = self.watcher
        if watcher is not None and any(root.is_dir() for root in watcher.missing_roots):
            log.info("a root folder that was missing is back; watching it again")
            watcher.restart()

    def record_everything_now(self) -> None:
        """After the ledger was rebuilt: record every file found before talking to the server.

        The ledger records them in doubt; resolving that at connect marks those the dataset
        already holds as uploaded instead of sending them again.
        """
        log.warning("ledger rebuilt: recording every file on disk before uploading anything")
        self.intake.admit_all()
        if not self.stop_event.is_set():
            self.ledger.end_recovery()

    def ensure_connected(self) -> bool:
        """Connect, or start a try in the background (see paiv_sync.connection)."""
        return self.connection.ensure()

    def admit_settled(self) -> None:
        """Check, hash and record the files that settled (see paiv_sync.intake)."""
        self.intake.admit_settled()

    def dispatch(self, *, force: bool) -> None:
        """Hand the categories that are due to the upload workers (``force``: all of them)."""
        self.dispatcher.dispatch(force=force)

    def wait_uploads(self) -> None:
        """Wait until no upload is in flight."""
        while self.dispatcher.inflight and not self.stop_event.is_set():
            time.sleep(0.02)
            self.collect_uploads()

    def collect_uploads(self) -> None:
        """Take in the uploads that ended."""
        if self.dispatcher.collect() and self.mode.watch:
            # Uploads went quiet: make the last batches' "uploaded" durable now rather than
            # with the next batch (see Uploader._settle_results). --once syncs at the end.
            self.sync_ledger()

    def sync_ledger(self) -> None:
        """Make the last writes durable and empty the write-ahead log (uploads are quiet).

        Raises LedgerWriteError when the disk refuses: the pipeline then holds, as the next
        writes would fail too.
        """
        self.ledger.sync()
        self.ledger.checkpoint()

    def _between_slices(self) -> None:
        """Between two slices of files taken in: hand what is ready to the upload workers."""
        self.collect_uploads()
        self.dispatch(force=self.mode.flush_whole)

    def _connected_now(self, new_dataset: bool) -> None:
        """After each connect: compare with the dataset again if it is another, and go on."""
        if new_dataset:
            self.dispatcher.new_dataset()
        self.dispatcher.changed()
        self.trainer_wake.set()

    def _ledger_back(self) -> None:
        """The ledger takes writes again: look at what waited, and at the disk."""
        self.dispatcher.changed()
        self.dispatcher.look_for_orphans_now()
        self.scan_all()

    def _upload_sleep(self, seconds: float) -> None:
        """The uploader's back-off wait: a sign of life, and it ends at once on shutdown."""
        self.beats.alive()
        self.upload_retries += 1
        self.stop_event.wait(seconds)
        self.beats.alive()

    # -- reload --------------------------------------------------------------------------

    def apply(self, new: Config) -> None:
        """Apply a re-read configuration (what needs a restart is named, and kept as it is)."""
        old = self.config
        needs_restart = restart_needed(old, new)
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
        self.trainer.threshold = new.training_threshold
        self.trainer.action = new.model_action
        self.trainer.model_name = new.model_name
        self.trainer.strategy = dict(new.strategy)
        self.layout, self.gate, self.intake = self._intake_for(new)
        self.ledger.only_roots(root_keys(new))
        report_kept(self.ledger)
        if self.watcher is not None and (
            tuple(old.folders) != tuple(new.folders)
            or (old.observer, old.polling_interval) != (new.observer, new.polling_interval)
        ):
            self.watcher.stop()
            self.start_watcher()
        self.dispatcher.changed()
        self.scan_all()


def root_keys(config: Config) -> list[str]:
    """The configured roots as the ledger's rows name them (absolute, links kept)."""
    return [str(Path(os.path.abspath(folder))) for folder in config.folders]  # noqa: PTH100


def report_kept(ledger: Ledger) -> None:
    """Say which folders no longer configured still have files that will not be sent."""
    for root, count in sorted(ledger.kept_counts().items()):
        log.warning(
            "%s is no longer in folders: its %d files not yet uploaded are kept in the "
            "ledger but not sent (put the folder back in folders to send them)",
            root,
            count,
        )
