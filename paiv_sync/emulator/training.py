"""The emulator's training tasks and trained models: the ``/dltasks`` and ``/trained-models``
routes, MVI's minimum for classification training, and the product's transient 500 just
after a task ends.

:class:`TrainingRules` is a part of :class:`~paiv_sync.emulator.state.EmulatorState`: it works
on the state's tasks and datasets, under the state's lock.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from paiv_sync.emulator.options import EmulatorOptions
from paiv_sync.emulator.records import (
    TASK_SORT_FIELDS,
    ApiError,
    Dataset,
    Task,
    bad_request,
    fail_body,
    json_object,
    listed,
    missing,
    new_id,
    required_name,
)

log = logging.getLogger(__name__)

# MVI's documented minimum for classification training.
MIN_CATEGORIES = 2
MIN_IMAGES_PER_CATEGORY = 5
# How long after a task ends its status may answer the transient 500 [client].
FINISHING_WINDOW = 1.0


class TrainingRules:
    """Training tasks and models, over the state's ``_tasks`` and datasets."""

    # The state's, shared with the rest of it.
    _lock: threading.RLock
    _options: EmulatorOptions
    _monotonic: Callable[[], float]
    _random: random.Random
    _tasks: dict[str, Task]
    _product_faults: Counter[str]
    _concurrent_trainings_max: int
    training_seconds: float
    training_outcome: str
    finishing_error_rate: float

    def _dataset(self, dataset_id: str, unknown: str = "Could not find dataset") -> Dataset:
        raise NotImplementedError  # the state's

    def _now(self) -> str:
        raise NotImplementedError  # the state's

    def create_task(self, body: Any) -> dict[str, Any]:
        """``POST /dltasks``: start training a classification model.

        Raises ApiError: 400 on a bad body, a ``pretrained_model`` that is not a trained task,
        or a dataset below MVI's minimum (the fault says what is missing); 404 for an unknown
        dataset.
        """
        body = json_object(body)
        name = required_name(body)
        dataset_id = body.get("dataset_id")
        if not isinstance(dataset_id, str) or not dataset_id:
            raise bad_request("dataset_id is required")
        action = body.get("action")
        usage = self._classification_usage(body.get("usage"), action)
        pretrained = body.get("pretrained_model")
        strategy = body.get("strategy")
        nn_arch = body.get("nn_arch")
        if pretrained is not None and not isinstance(pretrained, str):
            raise bad_request("pretrained_model must be a task id")
        if strategy is not None and not isinstance(strategy, dict):
            raise bad_request("strategy must be an object")
        if nn_arch is not None and not isinstance(nn_arch, str):
            raise bad_request("nn_arch must be a string")
        with self._lock:
            dataset = self._dataset(dataset_id)
            now = self._monotonic()
            if pretrained:
                base = self._tasks.get(pretrained)
                if base is None:
                    raise bad_request(f"pretrained_model {pretrained} is not a known model")
                if base.status(now) != "trained":
                    raise bad_request(
                        f"pretrained_model {pretrained} is {base.status(now)}, not trained"
                    )
            shortfall = training_shortfall(dataset)
            if shortfall:
                raise bad_request(shortfall)
            task = Task(
                id=new_id(),
                name=name,
                dataset_id=dataset_id,
                usage=usage,
                pretrained_model=pretrained or None,
                strategy=strategy,
                nn_arch=nn_arch,
                created_at=self._now(),
                ends=now + self.training_seconds,
                outcome=self.training_outcome,
                started=now,
                action=action if isinstance(action, str) else None,
            )
            # MVI would queue or refuse a second training [guess]; we run it and count it.
            running = 1 + sum(t.status(now) == "training" for t in self._tasks.values())
            self._concurrent_trainings_max = max(self._concurrent_trainings_max, running)
            self._tasks[task.id] = task
        log.info("emulator: training task %s started on dataset %s", task.id, dataset_id)
        return {"result": "success", "task_id": task.id}

    def list_tasks(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        """``GET /dltasks``, newest first [client], optionally only one ``status``."""
        with self._lock:
            now = self._monotonic()
            views = [t.view(now) for t in self._tasks.values()]
        return listed(views, params, TASK_SORT_FIELDS, filters=("status", "dataset_id"))

    def get_task(self, task_id: str) -> dict[str, Any]:
        """``GET /dltasks/{id}``. Raises ApiError 404 for an unknown id, and now and then the
        product's transient 500 just after the task finished."""
        with self._lock:
            task = self._task(task_id)
            self._maybe_finishing_error(task)
            return task.view(self._monotonic())

    def task_status(self, task_id: str) -> dict[str, Any]:
        """``GET /dltasks/{id}/status`` → ``{result, status, data: [{iter, total_iter, loss}]}``."""
        with self._lock:
            task = self._task(task_id)
            self._maybe_finishing_error(task)
            now = self._monotonic()
            return {"result": "success", "status": task.status(now), "data": task.progress(now)}

    def delete_task(self, task_id: str) -> dict[str, Any]:
        """``DELETE /dltasks/{id}`` (a trained task is its model: it goes too)."""
        with self._lock:
            self._task(task_id)
            del self._tasks[task_id]
        log.info("emulator: deleted task %s", task_id)
        return {"result": "success"}

    def list_models(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        """``GET /trained-models``: the tasks that trained, newest first; ids equal task ids."""
        with self._lock:
            now = self._monotonic()
            views = [t.model_view() for t in self._tasks.values() if t.trained(now)]
        return listed(
            views, params, TASK_SORT_FIELDS, filters=("usage", "production_status", "dataset_id")
        )

    def get_model(self, model_id: str) -> dict[str, Any]:
        """``GET /trained-models/{id}``. Raises ApiError 404 when no trained model has that id."""
        with self._lock:
            task = self._tasks.get(model_id)
            if task is None or not task.trained(self._monotonic()):
                raise missing(f"Could not find trained model {model_id}")
            return task.model_view()

    def delete_model(self, model_id: str) -> dict[str, Any]:
        """``DELETE /trained-models/{id}``."""
        self.get_model(model_id)
        with self._lock:
            self._tasks.pop(model_id, None)
        return {"result": "success"}

    def finish_trainings(self) -> int:
        """End every running training now (with its outcome); return how many there were."""
        with self._lock:
            now = self._monotonic()
            running = [t for t in self._tasks.values() if t.status(now) == "training"]
            for task in running:
                self._tasks[task.id] = dataclasses.replace(task, ends=now)
        return len(running)

    def _task(self, task_id: str) -> Task:
        task = self._tasks.get(task_id)
        if task is None:
            raise missing(f"Could not find task {task_id}")
        return task

    def _locked(self, dataset: Dataset) -> int:
        now = self._monotonic()
        tasks = self._tasks.values()
        return int(any(t.dataset_id == dataset.id and t.status(now) == "training" for t in tasks))

    def _maybe_finishing_error(self, task: Task) -> None:
        since_end = self._monotonic() - task.ends
        draw = self._random.random()
        if 0 <= since_end < FINISHING_WINDOW and draw < self.finishing_error_rate:
            self._product_faults["finishing_500"] += 1
            raise ApiError(500, fail_body("Internal server error"))

    def _classification_usage(self, usage: object, action: object) -> str:
        """``cic`` when the body asks for classification; raises ApiError 400 otherwise."""
        strict = self._options.strict_tasks
        if usage is None and action == "create" and not strict:
            return "cic"  # IBM's older demo sends action without usage [client]
        if usage != "cic":
            raise bad_request(f'usage must be "cic" (classification), got {usage!r}')
        if action is None and not strict:
            return "cic"  # IBM's library sends usage without action [client]
        if action != "create":
            raise bad_request(f'action must be "create" for classification, got {action!r}')
        return "cic"


def training_shortfall(dataset: Dataset) -> str | None:
    """Say what the dataset lacks for classification training, or None when it is enough."""
    counts = dataset.image_counts()
    enough = sum(n >= MIN_IMAGES_PER_CATEGORY for n in counts.values())
    if enough >= MIN_CATEGORIES:
        return None
    details = "; ".join(
        f"{dataset.categories[cid].name}: {n} image{'' if n == 1 else 's'}"
        + (f", needs {MIN_IMAGES_PER_CATEGORY - n} more" if n < MIN_IMAGES_PER_CATEGORY else "")
        for cid, n in counts.items()
    )
    missing_count = MIN_CATEGORIES - enough
    return (
        f"Training needs at least {MIN_CATEGORIES} categories with at least "
        f"{MIN_IMAGES_PER_CATEGORY} images each; dataset {dataset.id} has {enough}, "
        f"{missing_count} more needed ({details or 'no categories yet'})"
    )
