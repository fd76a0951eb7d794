"""A remote S2S server, over real loopback with TLS from the test CA, that
never answers dialback: the peer behind a pair that stays pending.

It requires STARTTLS, then offers dialback (``urn:xmpp:features:dialback``)
and nothing else, and records each ``<db:result/>`` it receives without
ever answering it, as a server that lost or ignored the request would (an
ejabberd without ``mod_s2s_dialback`` does this on a stream already
authenticated by SASL EXTERNAL).  It is the receiving end of the stream
only: whatever else arrives is recorded too.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.words.xish import domish
from zope.interface import implementer

from fedgate.stream import namespaces as ns
from fedgate.stream.serialize import escape_attr
from tests.support.pki import server_context

STARTTLS_REQUIRED = (b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>"
                     b"</starttls></stream:features>")
DIALBACK_ONLY = (b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
                 b"</stream:features>")


@implementer(IOpenSSLServerConnectionCreator)
class _ServerTLS:
    def __init__(self, issued):
        self.context = server_context(issued)

    def serverConnectionForTLS(self, tls_protocol):
        return SSL.Connection(self.context, None)


class _SilentStream(protocol.Protocol):
    def __init__(self, factory: "SilentDialbackPeer"):
        self.factory = factory
        self.tls = False
        self._parser = None

    def connectionMade(self):
        self.factory.connections.append(self)
        self._new_parser()

    def _new_parser(self):
        parser = self._parser = domish.elementStream()
        parser.DocumentStartEvent = lambda root: parser is self._parser and self._header(root)
        parser.ElementEvent = lambda element: parser is self._parser and self._element(element)
        parser.DocumentEndEvent = lambda: None

    def dataReceived(self, data):
        self._parser.parse(data)

    def _header(self, root):
        sender = escape_attr(root.getAttribute("from") or "")
        header = (f"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                  f"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
                  f"from='{escape_attr(self.factory.domain)}' to='{sender}' "
                  f"id='silent-{len(self.factory.connections)}-{int(self.tls)}' version='1.0'>").encode()
        self.transport.write(header + (DIALBACK_ONLY if self.tls else STARTTLS_REQUIRED))

    def _element(self, element):
        self.factory.received.append(element)
        if (element.uri, element.name) == (ns.TLS, "starttls") and not self.tls:
            self.transport.write(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            self.tls = True
            self._new_parser()
            self.transport.startTLS(self.factory.server_tls)
        elif (element.uri, element.name) == (ns.DIALBACK, "result"):
            self.factory.requests.append((element.getAttribute("from"), element.getAttribute("to")))
            if self.factory.asked is not None and not self.factory.asked.called:
                self.factory.asked.callback(element)
        # Nothing is ever answered.

    def connectionLost(self, reason):
        self.factory.closed += 1


class SilentDialbackPeer(protocol.Factory):
    """Listen with ``reactor.listenTCP(0, peer, interface="127.0.0.1")``;
    ``requests`` lists (from, to) of every dialback request received, and
    ``asked`` fires with the first."""

    def __init__(self, domain: str, issued):
        self.domain = domain
        self.server_tls = _ServerTLS(issued)
        self.connections: list = []
        self.received: list = []
        self.requests: list = []
        self.closed = 0
        self.asked: defer.Deferred | None = defer.Deferred()

    def buildProtocol(self, addr):
        return _SilentStream(self)
