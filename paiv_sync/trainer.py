"""The trainer: starts (re)training once enough files were uploaded, one task at a time.

A training request is written to the ledger as ``requesting`` before it is sent. If the service
dies before the answer is recorded, the request is looked up by its (unique, time-stamped) name
in the server's task list on the next start: found, it is followed; not found, it is withdrawn
and made again when due. So no model is trained twice for the same uploads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import requests

from paiv_sync import ledger as states
from paiv_sync.api import (
    AmbiguousError,
    AuthError,
    MviClient,
    MviError,
    NotFoundError,
    NotSupportedError,
    RequestError,
    TlsError,
    TransientError,
    newest,
)
from paiv_sync.ledger import Ledger, TrainingRow
from paiv_sync.retry import RetryPolicy

log = logging.getLogger(__name__)

MIN_CATEGORIES = 2
MIN_IMAGES_PER_CATEGORY = 5
_DONE = ("trained", "failed", "completed", "error", "aborted")


def model_name_for(base: str, when: datetime) -> str:
    """The name of a model started at ``when``: ``<base>-<YYYYmmdd-HHMMSS>``."""
    return f"{base}-{when:%Y%m%d-%H%M%S}"


def missing_for_training(counts: Mapping[str, int]) -> str | None:
    """What the dataset lacks for MVI's minimum, as a sentence; None when it is enough.

    ``counts`` maps category name to the number of images the dataset holds in it.
    """
    enough = [c for c, n in counts.items() if n >= MIN_IMAGES_PER_CATEGORY]
    if len(enough) >= MIN_CATEGORIES:
        return None
    short = sorted(
        ((c, n) for c, n in counts.items() if n < MIN_IMAGES_PER_CATEGORY), key=lambda cn: -cn[1]
    )
    needed_categories = MIN_CATEGORIES - len(enough)
    parts = [f"{c!r} has {n}" for c, n in short[: needed_categories + 2]]
    detail = ("; " + ", ".join(parts)) if parts else ""
    return (
        f"MVI needs at least {MIN_CATEGORIES} categories with {MIN_IMAGES_PER_CATEGORY} images "
        f"each; {len(enough)} {'has' if len(enough) == 1 else 'have'} enough{detail}"
    )


# Shortest time between two training steps when uploads keep waking the trainer.
WAKE_GAP = 0.25


class Trainer:
    """Decides when to train and follows each task to its end."""

    def __init__(
        self,
        client: MviClient,
        ledger: Ledger,
        *,
        model_name: str,
        action: str,
        threshold: int,
        strategy: Mapping[str, Any],
        stop_event: threading.Event,
        now: Callable[[], datetime] = datetime.now,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.dataset_id: str | None = None
        self.model_name = model_name
        self.action = action
        self.threshold = threshold
        self.strategy = dict(strategy)
        self._stop = stop_event
        self._now = now
        self._last_missing: str | None = None
        self._last_status: dict[str, str] = {}
        self._clock = clock
        # Requests that timed out: until when the server may still be creating the task.
        self._patience: dict[int, float] = {}

    # -- the decision, one step at a time ------------------------------------------------

    def step(self) -> TrainingRow | None:
        """Follow open tasks, then start a training if one is due.

        Returns the training row still open after this step (None when idle). Network errors
        propagate (MviError); the caller logs them and tries again later.
        """
        dataset_id = self.dataset_id
        if dataset_id is None:
            return None
        for row in self.ledger.open_trainings():
            still_open = self._follow(row)
            if still_open is not None:
                return still_open
        if self.action == "nothing":
            return None
        since = self.ledger.uploads_since_last_training()
        if since < self.threshold:
            return None
        if self._busy_on_server(dataset_id):
            return None
        missing = self._missing(dataset_id)
        if missing is not None:
            if missing != self._last_missing:
                log.warning("training waits: %s", missing)
                self._last_missing = missing
            return None
        self._last_missing = None
        return self._start(dataset_id)

    def _busy_on_server(self, dataset_id: str) -> bool:
        running = [
            t
            for t in self.client.list_tasks(status="training")
            if t.get("dataset_id") == dataset_id and t.get("status", "training") == "training"
        ]
        if running:
            log.info(
                "training waits: task %s is already training on dataset %s",
                running[0].get("_id"),
                dataset_id,
            )
        return bool(running)

    def _missing(self, dataset_id: str) -> str | None:
        counts = {c: n.get(states.UPLOADED, 0) for c, n in self.ledger.counts().items()}
        if missing_for_training(counts) is None:
            return None
        # The dataset may hold more than this service uploaded (other hosts, the web UI).
        names = {c["_id"]: c["name"] for c in self.client.list_categories(dataset_id)}
        server_counts: dict[str, int] = dict.fromkeys(names.values(), 0)
        for item in self.client.iter_files(dataset_id):
            name = names.get(item.get("category_id", ""), item.get("category_name"))
            if name:
                server_counts[name] = server_counts.get(name, 0) + 1
        return missing_for_training(server_counts)

    def _start(self, dataset_id: str) -> TrainingRow | None:
        name = model_name_for(self.model_name, self._now())
        last = self.ledger.last_training()
        if last is not None and last.name.startswith(name):
            name = f"{name}-{last.id + 1}"
        pretrained = self._base_model(dataset_id) if self.action == "retrain" else None
        row = self.ledger.training_requested(
            name=name,
            model_name=self.model_name,
            dataset_id=dataset_id,
            pretrained_model=pretrained,
        )
        started = self._clock()
        try:
            task_id = self.client.start_training(
                dataset_id, name, pretrained_model=pretrained, strategy=self.strategy or None
            )
        except AmbiguousError as exc:
            log.warning(
                "training request %s may or may not have reached the server (%s); will look it up",
                name,
                exc,
            )
            if isinstance(exc.__cause__, requests.exceptions.Timeout):
                # No answer in time: the server may still be creating the task. Looked up too
                # soon, it would pass for never made, and be made a second time.
                self._patience[row.id] = self._clock() + 7 * (self._clock() - started)
            return row
        except (TransientError, AuthError, NotFoundError, TlsError):
            # Surely not processed (never sent, 429, refused login, no such dataset).
            self.ledger.training_withdrawn(row.id)
            raise
        except RequestError as exc:
            self.ledger.training_finished(row.id, states.FAILED, reason=str(exc))
            log.error("the server refused to train %s: %s", name, exc)
            return None
        except MviError as exc:
            # An answer of an unexpected shape: the task may exist. Withdrawing the request
            # here could start a second training for the same uploads; look it up instead.
            log.warning(
                "training request %s got an unexpected answer (%s); will look it up", name, exc
            )
            return row
        self.ledger.training_started(row.id, task_id)
        log.info(
            "training started: model %s (task %s) on dataset %s after %d new uploads%s",
            name,
            task_id,
            dataset_id,
            self.ledger.uploads_for(row),  # more may have come since the step began
            f", retraining from model {pretrained}" if pretrained else "",
        )
        return self.ledger.training(row.id)

    def _base_model(self, dataset_id: str) -> str | None:
        model_id = base_model(self.client, self.ledger, self.model_name, dataset_id)
        if model_id is None:
            log.info("retrain: no trained model yet for dataset %s; training a new one", dataset_id)
        return model_id

    # -- following a task ----------------------------------------------------------------

    def _follow(self, row: TrainingRow) -> TrainingRow | None:
        if row.state == states.REQUESTING:
            found = [t for t in self.client.list_tasks() if t.get("name") == row.name]
            if not found and self._clock() < self._patience.get(row.id, 0.0):
                log.info("training request %s timed out; looking for it again later", row.name)
                return row
            self._patience.pop(row.id, None)
            if not found:
                log.info(
                    "training request %s never reached the server; it will be made again", row.name
                )
                self.ledger.training_withdrawn(row.id)
                return None
            task_id = str(found[0].get("_id"))
            self.ledger.training_started(row.id, task_id)
            log.info("training request %s had reached the server: task %s", row.name, task_id)
            row = self.ledger.training(row.id) or row
        assert row.task_id is not None
        try:
            task = self.client.get_task(row.task_id)
        except NotFoundError:
            self.ledger.training_finished(row.id, states.FAILED, reason="task vanished")
            log.error("training %s (task %s) no longer exists on the server", row.name, row.task_id)
            return None
        status = str(task.get("status", "unknown"))
        if status != self._last_status.get(row.name):
            self._last_status[row.name] = status
            if status not in _DONE:
                log.info("training %s (task %s): %s", row.name, row.task_id, status)
        if status == "trained":
            self.ledger.training_finished(row.id, states.TRAINED)
            log.info("training %s (task %s) finished: model trained", row.name, row.task_id)
            return None
        if status in _DONE:
            reason = str(task.get("fault") or task.get("message") or status)
            self.ledger.training_finished(row.id, states.FAILED, reason=reason)
            log.error("training %s (task %s) failed: %s", row.name, row.task_id, reason)
            return None
        return self.ledger.training(row.id)

    # -- the thread ----------------------------------------------------------------------

    def run(self, wake: threading.Event, poll_interval: float) -> None:
        """Loop until the stop event: a step, then wait ``poll_interval`` or until woken."""
        failures = 0
        # After a failure: twice the poll interval, doubling, up to 32 times it or 5 minutes.
        most = max(2 * poll_interval, min(32 * poll_interval, 300.0))
        backoff = RetryPolicy(initial=2 * poll_interval, maximum=most, jitter=0.0)
        while not self._stop.is_set():
            try:
                self.step()
                failures = 0
                delay = poll_interval
            except MviError as exc:
                failures += 1
                delay = backoff.delay(failures)
                log.warning("training check failed (%s); trying again in %.0f s", exc, delay)
            except Exception:
                failures += 1
                delay = backoff.delay(failures)
                log.exception("training check crashed; trying again in %.0f s", delay)
            started = time.monotonic()
            while not self._stop.is_set() and time.monotonic() - started < delay:
                if wake.wait(min(0.5, delay)):
                    # Woken (by an upload, say): a step at most every WAKE_GAP seconds, so a
                    # burst of uploads costs a few ledger reads, not one per batch.
                    self._stop.wait(max(0.0, started + WAKE_GAP - time.monotonic()))
                    wake.clear()
                    break


def base_model(
    client: MviClient, ledger: Ledger | None, model_name: str, dataset_id: str
) -> str | None:
    """The model a retraining starts from: the last this service trained under
    ``model_name``, else the newest trained on the server for the dataset, else None."""
    mine = ledger.last_trained_task(model_name) if ledger is not None else None
    if mine is not None:
        return mine
    try:
        # The product's list of models; a model's id is its training task's id [client].
        trained = [
            m
            for m in client.list_trained_models()
            if m.get("dataset_id") == dataset_id and m.get("usage", "cic") == "cic"
        ]
    except NotSupportedError:
        trained = [
            t
            for t in client.list_tasks(status="trained")
            if t.get("dataset_id") == dataset_id and t.get("status", "trained") == "trained"
        ]
    if not trained:
        return None
    model_id = newest(trained).get("_id")
    return str(model_id) if model_id else None
