"""A fake remote server for outbound STARTTLS tests over loopback.

remote.example as the gateway sees it: it offers STARTTLS, writes what a
test gives it right after <proceed/> (in the same write, as a man in the
middle would), completes a real handshake with a certificate from the test
CA, and then plays a dialback server over TLS, answering 'valid'.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLServerConnectionCreator
from twisted.words.xish import domish
from zope.interface import implementer

from fedgate.stream import namespaces as ns
from tests.support.pki import server_context
from tests.support.s2speer import DIALBACK_FEATURES, PROCEED, s2s_header

#: The 'valid' answer remote.example gives to chat.a.example's dialback request.
VALID_RESULT = b"<db:result type='valid' from='remote.example' to='chat.a.example'/>"


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """A server context with one certificate; records the SNI it was asked for."""

    def __init__(self, issued):
        self.server_names: list = []
        self.context = server_context(issued)
        self.context.set_tlsext_servername_callback(
            lambda connection: self.server_names.append(connection.get_servername()))

    def serverConnectionForTLS(self, tls_protocol):
        return SSL.Connection(self.context, None)


@implementer(IHandshakeListener)
class FakeRemote(protocol.Protocol):
    """remote.example as seen by the gateway: offers STARTTLS, injects
    ``injection`` right after <proceed/>, then plays a dialback server over TLS.
    ``snapshot()`` is called at each step and its results kept in ``seen``."""

    def __init__(self, server: "FakeRemoteFactory"):
        self.server = server
        self.plain = bytearray()
        self.secure = bytearray()
        self.raw = bytearray()
        self.tls = False
        self.handshake_done = False
        self.headers: list = []
        self.elements: list = []
        self.seen: dict = {}
        self._parser = None

    def connectionMade(self):
        self.server.connections.append(self)
        self._new_parser()

    def _new_parser(self):
        parser = self._parser = domish.elementStream()
        parser.DocumentStartEvent = lambda root: parser is self._parser and self._header(root)
        parser.ElementEvent = lambda element: parser is self._parser and self._element(element)
        parser.DocumentEndEvent = lambda: None

    def dataReceived(self, data):
        (self.secure if self.tls else self.plain).extend(data)
        self._parser.parse(data)

    def handshakeCompleted(self):
        self.handshake_done = True

    def _record_raw(self, tls_protocol):
        """Keep the raw bytes the TLS layer gets (what the gateway sent after
        <proceed/>, before decryption)."""
        decrypt = tls_protocol.dataReceived

        def received(data):
            self.raw.extend(data)
            decrypt(data)
        tls_protocol.dataReceived = received

    def _header(self, root):
        self.headers.append(root)
        if not self.tls:
            self.transport.write(s2s_header("remote.example", "chat.a.example", "plain-id")
                                 + b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'>"
                                   b"<required/></starttls></stream:features>")
        else:
            self.seen["tls-header"] = self.server.snapshot()
            self.transport.write(s2s_header("remote.example", "chat.a.example", "tls-id")
                                 + DIALBACK_FEATURES)

    def _element(self, element):
        self.elements.append(element)
        if (element.uri, element.name) == (ns.TLS, "starttls"):
            # One write: <proceed/> and the injection; then TLS at once.
            self.transport.write(PROCEED + self.server.injection)
            self.tls = True
            self.transport.startTLS(self.server.tls)
            self._record_raw(self.transport.protocol)
            self._new_parser()
        elif (element.uri, element.name) == (ns.DIALBACK, "result") and self.tls:
            self.seen["db-request"] = self.server.snapshot()
            self.transport.write(VALID_RESULT)
        elif element.name == "message":
            self.server.messages.put(element)


class FakeRemoteFactory(protocol.Factory):
    noisy = False

    def __init__(self, injection: bytes, tls: ServerTLS, snapshot):
        self.injection = injection
        self.tls = tls
        self.snapshot = snapshot
        self.connections: list[FakeRemote] = []
        self.messages = defer.DeferredQueue()

    def buildProtocol(self, addr):
        return FakeRemote(self)
