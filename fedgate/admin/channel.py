"""The admin API's HTTP connections: what is checked before a request body
is read, how long a request may take to arrive, and how many may be open.

twisted.web's own channel reads a whole request body (spooling anything
over 100 KB to a temporary file) before the resource sees the request, and
its idle timer restarts on every byte.  Here, once the headers are in and
before any body byte is accepted:

- the bearer token is checked (401, connection closed), unless the request
  is the loopback ``GET /metrics`` that ``admin.metrics_open`` lets through;
- a ``Content-Length`` over ``admin.max_body_bytes`` is answered 413 and the
  connection closed; a chunked body is counted as it arrives and cut the
  same way once its running total passes the bound.

Bodies are kept in memory (they are bounded), never in a temporary file.
Deadlines run from fixed points, not from the last byte: the headers must
be complete ``admin.header_timeout`` seconds after the connection opens (or
after the previous response on a kept-alive connection), and the body
``admin.body_timeout`` seconds after the headers; otherwise 408 and close.
At most ``admin.max_connections`` connections are open at once; one past
that gets a fixed 503 and is closed without any per-connection state.
"""

from __future__ import annotations

import io
import json

from twisted.internet import protocol
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.web import http, server

from fedgate.admin.auth import BearerCheck
from fedgate.admin.web import AdminResource, error_body, token_exempt
from fedgate.config import AdminConfig

log = Logger(namespace="fedgate.admin")

#: seconds a refused connection gets to take its answer before it is cut
ABORT_AFTER = 2.0
_LOGGED_PATH = 200  # characters of a request path that go into a log line


def _response(status: int, message: str, headers: dict | None = None, head: bool = False) -> bytes:
    """A complete ``Connection: close`` JSON error response, as bytes."""
    body = (json.dumps(error_body(status, message), indent=1) + "\n").encode("utf-8")
    reason = http.RESPONSES.get(status, b"Error")
    lines = [b"HTTP/1.1 %d %s" % (status, reason),
             b"Content-Type: application/json; charset=utf-8",
             b"Content-Length: %d" % len(body),
             b"Connection: close",
             b"Cache-Control: no-store",
             b"X-Content-Type-Options: nosniff"]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in (headers or {}).items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head else body)


_BUSY = _response(503, "too many admin connections are open; try again shortly")


class AdminRequest(server.Request):
    """A request whose body lives in memory and is counted as it arrives."""

    _received = 0

    def gotLength(self, length):
        # The channel has already refused lengths over the bound, so memory
        # is enough; twisted.web would open a temporary file past 100 KB.
        self.content = io.BytesIO()

    def handleContentChunk(self, data):
        channel = self.channel
        if channel is None or channel.refused:
            return
        self._received += len(data)
        if self._received > channel.site.config.max_body_bytes:
            channel.refuse(413, f"the body is over {channel.site.config.max_body_bytes} bytes")
            return
        self.content.write(data)


class AdminChannel(http.HTTPChannel):
    """One admin connection: checks before the body, fixed deadlines."""

    refused = False
    _deadline = None
    _abort_call = None
    _counted = False

    # -- deadlines ------------------------------------------------------------
    def _arm(self, seconds: float, stage: str) -> None:
        self._disarm()
        self._deadline = self.callLater(seconds, self._expired, stage, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _expired(self, stage: str, seconds: float) -> None:
        self._deadline = None
        self.refuse(408, f"the request {stage} did not arrive within {seconds:g} s")

    # -- the connection -------------------------------------------------------
    def connectionMade(self):
        super().connectionMade()
        self._counted = True
        self.site.open_connections += 1
        self._arm(self.site.config.header_timeout, "headers")

    def connectionLost(self, reason):
        self._disarm()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        if self._counted:
            self._counted = False
            self.site.connection_closed()
        super().connectionLost(reason)

    def dataReceived(self, data):
        if self.refused:
            return
        self.site.bytes_received += len(data)
        super().dataReceived(data)

    def lineReceived(self, line):
        if not self.refused:
            super().lineReceived(line)

    def rawDataReceived(self, data):
        if not self.refused:
            super().rawDataReceived(data)

    def allHeadersReceived(self):
        request = self.requests[-1]
        method, path = self._command, self._path.partition(b"?")[0]
        if not token_exempt(method, path, self.transport.getPeer(), self.site.config.metrics_open) \
                and not self.site.check.matches(request.requestHeaders.getRawHeaders(
                    b"authorization", [None])[-1]):
            self.refuse(401, "a valid 'Authorization: Bearer <token>' header is required",
                        {"WWW-Authenticate": 'Bearer realm="fedgate"'})
            return
        limit = self.site.config.max_body_bytes
        if self.length is not None and self.length > limit:
            self.refuse(413, f"the body is over {limit} bytes")
            return
        super().allHeadersReceived()
        self._arm(self.site.config.body_timeout, "body")

    def allContentReceived(self):
        if self.refused:
            return
        self._disarm()  # the handler's own time is not the client's to spend
        super().allContentReceived()

    def requestDone(self, request):
        # The next request's headers are due header_timeout from now; armed
        # first, since a pipelined request may be parsed within this call.
        self._arm(self.site.config.header_timeout, "headers")
        super().requestDone(request)

    def refuse(self, status: int, message: str, headers: dict | None = None) -> None:
        """Answer ``status`` at once, read nothing more, and close."""
        if self.refused or self.transport is None:
            return
        self.refused = True
        self._disarm()
        method = getattr(self, "_command", b"")
        path = getattr(self, "_path", b"").partition(b"?")[0]
        self.transport.write(_response(status, message, headers, head=method == b"HEAD"))
        self.site.refused_requests[status] = self.site.refused_requests.get(status, 0) + 1
        log.info("{client} {method} {path} -> {status} (refused before the body: {reason})",
                 client=getattr(self.transport.getPeer(), "host", "?"),
                 method=method.decode("ascii", "replace")[:16] or "-",
                 path=path.decode("ascii", "replace")[:_LOGGED_PATH] or "-",
                 status=status, reason=message)
        self.loseConnection()
        # A peer that never reads could keep a half-closed connection.
        self._abort_call = self.callLater(ABORT_AFTER, self.transport.abortConnection)


class _Busy(protocol.Protocol):
    """A connection past the cap: a fixed answer, then closed."""

    def connectionMade(self):
        if ISSLTransport.providedBy(self.transport):
            # No handshake for a connection that is being turned away.
            self.transport.abortConnection()
            return
        self.transport.write(_BUSY)
        self.transport.loseConnection()


class AdminSite(server.Site):
    """The admin listener's factory: counts connections and logs requests
    through twisted.logger (never the token)."""

    noisy = False
    protocol = AdminChannel

    def __init__(self, resource: AdminResource, check: BearerCheck, config: AdminConfig, reactor=None):
        kwargs = {"reactor": reactor} if reactor is not None else {}
        super().__init__(resource, requestFactory=AdminRequest, **kwargs)
        self.check = check
        self.config = config
        self.open_connections = 0
        self.refused_connections = 0
        #: status -> count of requests refused before their body
        self.refused_requests: dict[int, int] = {}
        #: bytes read from every admin connection, for diagnostics and tests
        self.bytes_received = 0
        self._full = False

    def buildProtocol(self, addr):
        if self.open_connections >= self.config.max_connections:
            self.refused_connections += 1
            if not self._full:
                self._full = True
                log.warn("Admin API: {count} connections are open (admin.max_connections); "
                         "refusing new ones until some close", count=self.open_connections)
            return _Busy()
        return super().buildProtocol(addr)  # counted from its connectionMade

    def connection_closed(self) -> None:
        self.open_connections -= 1
        if self.open_connections < self.config.max_connections:
            self._full = False

    def log(self, request) -> None:
        log.info("{client} {method} {path} -> {status}", client=getattr(
            request.getClientAddress(), "host", "?"), method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace")[:_LOGGED_PATH], status=request.code)
