"""
A minimal XEP-0114 external component client for tests.

It plays a component talking to a real server (Prosody, or fedgate's own
component port): connect, handshake with the SHA-1 of stream id and secret,
then send raw XML and collect every top-level element received.  It leans
on Twisted's own C{ConnectComponentAuthenticator}, so it shares no code
with the fedgate side it may be testing.

    client = yield connect_component(reactor, "127.0.0.1", port,
                                     "svc.prosody.example", "secret")
    client.send("<message to='x@y' from='a@svc.prosody.example'/>")
    element = yield client.next_element(timeout=10)
    yield client.close()
"""

from __future__ import annotations

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.python.failure import Failure
from twisted.words.protocols.jabber import component, xmlstream
from twisted.words.xish import domish
from twisted.words.xish.xmlstream import XmlStreamFactoryMixin

# How long connect_component and close wait by default, in seconds.
DEFAULT_TIMEOUT = 10.0


class _StreamFactory(XmlStreamFactoryMixin, protocol.Factory):
    """
    Builds one XmlStream; unlike Twisted's XmlStreamFactory it never
    reconnects, which a test wants.
    """

    protocol = xmlstream.XmlStream


class ComponentClient:
    """
    One authenticated component stream.

    @ivar domain: the component's domain.
    @ivar received: top-level elements received after the handshake, as
        L{domish.Element}, in order.
    @ivar is_authenticated: whether the server accepted the handshake.
    """

    def __init__(self, reactor: IReactorTime, domain: str, secret: str) -> None:
        self.reactor = reactor
        self.domain = domain
        self.received: defer.DeferredQueue[domish.Element] = defer.DeferredQueue()
        self.is_authenticated = False
        self.is_disconnected = False
        self._auth_failure: Failure | None = None
        self._auth_waiters: list[defer.Deferred[ComponentClient]] = []
        self._disconnect_waiters: list[defer.Deferred[None]] = []
        self.xmlstream: xmlstream.XmlStream | None = None
        self.factory = _StreamFactory(
            component.ConnectComponentAuthenticator(domain, secret)
        )
        self.factory.addBootstrap(xmlstream.STREAM_CONNECTED_EVENT, self._connected)
        self.factory.addBootstrap(xmlstream.STREAM_AUTHD_EVENT, self._authenticated)
        self.factory.addBootstrap(xmlstream.INIT_FAILED_EVENT, self._init_failed)
        self.factory.addBootstrap(xmlstream.STREAM_END_EVENT, self._ended)

    def when_authenticated(self) -> defer.Deferred[ComponentClient]:
        """
        Fires with this client once the server accepted the handshake;
        fails if the handshake failed or the stream ended before.
        """
        if self.is_authenticated:
            return defer.succeed(self)
        if self._auth_failure is not None:
            return defer.fail(self._auth_failure)
        d: defer.Deferred[ComponentClient] = defer.Deferred()
        self._auth_waiters.append(d)
        return d

    def when_disconnected(self) -> defer.Deferred[None]:
        """
        Fires once the connection is gone.
        """
        if self.is_disconnected:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._disconnect_waiters.append(d)
        return d

    def send(self, data: str | domish.Element) -> None:
        """
        Send one element, given as serialized XML or as an element.
        """
        if self.xmlstream is None:
            raise RuntimeError("component stream is not connected")
        self.xmlstream.send(data)

    def next_element(self, timeout: float = DEFAULT_TIMEOUT) -> defer.Deferred[domish.Element]:
        """
        The next received element; fails with C{TimeoutError} (Twisted's
        C{defer.TimeoutError}) after C{timeout} seconds.
        """
        d = self.received.get()
        d.addTimeout(timeout, self.reactor)
        return d

    def close(self, timeout: float = DEFAULT_TIMEOUT) -> defer.Deferred[None]:
        """
        Close the stream the polite way: send our C{</stream:stream>}, and
        drop the connection when the server's arrives.  Fires once
        disconnected; after C{timeout} the transport is aborted.
        """
        xs = self.xmlstream
        if xs is None or xs.transport is None or self.is_disconnected:
            return defer.succeed(None)
        d = self.when_disconnected()
        # XmlStream drops the connection itself on the server's stream end.
        xs.sendFooter()

        def abort(failure: Failure) -> None:
            failure.trap(defer.TimeoutError)
            if xs.transport is not None:
                xs.transport.abortConnection()

        d.addTimeout(timeout, self.reactor)
        d.addErrback(abort)
        return d

    def _connected(self, xs: xmlstream.XmlStream) -> None:
        self.xmlstream = xs

    def _authenticated(self, xs: xmlstream.XmlStream) -> None:
        xs.addObserver("/*", self.received.put)
        self.is_authenticated = True
        waiters, self._auth_waiters = self._auth_waiters, []
        for d in waiters:
            d.callback(self)

    def _fail_authentication(self, failure: Failure) -> None:
        if self.is_authenticated or self._auth_failure is not None:
            return
        self._auth_failure = failure
        waiters, self._auth_waiters = self._auth_waiters, []
        for d in waiters:
            d.errback(failure)

    def _init_failed(self, failure: Failure) -> None:
        self._fail_authentication(failure)

    def _ended(self, reason: object) -> None:
        self._fail_authentication(Failure(ConnectionError(
            f"component stream for {self.domain} ended "
            f"before the handshake completed: {reason}"
        )))
        self.is_disconnected = True
        waiters, self._disconnect_waiters = self._disconnect_waiters, []
        for d in waiters:
            d.callback(None)


def connect_component(
    reactor: IReactorTCP,
    host: str,
    port: int,
    domain: str,
    secret: str,
    timeout: float = DEFAULT_TIMEOUT,
) -> defer.Deferred[ComponentClient]:
    """
    Connect and handshake; fires with the L{ComponentClient} once the
    server accepted it, or fails within C{timeout} seconds.
    """
    client = ComponentClient(reactor, domain, secret)
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    connecting = endpoint.connect(client.factory)

    connecting.addErrback(client._fail_authentication)

    def on_timeout(failure: Failure) -> Failure:
        if client.xmlstream is not None and client.xmlstream.transport is not None:
            client.xmlstream.transport.abortConnection()
        return failure

    d = client.when_authenticated()
    d.addTimeout(timeout, reactor)
    d.addErrback(on_timeout)
    return d
