"""The emulator's in-memory server state and the rules of the MVI API it follows.

Nothing here knows about HTTP: each method takes parsed input, applies MVI's rules and
returns the JSON-able answer, or raises :class:`ApiError` carrying the status and the body
MVI would send. One re-entrant lock guards everything, so concurrent requests lose nothing.
"""

from __future__ import annotations

import datetime
import hmac
import logging
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from paiv_sync.emulator.options import (
    EmulatorOptions,
    check_token_lifetime,
    check_training_outcome,
    check_training_seconds,
)
from paiv_sync.emulator.uploads import UploadForm

log = logging.getLogger(__name__)

# MVI's documented minimum for classification training.
MIN_CATEGORIES = 2
MIN_IMAGES_PER_CATEGORY = 5

_SORTABLE_FILE_FIELDS = (
    "_id",
    "original_file_name",
    "file_type",
    "size",
    "content_type",
    "created_at",
    "category_id",
    "category_name",
)

# Marks "argument not given" in set_options, where None is a meaningful value.
_UNSET: Any = object()


class ApiError(Exception):
    """An API call fails: ``status`` and ``body`` are what the emulator answers."""

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        """Take the HTTP status and the JSON body of the failure."""
        super().__init__(f"HTTP {status}: {body.get('fault', body)}")
        self.status = status
        self.body = dict(body)


def fail_body(fault: str) -> dict[str, Any]:
    """Return MVI's usual failure body ``{"result": "fail", "fault": fault}``."""
    return {"result": "fail", "fault": fault}


def not_found() -> ApiError:
    """Return the error for an unknown route, dataset or task (MVI's documented 404 body)."""
    return ApiError(
        404,
        {
            "status": "Not Found",
            "fault": "HTTP 404 Not Found",
            "type": "NotFoundException",
            "result": "fail",
        },
    )


def bad_request(fault: str) -> ApiError:
    """Return a 400 error with ``fault`` as its message."""
    return ApiError(400, fail_body(fault))


def unauthorized(fault: str) -> ApiError:
    """Return a 401 error with ``fault`` as its message."""
    return ApiError(401, fail_body(fault))


@dataclass(frozen=True)
class _Category:
    id: str
    dataset_id: str
    name: str
    created_at: str

    def api_view(self) -> dict[str, Any]:
        return {
            "_id": self.id,
            "dataset_id": self.dataset_id,
            "name": self.name,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class _File:
    id: str
    dataset_id: str
    original_file_name: str
    file_type: str
    size: int
    content_type: str
    sha256: str
    category_id: str | None
    category_name: str | None
    created_at: str

    def api_view(self) -> dict[str, Any]:
        """The file as ``GET /datasets/{id}/files`` shows it (no content hash)."""
        return {
            "_id": self.id,
            "original_file_name": self.original_file_name,
            "file_type": self.file_type,
            "dataset_id": self.dataset_id,
            "size": self.size,
            "content_type": self.content_type,
            "created_at": self.created_at,
            "category_id": self.category_id,
            "category_name": self.category_name,
        }

    def state_view(self) -> dict[str, Any]:
        """The file as the introspection endpoint shows it (with its content hash)."""
        return {
            "_id": self.id,
            "original_file_name": self.original_file_name,
            "category_id": self.category_id,
            "category_name": self.category_name,
            "sha256": self.sha256,
            "size": self.size,
            "content_type": self.content_type,
            "file_type": self.file_type,
            "created_at": self.created_at,
        }


@dataclass(frozen=True, eq=False)
class _Dataset:
    id: str
    name: str
    created_at: str
    # The containers are filled in place; the record itself never changes.
    categories: dict[str, _Category] = field(default_factory=dict)
    files: list[_File] = field(default_factory=list)

    def api_view(self) -> dict[str, Any]:
        return {
            "_id": self.id,
            "name": self.name,
            "total_file_count": len(self.files),
            "created_at": self.created_at,
        }

    def category_named(self, name: str) -> _Category | None:
        return next((c for c in self.categories.values() if c.name == name), None)

    def image_counts(self) -> dict[str, int]:
        """Images per category id (every category listed, also those with none)."""
        counts = dict.fromkeys(self.categories, 0)
        for f in self.files:
            if f.file_type == "image" and f.category_id in counts:
                counts[f.category_id] += 1
        return counts


@dataclass(frozen=True)
class _Task:
    id: str
    name: str
    dataset_id: str
    usage: str
    action: str
    pretrained_model: str | None
    strategy: dict[str, Any] | None
    nn_arch: str | None
    created_at: str
    ends: float  # on the monotonic clock
    ends_wall: float
    outcome: str

    def status(self, now: float) -> str:
        return self.outcome if now >= self.ends else "training"

    def view(self, now: float) -> dict[str, Any]:
        status = self.status(now)
        return {
            "_id": self.id,
            "name": self.name,
            "dataset_id": self.dataset_id,
            "usage": self.usage,
            "action": self.action,
            "status": status,
            "pretrained_model": self.pretrained_model,
            "strategy": self.strategy,
            "nn_arch": self.nn_arch,
            "created_at": self.created_at,
            "completed_at": None if status == "training" else _iso(self.ends_wall),
        }


class EmulatorState:
    """Datasets, categories, files, training tasks, credentials and counters, in memory.

    ``clock`` gives wall time (for timestamps), ``monotonic`` measures durations (token
    lifetime, training time); both are injectable for tests.
    """

    def __init__(
        self,
        options: EmulatorOptions,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """Take the emulator's options; the state starts empty."""
        self._options = options
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.RLock()
        self.training_seconds = options.training_seconds
        self.token_lifetime = options.token_lifetime
        self.training_outcome = options.training_outcome
        self._datasets: dict[str, _Dataset] = {}
        self._tasks: dict[str, _Task] = {}
        self._tokens: dict[str, float] = {}
        self._active_keys: set[str] = set(options.api_keys)
        self._requests: Counter[str] = Counter()
        self._tokens_issued = 0
        self._concurrent_trainings_max = 0

    # ---- housekeeping -------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything (datasets, tasks, tokens, counters, revocations); keep options."""
        with self._lock:
            self._datasets.clear()
            self._tasks.clear()
            self._tokens.clear()
            self._active_keys = set(self._options.api_keys)
            self._requests.clear()
            self._tokens_issued = 0
            self._concurrent_trainings_max = 0
        log.info("emulator state reset")

    def set_options(
        self,
        *,
        training_seconds: Any = _UNSET,
        token_lifetime: Any = _UNSET,
        training_outcome: Any = _UNSET,
    ) -> None:
        """Change run-time options; arguments not given are left alone.

        ``training_seconds`` and ``training_outcome`` apply to tasks started afterwards;
        ``token_lifetime`` applies at once to every token, old ones included.
        Raises ValueError on an invalid value.
        """
        if training_seconds is not _UNSET:
            check_training_seconds(training_seconds)
        if token_lifetime is not _UNSET:
            check_token_lifetime(token_lifetime)
        if training_outcome is not _UNSET:
            check_training_outcome(training_outcome)
        with self._lock:
            if training_seconds is not _UNSET:
                self.training_seconds = float(training_seconds)
            if token_lifetime is not _UNSET:
                self.token_lifetime = None if token_lifetime is None else float(token_lifetime)
            if training_outcome is not _UNSET:
                self.training_outcome = str(training_outcome)

    def count_request(self, key: str) -> None:
        """Count one request under ``key`` (``"METHOD /route/template"``)."""
        with self._lock:
            self._requests[key] += 1

    # ---- authentication ------------------------------------------------------------------

    def issue_token(self, body: Any) -> dict[str, Any]:
        """``POST /tokens``: check the user's password and return a new token.

        Raises ApiError: 404 in API-key mode (MVI 8.x has no ``/tokens``), 400 on a malformed
        body, 401 on an unknown user or a wrong password.
        """
        if self._options.api_key_mode:
            raise not_found()
        body = _json_object(body)
        if body.get("grant_type") != "password":
            raise bad_request('grant_type must be "password"')
        username, password = body.get("username"), body.get("password")
        if not isinstance(username, str) or not isinstance(password, str):
            raise bad_request("username and password are required strings")
        expected = self._options.users.get(username)
        if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
            log.info("emulator: refused a token for user %r (bad credentials)", username)
            raise unauthorized("Invalid username or password")
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = self._monotonic()
            self._tokens_issued += 1
        log.info("emulator: issued a token to user %r", username)
        return {"result": "success", "token": token}

    def authenticate(self, credential: str | None) -> None:
        """Check an ``X-Auth-Token`` value: a live token, or an active key in API-key mode.

        Raises ApiError 401 when it is missing, unknown, expired or revoked.
        """
        if not credential:
            raise unauthorized("Missing X-Auth-Token header")
        with self._lock:
            if self._options.api_key_mode:
                if not any(hmac.compare_digest(credential, k) for k in self._active_keys):
                    raise unauthorized("Invalid or revoked API key")
                return
            issued = self._tokens.get(credential)
            if issued is None:
                raise unauthorized("Invalid or revoked token")
            lifetime = self.token_lifetime
            if lifetime is not None and self._monotonic() - issued >= lifetime:
                del self._tokens[credential]
                raise unauthorized("Token expired")

    def revoke_tokens(self) -> int:
        """Revoke every token issued so far; return how many were live."""
        with self._lock:
            count = len(self._tokens)
            self._tokens.clear()
        log.info("emulator: revoked %d token(s)", count)
        return count

    def revoke_api_key(self, key: str) -> None:
        """Revoke one configured API key. Raises KeyError when it is not an active key."""
        with self._lock:
            if key not in self._active_keys:
                raise KeyError("not an active API key")
            self._active_keys.discard(key)
        log.info("emulator: revoked an API key")

    # ---- datasets and categories ---------------------------------------------------------

    def list_datasets(self) -> list[dict[str, Any]]:
        """``GET /datasets``: every dataset, newest first."""
        with self._lock:
            return [d.api_view() for d in reversed(self._datasets.values())]

    def create_dataset(self, body: Any) -> dict[str, Any]:
        """``POST /datasets`` with ``{"name": N}``. Raises ApiError 400 on a bad body."""
        name = _required_name(_json_object(body))
        with self._lock:
            dataset = _Dataset(id=_new_id(), name=name, created_at=self._now())
            self._datasets[dataset.id] = dataset
        log.info("emulator: created dataset %s %r", dataset.id, name)
        return {"result": "success", "dataset_id": dataset.id}

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        """``GET /datasets/{id}``. Raises ApiError 404 for an unknown id."""
        with self._lock:
            return self._dataset(dataset_id).api_view()

    def has_dataset(self, dataset_id: str) -> bool:
        """True when the dataset exists."""
        with self._lock:
            return dataset_id in self._datasets

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset with its categories and files. Raises KeyError for an unknown id."""
        with self._lock:
            del self._datasets[dataset_id]
        log.info("emulator: deleted dataset %s", dataset_id)

    def list_categories(self, dataset_id: str) -> list[dict[str, Any]]:
        """``GET /datasets/{id}/categories``, oldest first. Raises ApiError 404."""
        with self._lock:
            return [c.api_view() for c in self._dataset(dataset_id).categories.values()]

    def create_category(self, dataset_id: str, body: Any) -> dict[str, Any]:
        """``POST /datasets/{id}/categories`` with ``{"name": N}``.

        Raises ApiError: 404 for an unknown dataset, 400 on a bad body or a name the dataset
        already has.
        """
        name = _required_name(_json_object(body))
        with self._lock:
            dataset = self._dataset(dataset_id)
            if dataset.category_named(name) is not None:
                raise bad_request(f"Category {name!r} already exists in this dataset")
            category = self._add_category(dataset, name)
        return {"result": "success", "dataset_category_id": category.id}

    # ---- files ---------------------------------------------------------------------------

    def store_upload(
        self, dataset_id: str, form: UploadForm, fail_file: Callable[[], bool]
    ) -> dict[str, Any]:
        """``POST /datasets/{id}/files``: store the accepted files, one result entry each.

        The category comes from the ``category_id`` field, else ``category_name`` (created when
        the dataset has no such category), else none. ``fail_file`` is asked, for each file
        that would be stored, whether to fail it instead (fault injection).
        Raises ApiError: 404 for an unknown dataset, 400 when the request holds no file.
        """
        if not form.files:
            raise bad_request("No files in the request: send one or more parts named 'files'")
        # Names are kept exactly as sent (as for POST /categories); blank means "none".
        category_id = form.fields.get("category_id", "").strip()
        category_name = form.fields.get("category_name", "")
        if not category_name.strip():
            category_name = ""
        results: list[dict[str, Any]] = []
        stored = 0
        with self._lock:
            dataset = self._dataset(dataset_id)
            category = None
            category_fault = None
            if category_id:
                category = dataset.categories.get(category_id)
                if category is None:
                    category_fault = f"category_id {category_id} does not exist in this dataset"
            elif category_name:
                category = dataset.category_named(category_name)
            for upload in form.files:
                name = upload.original_file_name
                if upload.fault is not None:
                    results.append(_file_fail(name, upload.fault))
                    continue
                if category_fault is not None:
                    results.append(_file_fail(name, category_fault))
                    continue
                if fail_file():
                    results.append(_file_fail(name, "Internal error while storing the file"))
                    continue
                if category is None and category_name:
                    category = self._add_category(dataset, category_name)
                assert upload.file_type is not None and upload.content_type is not None
                stored_file = _File(
                    id=_new_id(),
                    dataset_id=dataset.id,
                    original_file_name=name,
                    file_type=upload.file_type,
                    size=upload.size,
                    content_type=upload.content_type,
                    sha256=upload.sha256,
                    category_id=category.id if category else None,
                    category_name=category.name if category else None,
                    created_at=self._now(),
                )
                dataset.files.append(stored_file)
                stored += 1
                results.append(
                    {"result": "success", "_id": stored_file.id, "original_file_name": name}
                )
        log.info(
            "emulator: dataset %s: stored %d of %d file(s)", dataset_id, stored, len(form.files)
        )
        return {"result": "success", "resultList": results}

    def list_files(self, dataset_id: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        """``GET /datasets/{id}/files`` filtered by ``category_id`` and ``query`` (a
        case-insensitive substring of the file name), ordered by ``sortby`` (a field name,
        ``-`` in front for descending; default upload order), then ``skip`` and ``limit``
        (0 = no limit).

        Raises ApiError: 404 for an unknown dataset, 400 on a bad parameter.
        """
        skip = _non_negative_int(params, "skip")
        limit = _non_negative_int(params, "limit")
        sortby = params.get("sortby", "").strip()
        descending = sortby.startswith("-")
        sort_field = sortby.lstrip("-")
        if sort_field and sort_field not in _SORTABLE_FILE_FIELDS:
            raise bad_request(
                f"sortby: unknown field {sort_field!r}; one of {', '.join(_SORTABLE_FILE_FIELDS)}"
            )
        with self._lock:
            views = [f.api_view() for f in self._dataset(dataset_id).files]
        if "category_id" in params:
            views = [v for v in views if v["category_id"] == params["category_id"]]
        query = params.get("query", "").lower()
        if query:
            views = [v for v in views if query in v["original_file_name"].lower()]
        if sort_field:
            views.sort(
                key=lambda v: (v[sort_field] is None, v[sort_field] or 0), reverse=descending
            )
        views = views[skip:]
        return views[:limit] if limit else views

    # ---- training --------------------------------------------------------------------------

    def create_task(self, body: Any) -> dict[str, Any]:
        """``POST /dltasks``: start training a classification model.

        Raises ApiError: 400 on a bad body, a ``pretrained_model`` that is not a trained task,
        or a dataset below MVI's minimum (the fault says what is missing); 404 for an unknown
        dataset.
        """
        body = _json_object(body)
        name = _required_name(body)
        dataset_id = body.get("dataset_id")
        if not isinstance(dataset_id, str) or not dataset_id:
            raise bad_request("dataset_id is required")
        usage, action = body.get("usage"), body.get("action")
        if usage != "cic":
            raise bad_request(f'usage must be "cic" (classification), got {usage!r}')
        if action != "create":
            raise bad_request(f'action must be "create" for classification, got {action!r}')
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
            shortfall = _training_shortfall(dataset)
            if shortfall:
                raise bad_request(shortfall)
            task = _Task(
                id=_new_id(),
                name=name,
                dataset_id=dataset_id,
                usage=usage,
                action=action,
                pretrained_model=pretrained or None,
                strategy=strategy,
                nn_arch=nn_arch,
                created_at=self._now(),
                ends=now + self.training_seconds,
                ends_wall=self._clock() + self.training_seconds,
                outcome=self.training_outcome,
            )
            # MVI would queue or refuse a second training [guess]; we run it and count it.
            running = 1 + sum(t.status(now) == "training" for t in self._tasks.values())
            self._concurrent_trainings_max = max(self._concurrent_trainings_max, running)
            self._tasks[task.id] = task
        log.info("emulator: training task %s started on dataset %s", task.id, dataset_id)
        return {"result": "success", "task_id": task.id}

    def list_tasks(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        """``GET /dltasks``, newest first, optionally only those whose ``status`` matches."""
        with self._lock:
            now = self._monotonic()
            views = [t.view(now) for t in reversed(self._tasks.values())]
        status = params.get("status")
        return [v for v in views if v["status"] == status] if status else views

    def get_task(self, task_id: str) -> dict[str, Any]:
        """``GET /dltasks/{id}``. Raises ApiError 404 for an unknown id."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                raise not_found()
            return task.view(self._monotonic())

    # ---- introspection ---------------------------------------------------------------------

    def snapshot(self, fault_counts: Mapping[str, int]) -> dict[str, Any]:
        """Everything the server holds, as ``GET /_emulator/state`` returns it."""
        with self._lock:
            now = self._monotonic()
            datasets = [
                {
                    "_id": d.id,
                    "name": d.name,
                    "created_at": d.created_at,
                    "categories": [{"_id": c.id, "name": c.name} for c in d.categories.values()],
                    "files": [f.state_view() for f in d.files],
                }
                for d in self._datasets.values()
            ]
            groups: dict[tuple[str, str | None, str], list[str]] = {}
            for d in self._datasets.values():
                for f in d.files:
                    groups.setdefault((d.id, f.category_name, f.sha256), []).append(f.id)
            return {
                "datasets": datasets,
                "tasks": [t.view(now) for t in self._tasks.values()],
                "requests": dict(self._requests),
                "faults": dict(fault_counts),
                "duplicates": [
                    {
                        "dataset_id": dataset_id,
                        "category_name": category_name,
                        "sha256": sha256,
                        "count": len(ids),
                        "file_ids": ids,
                    }
                    for (dataset_id, category_name, sha256), ids in groups.items()
                    if len(ids) > 1
                ],
                "tokens_issued": self._tokens_issued,
                "concurrent_trainings_max": self._concurrent_trainings_max,
            }

    # ---- helpers ---------------------------------------------------------------------------

    def _dataset(self, dataset_id: str) -> _Dataset:
        dataset = self._datasets.get(dataset_id)
        if dataset is None:
            raise not_found()
        return dataset

    def _add_category(self, dataset: _Dataset, name: str) -> _Category:
        category = _Category(id=_new_id(), dataset_id=dataset.id, name=name, created_at=self._now())
        dataset.categories[category.id] = category
        log.info("emulator: dataset %s: created category %r", dataset.id, name)
        return category

    def _now(self) -> str:
        return _iso(self._clock())


def _training_shortfall(dataset: _Dataset) -> str | None:
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
    missing = MIN_CATEGORIES - enough
    return (
        f"Training needs at least {MIN_CATEGORIES} categories with at least "
        f"{MIN_IMAGES_PER_CATEGORY} images each; dataset {dataset.id} has {enough}, "
        f"{missing} more needed ({details or 'no categories yet'})"
    )


def _json_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object")
    return body


def _required_name(body: Mapping[str, Any]) -> str:
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise bad_request("name is required and must be a non-empty string")
    return name


def _non_negative_int(params: Mapping[str, str], name: str) -> int:
    raw = params.get(name, "").strip()
    if not raw:
        return 0
    if not raw.isdigit():
        raise bad_request(f"{name} must be a non-negative integer, got {raw!r}")
    return int(raw)


def _file_fail(name: str, fault: str) -> dict[str, Any]:
    return {"result": "fail", "original_file_name": name, "fault": fault}


def _new_id() -> str:
    return str(uuid.uuid4())


def _iso(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
