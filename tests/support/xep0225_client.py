"""A small XEP-0225 component client for tests (no third-party one exists).

It speaks to a real gateway over loopback: stream header in jabber:client,
STARTTLS (trusting the test CA, optionally presenting a client certificate),
SASL (SCRAM-SHA-256, SCRAM-SHA-1, PLAIN or EXTERNAL), then hostname bind and
unbind.  Its SCRAM client is written here from RFC 5802, independently of the
gateway's server side.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from OpenSSL import SSL
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.words.xish import domish
from zope.interface import implementer

STREAMS = "http://etherx.jabber.org/streams"
TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
COMPONENT_NS = "urn:xmpp:component:0"


@implementer(IOpenSSLClientConnectionCreator)
class _ClientTLS:
    def __init__(self, ca_file, server_name, cert=None, key=None):
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.load_verify_locations(str(ca_file))
        ctx.set_verify(SSL.VERIFY_PEER, lambda *args: args[-1])
        if cert:
            ctx.use_certificate_chain_file(str(cert))
            ctx.use_privatekey_file(str(key))
        self.ctx, self.server_name = ctx, server_name

    def clientConnectionForTLS(self, tls_protocol):
        connection = SSL.Connection(self.ctx, None)
        connection.set_tlsext_host_name(self.server_name.encode("ascii"))
        return connection


class SaslFailed(Exception):
    def __init__(self, condition):
        super().__init__(condition)
        self.condition = condition


class Xep0225Client(protocol.Protocol):
    """Drive a component stream step by step; every wait is bounded."""

    def __init__(self, to: str, sender: str | None = None, timeout: float = 10.0):
        self.to, self.sender, self.timeout = to, sender, timeout
        self.elements: defer.DeferredQueue = defer.DeferredQueue()
        self.features = None
        self.closed = defer.Deferred()
        self.stream_error = None
        self._ids = 0

    # -- plumbing ---------------------------------------------------------------
    def connectionMade(self):
        self._start_stream()

    def _start_stream(self):
        self.parser = domish.elementStream()
        self.parser.DocumentStartEvent = lambda root: None
        self.parser.ElementEvent = self._element
        self.parser.DocumentEndEvent = lambda: None
        sender = f" from='{self.sender}'" if self.sender else ""
        self.write(f"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
                   f"xmlns:stream='{STREAMS}' to='{self.to}'{sender} version='1.0'>")

    def _element(self, element):
        if element.uri == STREAMS and element.name == "error":
            self.stream_error = next(c.name for c in element.elements() if c.name != "text")
        self.elements.put(element)

    def dataReceived(self, data):
        self.parser.parse(data)

    def connectionLost(self, reason):
        if not self.closed.called:
            self.closed.callback(None)

    def write(self, text: str):
        self.transport.write(text.encode("utf-8"))

    def next(self):
        return self.elements.get().addTimeout(self.timeout, _reactor())

    @defer.inlineCallbacks
    def next_features(self):
        element = yield self.next()
        assert (element.uri, element.name) == (STREAMS, "features"), element.toXml()
        self.features = element
        return element

    def mechanisms(self) -> list[str]:
        for child in self.features.elements():
            if child.uri == SASL_NS and child.name == "mechanisms":
                return [str(m) for m in child.elements()]
        return []

    # -- negotiation ------------------------------------------------------------
    @defer.inlineCallbacks
    def starttls(self, ca_file, cert=None, key=None):
        self.write(f"<starttls xmlns='{TLS_NS}'/>")
        proceed = yield self.next()
        assert proceed.name == "proceed", proceed.toXml()
        self.transport.startTLS(_ClientTLS(ca_file, self.to, cert, key))
        self._start_stream()
        yield self.next_features()

    @defer.inlineCallbacks
    def auth(self, mechanism: str, username: str = "", password: str = "", authzid: str = ""):
        if mechanism == "PLAIN":
            payload = f"{authzid}\0{username}\0{password}".encode()
            self.write(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{base64.b64encode(payload).decode()}</auth>")
            result = yield self.next()
        elif mechanism == "EXTERNAL":
            data = base64.b64encode(authzid.encode()).decode() if authzid else "="
            self.write(f"<auth xmlns='{SASL_NS}' mechanism='EXTERNAL'>{data}</auth>")
            result = yield self.next()
        else:
            result = yield self._scram(mechanism, username, password)
        if result.name != "success":
            raise SaslFailed(next(c.name for c in result.elements() if c.name != "text"))
        self._start_stream()
        yield self.next_features()
        return result

    @defer.inlineCallbacks
    def _scram(self, mechanism, username, password):
        algorithm = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}[mechanism]
        nonce = secrets.token_urlsafe(12)
        bare = f"n={username},r={nonce}"
        self.write(f"<auth xmlns='{SASL_NS}' mechanism='{mechanism}'>"
                   f"{base64.b64encode(('n,,' + bare).encode()).decode()}</auth>")
        challenge = yield self.next()
        if challenge.name != "challenge":
            return challenge
        server_first = base64.b64decode(str(challenge)).decode()
        attrs = dict(part.split("=", 1) for part in server_first.split(","))
        assert attrs["r"].startswith(nonce)
        salted = hashlib.pbkdf2_hmac(algorithm, password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
        client_key = hmac.new(salted, b"Client Key", algorithm).digest()
        stored = hashlib.new(algorithm, client_key).digest()
        without_proof = f"c={base64.b64encode(b'n,,').decode()},r={attrs['r']}"
        auth_message = f"{bare},{server_first},{without_proof}".encode()
        signature = hmac.new(stored, auth_message, algorithm).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        self.write(f"<response xmlns='{SASL_NS}'>"
                   f"{base64.b64encode(f'{without_proof},p={base64.b64encode(proof).decode()}'.encode()).decode()}"
                   f"</response>")
        result = yield self.next()
        if result.name == "success":
            server_key = hmac.new(salted, b"Server Key", algorithm).digest()
            expected = b"v=" + base64.b64encode(hmac.new(server_key, auth_message, algorithm).digest())
            assert base64.b64decode(str(result)) == expected, "the server's SCRAM signature is wrong"
        return result

    # -- binding and stanzas --------------------------------------------------------
    def _iq(self, child: str) -> str:
        self._ids += 1
        ident = f"b{self._ids}"
        self.write(f"<iq type='set' id='{ident}'>{child}</iq>")
        return ident

    @defer.inlineCallbacks
    def bind(self, hostname: str):
        ident = self._iq(f"<bind xmlns='{COMPONENT_NS}'><hostname>{hostname}</hostname></bind>")
        reply = yield self.next()
        assert reply.getAttribute("id") == ident, reply.toXml()
        return reply

    @defer.inlineCallbacks
    def unbind(self, hostname: str):
        ident = self._iq(f"<unbind xmlns='{COMPONENT_NS}'><hostname>{hostname}</hostname></unbind>")
        reply = yield self.next()
        assert reply.getAttribute("id") == ident, reply.toXml()
        return reply

    def send(self, xml: str):
        self.write(xml)

    def close(self):
        if self.transport is not None and self.transport.connected:
            self.write("</stream:stream>")
            self.transport.loseConnection()
        return self.closed


def _reactor():
    from twisted.internet import reactor
    return reactor


def error_condition(element) -> str | None:
    for child in element.elements():
        if child.name == "error":
            return next((c.name for c in child.elements() if c.name != "text"), None)
    return None


@defer.inlineCallbacks
def connect(reactor, port: int, to: str, sender: str | None = None,
            source: str | None = None) -> Xep0225Client:
    client = Xep0225Client(to, sender)
    bind = (source, 0) if source else None
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=bind), client)
    yield client.next_features()
    return client
