"""The emulator's HTTP side: a threaded server on loopback that serves the emulator's app.

Each connection gets its own thread. The server remembers its open connections so that
``stop()`` can close idle keep-alive connections and join every thread it started. What a
request does is decided in paiv_sync.emulator.app.
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
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from werkzeug.exceptions import ClientDisconnected
from werkzeug.serving import DechunkedInput
from werkzeug.wsgi import LimitedStream

from paiv_sync.emulator.app import App, Reply, Request, error_reply
from paiv_sync.emulator.options import EmulatorOptions, FaultOptions
from paiv_sync.emulator.records import (
    bad_request,
    fail_body,
)

log = logging.getLogger(__name__)

# An idle keep-alive connection is closed after this long, so abandoned clients cannot pile
# up threads in a long-running emulator.
_IDLE_TIMEOUT = 300.0
_HANDSHAKE_TIMEOUT = 10.0
_JOIN_TIMEOUT = 10.0


class _Server(socketserver.TCPServer):
    """A TCP server with a thread per connection that it can close and join on stop."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        app: App,
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
    """Reads one HTTP request at a time from a connection and answers it via ``App``."""

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
            self._send(error_reply(bad_request(str(exc))))
            return
        url = urlsplit(self.path)
        path = unquote(url.path).rstrip("/")
        request = Request(
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
            reply = Reply(500, fail_body("Internal error in the emulator (see its log)"))
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

    def _send(self, reply: Reply) -> None:
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
        self._app = App(self.options)
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
            try:
                # Only the TLS mode needs cryptography: it is the optional paiv-sync[tls].
                from paiv_sync.emulator import tls
            except ImportError as exc:
                raise RuntimeError(
                    "the emulator's TLS mode needs the cryptography package: "
                    "pip install 'paiv-sync[tls]'"
                ) from exc
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
