"""Options of the MVI emulator: what it serves, how it authenticates, which faults it injects."""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeGuard

TRAINING_OUTCOMES = ("trained", "failed")
# What an upload into a dataset that a training holds locked gets [guess]: stored as usual, or
# refused with one of these statuses (nothing stored).
LOCKED_UPLOADS = ("accept", "409", "423")


@dataclass(frozen=True)
class FaultOptions:
    """Which faults the emulator injects into ``/api`` calls, and how often.

    Every ``*_rate`` is a probability in [0, 1] drawn per request (``fail_in_200_rate`` is drawn
    per file for uploads). ``latency`` and ``retry_after`` are seconds. ``seed`` makes the
    sequence of injected faults reproducible: the same seed and the same sequence of requests
    give the same faults. ``routes``, when not empty, aims the faults at those routes only,
    each named as the introspection counts requests (``"POST /dltasks"``,
    ``"POST /datasets/{id}/files"``); other requests are served without fault. ``limit``, when
    set, ends the faults after that many were injected (since these options were set): "the
    first two logins drop their connection".

    Raises ValueError on a rate outside [0, 1], a negative duration or a route that is not a
    ``"METHOD /path"`` string.
    """

    error_rate: float = 0.0
    drop_rate: float = 0.0
    store_then_drop_rate: float = 0.0
    latency: float = 0.0
    latency_rate: float = 0.0
    rate_limit_rate: float = 0.0
    retry_after: float = 1.0
    fail_in_200_rate: float = 0.0
    seed: int | None = None
    routes: tuple[str, ...] = ()
    limit: int | None = None

    def __post_init__(self) -> None:
        routes = self.routes
        if isinstance(routes, str) or not isinstance(routes, (list, tuple)):
            raise ValueError(f'routes: must be a list of "METHOD /path" strings, got {routes!r}')
        for route in routes:
            method, _, path = route.partition(" ") if isinstance(route, str) else ("", "", "")
            if not method.isupper() or not path.startswith("/"):
                raise ValueError(
                    f'routes: expected "METHOD /path" such as "POST /dltasks", got {route!r}'
                )
        # Frozen means frozen: a caller's list must not change the options behind our back.
        object.__setattr__(self, "routes", tuple(routes))
        for name in (
            "error_rate",
            "drop_rate",
            "store_then_drop_rate",
            "latency_rate",
            "rate_limit_rate",
            "fail_in_200_rate",
        ):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: must be a number between 0 and 1, got {value!r}")
        for name in ("latency", "retry_after"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0 or math.isinf(value):
                raise ValueError(f"{name}: must be a number of seconds >= 0, got {value!r}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed: must be an integer or null, got {self.seed!r}")
        limit = self.limit
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
        ):
            raise ValueError(f"limit: must be an integer >= 0 or null, got {limit!r}")

    @property
    def any_enabled(self) -> bool:
        """True when at least one fault can be injected (on some route)."""
        return any(
            (
                self.error_rate,
                self.drop_rate,
                self.store_then_drop_rate,
                self.latency_rate and self.latency,
                self.rate_limit_rate,
                self.fail_in_200_rate,
            )
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> FaultOptions:
        """Build fault options from a JSON object; absent keys take their defaults.

        Raises ValueError on an unknown key or an invalid value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault option(s): {', '.join(unknown)}")
        return cls(**dict(data))

    def applies_to(self, route: str) -> bool:
        """True when faults may hit ``route`` (``"METHOD /template"``)."""
        return not self.routes or route in self.routes


def _default_users() -> Mapping[str, str]:
    return {"admin": "passw0rd"}


@dataclass(frozen=True)
class EmulatorOptions:
    """How the emulator serves.

    ``port`` 0 picks a free port. ``base_path`` is the API's context root (``/api``,
    ``/powerai-vision/api``, ``""`` for none). A non-empty ``api_keys`` switches to API-key mode
    (MVI 8.x): ``/tokens`` answers 404 and only the keys authenticate. ``token_lifetime`` is in
    seconds, None for tokens that never expire. A training task stays ``training`` for
    ``training_seconds`` and then ends ``training_outcome`` (``trained`` or ``failed``).

    How the product answers, where IBM's code shows it (the defaults), and the kinder answers
    of our older emulator (options, for the tests that run both):

    - ``upload_failure_status``: the status of an upload in which at least one file failed
      (400 [client]); its body carries ``result: fail`` and the per-file ``resultList``, and the
      files that succeeded ARE stored. 200 gives our older answer (success with the failures
      inside the list).
    - ``locked_uploads``: what an upload gets while a training holds its dataset ``locked``:
      ``accept`` (stored as usual), ``409`` or ``423`` (refused, nothing stored) [guess].
    - ``finishing_error_rate``: the share of ``GET /dltasks/{id}`` and ``…/status`` requests
      answered 500 in the second after a task finished training [client: IBM's Java client].
    - ``strict_tasks``: refuse a dltasks body without both ``usage: cic`` and ``action:
      create``; by default either alone means classification (IBM's clients send both forms).

    Raises ValueError on an invalid value.
    """

    host: str = "127.0.0.1"
    port: int = 0
    base_path: str = "/api"
    tls: bool = False
    users: Mapping[str, str] = field(default_factory=_default_users)
    api_keys: tuple[str, ...] = ()
    token_lifetime: float | None = None
    training_seconds: float = 5.0
    training_outcome: str = "trained"
    faults: FaultOptions = field(default_factory=FaultOptions)
    upload_failure_status: int = 400
    locked_uploads: str = "accept"
    finishing_error_rate: float = 0.1
    strict_tasks: bool = False

    def __post_init__(self) -> None:
        # Frozen means frozen: a caller's dict must not change the options behind our back.
        object.__setattr__(self, "users", types.MappingProxyType(dict(self.users)))
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        object.__setattr__(self, "base_path", normalise_base_path(self.base_path))
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be an integer 0..65535, got {self.port!r}")
        if self.base_path.startswith("/_emulator"):
            raise ValueError("base_path: /_emulator is reserved for introspection")
        for name, password in self.users.items():
            if not isinstance(name, str) or not name or not isinstance(password, str):
                raise ValueError("users: every user needs a non-empty name and a string password")
        if any(not isinstance(key, str) or not key for key in self.api_keys):
            raise ValueError("api_keys: every API key must be a non-empty string")
        check_token_lifetime(self.token_lifetime)
        check_training_seconds(self.training_seconds)
        check_training_outcome(self.training_outcome)
        if not isinstance(self.faults, FaultOptions):
            raise ValueError("faults: must be a FaultOptions")
        check_upload_failure_status(self.upload_failure_status)
        check_locked_uploads(self.locked_uploads)
        check_rate("finishing_error_rate", self.finishing_error_rate)
        if not isinstance(self.strict_tasks, bool):
            raise ValueError(f"strict_tasks: must be true or false, got {self.strict_tasks!r}")

    @property
    def api_key_mode(self) -> bool:
        """True when API keys are configured (MVI 8.x behaviour: no ``/tokens``)."""
        return bool(self.api_keys)


def normalise_base_path(base_path: str) -> str:
    """Return ``base_path`` with one leading slash and no trailing slash (``""`` for the root)."""
    stripped = base_path.strip().strip("/")
    return f"/{stripped}" if stripped else ""


def check_token_lifetime(value: object) -> None:
    """Raise ValueError unless ``value`` is None or a positive number of seconds."""
    if value is not None and (not _is_number(value) or value <= 0):
        raise ValueError(
            f"token_lifetime: must be a positive number of seconds or null, got {value!r}"
        )


def check_training_seconds(value: object) -> None:
    """Raise ValueError unless ``value`` is a number of seconds >= 0."""
    if not _is_number(value) or value < 0 or math.isinf(value):
        raise ValueError(f"training_seconds: must be a number of seconds >= 0, got {value!r}")


def check_training_outcome(value: object) -> None:
    """Raise ValueError unless ``value`` is ``trained`` or ``failed``."""
    if value not in TRAINING_OUTCOMES:
        raise ValueError(f"training_outcome: must be one of {TRAINING_OUTCOMES}, got {value!r}")


def lenient(**changes: Any) -> EmulatorOptions:
    """Options for the kinder server our older emulator was: failures inside a 200, no
    transient 500 as a training ends, strict dltasks bodies. ``changes`` as for the class."""
    settings: dict[str, Any] = {
        "upload_failure_status": 200,
        "finishing_error_rate": 0.0,
        "strict_tasks": True,
    }
    settings.update(changes)
    return EmulatorOptions(**settings)


def check_upload_failure_status(value: object) -> None:
    """Raise ValueError unless ``value`` is 200 or a 4xx/5xx status."""
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not (value == 200 or 400 <= value <= 599)
    ):
        raise ValueError(f"upload_failure_status: must be 200 or a 4xx/5xx status, got {value!r}")


def check_locked_uploads(value: object) -> None:
    """Raise ValueError unless ``value`` is one of LOCKED_UPLOADS."""
    if value not in LOCKED_UPLOADS:
        raise ValueError(f"locked_uploads: must be one of {LOCKED_UPLOADS}, got {value!r}")


def check_rate(name: str, value: object) -> None:
    """Raise ValueError unless ``value`` is a probability in [0, 1]."""
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: must be a number between 0 and 1, got {value!r}")


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
