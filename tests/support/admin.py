"""An admin API client for tests: treq over a real loopback listener, plus a
raw-bytes client for requests treq would tidy up (dot segments, %2F)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from treq.client import HTTPClient
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.web.client import Agent, HTTPConnectionPool

_DEFAULT = object()


@dataclass
class Answer:
    status: int
    headers: dict
    body: bytes

    @property
    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def token_of(gateway) -> str:
    return (Path(gateway.config.state_dir) / "admin.token").read_text().strip()


class AdminClient:
    def __init__(self, reactor, gateway, token: str | None = None):
        self.reactor = reactor
        self.port = gateway.admin.port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.token = token if token is not None else token_of(gateway)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))

    @defer.inlineCallbacks
    def request(self, method: str, path: str, body=_DEFAULT, *, token=_DEFAULT, data: bytes | None = None,
                content_type: str | None = "application/json", headers: dict | None = None):
        sent = {}
        token = self.token if token is _DEFAULT else token
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if body is not _DEFAULT:
            data = json.dumps(body).encode("utf-8")
        if data is not None and content_type is not None:
            sent["Content-Type"] = content_type
        sent.update(headers or {})
        response = yield self.http.request(method, self.base + path, data=data,
                                           headers={k: [v] for k, v in sent.items()})
        content = yield response.content()
        got = {k.decode("ascii").lower(): v[-1].decode("utf-8")
               for k, v in response.headers.getAllRawHeaders()}
        return Answer(response.code, got, content)

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs)

    def put(self, path: str, body=_DEFAULT, **kwargs):
        return self.request("PUT", path, body, **kwargs)

    def patch(self, path: str, body=_DEFAULT, **kwargs):
        return self.request("PATCH", path, body, **kwargs)

    def post(self, path: str, body=_DEFAULT, **kwargs):
        return self.request("POST", path, body, **kwargs)

    def delete(self, path: str, **kwargs):
        return self.request("DELETE", path, **kwargs)


class _Raw(protocol.Protocol):
    def __init__(self, request: bytes):
        self.request = request
        self.data = b""
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.done.callback(self.data)


@defer.inlineCallbacks
def raw_request(reactor, port: int, method: str, target: str, token: str | None = None,
                body: bytes = b"") -> tuple[int, bytes]:
    """Send exactly this request line; returns (status, body)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    raw = _Raw(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), raw)
    data = yield raw.done
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest
