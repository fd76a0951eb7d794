"""STARTTLS command injection (the CVE-2011-0411 class), in both roles.

Bytes that arrive in the same read as ``<starttls/>`` (we receive) or
``<proceed/>`` (we initiate) were sent in plaintext, before TLS: anyone on
the path could have put them there.  They must be dropped, never parsed as
if they had come over TLS.

First in memory, where the exact position of the switch to TLS in our output
can be checked; then over real loopback sockets against a real gateway: a
raw peer (inbound) and a fake remote server (outbound) inject dialback and
stanzas next to the switch, complete a real TLS handshake with certificates
from the test CA, and check that the stream really went on over TLS and that
nothing injected was acted on.
"""

from __future__ import annotations

import time

from OpenSSL import SSL, crypto
from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLServerConnectionCreator
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.words.xish import domish
from zope.interface import implementer

from fedgate.s2s import dialback
from fedgate.s2s.context import VerificationBudget
from fedgate.s2s.inbound import InboundS2S
from fedgate.s2s.outbound import OutboundS2S
from fedgate.s2s.pairs import INBOUND, OUTBOUND, PENDING, VALID, ConnectionTable
from fedgate.stream import namespaces as ns
from fedgate.stream.protocol import XmppStream
from fedgate.tls.contexts import TLSInfo
from tests.support.federation import add_component, start_dns
from tests.support.gateway import gateway_config, start_gateway, temp_dir, shared_ca
from tests.support.memory import RecordingRouter
from tests.support.rawpeer import Reply
from tests.support.s2s import FakeOwner, FakeTLS, FakeVerifier, TLSRecordingTransport, make_context

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


#: What a man in the middle appends to a peer's <starttls/>: a dialback
#: request (would start a verification), a verify request (would be answered
#: with our key's verdict) and a stanza (would be routed or refused).
INBOUND_INJECTION = (
    b"<db:result from='evil.example' to='a.example'>k3y</db:result>"
    b"<db:verify from='evil.example' to='a.example' id='sid-1'>k3y</db:verify>"
    b"<message from='eve@evil.example' to='bob@chat.a.example' id='injected'>"
    b"<body>injected</body></message>")

#: What a man in the middle appends to a server's <proceed/>: features that
#: would make us authenticate at once, and the 'valid' answer to that.
VALID_RESULT = b"<db:result type='valid' from='remote.example' to='chat.a.example'/>"
OUTBOUND_INJECTIONS = {
    # continuing the plaintext stream
    "features_and_result": DIALBACK_FEATURES + VALID_RESULT,
    # pretending a new stream has already begun (as a parser that restarted
    # but went on with the rest of the chunk would see it)
    "new_header_features_and_result": (s2s_header("remote.example", "chat.a.example", "injected-id",
                                                  decl=False) + DIALBACK_FEATURES + VALID_RESULT),
}


# -- in memory -------------------------------------------------------------------

class MemoryCase(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.table = ConnectionTable()
        self.router = RecordingRouter()
        self.verifier = FakeVerifier()
        self.budget = VerificationBudget(10)

    def connect(self, handler, encryption: str) -> tuple[XmppStream, TLSRecordingTransport]:
        ctx = make_context(self.clock, local_domains={"a.example", "chat.a.example"},
                           secret="s3cret", table=self.table, router=self.router, verifier=self.verifier,
                           budget=self.budget, encryption=encryption, tls=FakeTLS())
        handler = handler(ctx)
        stream = XmppStream(handler, self.clock)
        transport = TLSRecordingTransport()
        stream.makeConnection(transport)
        return stream, transport


class ReceivingInMemoryTests(MemoryCase):
    """We receive <starttls/>: the injected rest of the chunk is dropped."""

    def open(self, encryption="optional"):
        stream, transport = self.connect(InboundS2S, encryption)
        self.handler = stream.handler
        return stream, transport

    def assert_nothing_processed(self):
        self.assertEqual(self.verifier.calls, [])
        self.assertEqual(self.budget.in_use, 0)
        self.assertEqual(self.router.routed, [])
        self.assertEqual(self.router.bounced, [])
        self.assertEqual([r.pairs for r in self.table], [{}])

    def test_rest_of_the_chunk_is_dropped(self):
        for encryption in ("optional", "required"):
            stream, transport = self.open(encryption)
            stream.dataReceived(s2s_header("evil.example", "a.example") + STARTTLS + INBOUND_INJECTION)
            [(creator, _)] = transport.tls_calls
            self.assertEqual(creator, ("server", "a.example"))
            self.assertTrue(transport.before_tls().endswith(PROCEED), transport.before_tls())
            self.assertEqual(Reply(transport.before_tls()).elements[-1].name, "proceed")
            self.assertEqual(transport.after_tls(), b"", "nothing may follow <proceed/> in plaintext")
            self.assertFalse(transport.disconnecting)
            self.assert_nothing_processed()
            # The next bytes (decrypted, in real life) start a new stream.
            stream.dataReceived(s2s_header("evil.example", "a.example"))
            reply = Reply(transport.after_tls())
            self.assertEqual(reply.root.getAttribute("from"), "a.example")
            self.assertNotEqual(reply.root.getAttribute("id"),
                                Reply(transport.before_tls()).root.getAttribute("id"))
            [features] = reply.elements
            offered = [(c.uri, c.name) for c in features.elements()]
            self.assertIn((ns.DIALBACK_FEATURE, "dialback"), offered)
            self.assertNotIn((ns.TLS, "starttls"), offered, "no second STARTTLS offer once TLS has started")
            self.assert_nothing_processed()
            stream.connectionLost(None)

    def test_injection_in_a_later_chunk_is_not_part_of_the_new_stream(self):
        # Plaintext that arrives after the switch is the TLS layer's problem
        # in real life; here it reaches the fresh parser, which wants a new
        # header and closes instead of acting on it.
        stream, transport = self.open()
        stream.dataReceived(s2s_header("evil.example", "a.example") + STARTTLS)
        stream.dataReceived(INBOUND_INJECTION)
        self.assertTrue(transport.disconnecting)
        self.assertIsNotNone(Reply(transport.after_tls()).error_condition())
        self.assert_nothing_processed()

    def test_dialback_before_starttls_in_the_same_chunk_is_still_handled(self):
        # Control: the drop is exactly "after <starttls/>", not "the whole chunk".
        stream, transport = self.open()
        stream.dataReceived(s2s_header("evil.example", "a.example")
                            + b"<db:result from='evil.example' to='a.example'>k3y</db:result>"
                            + STARTTLS + INBOUND_INJECTION)
        self.assertEqual(len(self.verifier.calls), 1)
        self.assertEqual(len(transport.tls_calls), 1)
        self.assertEqual(transport.after_tls(), b"")


class InitiatingInMemoryTests(MemoryCase):
    """We initiate and receive <proceed/>: the rest of the chunk is dropped."""

    def open(self):
        self.owner = FakeOwner()
        stream, transport = self.connect(
            lambda ctx: OutboundS2S(ctx, "remote.example", "chat.a.example", self.owner), "optional")
        stream.dataReceived(s2s_header("remote.example", "chat.a.example", "plain-id")
                            + b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'>"
                              b"<required/></starttls></stream:features>")
        self.assertTrue(transport.value().endswith(STARTTLS), transport.value())
        return stream, transport

    def check_injection(self, injection: bytes):
        stream, transport = self.open()
        handler = stream.handler
        stream.dataReceived(PROCEED + injection)
        [(creator, _)] = transport.tls_calls
        self.assertEqual(creator, ("client", "chat.a.example", "remote.example"))
        self.assertTrue(transport.before_tls().endswith(STARTTLS))
        # After the switch: our new header and nothing else (no dialback
        # request answering injected features).
        after = Reply(transport.after_tls())
        self.assertEqual((after.root.getAttribute("to"), after.root.getAttribute("from")),
                         ("remote.example", "chat.a.example"))
        self.assertEqual(after.elements, [])
        self.assertEqual(self.owner.events, [])
        self.assertEqual(handler.record.pairs, {})
        self.assertEqual(handler.stream_id, "plain-id", "the injected header was parsed")
        self.assertFalse(transport.disconnecting)

        # The handshake completes (simulated) and the real server speaks.
        stream.tls = TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256")
        stream.dataReceived(s2s_header("remote.example", "chat.a.example", "tls-id") + DIALBACK_FEATURES)
        self.assertEqual(self.owner.events, [("open",)])
        handler.authenticate("chat.a.example")
        self.assertEqual(handler.record.state_of("chat.a.example", "remote.example"), PENDING)
        request = Reply(transport.after_tls()).elements[-1]
        self.assertEqual(str(request), dialback.dialback_key("s3cret", "remote.example",
                                                             "chat.a.example", "tls-id"))
        stream.dataReceived(VALID_RESULT)
        self.assertEqual(handler.record.state_of("chat.a.example", "remote.example"), VALID)

    def test_features_and_result_after_proceed(self):
        self.check_injection(OUTBOUND_INJECTIONS["features_and_result"])

    def test_new_header_after_proceed(self):
        self.check_injection(OUTBOUND_INJECTIONS["new_header_features_and_result"])


# -- over loopback against a real gateway -------------------------------------------

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


class GatewayCase(unittest.TestCase):
    """A real gateway (a.example, component chat.a.example) whose verifier,
    connector and router record every call."""

    timeout = 60
    encryption = "optional"

    @defer.inlineCallbacks
    def start(self, **s2s):
        self.dns, dns_port = start_dns(self)
        s2s.setdefault("policy", {"encryption": self.encryption})
        config = gateway_config(temp_dir(self), ["a.example"], {"chat.a.example": "secret-a"}, **s2s)
        self.gateway = gateway = yield start_gateway(reactor, config, dns_port, self)
        self.verify_calls: list = []
        self.connect_calls: list = []
        self.routed: list = []
        self.bounced: list = []
        self._record(gateway.verifier, "verify", self.verify_calls)
        self._record(gateway.connector, "connect", self.connect_calls)
        self._record(gateway.router, "route", self.routed)
        self._record(gateway.router, "bounce", self.bounced)
        self.component = yield add_component(self, gateway, "chat.a.example", "secret-a")

    @staticmethod
    def _record(obj, name: str, calls: list) -> None:
        original = getattr(obj, name)

        def recorded(*args, **kwargs):
            calls.append(args)
            return original(*args, **kwargs)
        setattr(obj, name, recorded)


class InboundInjectionTests(GatewayCase):
    """A raw peer injects after <starttls/>; the gateway must ignore it.

    Encryption is optional here, so the injected <db:result/> would start a
    verification if it were parsed before TLS: "no verifier call" can fail."""

    @defer.inlineCallbacks
    def setUp(self):
        yield self.start()

    def assert_nothing_processed(self):
        self.assertEqual(self.verify_calls, [])
        self.assertEqual(self.connect_calls, [])
        self.assertEqual(self.gateway.ctx.budget.in_use, 0)
        self.assertEqual([r.pairs for r in self.gateway.table if r.direction == INBOUND], [{}])
        self.assertEqual(self.routed, [])
        self.assertEqual(self.bounced, [])
        self.assertEqual(self.component.received.pending, [])
        self.assertEqual(self.dns.queries, [], "nothing looked up evil.example")

    @defer.inlineCallbacks
    def test_injected_after_starttls_is_never_parsed(self):
        peer = TLSPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.gateway.port_of("s2s")), peer)
        self.addCleanup(lambda: peer.transport.abortConnection() if not peer.lost.called else None)
        peer.transport.write(s2s_header("evil.example", "a.example") + STARTTLS + INBOUND_INJECTION)
        yield wait_until(lambda: PROCEED in peer.plain, "<proceed/>")
        plain = bytes(peer.plain)
        self.assertTrue(plain.endswith(PROCEED), f"plaintext after <proceed/>: {plain!r}")
        before = Reply(plain)
        self.assertEqual([(e.uri, e.name) for e in before.elements],
                         [(ns.STREAMS, "features"), (ns.TLS, "proceed")])
        self.assert_nothing_processed()

        # A real handshake, checked against the test CA and the name a.example.
        trust = ssl.Certificate.loadPEM(shared_ca().root_pem())
        peer.start_tls(ssl.optionsForClientTLS("a.example", trustRoot=trust))
        peer.handshake.addTimeout(TIMEOUT, reactor)
        connection = yield peer.handshake
        self.assertIn(connection.get_protocol_version_name(), ("TLSv1.2", "TLSv1.3"))

        # The stream goes on over TLS: a fresh header gets a header and features.
        peer.transport.write(s2s_header("evil.example", "a.example"))
        yield wait_until(lambda: b"</stream:features>" in peer.secure, "features over TLS")
        after = Reply(bytes(peer.secure))
        self.assertEqual((after.root.uri, after.root.name), (ns.STREAMS, "stream"))
        self.assertEqual(after.root.getAttribute("from"), "a.example")
        self.assertNotEqual(after.root.getAttribute("id"), before.root.getAttribute("id"))
        [features] = after.elements
        offered = [(c.uri, c.name) for c in features.elements()]
        self.assertIn((ns.DIALBACK_FEATURE, "dialback"), offered)
        self.assertNotIn((ns.TLS, "starttls"), offered)
        self.assertEqual(bytes(peer.plain), plain, "plaintext arrived after the switch")
        [record] = [r for r in self.gateway.table if r.direction == INBOUND]
        self.assertEqual(record.tls["version"], connection.get_protocol_version_name())

        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assert_nothing_processed()
        self.assertFalse(peer.lost.called)
        peer.transport.write(b"</stream:stream>")
        peer.lost.addTimeout(TIMEOUT, reactor)
        yield peer.lost
        self.assertTrue(Reply(bytes(peer.secure)).ended)


class InboundInjectionRequiredTLSTests(InboundInjectionTests):
    """The same with TLS required: STARTTLS is offered alone."""

    encryption = "required"


# -- the fake remote server for the outbound direction --------------------------------

@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """A server context with one certificate; records the SNI it was asked for."""

    def __init__(self, issued):
        self.server_names: list = []
        self.context = SSL.Context(SSL.TLS_METHOD)
        self.context.use_certificate(crypto.X509.from_cryptography(issued.cert))
        for cert in issued.chain:
            self.context.add_extra_chain_cert(crypto.X509.from_cryptography(cert))
        self.context.use_privatekey(crypto.PKey.from_cryptography_key(issued.key))
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


class OutboundInjectionTests(GatewayCase):
    """The gateway connects to a server that injects after <proceed/>."""

    injection = OUTBOUND_INJECTIONS["features_and_result"]

    @defer.inlineCallbacks
    def setUp(self):
        self.server_tls = ServerTLS(shared_ca().issue(dns=("remote.example",)))
        self.remote = FakeRemoteFactory(self.injection, self.server_tls, self.outbound_pairs)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.remote)
        self.addCleanup(port.stopListening)
        # Encryption optional for the peer: the injected features would then
        # be enough to start dialback if they were parsed.
        yield self.start(peers={"remote.example": {
            "addresses": [f"127.0.0.1:{port.getHost().port}"], "encryption": "optional"}})

    def outbound_pairs(self) -> dict:
        return {(p.local, p.remote): (p.state, p.method) for r in self.gateway.table
                if r.direction == OUTBOUND for p in r.pairs.values()}

    @defer.inlineCallbacks
    def test_injected_after_proceed_is_dropped(self):
        self.component.send("<message from='alice@chat.a.example' to='someone@remote.example' id='m1'>"
                            "<body>over TLS only</body></message>")
        message = yield self.remote.messages.get().addTimeout(TIMEOUT, reactor)
        self.assertEqual((message["to"], message["id"], str(message.body)),
                         ("someone@remote.example", "m1", "over TLS only"))
        [remote] = self.remote.connections
        self.assertTrue(remote.handshake_done)
        self.assertEqual(self.server_tls.server_names, [b"remote.example"])

        # Plaintext from the gateway: its header and <starttls/>, nothing more.
        plain = Reply(bytes(remote.plain))
        self.assertEqual((plain.root.getAttribute("to"), plain.root.getAttribute("from")),
                         ("remote.example", "chat.a.example"))
        self.assertEqual([(e.uri, e.name) for e in plain.elements], [(ns.TLS, "starttls")])
        self.assertTrue(bytes(remote.plain).endswith(STARTTLS))
        # Its next bytes on the wire are a TLS ClientHello (a handshake
        # record whose first message is type 1), and the first it sends
        # over TLS is a new header.
        self.assertEqual((remote.raw[0], remote.raw[5]), (0x16, 0x01), bytes(remote.raw[:16]))
        self.assertTrue(bytes(remote.secure).startswith(DECL + b"<stream:stream "), bytes(remote.secure[:80]))
        self.assertEqual(len(remote.headers), 2)

        # No pair before real authentication: none when the TLS header came,
        # pending (not valid) when the gateway asked, keyed on the TLS stream id.
        self.assertEqual(remote.seen["tls-header"], {})
        self.assertEqual(remote.seen["db-request"],
                         {("chat.a.example", "remote.example"): (PENDING, "dialback")})
        [request] = [e for e in remote.elements if (e.uri, e.name) == (ns.DIALBACK, "result")]
        self.assertEqual(str(request), dialback.dialback_key(
            self.gateway.ctx.secret, "remote.example", "chat.a.example", "tls-id"))
        self.assertEqual(self.outbound_pairs(),
                         {("chat.a.example", "remote.example"): (VALID, "dialback")})
        [record] = [r for r in self.gateway.table if r.direction == OUTBOUND]
        self.assertIn(record.tls["version"], ("TLSv1.2", "TLSv1.3"))
        self.assertTrue(record.tls["chain_ok"])
        self.assertEqual(self.bounced, [])
        self.assertEqual(self.verify_calls, [])


class OutboundNewHeaderInjectionTests(OutboundInjectionTests):
    """The same with a whole injected stream start (header, features, result)."""

    injection = OUTBOUND_INJECTIONS["new_header_features_and_result"]
