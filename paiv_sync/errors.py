"""The exceptions of the MVI client, apart from the client, so that lower modules (the retry
policy) can name them without importing it.

Each says what happened and what to do; the classes tell callers what may be tried again
(:class:`TransientError`), what may have been done already (:class:`AmbiguousError`) and what
will not change by itself.
"""

from __future__ import annotations

__all__ = [
    "AmbiguousError",
    "AuthError",
    "DatasetLocked",
    "MviError",
    "NotFoundError",
    "NotSupportedError",
    "RequestError",
    "TlsError",
    "TransientError",
]


class MviError(Exception):
    """A call to the MVI server failed; the message says what happened and what to do.

    ``status`` is the HTTP status when the server answered, ``fault`` the server's own
    explanation when it gave one, ``reason`` a few words for log lines ("HTTP 503",
    "connection refused").
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        fault: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.fault = fault
        if reason is None:
            reason = f"HTTP {status}" if status is not None else type(self).__name__
        self.reason = reason


class TransientError(MviError):
    """May succeed later: connection refused/reset, timeout, 429, 5xx, a proxy's HTML page.

    ``retry_after`` is the wait in seconds the server asked for (429 ``Retry-After``).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        fault: str | None = None,
        reason: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, fault=fault, reason=reason)
        self.retry_after = retry_after


class AmbiguousError(TransientError):
    """The request MAY have been processed (answer lost, read timeout, 5xx on a POST).

    Before sending a non-idempotent request again, look at what the server holds.
    """


class DatasetLocked(TransientError):
    """The server refused to change a dataset that a training holds locked (409/423).

    Nothing was stored, so sending again is safe; it is not retried inside the client, as a
    training can hold the lock for a long time: the caller waits (and shows it is alive).
    """


class AuthError(MviError):
    """Bad credentials, a revoked API key, or a 401 that survived a fresh login."""


class NotFoundError(MviError):
    """The server does not know the object (HTTP 404 NotFoundException), e.g. a deleted dataset."""


class RequestError(MviError):
    """The server refused the request for good (4xx, or ``"result": "fail"`` in a 200)."""


class NotSupportedError(RequestError):
    """The server has no such route (a generic 404, or 501): an older or newer API."""


class TlsError(MviError):
    """The TLS connection could not be set up safely; the message says how to fix it."""
