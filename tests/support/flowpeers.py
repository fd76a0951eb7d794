"""Peers that stop reading, for the backpressure tests, over real loopback.

- :class:`StallingS2SPeer`: a remote S2S server (STARTTLS with a certificate
  from the test CA, then SASL EXTERNAL accepted as offered) that counts the
  messages it receives and can stop and resume reading at any time.
- :class:`RawComponent`: an XEP-0114 component that sends many stanzas
  without buffering them all (a pull producer: a batch each time its socket
  drains), counts what it receives by markers, and can stop reading.

Both count by byte markers once negotiation is over, so that a test pushing
100,000 stanzas measures the gateway, not a parser in the test.
"""

from __future__ import annotations

import hashlib
import re
from itertools import islice

from OpenSSL import SSL
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IPullProducer
from twisted.words.xish import domish
from zope.interface import implementer

from fedgate.stream import namespaces as ns
from fedgate.stream.serialize import escape_attr
from tests.support.pki import server_context

STARTTLS_REQUIRED = (b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>"
                     b"</starttls></stream:features>")
SASL_EXTERNAL = (b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                 b"<mechanism>EXTERNAL</mechanism></mechanisms></stream:features>")


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class MarkerCount:
    """Counts byte markers across chunk boundaries."""

    def __init__(self, *markers: bytes):
        self.counts = dict.fromkeys(markers, 0)
        self._tails = dict.fromkeys(markers, b"")

    def feed(self, data: bytes) -> None:
        for marker, tail in self._tails.items():
            # the tail is one byte shorter than the marker: never counted twice
            buf = tail + data
            self.counts[marker] += buf.count(marker)
            self._tails[marker] = buf[-(len(marker) - 1):]

    def __getitem__(self, marker: bytes) -> int:
        return self.counts[marker]


@implementer(IOpenSSLServerConnectionCreator)
class _ServerTLS:
    def __init__(self, issued):
        self.context = server_context(issued)

    def serverConnectionForTLS(self, tls_protocol):
        return SSL.Connection(self.context, None)


class _StallingStream(protocol.Protocol):
    def __init__(self, factory: "StallingS2SPeer"):
        self.factory = factory
        self.tls = self.sasl = False
        self.counting = False
        self.count = MarkerCount(b"</message>")
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
        if self.counting:
            self.count.feed(data)
        else:
            self._parser.parse(data)

    def _header(self, root):
        sender = escape_attr(root.getAttribute("from") or "")
        header = (f"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                  f"xmlns:stream='http://etherx.jabber.org/streams' "
                  f"from='{escape_attr(self.factory.domain)}' to='{sender}' "
                  f"id='stall-{len(self.factory.connections)}-{int(self.tls)}{int(self.sasl)}' "
                  f"version='1.0'>").encode()
        if self.sasl:
            self.transport.write(header + b"<stream:features/>")
            self.counting = True  # from here on only stanzas come
            if not self.factory.ready.called:
                self.factory.ready.callback(self)
        else:
            self.transport.write(header + (SASL_EXTERNAL if self.tls else STARTTLS_REQUIRED))

    def _element(self, element):
        if self.counting:
            if element.name == "message":
                self.count.counts[b"</message>"] += 1
        elif (element.uri, element.name) == (ns.TLS, "starttls") and not self.tls:
            self.transport.write(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            self.tls = True
            self._new_parser()
            self.transport.startTLS(self.factory.server_tls)
        elif (element.uri, element.name) == (ns.SASL, "auth") and self.tls:
            self.transport.write(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
            self.sasl = True
            self._new_parser()

    def stop_reading(self):
        self.transport.pauseProducing()

    def resume_reading(self):
        self.transport.resumeProducing()


class StallingS2SPeer(protocol.Factory):
    """Listen with ``reactor.listenTCP(0, peer, interface="127.0.0.1")``;
    ``ready`` fires with the stream once the gateway's stream is
    authenticated; ``received()`` counts messages on all connections."""

    def __init__(self, domain: str, issued):
        self.domain = domain
        self.server_tls = _ServerTLS(issued)
        self.connections: list = []
        self.ready = defer.Deferred()

    def buildProtocol(self, addr):
        return _StallingStream(self)

    def received(self) -> int:
        return sum(c.count[b"</message>"] for c in self.connections)


@implementer(IPullProducer)
class _Feeder:
    """Writes the next batch each time the socket's buffer has drained."""

    def __init__(self, transport, stanzas, batch: int):
        self.transport = transport
        self.stanzas = iter(stanzas)
        self.batch = batch
        self.done = defer.Deferred()

    def resumeProducing(self):
        chunk = b"".join(islice(self.stanzas, self.batch))
        if not chunk:
            self.transport.unregisterProducer()
            self.done.callback(None)
            return
        self.transport.write(chunk)

    def stopProducing(self):
        pass


class RawComponent(protocol.Protocol):
    """An XEP-0114 component; ``bound`` fires after the handshake.  Counts
    received ``</message>`` and stanza error conditions."""

    def __init__(self, domain: str, secret: str):
        self.domain = domain
        self.secret = secret
        self.bound = defer.Deferred()
        self.count = MarkerCount(b"</message>", b"<resource-constraint", b"<service-unavailable")
        self._buffer = b""
        self._shaken = False

    def connectionMade(self):
        self.transport.write(
            f"<stream:stream xmlns='jabber:component:accept' xmlns:stream='{ns.STREAMS}' "
            f"to='{self.domain}'>".encode())

    def dataReceived(self, data):
        if self._shaken:
            self.count.feed(data)
            return
        self._buffer += data
        if b"<handshake" not in self._buffer:
            found = re.search(rb"<stream:stream[^>]*\sid='([^']+)'", self._buffer)
            if found and not getattr(self, "_sent", False):
                self._sent = True
                digest = hashlib.sha1(found.group(1) + self.secret.encode()).hexdigest()
                self.transport.write(f"<handshake>{digest}</handshake>".encode())
            return
        self._shaken = True
        rest = self._buffer.split(b"<handshake/>", 1)[-1]
        self._buffer = b""
        self.count.feed(rest)
        self.bound.callback(self)

    def send_many(self, stanzas, batch: int = 200) -> defer.Deferred:
        """Send every stanza (bytes) of the iterable, a batch at a time as
        the socket drains; fires when all are written."""
        feeder = _Feeder(self.transport, stanzas, batch)
        self.transport.registerProducer(feeder, False)
        return feeder.done

    def stop_reading(self):
        self.transport.pauseProducing()

    def resume_reading(self):
        self.transport.resumeProducing()

    def received(self, marker: bytes = b"</message>") -> int:
        return self.count[marker]


@defer.inlineCallbacks
def connect_raw_component(reactor, port: int, domain: str, secret: str):
    """A bound :class:`RawComponent` on the gateway's component ``port``."""
    endpoint_proto = RawComponent(domain, secret)
    yield protocol.ClientCreator(reactor, lambda: endpoint_proto).connectTCP("127.0.0.1", port)
    yield endpoint_proto.bound
    return endpoint_proto
