"""Dialback is no SSRF oracle: a real gateway on loopback, a raw peer asking
it to verify domains whose DNS (the real test DNS server) points at
loopback, private, link-local, shared, multicast and mapped addresses, and
an IP-literal domain.  The gateway must connect nowhere, and its dialback
error must name no address."""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from fedgate.stream import namespaces as ns
from tests.support.federation import start_dns
from tests.support.gateway import gateway_config, start_gateway, temp_dir
from tests.support.rawpeer import RawPeer, Reply
from tests.support.s2speer import s2s_header, wait_until

GW = "gw.example"

#: domain -> (record type, address) its server's host resolves to
TARGETS = {
    "loop.example": ("A", "127.0.0.1"),
    "loop6.example": ("AAAA", "::1"),
    "mapped.example": ("AAAA", "::ffff:127.0.0.1"),
    "rfc1918.example": ("A", "10.23.45.67"),
    "metadata.example": ("A", "169.254.169.254"),
    "cgnat.example": ("A", "100.64.12.34"),
    "linklocal6.example": ("AAAA", "fe80::1"),
    "multicast.example": ("A", "224.0.0.251"),
    "multicast6.example": ("AAAA", "ff02::1"),
}


class Listener(protocol.Factory):
    """A loopback port standing for an internal service; counts connections."""

    noisy = False

    def __init__(self):
        self.accepted = 0

    def buildProtocol(self, addr):
        self.accepted += 1
        return protocol.Protocol()


class AddressRuleCase(unittest.TestCase):
    timeout = 60
    allow: list = []

    @defer.inlineCallbacks
    def setUp(self):
        self.dns, dns_port = start_dns(self)
        self.listener = Listener()
        port = reactor.listenTCP(0, self.listener, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        # A short connect timeout: without the rule, an attempt at an
        # unreachable address would still end, with a connect failure.
        config = gateway_config(temp_dir(self), [GW], {}, policy={"encryption": "optional"},
                                allow_private_ranges=self.allow, connect_timeout=3)
        self.gateway = yield start_gateway(reactor, config, dns_port, self)
        self.refused: list = []

        def observe(event):
            if event.get("log_namespace") == "fedgate.s2s.connect" and "why" in event:
                self.refused.append((event.get("domain"), event.get("address"), event["why"]))
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        for domain, (kind, address) in TARGETS.items():
            self.dns.add_srv(f"_xmpp-server._tcp.{domain}", 0, 0, self.port, f"xmpp.{domain}")
            (self.dns.add_a if kind == "A" else self.dns.add_aaaa)(f"xmpp.{domain}", address)
        # The IP literal domain 127.0.0.1, with an SRV record at our listener.
        self.dns.add_srv("_xmpp-server._tcp.127.0.0.1", 0, 0, self.port, "127.0.0.1")

    @defer.inlineCallbacks
    def request(self, domain: str):
        """A raw peer that asked the gateway to verify ``domain``."""
        peer = RawPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.gateway.port_of("s2s")), peer)
        self.addCleanup(lambda: peer.transport.abortConnection() if not peer.lost.called else None)
        peer.transport.write(s2s_header(domain, GW)
                             + f"<db:result from='{domain}' to='{GW}'>abcdef</db:result>".encode())
        return peer

    @defer.inlineCallbacks
    def ask(self, domain: str):
        """Ask the gateway to verify ``domain``; the <db:result/> answer and
        all the bytes it wrote."""
        peer = yield self.request(domain)

        def answer():
            return [e for e in Reply(bytes(peer.data)).elements
                    if (e.uri, e.name) == (ns.DIALBACK, "result")]
        yield wait_until(lambda: answer(), f"the dialback answer for {domain}", timeout=20)
        peer.transport.loseConnection()
        return answer()[0], bytes(peer.data)


class AddressRuleTests(AddressRuleCase):
    @defer.inlineCallbacks
    def test_no_connection_and_no_address_in_the_answer(self):
        for domain, (_, address) in TARGETS.items():
            result, data = yield self.ask(domain)
            self.assertEqual(result["type"], "error", domain)
            condition = [c.name for e in result.elements() for c in e.elements()
                         if c.uri == ns.STANZA_ERRORS and c.name != "text"]
            self.assertEqual(condition, ["remote-server-not-found"], domain)
            for leak in (address, "127.0.0.1", str(self.port)):
                self.assertNotIn(leak.encode(), data, f"{domain}: {leak} sent to the peer")
            self.assertIn(domain, [d for d, _, _ in self.refused], "refused by the rule, not by chance")
        self.assertEqual(self.listener.accepted, 0)
        self.assertEqual(self.gateway.ctx.budget.in_use, 0)

    @defer.inlineCallbacks
    def test_ip_literal_domain(self):
        result, data = yield self.ask("127.0.0.1")
        self.assertEqual(result["type"], "error")
        self.assertNotIn(str(self.port).encode(), data)
        self.assertEqual(self.listener.accepted, 0)
        self.assertFalse([q for q in self.dns.queries if "127.0.0.1" in q[0]],
                         "an IP literal is not even looked up")

    @defer.inlineCallbacks
    def test_diagnose_shows_the_refused_addresses(self):
        from fedgate.admin.diagnose import Diagnosis
        report = yield Diagnosis(self.gateway, reactor, "metadata.example", GW).run()
        steps = {s["step"]: s for s in report["steps"]}
        self.assertEqual(steps["dns"]["targets"][0]["addresses"], ["169.254.169.254"])
        [attempt] = steps["tcp"]["attempts"]
        self.assertEqual((attempt["address"], attempt["ok"]), ("169.254.169.254", False))
        self.assertIn("link-local", attempt["refused"])
        self.assertEqual(self.listener.accepted, 0)


class AllowedRangeTests(AddressRuleCase):
    """The control: with loopback allowed (as the development and test
    configurations do), the same records do lead to a connection."""

    allow = ["loopback"]

    @defer.inlineCallbacks
    def test_loopback_allowed(self):
        yield self.request("loop.example")
        yield wait_until(lambda: self.listener.accepted >= 1, "a connection to the listener")
        self.assertEqual([d for d, _, _ in self.refused if d == "loop.example"], [])
        # Everything else stays refused.
        yield self.ask("metadata.example")
        self.assertIn("metadata.example", [d for d, _, _ in self.refused])
