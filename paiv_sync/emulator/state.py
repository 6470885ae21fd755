"""The emulator's in-memory server state and the rules of the MVI API it follows.

Nothing here knows about HTTP: each method takes parsed input, applies MVI's rules and
returns the JSON-able answer, or raises :class:`ApiError` carrying the status and the body
MVI would send. One re-entrant lock guards everything, so concurrent requests lose nothing.
Objects are kept in the records of :mod:`paiv_sync.emulator.records`; what each shows of
itself, and with which field types, is decided there.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from paiv_sync.emulator import listing
from paiv_sync.emulator.options import (
    EmulatorOptions,
    check_locked_uploads,
    check_rate,
    check_token_lifetime,
    check_training_outcome,
    check_training_seconds,
    check_upload_failure_status,
)
from paiv_sync.emulator.records import (
    FILE_SORT_ALIASES,
    FILE_SORT_FIELDS,
    ApiError,
    Category,
    Dataset,
    StoredFile,
    Task,
    bad_request,
    fail_body,
    file_fail,
    iso,
    json_object,
    listed,
    missing,
    new_id,
    not_found,
    required_name,
    unauthorized,
)
from paiv_sync.emulator.training import TrainingRules
from paiv_sync.emulator.uploads import UploadForm

__all__ = ["ApiError", "EmulatorState", "bad_request", "fail_body", "not_found"]

log = logging.getLogger(__name__)

# The form field of an upload whose JSON object is attached to every file of it [client].
USER_METADATA_FIELD = "user-metadata"
# Marks "argument not given" in set_options, where None is a meaningful value.
_UNSET: Any = object()
_RUNTIME_OPTIONS = (
    "training_seconds",
    "token_lifetime",
    "training_outcome",
    "upload_failure_status",
    "locked_uploads",
    "finishing_error_rate",
)


class EmulatorState(TrainingRules):
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
        self.upload_failure_status = options.upload_failure_status
        self.locked_uploads = options.locked_uploads
        self.finishing_error_rate = options.finishing_error_rate
        self._random = random.Random(options.faults.seed)
        self._datasets: dict[str, Dataset] = {}
        self._tasks: dict[str, Task] = {}
        self._tokens: dict[str, tuple[float, str]] = {}  # token -> (issued, user)
        self._active_keys: set[str] = set(options.api_keys)
        self._requests: Counter[str] = Counter()
        self._in_flight: Counter[str] = Counter()  # received, not answered yet (not reset)
        self._tokens_issued = 0
        self._concurrent_trainings_max = 0
        self._product_faults: Counter[str] = Counter()

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
            self._product_faults.clear()
            self._random = random.Random(self._options.faults.seed)
        log.info("emulator state reset")

    def set_options(self, **changes: Any) -> None:
        """Change run-time options (see ``_RUNTIME_OPTIONS``); those not given are left alone.

        ``training_seconds`` and ``training_outcome`` apply to tasks started afterwards;
        ``token_lifetime`` applies at once to every token, old ones included; the others to
        the next request. Raises ValueError on an unknown option or an invalid value.
        """
        unknown = sorted(set(changes) - set(_RUNTIME_OPTIONS))
        if unknown:
            raise ValueError(f"not a run-time option: {', '.join(unknown)}")
        checks: dict[str, Callable[[Any], None]] = {
            "training_seconds": check_training_seconds,
            "token_lifetime": check_token_lifetime,
            "training_outcome": check_training_outcome,
            "upload_failure_status": check_upload_failure_status,
            "locked_uploads": check_locked_uploads,
            "finishing_error_rate": lambda v: check_rate("finishing_error_rate", v),
        }
        for name, value in changes.items():
            checks[name](value)
        with self._lock:
            for name, value in changes.items():
                numeric = name in ("training_seconds", "finishing_error_rate", "token_lifetime")
                setattr(self, name, float(value) if numeric and value is not None else value)

    def count_request(self, key: str) -> None:
        """Count one request under ``key`` (``"METHOD /route/template"``), now in flight."""
        with self._lock:
            self._requests[key] += 1
            self._in_flight[key] += 1

    def request_done(self, key: str) -> None:
        """The request counted under ``key`` was answered (or its connection dropped)."""
        with self._lock:
            self._in_flight[key] -= 1

    # ---- authentication ------------------------------------------------------------------

    def issue_token(self, body: Any) -> dict[str, Any]:
        """``POST /tokens``: check the user's password and return a new token.

        Raises ApiError: 404 in API-key mode (MVI 8.x has no ``/tokens``), 400 on a malformed
        body, 401 on an unknown user or a wrong password.
        """
        if self._options.api_key_mode:
            raise not_found()
        body = json_object(body)
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
            self._tokens[token] = (self._monotonic(), username)
            self._tokens_issued += 1
        log.info("emulator: issued a token to user %r", username)
        return {"result": "success", "token": token}

    def authenticate(self, credential: str | None) -> str:
        """Check an ``X-Auth-Token`` value: a live token, or an active key in API-key mode.

        Returns the user it stands for (the files' ``owner``). Raises ApiError 401 when it is
        missing, unknown, expired or revoked.
        """
        if not credential:
            raise unauthorized("Missing X-Auth-Token header")
        with self._lock:
            if self._options.api_key_mode:
                if not any(hmac.compare_digest(credential, k) for k in self._active_keys):
                    raise unauthorized("Invalid or revoked API key")
                return "apikey"
            issued = self._tokens.get(credential)
            if issued is None:
                raise unauthorized("Invalid or revoked token")
            lifetime = self.token_lifetime
            if lifetime is not None and self._monotonic() - issued[0] >= lifetime:
                del self._tokens[credential]
                raise unauthorized("Token expired")
            return issued[1]

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

    def list_datasets(self, params: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """``GET /datasets``: every dataset, newest first [client]."""
        with self._lock:
            views = [self._dataset_view(d) for d in self._datasets.values()]
        return listed(views, params or {}, ("_id", "name", "created_at", "total_file_count"))

    def create_dataset(self, body: Any) -> dict[str, Any]:
        """``POST /datasets`` with ``{"name": N}``. Raises ApiError 400 on a bad body."""
        name = required_name(json_object(body))
        with self._lock:
            dataset = Dataset(id=new_id(), name=name, created_at=self._now())
            self._datasets[dataset.id] = dataset
        log.info("emulator: created dataset %s %r", dataset.id, name)
        return {"result": "success", "dataset_id": dataset.id}

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        """``GET /datasets/{id}``. Raises ApiError 404 for an unknown id."""
        with self._lock:
            return self._dataset_view(self._dataset(dataset_id))

    def has_dataset(self, dataset_id: str) -> bool:
        """True when the dataset exists."""
        with self._lock:
            return dataset_id in self._datasets

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset with its categories and files. Raises KeyError for an unknown id."""
        with self._lock:
            del self._datasets[dataset_id]
        log.info("emulator: deleted dataset %s", dataset_id)

    def api_delete_dataset(self, dataset_id: str) -> dict[str, Any]:
        """``DELETE /datasets/{id}``. Raises ApiError 404 ("Unknown dataset") [client]."""
        with self._lock:
            if dataset_id not in self._datasets:
                raise missing(f"Unknown dataset {dataset_id}")
            del self._datasets[dataset_id]
        log.info("emulator: deleted dataset %s", dataset_id)
        return {"result": "success"}

    def list_categories(
        self, dataset_id: str, params: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """``GET /datasets/{id}/categories``, oldest first. Raises ApiError 404."""
        with self._lock:
            views = [c.api_view() for c in self._dataset(dataset_id).categories.values()]
        return listed(views, params or {}, ("_id", "name", "created_at"), newest_first=False)

    def create_category(self, dataset_id: str, body: Any) -> dict[str, Any]:
        """``POST /datasets/{id}/categories`` with ``{"name": N}``.

        Raises ApiError: 404 for an unknown dataset, 400 on a bad body or a name the dataset
        already has.
        """
        name = required_name(json_object(body))
        with self._lock:
            dataset = self._dataset(dataset_id)
            if dataset.category_named(name) is not None:
                raise bad_request(f"Category {name!r} already exists in this dataset")
            category = self._add_category(dataset, name)
        return {"result": "success", "dataset_category_id": category.id}

    def get_category(self, dataset_id: str, category_id: str) -> dict[str, Any]:
        """``GET /datasets/{id}/categories/{cid}``. Raises ApiError 404."""
        with self._lock:
            return self._category(self._dataset(dataset_id), category_id).api_view()

    def delete_category(self, dataset_id: str, category_id: str) -> dict[str, Any]:
        """``DELETE /datasets/{id}/categories/{cid}``: its files stay, uncategorised [guess]."""
        with self._lock:
            dataset = self._dataset(dataset_id)
            self._category(dataset, category_id)
            del dataset.categories[category_id]
            dataset.files[:] = [
                dataclasses.replace(f, category_id=None, category_name=None)
                if f.category_id == category_id
                else f
                for f in dataset.files
            ]
        log.info("emulator: dataset %s: deleted category %s", dataset_id, category_id)
        return {"result": "success"}

    def category_action(self, dataset_id: str, category_id: str, body: Any) -> dict[str, Any]:
        """``POST …/categories/{cid}/action`` ``{"action": "calculate"}`` → its file count."""
        body = json_object(body)
        if body.get("action") != "calculate":
            raise bad_request(f'action must be "calculate", got {body.get("action")!r}')
        with self._lock:
            dataset = self._dataset(dataset_id)
            category = self._category(dataset, category_id)
            size = sum(f.category_id == category.id for f in dataset.files)
        return {"result": "success", **category.api_view(), "size": size}

    # ---- files ---------------------------------------------------------------------------

    def store_upload(
        self, dataset_id: str, form: UploadForm, owner: str, fail_file: Callable[[], bool]
    ) -> dict[str, Any]:
        """``POST /datasets/{id}/files``: store the accepted files, one result entry each.

        The category comes from the ``category_id`` field, else ``category_name`` (created when
        the dataset has no such category), else none; a ``user-metadata`` field (a JSON
        object) is attached to every stored file. ``fail_file`` is asked, for each file that
        would be stored, whether to fail it instead (fault injection).

        When any file failed, the answer is ``upload_failure_status`` (400 by default, as the
        product answers [client]) with ``result: fail`` and the same ``resultList``; the files
        that succeeded are stored all the same.
        Raises ApiError: 404 for an unknown dataset, 400 when the request holds no file or a
        bad ``user-metadata``, 409/423 while the dataset is locked (``locked_uploads``).
        """
        if not form.files:
            raise bad_request("No files in the request: send one or more parts named 'files'")
        metadata = _user_metadata(form.fields.get(USER_METADATA_FIELD))
        # Names are kept exactly as sent (as for POST /categories); blank means "none".
        category_id = form.fields.get("category_id", "").strip()
        category_name = form.fields.get("category_name", "")
        if not category_name.strip():
            category_name = ""
        results: list[dict[str, Any]] = []
        stored = 0
        with self._lock:
            dataset = self._dataset(dataset_id)
            if self.locked_uploads != "accept" and self._locked(dataset):
                self._product_faults["locked"] += 1
                raise ApiError(
                    int(self.locked_uploads),
                    fail_body(f"Dataset {dataset_id} is locked while a training runs"),
                )
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
                    results.append(file_fail(name, upload.fault))
                    continue
                if category_fault is not None:
                    results.append(file_fail(name, category_fault))
                    continue
                if fail_file():
                    results.append(file_fail(name, "Internal error while storing the file"))
                    continue
                if category is None and category_name:
                    category = self._add_category(dataset, category_name)
                assert upload.file_type is not None and upload.content_type is not None
                stored_file = StoredFile(
                    id=new_id(),
                    dataset_id=dataset.id,
                    original_file_name=name,
                    file_type=upload.file_type,
                    size=upload.size,
                    content_type=upload.content_type,
                    sha256=upload.sha256,
                    category_id=category.id if category else None,
                    category_name=category.name if category else None,
                    created_ms=self._now_ms(),
                    owner=owner,
                    width=upload.width,
                    height=upload.height,
                    user_metadata=dict(metadata),
                )
                dataset.files.append(stored_file)
                stored += 1
                results.append(
                    {"result": "success", "_id": stored_file.id, "original_file_name": name}
                )
        failed = len(results) - stored
        log.info(
            "emulator: dataset %s: stored %d of %d file(s)", dataset_id, stored, len(form.files)
        )
        if failed and self.upload_failure_status != 200:
            raise ApiError(
                self.upload_failure_status,
                {
                    "result": "fail",
                    "fault": f"{failed} of {len(results)} files could not be uploaded",
                    "resultList": results,
                },
            )
        return {"result": "success", "resultList": results}

    def list_files(self, dataset_id: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        """``GET /datasets/{id}/files``: newest first by default [client], then as ``params``
        say: ``category_id`` and ``parent_id`` (exact), ``query`` terms (``metadata.<key>``
        included), ``sortby``, ``skip`` and ``limit`` (0 = no limit) — see ``listing``.

        Raises ApiError: 404 for an unknown dataset, 400 on a bad parameter.
        """
        with self._lock:
            files = list(self._dataset(dataset_id).files)
        # The user metadata takes part in queries but is not a field of the file object.
        views = [{**f.api_view(), "user_metadata": f.user_metadata} for f in files]
        try:
            chosen = listing.apply(
                views,
                params,
                sortable=FILE_SORT_FIELDS,
                aliases=FILE_SORT_ALIASES,
                filters=("category_id", "parent_id"),
            )
        except listing.ListingError as exc:
            raise bad_request(str(exc)) from exc
        for view in chosen:
            del view["user_metadata"]
        return chosen

    def get_file(self, dataset_id: str, file_id: str) -> dict[str, Any]:
        """``GET /datasets/{id}/files/{fid}``. Raises ApiError 404 [client: the fault texts]."""
        with self._lock:
            return self._file(self._dataset(dataset_id), file_id).api_view()

    def delete_file(self, dataset_id: str, file_id: str) -> dict[str, Any]:
        """``DELETE /datasets/{id}/files/{fid}``. Raises ApiError 404."""
        with self._lock:
            dataset = self._dataset(dataset_id, unknown="Unknown dataset")
            found = self._file(dataset, file_id)
            dataset.files.remove(found)
        log.info("emulator: dataset %s: deleted file %s", dataset_id, file_id)
        return {"result": "success"}

    def get_user_metadata(self, dataset_id: str, file_id: str) -> dict[str, Any]:
        """``GET …/files/{fid}/user-metadata``: the file's key/value pairs."""
        with self._lock:
            return dict(self._file(self._dataset(dataset_id), file_id).user_metadata)

    def add_user_metadata(self, dataset_id: str, file_id: str, body: Any) -> dict[str, Any]:
        """``POST …/files/{fid}/user-metadata`` with a JSON object: add or replace those keys."""
        pairs = json_object(body)
        with self._lock:
            self._file(self._dataset(dataset_id), file_id).user_metadata.update(pairs)
        return {"result": "success"}

    def delete_user_metadata(self, dataset_id: str, file_id: str, body: Any) -> list[str]:
        """``DELETE …/files/{fid}/user-metadata`` with a JSON list of keys; the keys deleted."""
        if not isinstance(body, list) or not all(isinstance(k, str) for k in body):
            raise bad_request("The request body must be a JSON list of metadata keys")
        with self._lock:
            metadata = self._file(self._dataset(dataset_id), file_id).user_metadata
            return [k for k in body if metadata.pop(k, None) is not None]

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
                    "locked": self._locked(d),
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
                "tasks": [t.state_view(now) for t in self._tasks.values()],
                "requests": dict(self._requests),
                "in_flight": {k: n for k, n in self._in_flight.items() if n > 0},
                "faults": {**fault_counts, **self._product_faults},
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

    def count_product_fault(self, kind: str) -> None:
        """Count an answer the product gives and the client must handle (``locked``, …)."""
        with self._lock:
            self._product_faults[kind] += 1

    # ---- helpers ---------------------------------------------------------------------------

    def _dataset(self, dataset_id: str, unknown: str = "Could not find dataset") -> Dataset:
        dataset = self._datasets.get(dataset_id)
        if dataset is None:
            raise missing(f"{unknown} {dataset_id}")
        return dataset

    def _category(self, dataset: Dataset, category_id: str) -> Category:
        category = dataset.categories.get(category_id)
        if category is None:
            raise missing(f"Could not find category {category_id}")
        return category

    def _file(self, dataset: Dataset, file_id: str) -> StoredFile:
        found = next((f for f in dataset.files if f.id == file_id), None)
        if found is None:
            raise missing(f"Could not find file {file_id}")
        return found

    def _dataset_view(self, dataset: Dataset) -> dict[str, Any]:
        return dataset.api_view(locked=self._locked(dataset))

    def _add_category(self, dataset: Dataset, name: str) -> Category:
        category = Category(id=new_id(), dataset_id=dataset.id, name=name, created_at=self._now())
        dataset.categories[category.id] = category
        log.info("emulator: dataset %s: created category %r", dataset.id, name)
        return category

    def _now(self) -> str:
        return iso(self._clock())

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)


def _user_metadata(raw: str | None) -> dict[str, Any]:
    """The ``user-metadata`` field: a JSON object. Raises ApiError 400 when it is not one."""
    if raw is None or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise bad_request(f"user-metadata must be a JSON object: {exc}") from exc
    if not isinstance(value, dict):
        raise bad_request("user-metadata must be a JSON object of key/value pairs")
    return value
