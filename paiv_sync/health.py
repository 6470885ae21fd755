"""Optional health and metrics endpoints: ``/healthz`` and Prometheus ``/metrics``.

Served on a loopback port by a small threaded werkzeug server. ``/livez`` (and its old name
``/healthz``) answers 200 while observer, pipeline and upload workers work (the same test as the
systemd watchdog) and 503 with the reason otherwise; ``/readyz`` answers 200 while the service can
do its job (started, working, the server reachable, the ledger writable) and 503 with every
reason otherwise. ``/metrics`` is rendered by ``prometheus_client`` from the ledger and
the service at scrape time, so nothing is counted twice and nothing is held in memory between
scrapes.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from paiv_sync import ledger as states
from paiv_sync.ledger import Ledger

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger(__name__)

_TRAINING_STATES = (states.REQUESTING, states.TRAINING, states.TRAINED, states.FAILED)


class Observed(Protocol):
    """What the endpoints read of a running service (paiv_sync.service.Service is one)."""

    @property
    def ledger(self) -> Ledger | None: ...  # None before the service has opened it

    @property
    def connected(self) -> bool: ...

    @property
    def upload_retries(self) -> int: ...

    @property
    def request_retries(self) -> Mapping[str, int]: ...

    @property
    def last_upload_time(self) -> float | None: ...

    def healthy(self) -> tuple[bool, str]: ...

    def readiness(self) -> list[str]: ...


class ServiceCollector(Collector):
    """Reads the service's ledger and counters when Prometheus scrapes."""

    def __init__(self, service: Observed) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        service = self._service
        healthy, _why = service.healthy()
        up = GaugeMetricFamily("paiv_sync_healthy", "1 while observer, pipeline and uploads work")
        up.add_metric([], 1.0 if healthy else 0.0)
        yield up
        connected = GaugeMetricFamily(
            "paiv_sync_server_connected", "1 while the MVI server is reachable and authenticated"
        )
        connected.add_metric([], 1.0 if service.connected else 0.0)
        yield connected
        ledger = service.ledger
        if ledger is None:
            return
        files = GaugeMetricFamily(
            "paiv_sync_files",
            "Files known to the ledger, by category and state",
            labels=["category", "state"],
        )
        for category, by_state in sorted(ledger.counts().items()):
            for state, count in by_state.items():
                files.add_metric([category, state], float(count))
        yield files
        uploads = CounterMetricFamily(
            "paiv_sync_uploads", "Files the server confirmed, over the ledger's life"
        )
        uploads.add_metric([], float(ledger.uploads_total()))
        yield uploads
        retries = CounterMetricFamily(
            "paiv_sync_upload_retries", "Upload back-off waits since this process started"
        )
        retries.add_metric([], float(service.upload_retries))
        yield retries
        requests = CounterMetricFamily(
            "paiv_sync_retries",
            "Back-off waits after a failed request or upload since this process started, by "
            "operation (login, read, upload, create, delete, training)",
            labels=["operation"],
        )
        for operation, count in sorted(service.request_retries.items()):
            requests.add_metric([operation], float(count))
        yield requests
        last = GaugeMetricFamily(
            "paiv_sync_last_upload_timestamp_seconds",
            "When this process last had a file confirmed (0: not yet)",
        )
        last.add_metric([], service.last_upload_time or 0.0)
        yield last
        training = GaugeMetricFamily(
            "paiv_sync_training_state",
            "1 for the state of the most recent training request",
            labels=["state"],
        )
        newest = ledger.last_training()
        for state in _TRAINING_STATES:
            training.add_metric(
                [state], 1.0 if newest is not None and newest.state == state else 0.0
            )
        yield training


class _QuietHandler(WSGIRequestHandler):
    """No access log: a scrape every 15 s would be a log line (coloured, even in the journal)
    every 15 s for months."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return None


class HealthServer:
    """The endpoints on ``host:port`` (port 0 picks a free one) in a background thread."""

    def __init__(self, service: Observed, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._service = service
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ServiceCollector(service))
        self._metrics_app = make_wsgi_app(registry)
        self._server: BaseWSGIServer = make_server(
            host, port, self._app, threaded=True, request_handler=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="paiv-health", daemon=True
        )

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        host, port = self._server.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        return f"http://{name}:{port}"

    def start(self) -> HealthServer:
        """Start serving; returns at once."""
        self._thread.start()
        log.info("health and metrics at %s/healthz and %s/metrics", self.url, self.url)
        return self

    def stop(self) -> None:
        """Stop serving and join the thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = Request(environ).path.rstrip("/")
        if path == "/metrics":
            result: Iterable[bytes] = self._metrics_app(environ, start_response)
            return result
        if path in ("/livez", "/healthz"):
            healthy, why = self._service.healthy()
            body: dict[str, Any] = {"status": "ok" if healthy else "unhealthy", "reason": why}
            response = Response(
                json.dumps(body), status=200 if healthy else 503, mimetype="application/json"
            )
        elif path == "/readyz":
            reasons = self._service.readiness()
            body = {"status": "not ready" if reasons else "ready", "reasons": reasons}
            response = Response(
                json.dumps(body), status=503 if reasons else 200, mimetype="application/json"
            )
        else:
            response = Response(
                "not found: try /livez, /readyz or /metrics\n", status=404, mimetype="text/plain"
            )
        return response(environ, start_response)
