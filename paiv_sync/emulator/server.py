"""The emulator's HTTP side: a threaded server on loopback, routing, faults, introspection.

Each connection gets its own thread. The server remembers its open connections so that
``stop()`` can close idle keep-alive connections and join every thread it started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import socketserver
import ssl
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from werkzeug.exceptions import ClientDisconnected
from werkzeug.serving import DechunkedInput
from werkzeug.wsgi import LimitedStream

from paiv_sync.emulator import tls
from paiv_sync.emulator.faults import FaultInjector
from paiv_sync.emulator.options import EmulatorOptions, FaultOptions
from paiv_sync.emulator.records import (
    ApiError,
    bad_request,
    fail_body,
    not_found,
    not_implemented,
)
from paiv_sync.emulator.state import EmulatorState
from paiv_sync.emulator.uploads import UploadError, parse_upload

log = logging.getLogger(__name__)

INTROSPECTION_PREFIX = "/_emulator"

_MAX_JSON_BODY = 1024 * 1024
# An idle keep-alive connection is closed after this long, so abandoned clients cannot pile
# up threads in a long-running emulator.
_IDLE_TIMEOUT = 300.0
_HANDSHAKE_TIMEOUT = 10.0
_JOIN_TIMEOUT = 10.0


@dataclass(frozen=True)
class _Request:
    method: str
    path: str  # percent-decoded, without trailing slashes
    params: Mapping[str, str]  # first value of each query parameter
    headers: Mapping[str, str]
    body: IO[bytes]
    content_type: str | None
    content_length: int | None


@dataclass(frozen=True)
class _Reply:
    status: int
    body: Any = None
    headers: tuple[tuple[str, str], ...] = ()
    drop: bool = False  # close the connection without answering


_DROP = _Reply(0, drop=True)

_Handler = Callable[[_Request, Mapping[str, str]], Any]


@dataclass(frozen=True)
class _Route:
    method: str
    template: str
    handler: _Handler
    needs_auth: bool = True
    is_upload: bool = False

    def match(self, path: str) -> dict[str, str] | None:
        """Return the path's ``{id}`` values when it fits this route's template, else None."""
        want, got = self.template.split("/"), path.split("/")
        if len(want) != len(got):
            return None
        args: dict[str, str] = {}
        for pattern, segment in zip(want, got, strict=True):
            if pattern.startswith("{"):
                if not segment:
                    return None
                args[pattern.strip("{}")] = segment
            elif pattern != segment:
                return None
        return args


class _App:
    """The request logic: routes a parsed request to the state, with faults and introspection."""

    def __init__(self, options: EmulatorOptions) -> None:
        self.options = options
        self.state = EmulatorState(options)
        self.faults = FaultInjector(options.faults)
        # Set when the emulator stops, to cut injected latency short.
        self.stopping = threading.Event()
        s = self.state
        d, f, c = "/datasets/{id}", "/datasets/{id}/files/{fid}", "/datasets/{id}/categories/{cid}"
        self.routes = (
            _Route("POST", "/tokens", lambda r, a: s.issue_token(_json(r)), needs_auth=False),
            _Route("GET", "/datasets", lambda r, a: s.list_datasets(r.params)),
            _Route("POST", "/datasets", lambda r, a: s.create_dataset(_json(r))),
            _Route("GET", d, lambda r, a: s.get_dataset(a["id"])),
            _Route("DELETE", d, lambda r, a: s.api_delete_dataset(a["id"])),
            _Route("GET", d + "/categories", lambda r, a: s.list_categories(a["id"], r.params)),
            _Route("POST", d + "/categories", lambda r, a: s.create_category(a["id"], _json(r))),
            _Route("GET", c, lambda r, a: s.get_category(a["id"], a["cid"])),
            _Route("DELETE", c, lambda r, a: s.delete_category(a["id"], a["cid"])),
            _Route(
                "POST", c + "/action", lambda r, a: s.category_action(a["id"], a["cid"], _json(r))
            ),
            _Route("GET", d + "/files", lambda r, a: s.list_files(a["id"], r.params)),
            _Route("POST", d + "/files", self._upload, is_upload=True),
            _Route("GET", f, lambda r, a: s.get_file(a["id"], a["fid"])),
            _Route("DELETE", f, lambda r, a: s.delete_file(a["id"], a["fid"])),
            _Route(
                "GET", f + "/user-metadata", lambda r, a: s.get_user_metadata(a["id"], a["fid"])
            ),
            _Route(
                "POST",
                f + "/user-metadata",
                lambda r, a: s.add_user_metadata(a["id"], a["fid"], _json(r)),
            ),
            _Route(
                "DELETE",
                f + "/user-metadata",
                lambda r, a: s.delete_user_metadata(a["id"], a["fid"], _json(r)),
            ),
            _Route("GET", "/dltasks", lambda r, a: s.list_tasks(r.params)),
            _Route("POST", "/dltasks", lambda r, a: s.create_task(_json(r))),
            _Route("GET", "/dltasks/{id}", lambda r, a: s.get_task(a["id"])),
            _Route("GET", "/dltasks/{id}/status", lambda r, a: s.task_status(a["id"])),
            _Route("DELETE", "/dltasks/{id}", lambda r, a: s.delete_task(a["id"])),
            _Route("GET", "/trained-models", lambda r, a: s.list_models(r.params)),
            _Route("GET", "/trained-models/{id}", lambda r, a: s.get_model(a["id"])),
            _Route("DELETE", "/trained-models/{id}", lambda r, a: s.delete_model(a["id"])),
        )
        self.introspection_routes = (
            _Route("GET", "/state", lambda r, a: self.snapshot(), needs_auth=False),
            _Route("POST", "/reset", self._reset, needs_auth=False),
            _Route("POST", "/faults", self._set_faults, needs_auth=False),
            _Route("POST", "/revoke", self._revoke, needs_auth=False),
            _Route("POST", "/options", self._set_options, needs_auth=False),
            _Route("DELETE", "/datasets/{id}", self._delete_dataset, needs_auth=False),
        )

    def snapshot(self) -> dict[str, Any]:
        """The introspection view of the whole state."""
        return self.state.snapshot(self.faults.counts())

    def dispatch(self, request: _Request) -> _Reply:
        """Answer one request (or decide to drop it)."""
        path = request.path
        if path == INTROSPECTION_PREFIX or path.startswith(INTROSPECTION_PREFIX + "/"):
            return self._introspect(request, path[len(INTROSPECTION_PREFIX) :])
        base = self.options.base_path
        if base and path != base and not path.startswith(base + "/"):
            return _error(not_found())
        return self._api(request, path[len(base) :])

    def _api(self, request: _Request, path: str) -> _Reply:
        route, args = _find(self.routes, request.method, path)
        key = f"{request.method} {route.template if route else '(unknown route)'}"
        self.state.count_request(key)
        try:
            return self._serve(request, path, key, route, args)
        finally:
            self.state.request_done(key)

    def _serve(
        self, request: _Request, path: str, key: str, route: _Route | None, args: dict[str, Any]
    ) -> _Reply:
        plan = self.faults.plan(is_upload=route is not None and route.is_upload, route=key)
        if plan.latency:
            self.stopping.wait(plan.latency)
        if plan.rate_limit:
            retry_after = f"{self.faults.retry_after():g}"
            log.debug("emulator: injected 429 for %s", key)
            return _Reply(
                429,
                fail_body("Too many requests (injected fault)"),
                headers=(("Retry-After", retry_after),),
            )
        if plan.error_status is not None:
            phrase = HTTPStatus(plan.error_status).phrase
            log.debug("emulator: injected %d for %s", plan.error_status, key)
            return _Reply(plan.error_status, fail_body(f"HTTP {plan.error_status} {phrase}"))
        if plan.drop:
            log.debug("emulator: injected drop for %s", key)
            return _DROP
        if route is None:
            return _error(not_implemented(request.method, path))
        if plan.fail_in_200:
            log.debug("emulator: injected result:fail in a 200 for %s", key)
            return _Reply(200, fail_body("The request could not be completed (injected fault)"))
        try:
            if route.needs_auth:
                args["_owner"] = self.state.authenticate(request.headers.get("x-auth-token"))
            reply = _Reply(200, route.handler(request, args))
        except ApiError as exc:
            reply = _error(exc)
        if plan.store_then_drop:
            log.debug("emulator: injected store-then-drop for %s", key)
            return _DROP
        return reply

    def _introspect(self, request: _Request, path: str) -> _Reply:
        route, args = _find(self.introspection_routes, request.method, path)
        if route is None:
            return _error(not_found())
        try:
            return _Reply(200, route.handler(request, args))
        except ApiError as exc:
            return _error(exc)

    def _upload(self, request: _Request, args: Mapping[str, str]) -> Any:
        dataset_id = args["id"]
        # Refuse before reading a possibly large body into the parser.
        if not self.state.has_dataset(dataset_id):
            self.state.get_dataset(dataset_id)  # raises the product's 404
        try:
            form = parse_upload(request.body, request.content_type, request.content_length)
        except UploadError as exc:
            raise bad_request(str(exc)) from exc
        return self.state.store_upload(
            dataset_id,
            form,
            args.get("_owner", ""),
            lambda: self.faults.fail_file("POST /datasets/{id}/files"),
        )

    def _reset(self, request: _Request, args: Mapping[str, str]) -> Any:
        self.state.reset()
        self.faults.reset()
        return {"result": "success"}

    def _set_faults(self, request: _Request, args: Mapping[str, str]) -> Any:
        body = _json(request)
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object of fault options")
        try:
            options = FaultOptions.from_mapping(body)
        except (TypeError, ValueError) as exc:
            raise bad_request(str(exc)) from exc
        self.faults.configure(options)
        return {"result": "success"}

    def _revoke(self, request: _Request, args: Mapping[str, str]) -> Any:
        body = _json(request)
        if not isinstance(body, dict) or not set(body) <= {"tokens", "api_key"}:
            raise bad_request('Expected {"tokens": true} and/or {"api_key": "..."}')
        revoked = 0
        if body.get("tokens"):
            revoked = self.state.revoke_tokens()
        if "api_key" in body:
            try:
                self.state.revoke_api_key(str(body["api_key"]))
            except KeyError as exc:
                raise not_found() from exc
        return {"result": "success", "tokens_revoked": revoked}

    def _set_options(self, request: _Request, args: Mapping[str, str]) -> Any:
        body = _json(request)
        if not isinstance(body, dict):
            raise bad_request("Expected a JSON object of run-time options")
        try:
            self.state.set_options(**body)
        except ValueError as exc:
            raise bad_request(str(exc)) from exc
        return {"result": "success"}

    def _delete_dataset(self, request: _Request, args: Mapping[str, str]) -> Any:
        try:
            self.state.delete_dataset(args["id"])
        except KeyError as exc:
            raise not_found() from exc
        return {"result": "success"}


def _find(
    routes: tuple[_Route, ...], method: str, path: str
) -> tuple[_Route | None, dict[str, str]]:
    for route in routes:
        args = route.match(path)
        if args is not None and route.method == method:
            return route, args
    return None, {}


def _json(request: _Request) -> Any:
    """The request body parsed as JSON. Raises ApiError 400 when it is not JSON."""
    chunks: list[bytes] = []
    size = 0
    while chunk := request.body.read(64 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size > _MAX_JSON_BODY:
            raise bad_request(f"JSON body larger than {_MAX_JSON_BODY} bytes")
    data = b"".join(chunks)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"Malformed JSON body: {exc}") from exc


def _error(exc: ApiError) -> _Reply:
    return _Reply(exc.status, exc.body)


class _Server(socketserver.TCPServer):
    """A TCP server with a thread per connection that it can close and join on stop."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        app: _App,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app = app
        self.ssl_context = ssl_context
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._closing = False
        self._counter = 0
        super().__init__(address, _RequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._counter += 1
            thread = threading.Thread(
                target=self._serve_connection,
                args=(request, client_address),
                name=f"emulator-connection-{self._counter}",
                daemon=True,
            )
            self._threads.add(thread)
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            # A client that vanished or spoke garbage: nothing the emulator must act on.
            log.debug("emulator: connection from %s failed", client_address, exc_info=True)
        finally:
            self.shutdown_request(request)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def register(self, connection: socket.socket) -> bool:
        """Track an open connection; False when the server is closing (then drop it)."""
        with self._lock:
            if self._closing:
                return False
            self._connections.add(connection)
            return True

    def unregister(self, connection: socket.socket) -> None:
        """Forget a connection that was closed."""
        with self._lock:
            self._connections.discard(connection)

    def close_connections(self) -> None:
        """Refuse new connections and shut down the open ones (waking their threads)."""
        with self._lock:
            self._closing = True
            connections = list(self._connections)
        for connection in connections:
            _shutdown(connection)

    def join_threads(self, timeout: float) -> None:
        """Wait for every connection thread to end (logging any that would not)."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("emulator: connection thread %s did not stop", thread.name)


def _shutdown(connection: socket.socket) -> None:
    # The plain socket's shutdown: for TLS this skips the polite close_notify on purpose,
    # which both wakes a blocked reader and looks to the client like a dropped connection.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(connection, socket.SHUT_RDWR)


class _RequestHandler(BaseHTTPRequestHandler):
    """Reads one HTTP request at a time from a connection and answers it via ``_App``."""

    protocol_version = "HTTP/1.1"
    server_version = "paiv-sync-emulator"
    sys_version = ""
    timeout = _IDLE_TIMEOUT
    server: _Server

    def setup(self) -> None:
        server = self.server
        # Headers and body leave in separate writes; without this, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every answer.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if server.ssl_context is not None:
            self.request = server.ssl_context.wrap_socket(
                self.request, server_side=True, do_handshake_on_connect=False
            )
        if not server.register(self.request):
            self.request.close()
            raise ConnectionAbortedError("the emulator is stopping")
        try:
            super().setup()
            if isinstance(self.connection, ssl.SSLSocket):
                self.connection.settimeout(_HANDSHAKE_TIMEOUT)
                self.connection.do_handshake()
                self.connection.settimeout(self.timeout)
        except BaseException:
            server.unregister(self.request)
            self.request.close()
            raise

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # the client went away; there is nothing left to flush to
        finally:
            self.server.unregister(self.request)
            self.request.close()

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        try:
            body, content_length = self._body()
        except ValueError as exc:
            self.close_connection = True
            self._send(_error(bad_request(str(exc))))
            return
        url = urlsplit(self.path)
        path = unquote(url.path).rstrip("/")
        request = _Request(
            method=self.command,
            path=path,
            params=dict(reversed(parse_qsl(url.query, keep_blank_values=True))),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            content_type=self.headers.get("Content-Type"),
            content_length=content_length,
        )
        try:
            reply = self.server.app.dispatch(request)
            # Read what the handler left unread, so the next request on this connection
            # starts at the right place (and a dropped request was fully received).
            while body.read(64 * 1024):
                pass
        except (ClientDisconnected, OSError):
            self.close_connection = True
            return
        except Exception:
            # A bug in the emulator must show, not pass for an injected drop.
            log.exception("emulator: internal error answering %s %s", self.command, path)
            self.close_connection = True  # the body may be partly unread
            reply = _Reply(500, fail_body("Internal error in the emulator (see its log)"))
        if reply.drop:
            self.close_connection = True
            _shutdown(self.connection)
            return
        self._send(reply)

    def _body(self) -> tuple[IO[bytes], int | None]:
        """The request body as a stream that ends where the body ends; its length if known."""
        rfile = cast(IO[bytes], self.rfile)
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return cast(IO[bytes], DechunkedInput(rfile)), None
        raw = self.headers.get("Content-Length", "0").strip() or "0"
        if not raw.isdigit():
            raise ValueError(f"invalid Content-Length header {raw!r}")
        length = int(raw)
        return cast(IO[bytes], LimitedStream(rfile, length)), length

    def _send(self, reply: _Reply) -> None:
        data = json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in reply.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("emulator: %s %s", self.address_string(), format % args)


class Emulator:
    """A stand-in MVI server on a real socket; see ``docs/emulator.md``.

    Use as a context manager (``with Emulator(opts) as emu:``) or call :meth:`start` and
    :meth:`stop`. The state, reset and fault methods work before ``start`` too.
    """

    def __init__(self, options: EmulatorOptions | None = None) -> None:
        """Take the options (defaults: loopback, free port, ``/api``, user admin/passw0rd)."""
        self.options = options if options is not None else EmulatorOptions()
        self._app = _App(self.options)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._tmpdir: Path | None = None
        self._port: int | None = None
        self.cert_path: Path | None = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> Emulator:
        """Bind, start serving in a background thread, and return self.

        Connections are accepted as soon as this returns. Raises RuntimeError when already
        started, OSError when the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("the emulator is already running")
        context = None
        if self.options.tls:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="paiv-sync-emulator-"))
            self.cert_path, key_path = tls.write_self_signed(self._tmpdir, self.options.host)
            context = tls.server_context(self.cert_path, key_path)
        try:
            server = _Server((self.options.host, self.options.port), self._app, context)
        except BaseException:
            self._remove_tmpdir()
            raise
        self._app.stopping.clear()
        self._server = server
        # Kept after stop(): tests point clients at a server that has gone away.
        self._port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="emulator-server",
            daemon=True,
        )
        self._thread.start()
        log.info("emulator serving %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving, close every connection, join every thread, remove the temp files.

        Safe to call twice or before ``start``.
        """
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._app.stopping.set()
        server.shutdown()
        thread.join()
        server.close_connections()
        server.join_threads(_JOIN_TIMEOUT)
        server.server_close()
        self._server = self._thread = None
        self._remove_tmpdir()
        log.info("emulator stopped")

    @property
    def root_url(self) -> str:
        """``scheme://host:port`` it serves (or served, after ``stop``).

        Raises RuntimeError when it was never started (the port is not known yet).
        """
        if self._port is None:
            raise RuntimeError("the emulator has not been started")
        port = self._port
        host = self.options.host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.options.tls else 'http'}://{host}:{port}"

    @property
    def url(self) -> str:
        """The API's base URL, e.g. ``http://127.0.0.1:40123/api``."""
        return self.root_url + self.options.base_path

    def state(self) -> dict[str, Any]:
        """Everything the server holds; the same as ``GET /_emulator/state``."""
        return self._app.snapshot()

    def reset(self) -> None:
        """Clear all state and fault counts (options stay); the fault generator is reseeded."""
        self._app.state.reset()
        self._app.faults.reset()

    def set_faults(self, faults: FaultOptions) -> None:
        """Replace the fault options (and reseed the fault generator from their seed)."""
        self._app.faults.configure(faults)

    def set_options(self, **changes: Any) -> None:
        """Change run-time options: ``training_seconds``, ``token_lifetime``,
        ``training_outcome``, ``upload_failure_status``, ``locked_uploads``,
        ``finishing_error_rate``.

        Raises ValueError on an unknown option or an invalid value.
        """
        self._app.state.set_options(**changes)

    def finish_trainings(self) -> int:
        """End every running training now; return how many were running."""
        return self._app.state.finish_trainings()

    def revoke_tokens(self) -> None:
        """Revoke every token issued so far (the next call with one gets 401)."""
        self._app.state.revoke_tokens()

    def revoke_api_key(self, key: str) -> None:
        """Revoke an API key. Raises KeyError when it is not an active key."""
        self._app.state.revoke_api_key(key)

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset as a user would in the UI. Raises KeyError for an unknown id."""
        self._app.state.delete_dataset(dataset_id)

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
