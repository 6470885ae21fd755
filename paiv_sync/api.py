"""The MVI (PowerAI Vision / Maximo Visual Inspection) REST client.

Follows docs/mvi-api.md. Every failure is turned into one of the exceptions of
paiv_sync.errors (also importable from here), whose message is a sentence a person can act on;
callers choose what to do by the class:

- ``TransientError``: may succeed later (server down, timeout, 429, 5xx, proxy error page);
- ``AmbiguousError``: a ``TransientError`` after which the request MAY have been processed —
  a non-idempotent request must not be sent again before checking what the server holds;
- ``AuthError``, ``NotFoundError``, ``RequestError``, ``TlsError``: permanent until something
  is changed by a person.

Idempotent GETs are retried with the :mod:`paiv_sync.retry` policy; POSTs are resent only when
the request provably was not processed (connection never established, 429, 401 followed by a
new login). Passwords, tokens and API keys never appear in a log line or an exception.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import hashlib
import json
import logging
import os
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import requests
import tenacity
import urllib3
from urllib3.fields import RequestField
from urllib3.filepost import choose_boundary

from paiv_sync._version import __version__
from paiv_sync.errors import (
    AmbiguousError,
    AuthError,
    DatasetLocked,
    MviError,
    NotFoundError,
    NotSupportedError,
    RequestError,
    TlsError,
    TransientError,
)
from paiv_sync.retry import RetryPolicy, build_retrying, is_retryable

__all__ = [
    "AmbiguousError",
    "AuthError",
    "DatasetLocked",
    "FileResult",
    "MviClient",
    "MviError",
    "NotFoundError",
    "NotSupportedError",
    "RequestError",
    "TlsError",
    "TransientError",
    "UploadPart",
    "as_int",
    "epoch_seconds",
    "newest",
    "wire_name",
]

_log = logging.getLogger(__name__)

# Connecting should take milliseconds; a host that does not answer at all must not hold a
# worker for the full read timeout, which has to cover the server storing a large batch.
_MAX_CONNECT_TIMEOUT = 10.0
_READ_CHUNK = 256 * 1024
_URLLIB3_TAKES_BLOCKSIZE = int(str(getattr(urllib3, "__version__", "1")).split(".", 1)[0]) >= 2


# What to do about a refusal, by HTTP status.
_REFUSAL_HINTS = {
    413: "; upload fewer files per request (lower the batch size)",
    403: "; does this user have the right to do this?",
}

# --------------------------------------------------------------------------- exceptions


class _Unauthorized(AuthError):
    """HTTP 401 on one request; handled by logging in again (password mode)."""


class _SourceError(Exception):
    """A file could not be read, or changed size, while its bytes were being sent.

    Carries the OSError for the caller. Deliberately not an OSError itself: urllib3 would
    turn an OSError raised while sending into "connection aborted", indistinguishable from a
    network failure after which the server may have processed the request.
    """

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class UploadPart:
    """One file to upload: where it is on disk, the name the server records, its MIME type."""

    path: str | os.PathLike[str]
    name: str
    content_type: str


@dataclass(frozen=True)
class FileResult:
    """The server's verdict on one uploaded file.

    ``file_id`` is the stored file's ``_id`` when ``ok``; ``fault`` the server's reason when not;
    ``sent_sha256`` the hash of the bytes the request carried (compare it with the hash the
    file had when it was checked: a file overwritten in the meantime sends other content).
    """

    name: str
    ok: bool
    file_id: str | None
    fault: str | None
    sent_sha256: str | None = None  # the SHA-256 of the bytes sent, when they were all read


# --------------------------------------------------------------------------- multipart body


class _MultipartBody:
    """A ``multipart/form-data`` body streamed from disk, with its length known in advance.

    Knowing the length lets requests send ``Content-Length`` instead of chunked encoding,
    which some servers and proxies refuse. Each file is opened only while its bytes are
    being read and closed right after; :meth:`close` closes one left open by a failed send.
    Part headers are rendered by urllib3, which quotes file names the way browsers do.
    """

    def __init__(self, fields: Mapping[str, str], parts: Sequence[UploadPart]) -> None:
        boundary = choose_boundary()
        self.content_type = f"multipart/form-data; boundary={boundary}"
        delimiter = f"--{boundary}\r\n".encode("ascii")
        segments: list[bytes | tuple[str, int]] = []
        for name, value in fields.items():
            field = RequestField(name=name, data=value)
            field.make_multipart()
            segments.append(
                delimiter + field.render_headers().encode("utf-8") + value.encode("utf-8") + b"\r\n"
            )
        for part in parts:
            field = RequestField(name="files", data=b"", filename=wire_name(part.name))
            field.make_multipart(content_type=part.content_type)
            segments.append(delimiter + field.render_headers().encode("utf-8"))
            path = os.fspath(part.path)
            segments.append((path, os.stat(path).st_size))
            segments.append(b"\r\n")
        segments.append(f"--{boundary}--\r\n".encode("ascii"))
        self._length = sum(len(s) if isinstance(s, bytes) else s[1] for s in segments)
        self._segments = deque(segments)
        self._fd: int | None = None
        self._file_path = ""
        self._file_size = 0
        self._file_left = 0
        # The SHA-256 of each file's bytes as they were sent, in the order of the parts: what
        # the server got, which may not be what was hashed before (a file overwritten since).
        self.digests: list[str] = []
        self._hash: Any = None

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(_READ_CHUNK):
            yield chunk

    def read(self, size: int = -1) -> bytes:
        """Return up to ``size`` bytes of the body (all that is left when negative)."""
        wanted = self._length if size is None or size < 0 else size
        out = bytearray()
        while len(out) < wanted and (self._fd is not None or self._segments):
            if self._fd is not None:
                out += self._read_file(wanted - len(out))
                continue
            segment = self._segments.popleft()
            if isinstance(segment, bytes):
                take = wanted - len(out)
                out += segment[:take]
                if len(segment) > take:
                    self._segments.appendleft(segment[take:])
            else:
                self._file_path, self._file_size = segment
                self._file_left = self._file_size
                self._hash = hashlib.sha256()
                try:
                    self._fd = os.open(self._file_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as exc:
                    raise _SourceError(exc) from exc
        return bytes(out)

    def _read_file(self, limit: int) -> bytes:
        assert self._fd is not None
        want = min(limit, self._file_left)
        # Reading the rest, ask for one byte more than announced: getting it means the file
        # grew, and sending a prefix of it would store a truncated image. (A regular file
        # returns fewer bytes than asked only at its end.)
        ask = want + 1 if want == self._file_left else want
        try:
            data = os.read(self._fd, ask)
        except OSError as exc:
            self._close_file()
            raise _SourceError(exc) from exc
        if len(data) > self._file_left:
            self._close_file()
            raise _SourceError(
                OSError(f"{self._file_path} grew while it was being uploaded; upload abandoned")
            )
        self._file_left -= len(data)
        self._hash.update(data)
        if self._file_left == 0:
            self.digests.append(self._hash.hexdigest())
            self._close_file()
        elif not data:
            self._close_file()
            raise _SourceError(
                OSError(
                    f"{self._file_path} shrank while it was being uploaded "
                    f"(expected {self._file_size} bytes); upload abandoned"
                )
            )
        return data

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Close the file being read, if any."""
        self._close_file()


# --------------------------------------------------------------------------- helpers


class _Adapter(requests.adapters.HTTPAdapter):
    """Sends request bodies in blocks of ``_READ_CHUNK`` instead of urllib3's 16 kB.

    Fewer, larger reads of the multipart body and fewer send calls per upload. Only urllib3 2
    takes the setting; with urllib3 1.x the adapter is a plain HTTPAdapter.
    """

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        if _URLLIB3_TAKES_BLOCKSIZE:
            pool_kwargs.setdefault("blocksize", _READ_CHUNK)
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        if _URLLIB3_TAKES_BLOCKSIZE:
            proxy_kwargs.setdefault("blocksize", _READ_CHUNK)
        return super().proxy_manager_for(proxy, **proxy_kwargs)


# Characters that cannot travel unchanged in the file name of a multipart part header: a line
# break would end the header (urllib3 sends it as "%0A", which servers keep as is), and servers
# undo the quoting of double quotes and backslashes differently. Each becomes "_", so the name
# the server records is one the client can predict — and find again in the dataset's list.
_UNSAFE_NAME_CHARS = dict.fromkeys([*range(0x20), 0x7F, ord('"'), ord("\\")], "_")


def wire_name(name: str) -> str:
    """Return the file name as it is sent to the server, and so as the server records it.

    Takes a file name (no folders); returns it with control characters, double quotes and
    backslashes replaced by ``_``. Anything else, spaces and non-ASCII letters included, is
    kept.
    """
    return name.translate(_UNSAFE_NAME_CHARS)


def as_int(value: object, default: int = -1) -> int:
    """A count or size the server sent as a number or as a string ("2048"); ``default`` when
    it is neither."""
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        return default


def epoch_seconds(value: object) -> float | None:
    """A time stamp the server sent as epoch milliseconds (files on the product), epoch
    seconds, or ISO 8601 text; None when it is none of these."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip().isdigit()):
        number = float(value)
        # Epoch milliseconds pass 1e11 in 1973; epoch seconds will not before the year 5138.
        return number / 1000.0 if number > 1e11 else number
    if isinstance(value, str):
        text = value.strip().replace("Z", "+00:00")
        try:
            moment = datetime.datetime.fromisoformat(text)
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        return moment.timestamp()
    return None


def _operation(what: str) -> str:
    """The operation a request is (``what``: "METHOD /path"), as /metrics labels retries."""
    method, _, rest = what.partition(" ")
    path = rest.split(" ", 1)[0]
    if path.startswith("/tokens"):
        return "login"
    if method == "POST" and path.endswith("/files"):
        return "upload"
    if path.startswith(("/dltasks", "/trained-models")):
        return "training"
    if method == "GET":
        return "read"
    return {"DELETE": "delete"}.get(method, "create")


def newest(items: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The item created last, by ``created_at`` in any of the forms ``epoch_seconds`` reads.

    Takes a non-empty list as the server gave it; on a tie or a missing time the earlier item
    wins, as servers list datasets, tasks and models newest first. Raises ValueError when
    ``items`` is empty.
    """
    return max(items, key=lambda item: epoch_seconds(item.get("created_at")) or 0.0)


def _strip_userinfo(url: str) -> str:
    """Return ``url`` without any ``user:password@`` part, for messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """Yield ``exc`` and every exception it wraps (causes, contexts, urllib3 reasons, args)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for inner in (
            current.__cause__,
            current.__context__,
            getattr(current, "reason", None),
            *current.args,
        ):
            if isinstance(inner, BaseException):
                todo.append(inner)


def _os_reason(exc: BaseException) -> str | None:
    """Return the operating system's words for a network failure ("connection refused")."""
    for inner in _exception_chain(exc):
        if isinstance(inner, OSError) and inner.strerror:
            return inner.strerror.lower()
    return None


def _retry_after(value: str | None) -> float | None:
    """Parse a ``Retry-After`` header (seconds or an HTTP date) into seconds from now."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _body_kind(response: requests.Response) -> str:
    """Describe a body that is not JSON: "HTML", "an empty body" or "a non-JSON body"."""
    content_type = response.headers.get("Content-Type", "").lower()
    head = response.content[:200].lstrip().lower()
    if "html" in content_type or head.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    if not head:
        return "an empty body"
    return "a non-JSON body"


def _fault_of(body: object) -> str | None:
    """Return the server's explanation from an error body, if it gave one."""
    if isinstance(body, Mapping):
        fault = body.get("fault")
        if isinstance(fault, str) and fault:
            return fault
    return None


# What the product says of an object that does not exist [client: IBM's CLI tests].
_MISSING_TEXTS = ("could not find", "unknown ", "does not exist", "not found:")
_GENERIC_404 = "http 404 not found"


def _object_missing(body: object, fault: str | None, missing: str | None) -> bool:
    """Whether a 404 says the object asked for is gone (rather than the route unknown).

    The product names the object ("Could not find dataset …", "Unknown dataset"); its generic
    404 body ("HTTP 404 Not Found") is what any unknown path gets, and is taken for a missing
    object only on a path that names one (``missing``).
    """
    text = (fault or "").strip().lower()
    if text and text != _GENERIC_404:
        return any(marker in text for marker in _MISSING_TEXTS)
    is_not_found = isinstance(body, Mapping) and body.get("type") == "NotFoundException"
    return is_not_found and missing is not None


def _list_of_dicts(body: object, what: str, where: str) -> list[dict[str, Any]]:
    """Check that an answer is a JSON array of objects; return it.

    Raises MviError when it is not (a server speaking another version of the API).
    """
    if not isinstance(body, list) or not all(isinstance(item, dict) for item in body):
        raise MviError(
            f"the server at {where} answered {what} with something other than a list of "
            "objects; is the endpoint an MVI / PowerAI Vision API?"
        )
    return body


def _string_field(body: object, key: str, what: str, where: str) -> str:
    """Return ``body[key]`` when it is a non-empty string.

    Raises AmbiguousError otherwise: the server said success, so the object was probably
    created even though its id is missing.
    """
    value = body.get(key) if isinstance(body, Mapping) else None
    if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
        return str(value)
    raise AmbiguousError(
        f"the server at {where} accepted {what} but did not return its {key}; "
        "check on the server whether it was created",
        reason=f"no {key} in the answer",
    )


def _is_safe_to_resend(exc: BaseException) -> bool:
    """Retry a non-idempotent request only when it certainly was not processed."""
    return is_retryable(exc) and not isinstance(exc, AmbiguousError)


# --------------------------------------------------------------------------- client


class MviClient:
    """A client for one MVI server, shared by the service's threads.

    Authenticates either with a user name and password (``POST /tokens``, renewed when a
    request answers 401) or with an API key (MVI 8.x, sent as is). ``verify`` is True,
    False (no certificate check — insecure) or the path of a CA bundle; ``timeout`` bounds
    each read from the server in seconds; ``retry`` and ``stop_event`` govern how idempotent
    calls are retried and when retrying ends; ``on_wait`` is called before each back-off wait.

    Raises ValueError when the credentials are neither a user/password pair nor an API key,
    and TlsError when ``verify`` names a file that does not exist.
    """

    def __init__(
        self,
        base_url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        api_key: str | None = None,
        verify: bool | str = True,
        timeout: float = 30.0,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen dataclass, immutable
        stop_event: threading.Event | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        if api_key and (username or password):
            raise ValueError("give either a user name and password or an API key, not both")
        if not api_key and not (username and password):
            raise ValueError("give a user name and password, or an API key")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self._base = base_url.rstrip("/")
        self._where = _strip_userinfo(self._base)
        self._host = urlsplit(self._base).netloc.rsplit("@", 1)[-1] or self._where
        self._username = username
        self._password = password
        self._api_key = api_key or None
        if isinstance(verify, str) and not Path(verify).is_file():
            raise TlsError(
                f"the CA bundle {verify!r} given as credentials.verify does not exist; "
                "give the path of the server's CA certificate (PEM), or true, or false"
            )
        if verify is False:
            _log.warning(
                "TLS certificate verification is OFF for %s: the connection can be intercepted; "
                "set credentials.verify to the server's CA bundle instead",
                self._where,
            )
            # The user chose this explicitly and was told once above; urllib3 would otherwise
            # repeat its warning on every single request for months.
            warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
        self._timeout = (min(timeout, _MAX_CONNECT_TIMEOUT), timeout)
        self._retry = retry
        self._stop = stop_event if stop_event is not None else threading.Event()
        # Called before each back-off wait of a retried request (the service counts it as a
        # sign of life of the thread that waits).
        self._on_wait = on_wait
        # What the last request met (None before the first): False when it got no answer or
        # a 5xx, True otherwise. Read by the health endpoints and the systemd status line.
        self.reachable: bool | None = None
        # Back-off waits of retried requests, by operation (see _operation), since the start.
        self.retries: Counter[str] = Counter()
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"paiv-sync/{__version__}"
        self._session.headers["Accept"] = "application/json"
        adapter = _Adapter()
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)
        # requests reads the proxy and CA-bundle variables from the environment again for every
        # request (about a millisecond with a typical environment, on every upload); read them
        # once here instead, with the same rules, and stop requests from reading them again.
        settings = self._session.merge_environment_settings(self._base, {}, None, verify, None)
        self._session.trust_env = False
        self._session.proxies.update(settings.get("proxies") or {})
        found = settings.get("verify")
        self._verify: bool | str = found if isinstance(found, (bool, str)) else verify
        self._token: str | None = self._api_key
        self._auth_lock = threading.Lock()
        self._category_lock = threading.Lock()
        self._category_ids: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the HTTP connections; the client must not be used afterwards."""
        self._session.close()

    def __enter__(self) -> MviClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ authentication

    def authenticate(self) -> None:
        """Log in (password mode) or check the API key, with one attempt.

        Raises AuthError when the credentials are refused, TlsError when the certificate
        cannot be verified, TransientError when the server cannot be reached or fails.
        """
        if self._api_key is not None:
            try:
                self._request_once("GET", "/datasets", token=self._api_key, idempotent=True)
            except _Unauthorized as exc:
                raise self._api_key_rejected() from exc
            _log.info("using an API key at %s", self._where)
            return
        with self._auth_lock:
            self._login()
        _log.info("authenticated as %s at %s", self._username, self._where)

    def _login(self) -> str:
        """POST /tokens and remember the token; the caller holds ``_auth_lock``.

        Raises AuthError, TlsError, TransientError.
        """
        payload = {"grant_type": "password", "username": self._username, "password": self._password}
        try:
            body = self._request_once("POST", "/tokens", json=payload, idempotent=True)
        except _Unauthorized as exc:
            detail = f": {exc.fault}" if exc.fault else ""
            raise AuthError(
                f"the server at {self._where} refused the user name or password for user "
                f"{self._username!r} (HTTP 401{detail}); check credentials.username and "
                "credentials.password",
                status=401,
                fault=exc.fault,
            ) from exc
        except (NotFoundError, RequestError) as exc:
            if exc.status is not None and 200 <= exc.status < 300:
                # "result": "fail" inside a 200 from /tokens says nothing about the password
                # (a wrong one is a 401): a passing server fault, so the caller may retry.
                raise TransientError(
                    f"the server at {self._where} failed to issue a token ({exc.reason})",
                    status=exc.status,
                    fault=exc.fault,
                ) from exc
            if exc.status != 404:
                raise
            raise AuthError(
                f"the server at {self._where} has no /tokens endpoint (HTTP 404): either the "
                "endpoint is wrong (it should end in the API's base path, e.g. /api) or this "
                "is MVI 8.x or later, which accepts only API keys — create one in the MVI UI "
                "and set credentials.api_key",
                status=404,
            ) from exc
        token = body.get("token") if isinstance(body, Mapping) else None
        if not isinstance(token, str) or not token:
            raise AuthError(
                f"the server at {self._where} accepted the login of {self._username!r} "
                "but returned no token; is the endpoint an MVI / PowerAI Vision API?"
            )
        self._token = token
        return token

    def _current_token(self) -> str:
        """Return the token to send, logging in first when there is none yet."""
        with self._auth_lock:
            if self._token is not None:
                return self._token
            token = self._login()
        _log.info("authenticated as %s at %s", self._username, self._where)
        return token

    def _renew_token(self, refused: str) -> str:
        """Log in again after ``refused`` was answered with 401; return the new token.

        Several threads may see the same 401 at once: only the first logs in, the others
        use the token it obtained.
        """
        with self._auth_lock:
            if self._token is not None and self._token != refused:
                return self._token
            _log.info(
                "the server at %s refused the session token (expired?); logging in again as %s",
                self._where,
                self._username,
            )
            return self._login()

    def _api_key_rejected(self) -> AuthError:
        return AuthError(
            f"the API key was rejected (revoked?) by the server at {self._where} (HTTP 401); "
            "create a new one in the MVI UI and set credentials.api_key",
            status=401,
        )

    # ------------------------------------------------------------------ HTTP core

    def _request_once(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        params: Mapping[str, str | int] | None = None,
        json: object = None,
        make_body: Callable[[], _MultipartBody] | None = None,
        idempotent: bool,
        missing: str | None = None,
        result_list: bool = False,
    ) -> Any:
        """Send one request and return its decoded JSON answer.

        ``token`` goes into X-Auth-Token; ``make_body`` builds a streamed multipart body;
        ``idempotent`` says whether a lost answer may be ignored (else AmbiguousError);
        ``missing`` names the object for a 404 message ("dataset 5f…").

        Raises _Unauthorized (401), NotFoundError, RequestError, TransientError,
        AmbiguousError, TlsError, MviError; OSError when a file to upload cannot be read.
        """
        headers: dict[str, str] = {}
        if token is not None:
            headers["X-Auth-Token"] = token
        body = make_body() if make_body is not None else None
        if body is not None:
            headers["Content-Type"] = body.content_type
        started = time.monotonic()
        try:
            response = self._session.request(
                method,
                self._base + path,
                params=params,
                json=json,
                data=body,
                headers=headers,
                timeout=self._timeout,
                verify=self._verify,
                # A redirect would turn a POST into a GET; report it instead of following it.
                allow_redirects=False,
            )
        except _SourceError as exc:
            # The body was cut short, so the server cannot have stored this request.
            _log.debug("%s %s abandoned: %s", method, path, exc.error)
            raise exc.error from None
        except requests.exceptions.RequestException as exc:
            self.reachable = False
            elapsed = time.monotonic() - started
            error = self._network_error(exc, method, path, idempotent)
            _log.debug("%s %s failed after %.3f s: %s", method, path, elapsed, error.reason)
            raise error from exc
        finally:
            if body is not None:
                body.close()
        self.reachable = response.status_code < 500
        _log.debug(
            "%s %s -> %d in %.3f s", method, path, response.status_code, time.monotonic() - started
        )
        return self._decode(
            response,
            method,
            path,
            idempotent=idempotent,
            missing=missing,
            result_list=result_list,
        )

    def _network_error(
        self, exc: requests.exceptions.RequestException, method: str, path: str, idempotent: bool
    ) -> MviError:
        """Turn a requests exception (no HTTP answer) into the matching MviError."""
        chain = list(_exception_chain(exc))
        os_reason = _os_reason(exc)
        if isinstance(exc, requests.exceptions.SSLError):
            text = " ".join(str(e) for e in chain)
            if "CERTIFICATE_VERIFY_FAILED" in text or any(
                type(e).__name__ == "SSLCertVerificationError" for e in chain
            ):
                return TlsError(
                    f"could not verify the TLS certificate of {self._host}; if the server uses "
                    "a self-signed certificate, set credentials.verify to the path of its CA "
                    "bundle (PEM file), or to false to skip the check (insecure)",
                    reason="certificate verification failed",
                )
            if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
                return TlsError(
                    f"{self._host} does not speak TLS on that port; if the server uses plain "
                    "HTTP, write the endpoint with http:// instead of https://",
                    reason="not a TLS server",
                )
        never_sent = isinstance(exc, requests.exceptions.ConnectTimeout) or any(
            isinstance(e, urllib3.exceptions.NewConnectionError) for e in chain
        )
        if never_sent:
            if any(isinstance(e, urllib3.exceptions.NameResolutionError) for e in chain):
                reason = "host name not found"
            elif isinstance(exc, requests.exceptions.ConnectTimeout):
                reason = "connect timeout"
            else:
                reason = os_reason or "connection failed"
            return TransientError(
                f"could not connect to {self._host} ({reason}); is the MVI server running "
                "and the endpoint right?",
                reason=reason,
            )
        if isinstance(exc, requests.exceptions.Timeout):
            reason = f"no answer within {self._timeout[1]:g} s"
        elif isinstance(
            exc, (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)
        ):
            reason = f"connection lost: {os_reason}" if os_reason else "connection lost"
        else:
            return MviError(
                f"could not send {method} {path} to {self._where}: {type(exc).__name__}; "
                "check the endpoint in the configuration",
                reason=type(exc).__name__,
            )
        if idempotent:
            return TransientError(
                f"{method} {path} at {self._host} failed ({reason}); it will be retried",
                reason=reason,
            )
        return AmbiguousError(
            f"{method} {path} at {self._host} failed ({reason}) after the request was sent; "
            "the server may have processed it",
            reason=reason,
        )

    def _decode(
        self,
        response: requests.Response,
        method: str,
        path: str,
        *,
        idempotent: bool,
        missing: str | None,
        result_list: bool = False,
    ) -> Any:
        """Check status and body of an answer; return the decoded JSON.

        With ``result_list`` (uploads), an answer of any status but 401 whose body carries a
        ``resultList`` is returned as it is: the product answers a request in which some files
        failed with a 4xx and ``result: fail``, yet stores the others [client], so each file's
        fate is read from the list, never from the status.
        Raises the MviError subclass that fits the status and body (see ``_request_once``).
        """
        status = response.status_code
        try:
            body: Any = response.json()
            is_json = True
        except ValueError:
            body, is_json = None, False
        if (
            result_list
            and status != 401
            and isinstance(body, Mapping)
            and isinstance(body.get("resultList"), list)
        ):
            return body
        fault = _fault_of(body)
        call = f"{method} {path}"
        # Says what came back instead of a JSONDecodeError: usually a proxy's error page.
        answered = (
            None
            if is_json
            else f"the server at {self._where} answered {call} with {_body_kind(response)}, "
            f"not JSON (HTTP {status})"
        )
        if 200 <= status < 300:
            if answered is not None:
                error_type = TransientError if idempotent else AmbiguousError
                raise error_type(
                    f"{answered}; is the endpoint the API's base URL "
                    "(e.g. https://host/powerai-vision/api)?",
                    status=status,
                    reason=f"HTTP {status}, not JSON",
                )
            if isinstance(body, Mapping) and body.get("result") == "fail":
                raise RequestError(
                    f"the server at {self._where} refused {call}: {fault or 'it gave no reason'}",
                    status=status,
                    fault=fault,
                    reason="result: fail",
                )
            return body
        raise self._failure(response, call, body, fault, answered, idempotent, missing)

    def _failure(
        self,
        response: requests.Response,
        call: str,
        body: Any,
        fault: str | None,
        answered: str | None,
        idempotent: bool,
        missing: str | None,
    ) -> MviError:
        """The error for an answer that is not a 2xx (``answered``: what came, if not JSON)."""
        status = response.status_code
        where = self._where
        said = f": {fault}" if fault else ""
        if status == 401:
            return _Unauthorized(
                f"the server at {where} answered {call} with HTTP 401{said}",
                status=401,
                fault=fault,
            )
        if status == 404 and _object_missing(body, fault, missing):
            subject = missing or "the requested object"
            return NotFoundError(
                f"{subject} does not exist on the server at {where} "
                f"(HTTP 404 on {call}{said}); was it deleted?",
                status=404,
                fault=fault,
            )
        if status == 404 or status == 501:
            return NotSupportedError(
                f"the server at {where} has no {call} (HTTP {status}{said}); is the endpoint the "
                "API's base URL (e.g. https://host/powerai-vision/api), and is this an MVI / "
                "PowerAI Vision version that offers it?",
                status=status,
                fault=fault,
            )
        if status == 423 or (status == 409 and "lock" in (fault or "").lower()):
            return DatasetLocked(
                f"the server at {where} refused {call} while the dataset is locked "
                f"(HTTP {status}{said}); a training is probably running",
                status=status,
                fault=fault,
                reason="dataset locked",
            )
        retry_after = _retry_after(response.headers.get("Retry-After"))
        if status == 429:
            wait = f"; it asked to wait {retry_after:g} s" if retry_after is not None else ""
            return TransientError(
                f"the server at {where} is rate limiting {call} (HTTP 429){wait}",
                status=429,
                fault=fault,
                retry_after=retry_after,
            )
        if status >= 500:
            message = (
                f"the server at {where} failed {call} (HTTP {status}{said})"
                if answered is None
                else f"{answered} — a proxy error page?"
            )
            if idempotent:
                return TransientError(message, status=status, fault=fault, retry_after=retry_after)
            return AmbiguousError(
                f"{message}; it may have processed the request anyway",
                status=status,
                fault=fault,
            )
        if 300 <= status < 400:
            location = _strip_userinfo(response.headers.get("Location", "another address"))
            return RequestError(
                f"the server at {where} redirected {call} to {location} (HTTP {status}); "
                "set the endpoint to the address it redirects to",
                status=status,
            )
        hint = _REFUSAL_HINTS.get(status, "")
        message = f"the server at {where} refused {call} (HTTP {status}{said})"
        return RequestError(
            f"{message if answered is None else answered}{hint}", status=status, fault=fault
        )

    def _authorized(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        params: Mapping[str, str | int] | None = None,
        json: object = None,
        make_body: Callable[[], _MultipartBody] | None = None,
        missing: str | None = None,
        result_list: bool = False,
    ) -> Any:
        """Send one request with the current token; after a 401, log in again once and resend.

        A 401 means the request was not processed, so resending is safe even for a POST.
        Raises AuthError when the API key or the fresh token is refused; otherwise as
        ``_request_once``.
        """

        def send(token: str) -> Any:
            return self._request_once(
                method,
                path,
                token=token,
                params=params,
                json=json,
                make_body=make_body,
                idempotent=idempotent,
                missing=missing,
                result_list=result_list,
            )

        token = self._current_token()
        try:
            return send(token)
        except _Unauthorized as exc:
            if self._api_key is not None:
                raise self._api_key_rejected() from exc
        try:
            return send(self._renew_token(token))
        except _Unauthorized as exc:
            raise AuthError(
                f"the server at {self._where} refused {method} {path} even with a fresh token "
                f"for user {self._username!r} (HTTP 401); check that this user may access it",
                status=401,
                fault=exc.fault,
            ) from exc

    def _retrying(
        self,
        what: str,
        retry_if: Callable[[BaseException], bool] = is_retryable,
        *,
        policy: RetryPolicy | None = None,
    ) -> tenacity.Retrying:
        return build_retrying(
            policy or self._retry,
            stop_event=self._stop,
            retry_if=retry_if,
            logger=_log,
            what=what,
            sleep=lambda seconds: self._wait(seconds, _operation(what)),
        )

    def _wait(self, seconds: float, operation: str) -> None:
        """A back-off wait between two tries: counted, a sign of life, and it ends on shutdown."""
        self.retries[operation] += 1
        if self._on_wait is not None:
            self._on_wait()
        self._stop.wait(seconds)

    def _get(
        self,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        missing: str | None = None,
        retry: bool = True,
    ) -> Any:
        """GET with retries on every TransientError (a GET changes nothing on the server);
        one try only without ``retry`` (for a question that may as well be asked later)."""
        if not retry:
            return self._authorized("GET", path, idempotent=True, params=params, missing=missing)
        return self._retrying(f"GET {path}")(
            self._authorized, "GET", path, idempotent=True, params=params, missing=missing
        )

    def _post(self, path: str, payload: Mapping[str, Any], *, missing: str | None = None) -> Any:
        """POST JSON, retrying only failures after which the request was surely not processed."""
        return self._retrying(f"POST {path}", _is_safe_to_resend)(
            self._authorized, "POST", path, idempotent=False, json=payload, missing=missing
        )

    # ------------------------------------------------------------------ datasets

    def list_datasets(self) -> list[dict[str, Any]]:
        """Return every dataset (newest first, as the server lists them).

        Raises MviError subclasses as described in the module docstring.
        """
        return _list_of_dicts(self._get("/datasets"), "the list of datasets", self._where)

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        """Return the dataset ``dataset_id``.

        Raises NotFoundError when it does not exist (deleted?), other MviErrors otherwise.
        """
        missing = f"dataset {dataset_id}"
        body = self._get(f"/datasets/{quote(dataset_id, safe='')}", missing=missing)
        if not isinstance(body, dict):
            raise MviError(f"the server at {self._where} answered {missing} with a non-object")
        return body

    def create_dataset(self, name: str) -> str:
        """Create a dataset called ``name`` (names need not be unique); return its id.

        Raises AmbiguousError when it may have been created anyway (look it up by name
        before creating again), other MviErrors otherwise.
        """
        body = self._post("/datasets", {"name": name})
        dataset_id = _string_field(body, "dataset_id", f"dataset {name!r}", self._where)
        _log.debug("created dataset %r (%s)", name, dataset_id)
        return dataset_id

    # ------------------------------------------------------------------ categories

    def list_categories(self, dataset_id: str) -> list[dict[str, Any]]:
        """Return the categories of dataset ``dataset_id``.

        Raises NotFoundError when the dataset does not exist, other MviErrors otherwise.
        """
        body = self._get(
            f"/datasets/{quote(dataset_id, safe='')}/categories", missing=f"dataset {dataset_id}"
        )
        return _list_of_dicts(body, f"the categories of dataset {dataset_id}", self._where)

    def create_category(self, dataset_id: str, name: str) -> str:
        """Create category ``name`` in dataset ``dataset_id``; return its id.

        Raises AmbiguousError when it may have been created anyway, NotFoundError when the
        dataset does not exist, other MviErrors otherwise.
        """
        body = self._post(
            f"/datasets/{quote(dataset_id, safe='')}/categories",
            {"name": name},
            missing=f"dataset {dataset_id}",
        )
        category_id = _string_field(body, "dataset_category_id", f"category {name!r}", self._where)
        _log.info("created category %r (%s) in dataset %s", name, category_id, dataset_id)
        return category_id

    def find_category(self, dataset_id: str, name: str) -> str | None:
        """The id of category ``name`` in the dataset, or None when it has none of that name.

        From the cache when known; else one listing, whose every category is cached, so a
        dataset's existing categories cost one request, not one each.
        """
        with self._category_lock:  # a thread that waited here finds what the other listed
            cached = self._category_ids.get((dataset_id, name))
            if cached is not None:
                return cached
            return self._listed_category(dataset_id, name)

    def _listed_category(self, dataset_id: str, name: str) -> str | None:
        """List the dataset's categories (caching them all); the id of ``name`` among them."""
        for category in self.list_categories(dataset_id):
            if category.get("name") and category.get("_id"):
                self._category_ids[(dataset_id, str(category["name"]))] = str(category["_id"])
        return self._category_ids.get((dataset_id, name))

    def ensure_category(self, dataset_id: str, name: str) -> str:
        """Return the id of category ``name`` in dataset ``dataset_id``, creating it if needed.

        Ids are cached. The server is asked before every create, also after an ambiguous
        create, so a lost answer never yields a second category of the same name.
        Raises NotFoundError when the dataset does not exist, other MviErrors otherwise.
        """
        key = (dataset_id, name)
        # One lock for all categories: creating one is rare, and two threads creating the
        # same category at once would otherwise both find it missing.
        with self._category_lock:
            cached = self._category_ids.get(key)
            if cached is not None:
                return cached

            def find_or_create() -> str:
                found = self._listed_category(dataset_id, name)
                return found if found is not None else self.create_category(dataset_id, name)

            # Only an ambiguous create is retried here (by looking up again); the GET and
            # POST inside already retry the failures that are safe to retry.
            category_id: str = self._retrying(
                f"creating category {name!r}", lambda exc: isinstance(exc, AmbiguousError)
            )(find_or_create)
            self._category_ids[key] = category_id
            return category_id

    # ------------------------------------------------------------------ files

    def upload(
        self,
        dataset_id: str,
        parts: Sequence[UploadPart],
        *,
        category_name: str,
        category_id: str | None,
        metadata: Mapping[str, str] | None = None,
    ) -> list[FileResult]:
        """Upload ``parts`` into dataset ``dataset_id`` under a category, in ONE request.

        ``metadata`` is sent as the ``user-metadata`` field: the server attaches it to every
        file of the request (servers that do not know the field ignore it).
        Returns one FileResult per part, in the order of ``parts``, read from the answer's
        ``resultList`` whatever its status. The request is sent again only when it surely was
        not processed (connection never established, 429, 401 followed by a new login).
        Raises AmbiguousError when the server may have stored the files (compare with
        ``list_files`` before sending them again), NotFoundError when the dataset is gone,
        RequestError when the server refused the whole request without a per-file list,
        DatasetLocked while a training holds the dataset (nothing stored; not retried here),
        other MviErrors as in the module docstring, and OSError when a file cannot be read or
        changes while sent.
        """
        if not parts:
            return []
        # Form fields before the files, as IBM's library sends them.
        fields: dict[str, str] = {}
        if metadata:
            fields["user-metadata"] = json.dumps(dict(metadata), sort_keys=True)
        fields["category_name"] = category_name
        if category_id is not None:
            fields["category_id"] = category_id
        path = f"/datasets/{quote(dataset_id, safe='')}/files"
        bodies: list[_MultipartBody] = []

        def make_body() -> _MultipartBody:
            bodies.append(_MultipartBody(fields, parts))
            return bodies[-1]

        body = self._retrying(
            f"POST {path} ({len(parts)} files)",
            lambda exc: _is_safe_to_resend(exc) and not isinstance(exc, DatasetLocked),
        )(
            self._authorized,
            "POST",
            path,
            idempotent=False,
            make_body=make_body,
            missing=f"dataset {dataset_id}",
            result_list=True,
        )
        results = self._file_results(parts, body, path)
        digests = bodies[-1].digests if bodies else []
        if len(digests) == len(results):
            results = [
                dataclasses.replace(r, sent_sha256=d) for r, d in zip(results, digests, strict=True)
            ]
        for result in results:
            if result.ok:
                _log.debug("uploaded %s as %s", result.name, result.file_id)
            else:
                _log.debug("the server refused %s: %s", result.name, result.fault)
        return results

    def _file_results(
        self, parts: Sequence[UploadPart], body: object, path: str
    ) -> list[FileResult]:
        """Match the server's ``resultList`` to ``parts``.

        By position when the list has one entry per part and the names agree, else by
        ``original_file_name``. Raises AmbiguousError when some part cannot be matched: the
        server answered success, so it may well have stored it.
        """
        entries = body.get("resultList") if isinstance(body, Mapping) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise AmbiguousError(
                f"the server at {self._where} answered POST {path} without a usable resultList; "
                "the files may have been stored — compare with the dataset's file list",
                reason="no resultList",
            )
        names = [e.get("original_file_name") for e in entries]
        sent = [wire_name(p.name) for p in parts]  # what the server saw and records
        if len(entries) == len(parts) and all(
            n is None or n == w for n, w in zip(names, sent, strict=True)
        ):
            matched: list[dict[str, Any] | None] = list(entries)
        else:
            by_name: dict[str, deque[dict[str, Any]]] = {}
            for entry, entry_name in zip(entries, names, strict=True):
                if isinstance(entry_name, str):
                    by_name.setdefault(entry_name, deque()).append(entry)
            matched = [by_name[w].popleft() if by_name.get(w) else None for w in sent]
        unmatched = [p.name for p, e in zip(parts, matched, strict=True) if e is None]
        if unmatched:
            raise AmbiguousError(
                f"the server at {self._where} answered POST {path} without a result for "
                f"{', '.join(unmatched[:5])}{' …' if len(unmatched) > 5 else ''}; the files "
                "may have been stored — compare with the dataset's file list",
                reason="incomplete resultList",
            )
        results = []
        for part, entry in zip(parts, matched, strict=True):
            assert entry is not None
            ok = entry.get("result") == "success"
            file_id = entry.get("_id")
            results.append(
                FileResult(
                    name=part.name,
                    ok=ok,
                    file_id=str(file_id) if ok and file_id is not None else None,
                    fault=None if ok else (_fault_of(entry) or "the server gave no reason"),
                )
            )
        return results

    def delete_file(self, dataset_id: str, file_id: str, *, tries: int | None = None) -> None:
        """Delete file ``file_id`` of dataset ``dataset_id``; one that is gone already is fine.

        ``tries`` bounds the attempts (the client's retry policy otherwise). Raises
        NotSupportedError when the server does not delete files, other MviErrors otherwise.
        """
        path = f"/datasets/{quote(dataset_id, safe='')}/files/{quote(file_id, safe='')}"
        policy = None if tries is None else dataclasses.replace(self._retry, max_attempts=tries)
        try:
            self._retrying(f"DELETE {path}", policy=policy)(
                self._authorized, "DELETE", path, idempotent=True, missing=f"file {file_id}"
            )
        except NotFoundError:
            _log.debug("file %s of dataset %s was gone already", file_id, dataset_id)

    def list_files(
        self,
        dataset_id: str,
        *,
        category_id: str | None = None,
        query: str | None = None,
        sortby: str | None = None,
        limit: int | None = None,
        skip: int | None = None,
        retry: bool = True,
    ) -> list[dict[str, Any]]:
        """Return files of dataset ``dataset_id``, optionally filtered, sorted and paged
        (one try only without ``retry``).

        ``query`` is MVI's ``field op value`` terms (``original_file_name == "a.jpg"``,
        ``metadata.key == "v"``); ``sortby`` a field, ``"field DESC"`` for descending (the
        server's default order is newest first). Raises NotFoundError when the dataset does
        not exist, other MviErrors otherwise.
        """
        params: dict[str, str | int] = {}
        if category_id is not None:
            params["category_id"] = category_id
        if query is not None:
            params["query"] = query
        if sortby is not None:
            params["sortby"] = sortby
        if limit is not None:
            params["limit"] = limit
        if skip is not None:
            params["skip"] = skip
        body = self._get(
            f"/datasets/{quote(dataset_id, safe='')}/files",
            params=params or None,
            missing=f"dataset {dataset_id}",
            retry=retry,
        )
        return _list_of_dicts(body, f"the files of dataset {dataset_id}", self._where)

    def iter_files(
        self,
        dataset_id: str,
        *,
        category_id: str | None = None,
        query: str | None = None,
        page_size: int = 1000,
    ) -> Iterator[dict[str, Any]]:
        """Yield every file of dataset ``dataset_id`` (optionally one category, or those that
        match ``query``) once, page by page.

        Pages are asked for oldest first (``sortby=created_at,_id``): files that arrive while
        paging then land after the pages already read instead of shifting them, as they would
        in the server's default newest-first order. A file seen twice all the same (a server
        that ignores ``sortby``, files deleted meanwhile) is yielded once, by ``_id``.
        Raises as ``list_files``; MviError when the server ignores ``skip`` (it would
        otherwise loop forever).
        """
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        skip = 0
        seen: set[object] = set()
        previous: list[object] = []
        repeated = False
        while True:
            page = self.list_files(
                dataset_id,
                category_id=category_id,
                query=query,
                # Times are in milliseconds: files of one request share one; the id breaks ties,
                # so that the order, hence the pages, cannot change between two requests.
                sortby="created_at,_id",
                limit=page_size,
                skip=skip,
            )
            if not page:
                return
            ids = [item.get("_id") for item in page]
            if skip and ids == previous and None not in ids:
                # The very page asked for before. Exactly a page of arrivals in between can do
                # that on a server that ignores sortby; asking once more tells the two apart.
                if repeated:
                    raise MviError(
                        f"the server at {self._where} ignores the skip parameter when listing "
                        "files; cannot page through the dataset"
                    )
                repeated = True
                continue
            repeated = False
            previous = ids
            for item, file_id in zip(page, ids, strict=True):
                if file_id is not None:
                    if file_id in seen:
                        continue
                    seen.add(file_id)
                yield item
            # A page longer than asked for means the server ignored limit and sent everything.
            if len(page) != page_size:
                return
            skip += page_size

    def file_metadata(self, dataset_id: str, file_id: str, *, retry: bool = True) -> dict[str, Any]:
        """Return the user metadata of one file (``GET …/files/{fid}/user-metadata``); one
        try only without ``retry``.

        Raises NotSupportedError on a server without user metadata, NotFoundError when the
        dataset or file does not exist, other MviErrors otherwise.
        """
        path = f"/datasets/{quote(dataset_id, safe='')}/files/{quote(file_id, safe='')}"
        body = self._get(f"{path}/user-metadata", missing=f"file {file_id}", retry=retry)
        if not isinstance(body, dict):
            raise MviError(f"the server at {self._where} answered {path} with a non-object")
        return body

    # ------------------------------------------------------------------ training

    def start_training(
        self,
        dataset_id: str,
        name: str,
        *,
        pretrained_model: str | None = None,
        strategy: Mapping[str, Any] | None = None,
    ) -> str:
        """Start training a classification model called ``name`` on ``dataset_id``.

        ``pretrained_model`` (an earlier trained task's id) makes it a retraining;
        ``strategy`` holds training settings. Returns the task id.
        Raises AmbiguousError when the task may have been started anyway (look the name up
        in ``list_tasks`` before starting again), RequestError when the server refuses
        (e.g. too few images), other MviErrors otherwise.
        """
        payload: dict[str, Any] = {
            "name": name,
            "dataset_id": dataset_id,
            "usage": "cic",
            "action": "create",
        }
        if pretrained_model is not None:
            payload["pretrained_model"] = pretrained_model
        if strategy is not None:
            payload["strategy"] = dict(strategy)
        body = self._post("/dltasks", payload, missing=f"dataset {dataset_id}")
        task_id = _string_field(body, "task_id", f"training task {name!r}", self._where)
        _log.debug("started training task %r (%s) on dataset %s", name, task_id, dataset_id)
        return task_id

    def get_task(self, task_id: str) -> dict[str, Any]:
        """Return training task ``task_id`` (its ``status``: training, trained or failed).

        Raises NotFoundError when it does not exist, other MviErrors otherwise.
        """
        missing = f"training task {task_id}"
        body = self._get(f"/dltasks/{quote(task_id, safe='')}", missing=missing)
        if not isinstance(body, dict):
            raise MviError(f"the server at {self._where} answered {missing} with a non-object")
        return body

    def list_trained_models(self) -> list[dict[str, Any]]:
        """Return the trained models (their ``_id`` is their training task's id).

        Raises NotSupportedError on a server without ``/trained-models``, other MviErrors as
        in the module docstring.
        """
        body = self._get("/trained-models")
        return _list_of_dicts(body, "the list of trained models", self._where)

    def list_tasks(self, status: str | None = None) -> list[dict[str, Any]]:
        """Return the training tasks, only those in ``status`` when given.

        Raises MviErrors as described in the module docstring.
        """
        params = {"status": status} if status is not None else None
        body = self._get("/dltasks", params=params)
        return _list_of_dicts(body, "the list of training tasks", self._where)
