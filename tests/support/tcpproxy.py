"""A TCP proxy on loopback that can make a peer vanish without closing TCP.

:meth:`TcpProxy.freeze` stops reading on both sides of every connection
through it: nothing is forwarded either way and nothing is closed, as when
a peer's host disappears.  :meth:`TcpProxy.hold` makes new connections wait
(accepted, but not yet joined to the target) until :meth:`TcpProxy.release`.
"""

from __future__ import annotations

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol


class _Upstream(protocol.Protocol):
    def __init__(self, client: "_Client"):
        self.client = client

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connectionLost(self, reason) -> None:
        if self.client.transport is not None and not self.client.frozen:
            self.client.transport.loseConnection()


class _Client(protocol.Protocol):
    """The accepted side of one proxied connection."""

    def __init__(self, proxy: "TcpProxy"):
        self.proxy = proxy
        self.upstream: _Upstream | None = None
        self.buffer: list[bytes] = []
        self.frozen = False
        self.gone = False

    def connectionMade(self) -> None:
        self.proxy.clients.append(self)
        if self.proxy.holding:
            self.transport.pauseProducing()
            self.proxy.held.append(self)
        else:
            self.join()

    def join(self) -> None:
        endpoint = TCP4ClientEndpoint(self.proxy.reactor, "127.0.0.1", self.proxy.target_port)
        d = connectProtocol(endpoint, _Upstream(self))
        d.addCallbacks(self._joined, lambda failure: self.transport.loseConnection())

    def _joined(self, upstream: _Upstream) -> None:
        self.upstream = upstream
        if self.gone:
            upstream.transport.loseConnection()
            return
        for data in self.buffer:
            upstream.transport.write(data)
        self.buffer = []
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.upstream is None:
            self.buffer.append(data)
        else:
            self.upstream.transport.write(data)

    def freeze(self) -> None:
        self.frozen = True
        self.transport.pauseProducing()
        if self.upstream is not None:
            self.upstream.transport.pauseProducing()

    def abort(self) -> None:
        self.gone = True
        self.transport.abortConnection()
        if self.upstream is not None:
            self.upstream.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        self.gone = True
        if self.upstream is not None and not self.frozen:
            self.upstream.transport.loseConnection()


class TcpProxy(protocol.Factory):
    noisy = False

    def __init__(self, reactor, target_port: int):
        self.reactor = reactor
        self.target_port = target_port
        self.clients: list[_Client] = []
        self.held: list[_Client] = []
        self.holding = False
        self.port = None

    def buildProtocol(self, addr):
        return _Client(self)

    @defer.inlineCallbacks
    def start(self):
        self.port = yield TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(self)
        return self.port.getHost().port

    def freeze(self) -> int:
        """Freeze every connection open now; returns how many."""
        live = [c for c in self.clients if not c.gone]
        for client in live:
            client.freeze()
        return len(live)

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        self.holding = False
        held, self.held = self.held, []
        for client in held:
            if not client.gone:
                client.join()

    @defer.inlineCallbacks
    def stop(self):
        for client in self.clients:
            if not client.gone:
                client.abort()
        if self.port is not None:
            yield self.port.stopListening()
