"""The admin API's HTTP plumbing: one leaf resource that authenticates, parses
and routes every request, so no path can reach a handler another way.

Order of checks, for every method (HEAD and OPTIONS included): the bearer
token first (401 before anything else is looked at; fedgate.admin.channel
checks it, and the body's length, before the body is read), then the raw path
(dot segments and encoded slashes are refused, never normalised into
another route), then the route table (404, or 405 with ``Allow``), then the
body (413 over ``admin.max_body_bytes``, 1 MiB by default, 415 for a non-JSON type, 400 for malformed JSON).
Handlers get an :class:`ApiRequest` and return a JSON-able value, a
:class:`Reply`, or a Deferred of either; errors are :class:`ApiError`
values and always go out as JSON with a message.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs, unquote_to_bytes

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, resource, server

from fedgate.admin.auth import BearerCheck
from fedgate.admin.errors import ApiError, not_found  # noqa: F401 (imported from here too)
from fedgate.domain import InvalidDomain
from fedgate.storage.interface import StorageError

log = Logger(namespace="fedgate.admin")

MAX_BODY = 1024 * 1024
API_PREFIX = "/api/v1"
METRICS_PATH = b"/metrics"
_JSON_TYPE = re.compile(r"^application/(?:[\w.+-]+\+)?json$")
_BAD_PATH = re.compile(rb"%2f|%5c|\\", re.I)


@dataclass(frozen=True)
class Reply:
    body: Any = None
    status: int = 200
    content_type: str | None = None  # None: the body is JSON
    headers: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    handler: Callable
    #: "none" (no body read), "optional" or "required"
    body: str = "none"

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.template.strip("/").split("/"))


@dataclass
class ApiRequest:
    method: str
    path: str
    params: dict
    query: dict
    body: Any
    client: str

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


def error_body(status: int, message: str, extra: dict | None = None) -> dict:
    body = {"status": status, "error": http.RESPONSES.get(status, b"error").decode("ascii").lower(),
            "message": message}
    body.update(extra or {})
    return body


class AdminResource(resource.Resource):
    """Every admin request goes through :meth:`render`."""

    isLeaf = True

    def __init__(self, routes: list[Route], check: BearerCheck, metrics_open: bool = False,
                 max_body: int = MAX_BODY):
        super().__init__()
        self.routes = routes
        self.check = check
        self.metrics_open = metrics_open
        self.max_body = max_body

    # -- entry ----------------------------------------------------------------
    def render(self, request: server.Request):
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        try:
            route, params = self._authorize_and_route(request)
            if request.method == b"OPTIONS":
                return self._finish(request, Reply(None, 204, headers={"allow": params}))
            api_request = self._api_request(request, route, params)
        except ApiError as error:
            return self._finish(request, self._error_reply(error))
        d = defer.maybeDeferred(route.handler, api_request)
        d.addErrback(self._failed, api_request)
        d.addCallback(lambda reply: self._finish(request, reply))
        d.addErrback(lambda f: log.failure("Writing an admin response failed", f))
        return server.NOT_DONE_YET

    def _authorize_and_route(self, request) -> tuple[Route | None, Any]:
        raw = request.path
        if not token_exempt(request.method, raw, request.getClientAddress(), self.metrics_open):
            if not self.check.matches(request.getHeader(b"authorization")):
                raise ApiError(401, "a valid 'Authorization: Bearer <token>' header is required",
                               _headers={"www-authenticate": 'Bearer realm="fedgate"'})
        segments = _split_path(raw)
        method = request.method.decode("ascii", "replace")
        matched = [(route, params) for route in self.routes
                   if (params := _match(route.segments, segments)) is not None]
        if not matched:
            raise ApiError(404, "no such route")
        allowed = sorted({r.method for r, _ in matched} | {"OPTIONS"}
                         | ({"HEAD"} if any(r.method == "GET" for r, _ in matched) else set()))
        if method == "OPTIONS":
            return None, ", ".join(allowed)
        wanted = "GET" if method == "HEAD" else method
        for route, params in matched:
            if route.method == wanted:
                return route, params
        raise ApiError(405, f"{method} is not allowed here", _headers={"allow": ", ".join(allowed)})

    def _api_request(self, request, route: Route, params: dict) -> ApiRequest:
        body = None
        if route.body != "none":
            body = _read_body(request, route.body == "required", self.max_body)
        query = {k.decode("utf-8", "replace"): [v.decode("utf-8", "replace") for v in vs]
                 for k, vs in parse_qs(request.uri.partition(b"?")[2]).items()}
        client = request.getClientAddress()
        return ApiRequest(route.method, request.path.decode("ascii", "replace"), params, query, body,
                          f"{getattr(client, 'host', '?')}")

    # -- exits ----------------------------------------------------------------
    def _failed(self, failure, api_request: ApiRequest) -> Reply:
        if failure.check(ApiError):
            return self._error_reply(failure.value)
        if failure.check(InvalidDomain):
            return self._error_reply(ApiError(422, str(failure.value)))
        if failure.check(StorageError):
            log.error("Storage failed for {method} {path}: {error}", method=api_request.method,
                      path=api_request.path, error=failure.getErrorMessage())
            return self._error_reply(ApiError(503, f"storage unavailable: {failure.getErrorMessage()}"))
        log.failure("Admin handler failed for {method} {path}", failure,
                    method=api_request.method, path=api_request.path)
        return self._error_reply(ApiError(500, "internal error; see the gateway's log"))

    @staticmethod
    def _error_reply(error: ApiError) -> Reply:
        extra = dict(error.extra)
        headers = extra.pop("_headers", {})
        return Reply(error_body(error.status, error.message, extra), error.status, headers=headers)

    @staticmethod
    def _finish(request, reply) -> bytes | int:
        if not isinstance(reply, Reply):
            reply = Reply(reply)
        request.setResponseCode(reply.status)
        for name, value in reply.headers.items():
            request.setHeader(name.encode("ascii"), str(value).encode("utf-8"))
        if reply.status == 204 or reply.body is None and reply.content_type is None:
            data = b""
        elif reply.content_type is None:
            request.setHeader(b"content-type", b"application/json; charset=utf-8")
            data = json.dumps(reply.body, ensure_ascii=False, indent=1).encode("utf-8") + b"\n"
        else:
            request.setHeader(b"content-type", reply.content_type.encode("ascii"))
            data = reply.body if isinstance(reply.body, bytes) else str(reply.body).encode("utf-8")
        if request.startedWriting or getattr(request, "_disconnected", False):
            return server.NOT_DONE_YET
        request.setHeader(b"content-length", str(len(data)).encode("ascii"))
        if request.method != b"HEAD" and data:
            request.write(data)
        request.finish()
        return server.NOT_DONE_YET


def token_exempt(method: bytes, path: bytes, address, metrics_open: bool) -> bool:
    """Whether a request may go without the token: only ``GET /metrics``
    (or HEAD) from a loopback client, and only with ``admin.metrics_open``."""
    return (metrics_open and path == METRICS_PATH and method in (b"GET", b"HEAD")
            and _loopback(address))


def _loopback(address) -> bool:
    try:
        return ipaddress.ip_address(getattr(address, "host", "")).is_loopback
    except ValueError:
        return False


def _split_path(raw: bytes) -> tuple[str, ...]:
    """Decoded segments of a raw path; refuses what could alias another route."""
    if not raw.startswith(b"/") or _BAD_PATH.search(raw):
        raise ApiError(400, "malformed path (encoded slashes and backslashes are not accepted)")
    segments = []
    for part in raw[1:].split(b"/"):
        try:
            text = unquote_to_bytes(part).decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "malformed path (not UTF-8)") from None
        if text in (".", ".."):
            raise ApiError(400, "malformed path (dot segments are not accepted)")
        segments.append(text)
    return tuple(segments)


def _match(template: tuple[str, ...], segments: tuple[str, ...]) -> dict | None:
    if len(template) != len(segments):
        return None
    params = {}
    for want, got in zip(template, segments):
        if want.startswith("{") and want.endswith("}"):
            if not got:
                return None
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params


def _read_body(request, required: bool, limit: int) -> Any:
    length = request.getHeader(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the body is over {limit} bytes")
    data = request.content.read(limit + 1) if request.content is not None else b""
    if len(data) > limit:
        raise ApiError(413, f"the body is over {limit} bytes")
    content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
    mime = content_type.partition(";")[0].strip().lower()
    if not data and not required:
        return None
    if not _JSON_TYPE.match(mime):
        raise ApiError(415, f"expected Content-Type application/json, got {mime or 'none'}")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None
