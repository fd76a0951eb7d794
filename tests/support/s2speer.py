"""Bytes and a raw peer for S2S tests over loopback: stream headers, the
STARTTLS exchange, a peer that keeps plaintext and TLS bytes apart, and a
poll for a condition on the real reactor."""

from __future__ import annotations

import time

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.interfaces import IHandshakeListener
from zope.interface import implementer

TIMEOUT = 10.0
DECL = b"<?xml version='1.0'?>"
STARTTLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
PROCEED = b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
DIALBACK_FEATURES = (b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/>"
                     b"</dialback></stream:features>")


def s2s_header(sender: str, to: str, stream_id: str | None = None, decl: bool = True) -> bytes:
    attrs = f" from='{sender}' to='{to}' version='1.0'" + (f" id='{stream_id}'" if stream_id else "")
    return ((DECL if decl else b"") + b"<stream:stream xmlns='jabber:server'"
            b" xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback'"
            + attrs.encode() + b">")


@defer.inlineCallbacks
def wait_until(predicate, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        yield task.deferLater(reactor, 0.01, lambda: None)


@implementer(IHandshakeListener)
class TLSPeer(protocol.Protocol):
    """A raw peer that can switch to TLS; keeps plaintext and TLS bytes apart."""

    def __init__(self):
        self.plain = bytearray()
        self.secure = bytearray()
        self.tls = False
        self.handshake = defer.Deferred()
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        (self.secure if self.tls else self.plain).extend(data)

    def start_tls(self, creator):
        self.tls = True
        self.transport.startTLS(creator)

    def handshakeCompleted(self):
        self.handshake.callback(self.transport.getHandle())

    def connectionLost(self, reason):
        if self.tls and not self.handshake.called:
            self.handshake.errback(reason)
        self.lost.callback(None)
