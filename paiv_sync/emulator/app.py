"""The emulator's request logic: routes, authentication, faults, uploads and introspection.

A parsed :class:`Request` goes in, a :class:`Reply` comes out; the HTTP side
(paiv_sync.emulator.server) reads the one from a connection and writes the other to it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import IO, Any

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


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # percent-decoded, without trailing slashes
    params: Mapping[str, str]  # first value of each query parameter
    headers: Mapping[str, str]
    body: IO[bytes]
    content_type: str | None
    content_length: int | None


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any = None
    headers: tuple[tuple[str, str], ...] = ()
    drop: bool = False  # close the connection without answering


DROP = Reply(0, drop=True)

_Handler = Callable[[Request, Mapping[str, str]], Any]


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


class App:
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

    def dispatch(self, request: Request) -> Reply:
        """Answer one request (or decide to drop it)."""
        path = request.path
        if path == INTROSPECTION_PREFIX or path.startswith(INTROSPECTION_PREFIX + "/"):
            return self._introspect(request, path[len(INTROSPECTION_PREFIX) :])
        base = self.options.base_path
        if base and path != base and not path.startswith(base + "/"):
            return error_reply(not_found())
        return self._api(request, path[len(base) :])

    def _api(self, request: Request, path: str) -> Reply:
        route, args = _find(self.routes, request.method, path)
        key = f"{request.method} {route.template if route else '(unknown route)'}"
        self.state.count_request(key)
        try:
            return self._serve(request, path, key, route, args)
        finally:
            self.state.request_done(key)

    def _serve(
        self, request: Request, path: str, key: str, route: _Route | None, args: dict[str, Any]
    ) -> Reply:
        plan = self.faults.plan(is_upload=route is not None and route.is_upload, route=key)
        if plan.latency:
            self.stopping.wait(plan.latency)
        if plan.rate_limit:
            retry_after = f"{self.faults.retry_after():g}"
            log.debug("emulator: injected 429 for %s", key)
            return Reply(
                429,
                fail_body("Too many requests (injected fault)"),
                headers=(("Retry-After", retry_after),),
            )
        if plan.error_status is not None:
            phrase = HTTPStatus(plan.error_status).phrase
            log.debug("emulator: injected %d for %s", plan.error_status, key)
            return Reply(plan.error_status, fail_body(f"HTTP {plan.error_status} {phrase}"))
        if plan.drop:
            log.debug("emulator: injected drop for %s", key)
            return DROP
        if route is None:
            return error_reply(not_implemented(request.method, path))
        if plan.fail_in_200:
            log.debug("emulator: injected result:fail in a 200 for %s", key)
            return Reply(200, fail_body("The request could not be completed (injected fault)"))
        try:
            if route.needs_auth:
                args["_owner"] = self.state.authenticate(request.headers.get("x-auth-token"))
            reply = Reply(200, route.handler(request, args))
        except ApiError as exc:
            reply = error_reply(exc)
        if plan.store_then_drop:
            log.debug("emulator: injected store-then-drop for %s", key)
            return DROP
        return reply

    def _introspect(self, request: Request, path: str) -> Reply:
        route, args = _find(self.introspection_routes, request.method, path)
        if route is None:
            return error_reply(not_found())
        try:
            return Reply(200, route.handler(request, args))
        except ApiError as exc:
            return error_reply(exc)

    def _upload(self, request: Request, args: Mapping[str, str]) -> Any:
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

    def _reset(self, request: Request, args: Mapping[str, str]) -> Any:
        self.state.reset()
        self.faults.reset()
        return {"result": "success"}

    def _set_faults(self, request: Request, args: Mapping[str, str]) -> Any:
        body = _json(request)
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object of fault options")
        try:
            options = FaultOptions.from_mapping(body)
        except (TypeError, ValueError) as exc:
            raise bad_request(str(exc)) from exc
        self.faults.configure(options)
        return {"result": "success"}

    def _revoke(self, request: Request, args: Mapping[str, str]) -> Any:
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

    def _set_options(self, request: Request, args: Mapping[str, str]) -> Any:
        body = _json(request)
        if not isinstance(body, dict):
            raise bad_request("Expected a JSON object of run-time options")
        try:
            self.state.set_options(**body)
        except ValueError as exc:
            raise bad_request(str(exc)) from exc
        return {"result": "success"}

    def _delete_dataset(self, request: Request, args: Mapping[str, str]) -> Any:
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


def _json(request: Request) -> Any:
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


def error_reply(exc: ApiError) -> Reply:
    """The reply that carries ``exc``'s status and body."""
    return Reply(exc.status, exc.body)
