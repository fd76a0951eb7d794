"""STARTTLS command injection (the CVE-2011-0411 class), in both roles,
over real loopback sockets against a real gateway.

A raw peer (inbound) and a fake remote server (outbound,
tests/support/tlsremote.py) inject dialback and stanzas next to the switch
to TLS, complete a real TLS handshake with certificates from the test CA,
and check that the stream really went on over TLS and that nothing injected
was acted on.  test_starttls_injection.py has the same in memory.
"""

from __future__ import annotations

from twisted.internet import defer, reactor, ssl, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.trial import unittest

from fedgate.s2s import dialback
from fedgate.s2s.pairs import INBOUND, OUTBOUND, PENDING, VALID
from fedgate.stream import namespaces as ns
from tests.support.federation import add_component, start_dns
from tests.support.gateway import gateway_config, start_gateway, temp_dir, shared_ca
from tests.support.rawpeer import Reply
from tests.support.s2speer import DECL, PROCEED, STARTTLS, TIMEOUT, TLSPeer, s2s_header, wait_until
from tests.support.tlsremote import FakeRemoteFactory, ServerTLS
from tests.test_starttls_injection import INBOUND_INJECTION, OUTBOUND_INJECTIONS


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
