"""What the emulator keeps of each object, and how each shows itself in answers.

Field names and types follow what IBM's own clients and notes show of the product (see
docs/mvi-api.md, with the evidence for each): a file's ``size`` is a string and its
``created_at``/``uploaded_at`` are epoch milliseconds; a task carries no ``completed_at``.
The introspection views (``state_view``) are our own and keep plain types for the tests.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from paiv_sync.emulator import listing

FILE_SORT_FIELDS = (
    "_id",
    "original_file_name",
    "file_name",
    "file_type",
    "size",
    "content_type",
    "created_at",
    "uploaded_at",
    "category_id",
    "category_name",
    "owner",
)
# IBM's CLI tests sort files by "name" [client].
FILE_SORT_ALIASES = {"name": "original_file_name"}
TASK_SORT_FIELDS = ("_id", "name", "dataset_id", "status", "created_at", "usage")

# What a trained model of ours reports; the product measures these [guess: the values].
_MODEL_ACCURACY = "0.95"
_MODEL_PRODUCTION_STATUS = "untested"
_TOTAL_ITERATIONS = 100


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
    """The 404 of a path the server has no route for (MVI's documented body) [doc]."""
    return ApiError(
        404,
        {
            "status": "Not Found",
            "fault": "HTTP 404 Not Found",
            "type": "NotFoundException",
            "result": "fail",
        },
    )


def missing(fault: str) -> ApiError:
    """The 404 of an object that does not exist (any more), with the product's fault text
    ("Could not find dataset …", "Unknown dataset …") [client]."""
    return ApiError(
        404, {"status": "Not Found", "fault": fault, "type": "NotFoundException", "result": "fail"}
    )


def not_implemented(method: str, path: str) -> ApiError:
    """A route under the base path that the emulator does not model (ours: the product may
    well have it). 501, so that a client can tell "not modelled" from "gone"."""
    return ApiError(
        501, fail_body(f"The emulator does not implement {method} {path or '/'} (see its docs)")
    )


def bad_request(fault: str) -> ApiError:
    """Return a 400 error with ``fault`` as its message."""
    return ApiError(400, fail_body(fault))


def unauthorized(fault: str) -> ApiError:
    """Return a 401 error with ``fault`` as its message."""
    return ApiError(401, fail_body(fault))


def file_fail(name: str, fault: str) -> dict[str, Any]:
    """One failed entry of an upload's ``resultList``."""
    return {"result": "fail", "original_file_name": name, "fault": fault}


def new_id() -> str:
    """A fresh object id."""
    return str(uuid.uuid4())


def iso(timestamp: float) -> str:
    """``timestamp`` as ISO 8601 UTC with milliseconds (``2024-05-01T12:00:00.123Z``)."""
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Category:
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
class StoredFile:
    """One stored file; only its hash and size are kept of its content."""

    id: str
    dataset_id: str
    original_file_name: str
    file_type: str
    size: int
    content_type: str
    sha256: str
    category_id: str | None
    category_name: str | None
    created_ms: int
    owner: str
    width: int | None = None
    height: int | None = None
    # Changed in place by the user-metadata calls; the record itself never changes.
    user_metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        """The name the product stores the file under: ``<id>.<ext>``."""
        ext = self.content_type.rsplit("/", 1)[-1].replace("jpeg", "jpg")
        return f"{self.id}.{ext}"

    def api_view(self) -> dict[str, Any]:
        """The file as ``GET /datasets/{id}/files`` shows it (no content hash) [doc]."""
        dimensions = {"width": self.width, "height": self.height} if self.width is not None else {}
        return {
            "_id": self.id,
            "owner": self.owner,
            "original_file_name": self.original_file_name,
            "file_name": self.file_name,
            "file_type": self.file_type,
            "dataset_id": self.dataset_id,
            "size": str(self.size),
            "content_type": self.content_type,
            "created_at": self.created_ms,
            "uploaded_at": self.created_ms,
            "category_id": self.category_id,
            "category_name": self.category_name,
            "meta_data": dimensions,
            "tag_list": [],
            "upload_type": "file",
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
            "created_at": iso(self.created_ms / 1000),
            "user_metadata": dict(self.user_metadata),
        }


@dataclass(frozen=True, eq=False)
class Dataset:
    id: str
    name: str
    created_at: str
    # The containers are filled in place; the record itself never changes.
    categories: dict[str, Category] = field(default_factory=dict)
    files: list[StoredFile] = field(default_factory=list)

    def api_view(self, *, locked: int) -> dict[str, Any]:
        return {
            "_id": self.id,
            "name": self.name,
            "total_file_count": len(self.files),
            "created_at": self.created_at,
            "locked": locked,
        }

    def category_named(self, name: str) -> Category | None:
        return next((c for c in self.categories.values() if c.name == name), None)

    def image_counts(self) -> dict[str, int]:
        """Images per category id (every category listed, also those with none)."""
        counts = dict.fromkeys(self.categories, 0)
        for f in self.files:
            if f.file_type == "image" and f.category_id in counts:
                counts[f.category_id] += 1
        return counts


@dataclass(frozen=True)
class Task:
    id: str
    name: str
    dataset_id: str
    usage: str
    pretrained_model: str | None
    strategy: dict[str, Any] | None
    nn_arch: str | None
    created_at: str
    ends: float  # on the monotonic clock
    outcome: str
    started: float = 0.0  # on the monotonic clock
    action: str | None = None  # as the request gave it (introspection only)

    def status(self, now: float) -> str:
        return self.outcome if now >= self.ends else "training"

    def trained(self, now: float) -> bool:
        return self.status(now) == "trained"

    def view(self, now: float) -> dict[str, Any]:
        return {
            "_id": self.id,
            "name": self.name,
            "dataset_id": self.dataset_id,
            "usage": self.usage,
            "status": self.status(now),
            "pretrained_model": self.pretrained_model,
            "strategy": self.strategy,
            "nn_arch": self.nn_arch,
            "created_at": self.created_at,
        }

    def state_view(self, now: float) -> dict[str, Any]:
        """The task as the introspection endpoint shows it: also the ``action`` requested."""
        return {**self.view(now), "action": self.action}

    def model_view(self) -> dict[str, Any]:
        """The task as ``GET /trained-models`` shows its model (same ``_id``) [client]."""
        return {
            "_id": self.id,
            "name": self.name,
            "dataset_id": self.dataset_id,
            "usage": self.usage,
            "nn_arch": self.nn_arch or "cic",
            "accuracy": _MODEL_ACCURACY,
            "production_status": _MODEL_PRODUCTION_STATUS,
            "pretrained_model": self.pretrained_model,
            "created_at": self.created_at,
        }

    def progress(self, now: float) -> list[dict[str, Any]]:
        """What ``…/status`` reports of the iterations: ``[{iter, total_iter, loss}]``."""
        length = max(self.ends - self.started, 1e-9)
        done = min(1.0, max(0.0, (now - self.started) / length))
        iteration = round(done * _TOTAL_ITERATIONS)
        return [
            {
                "iter": iteration,
                "total_iter": _TOTAL_ITERATIONS,
                "loss": round(1.0 / (1 + iteration), 4),
            }
        ]


def json_object(body: Any) -> dict[str, Any]:
    """``body`` as a JSON object; raises ApiError 400 when it is not one."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object")
    return body


def required_name(body: Mapping[str, Any]) -> str:
    """The body's ``name``; raises ApiError 400 unless it is a non-empty string."""
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise bad_request("name is required and must be a non-empty string")
    return name


def listed(
    views: list[dict[str, Any]],
    params: Mapping[str, str],
    sortable: tuple[str, ...],
    filters: tuple[str, ...] = (),
    newest_first: bool = True,
) -> list[dict[str, Any]]:
    """``views`` sorted, filtered and paged as ``params`` ask; raises ApiError 400 on a bad
    parameter."""
    try:
        return listing.apply(
            views,
            params,
            sortable=sortable,
            aliases={},
            filters=filters,
            newest_first=newest_first,
        )
    except listing.ListingError as exc:
        raise bad_request(str(exc)) from exc
