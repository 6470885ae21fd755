"""The link to the server: log in, find or create the dataset, settle the files in doubt.

:class:`Connection` is the only holder of the dataset id and of the "connection lost" event
that upload workers set. While the service runs, each try to connect runs in a thread of its
own (:meth:`Connection.ensure`), so that the pipeline goes on taking in files while the server
is away; ``--once`` connects in line (:meth:`Connection.try_now`). Between failed tries it
backs off with the retry policy's curve; a refused password or certificate waits longest.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from datetime import datetime

from paiv_sync.api import MviClient, newest
from paiv_sync.config import Config
from paiv_sync.errors import AmbiguousError, AuthError, MviError, NotFoundError, TlsError
from paiv_sync.ledger import Ledger, LedgerWriteError
from paiv_sync.retry import RetryPolicy
from paiv_sync.trainer import Trainer
from paiv_sync.uploader import Uploader

log = logging.getLogger(__name__)


class Connection:
    """Connects the uploader and the trainer to the dataset the configuration names.

    ``lost`` is the event upload workers set when the connection is lost (credentials refused,
    dataset gone): the next :meth:`ensure` connects again. ``on_connected(new_dataset)`` runs
    after each successful connect (``new_dataset``: the id differs from the one before);
    ``job`` wraps the connector thread's work (a sign of life for the health check);
    ``on_ledger_failure`` takes a ledger that cannot be written; ``wake`` ends the pipeline
    loop's wait once a try is over.
    """

    def __init__(
        self,
        config: Config,
        client: MviClient,
        ledger: Ledger,
        uploader: Uploader,
        trainer: Trainer,
        *,
        retry: RetryPolicy,
        stop_event: threading.Event,
        lost: threading.Event,
        clock: Callable[[], float],
        on_connected: Callable[[bool], None],
        job: Callable[[], contextlib.AbstractContextManager[None]],
        on_ledger_failure: Callable[[LedgerWriteError], None],
        wake: Callable[[], None],
    ) -> None:
        self.config = config
        self.client = client
        self.ledger = ledger
        self.uploader = uploader
        self.trainer = trainer
        self._retry = retry
        self._stop = stop_event
        self._clock = clock
        self._on_connected = on_connected
        self._job = job
        self._on_ledger_failure = on_ledger_failure
        self._wake = wake
        self.lost = lost  # set by an upload worker: connect and resolve again
        self.connected = False
        self.fatal = False  # the last try failed on credentials or TLS
        self.dataset_id: str | None = None
        self.next_try = 0.0  # on the service's clock
        self._failures = 0
        self._thread: threading.Thread | None = None

    @property
    def trying(self) -> bool:
        """Whether a connector thread is at work."""
        return self._thread is not None and self._thread.is_alive()

    def ensure(self) -> bool:
        """Whether connected; if not, and a try is due, start one in a thread of its own."""
        if self.lost.is_set():
            self.lost.clear()
            self.connected = False
        if self.connected:
            return True
        if self._thread is not None:
            if self._thread.is_alive():
                return False
            self._thread = None
            if self.connected:
                return True
        if self._clock() < self.next_try or self._stop.is_set():
            return False
        self._thread = threading.Thread(
            target=self._in_background, name="paiv-connect", daemon=True
        )
        self._thread.start()
        return False

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a connector thread to end (at shutdown)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _in_background(self) -> None:
        """The connector thread: one try (with the client's retries), then wake the loop."""
        with self._job():
            try:
                self.try_now()
            except LedgerWriteError as exc:
                self._on_ledger_failure(exc)
            except Exception as exc:  # the thread must end with a verdict
                log.exception("connecting to the server crashed")
                self._failed(exc, fatal=False)
            finally:
                self._wake()

    def try_now(self) -> bool:
        """Connect now; on failure, log it and set when to try again."""
        try:
            self._connect()
        except (AuthError, TlsError) as exc:
            self.fatal = True
            self._failed(exc, fatal=True)
            return False
        except MviError as exc:
            self.fatal = False
            self._failed(exc, fatal=False)
            return False
        self.connected = True
        self._failures = 0
        return True

    def _failed(self, exc: Exception, *, fatal: bool) -> None:
        self._failures += 1
        # A refused password or certificate will not change by itself: the longest wait.
        delay = self._retry.maximum if fatal else self._retry.delay(self._failures)
        self.next_try = self._clock() + delay
        log.error(
            "cannot use the server at %s: %s; files stay pending; trying again in %.0f s",
            self.config.base_url,
            exc,
            delay,
        )

    def _connect(self) -> None:
        self.client.authenticate()
        dataset_id = self._resolve_dataset()
        # Another dataset (the old one was deleted): what it holds has not been compared.
        new_dataset = self.dataset_id is not None and dataset_id != self.dataset_id
        self.dataset_id = dataset_id
        self.uploader.dataset_id = dataset_id
        self.trainer.dataset_id = dataset_id
        self.uploader.resolve_in_doubt()
        self._on_connected(new_dataset)

    def _resolve_dataset(self) -> str:
        """The id of the dataset to feed, creating it when needed (see ``dataset.action``)."""
        cfg = self.config
        remembered = self.ledger.get_meta("dataset_id")
        remembered_for = self.ledger.get_meta("dataset_config_name")
        if remembered and remembered_for == cfg.dataset_name:
            try:
                dataset = self.client.get_dataset(remembered)
            except NotFoundError:
                log.warning(
                    "dataset %s (id %s) that this service fed is gone from the server; its files "
                    "will go into a new one",
                    cfg.dataset_name,
                    remembered,
                )
            else:
                log.info("using dataset %r (id %s)", dataset.get("name"), remembered)
                return remembered
        dataset_id: str | None = None
        if cfg.dataset_action == "append":
            same_name = [
                d for d in self.client.list_datasets() if d.get("name") == cfg.dataset_name
            ]
            if same_name:
                chosen = newest(same_name)
                dataset_id = str(chosen["_id"])
                log.info("using dataset %r (id %s)", cfg.dataset_name, dataset_id)
            else:
                dataset_id = self._create_dataset(cfg.dataset_name)
        else:
            # A creation whose answer was lost (or cut short by a crash) is finished under
            # the name it was given, not started again under a new one.
            name = self.ledger.get_meta("creating_dataset") or (
                f"{cfg.dataset_name}-{datetime.now():%Y%m%d-%H%M%S}"
            )
            dataset_id = self._create_dataset(name)
        if remembered and remembered != dataset_id:
            again = self.ledger.reset_for_new_dataset()
            if again:
                log.warning(
                    "%d files uploaded to the previous dataset will be uploaded to the new one",
                    again,
                )
        self.ledger.set_meta("dataset_id", dataset_id)
        self.ledger.bind(endpoint=cfg.base_url, dataset_name=cfg.dataset_name)
        self.ledger.delete_meta("creating_dataset")  # only now: see _create_dataset
        return dataset_id

    def _create_dataset(self, name: str) -> str:
        """Create the dataset ``name`` once, also when the answer to the POST is lost.

        The name is recorded before the POST (and forgotten once the ledger records the id);
        until then every attempt first looks the name up, so a creation the server carried
        out is not repeated and no empty dataset is left behind. Raises MviError when the
        server cannot be asked.
        """
        if self.ledger.get_meta("creating_dataset") == name:
            same_name = [d for d in self.client.list_datasets() if d.get("name") == name]
            if same_name:
                dataset_id = str(newest(same_name)["_id"])
                log.info(
                    "dataset %r (id %s) was created although the answer was lost; using it",
                    name,
                    dataset_id,
                )
                return dataset_id
        else:
            self.ledger.set_meta("creating_dataset", name)
        try:
            dataset_id = self.client.create_dataset(name)
        except AmbiguousError:
            log.warning(
                "the answer to creating dataset %r was lost; it is looked up by name before "
                "it is created again",
                name,
            )
            raise
        log.info("created dataset %r (id %s)", name, dataset_id)
        return dataset_id
