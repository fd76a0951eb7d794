"""The outbound address rule: which addresses we may connect to, and the
connector that applies it to every resolved address (real DNS on loopback;
TCP on a memory reactor, so a refused address is seen to get no attempt)."""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from fedgate.s2s.addresses import AddressPolicy, allowed_networks, is_ip_literal
from fedgate.s2s.connect import ConnectError, DomainConnector
from fedgate.s2s.resolver import S2SResolver
from tests.support.dnsserver import TestDNSServer, make_client_resolver

#: Addresses a remote server's DNS may point us at, none of which we may reach.
REFUSED = {
    "127.0.0.1": "loopback",
    "127.5.6.7": "loopback",
    "10.1.2.3": "private",
    "172.16.9.9": "private",
    "192.168.1.1": "private",
    "169.254.169.254": "link-local",
    "100.64.0.1": "shared",
    "224.0.0.1": "multicast",
    "0.0.0.0": "unspecified",
    "240.0.0.1": "",
    "::1": "loopback",
    "fe80::1": "link-local",
    "fc00::1": "private",
    "fd12:3456::1": "private",
    "ff02::1": "multicast",
    "::": "unspecified",
    "::ffff:127.0.0.1": "loopback",
    "::ffff:10.0.0.1": "private",
    "::ffff:169.254.169.254": "link-local",
    "2002:7f00:1::1": "loopback",       # 6to4 of 127.0.0.1
    "64:ff9b::a9fe:a9fe": "link-local",  # NAT64 of 169.254.169.254
}
GLOBAL = ["8.8.8.8", "2a00:1450:4001:80b::200e", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]


class AddressPolicyTests(unittest.TestCase):
    def test_non_global_addresses_are_refused_with_a_reason(self):
        policy = AddressPolicy()
        for address, kind in REFUSED.items():
            why = policy.refusal(address)
            self.assertIsNotNone(why, address)
            self.assertIn(kind, why, address)

    def test_global_unicast_passes(self):
        policy = AddressPolicy()
        for address in GLOBAL:
            self.assertIsNone(policy.refusal(address), address)

    def test_named_ranges(self):
        loopback = AddressPolicy(allowed_networks(["loopback"]))
        for address in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"]:
            self.assertIsNone(loopback.refusal(address), address)
        for address in ["10.1.2.3", "169.254.169.254", "0.0.0.0", "fe80::1"]:
            self.assertIsNotNone(loopback.refusal(address), address)
        everything = AddressPolicy(allowed_networks(["private", "link-local", "shared"]))
        for address in ["10.1.2.3", "172.31.0.1", "192.168.0.1", "fd00::1", "169.254.169.254",
                        "fe80::1", "100.127.255.254"]:
            self.assertIsNone(everything.refusal(address), address)
        self.assertIsNotNone(everything.refusal("127.0.0.1"))

    def test_cidr_ranges_are_exact(self):
        policy = AddressPolicy(allowed_networks(["10.20.0.0/16", "fd12::/16"]))
        self.assertIsNone(policy.refusal("10.20.3.4"))
        self.assertIsNone(policy.refusal("fd12::5"))
        self.assertIn("private", policy.refusal("10.21.0.1"))
        self.assertIn("private", policy.refusal("fd13::5"))

    def test_bad_range_values(self):
        for value in ["lan", "10.0.0.1/8", "10.0.0.0/33", ""]:
            with self.assertRaises(ValueError) as info:
                allowed_networks([value])
            self.assertIn(repr(value), str(info.exception))

    def test_not_an_address(self):
        self.assertEqual(AddressPolicy().refusal("gw.example"), "not an IP address")

    def test_ip_literals(self):
        for domain in ["[::1]", "127.0.0.1", "10.0.0.1", "[fe80::1]", "::1"]:
            self.assertTrue(is_ip_literal(domain), domain)
        for domain in ["example.org", "127.0.0.1.example", "[example]", "1.2.3"]:
            self.assertFalse(is_ip_literal(domain), domain)


class _Factory:
    def __init__(self):
        self.targets = []

    def __call__(self, target=None):
        self.targets.append(target)
        return object()


class ConnectorTests(unittest.TestCase):
    """Resolution is real (the test DNS server); connections go to a
    memory reactor, which records every attempt."""

    @defer.inlineCallbacks
    def setUp(self):
        self.dns = TestDNSServer(reactor)
        port = self.dns.start()
        self.addCleanup(self.dns.stop)
        self.resolver = S2SResolver(make_client_resolver(reactor, port))
        self.tcp = MemoryReactorClock()
        yield None

    def connector(self, allowed=(), static=()):
        return DomainConnector(self.tcp, self.resolver, timeout=5,
                               addresses=AddressPolicy(allowed_networks(allowed)),
                               is_static=lambda domain: domain in static)

    def point(self, domain, address, port=5270):
        self.dns.add_srv(f"_xmpp-server._tcp.{domain}", 0, 0, port, f"xmpp.{domain}")
        if ":" in address:
            self.dns.add_aaaa(f"xmpp.{domain}", address)
        else:
            self.dns.add_a(f"xmpp.{domain}", address)

    @defer.inlineCallbacks
    def test_refused_addresses_get_no_connection_attempt(self):
        connector = self.connector()
        for n, address in enumerate(REFUSED):
            domain = f"evil{n}.example"
            self.point(domain, address)
            factory = _Factory()
            with self.assertRaises(ConnectError) as info:
                yield connector.connect(domain, factory)
            error = info.exception
            self.assertEqual(error.condition, "remote-server-not-found")
            self.assertEqual(error.text, f"could not connect to the servers of {domain}: the server "
                                         "its SRV records name has only addresses we may not connect to")
            self.assertNotIn(address, error.text)
            self.assertIn(f"{address}:5270 refused", error.detail)
            self.assertEqual(factory.targets, [], address)
        self.assertEqual(self.tcp.tcpClients, [])

    @defer.inlineCallbacks
    def test_allowed_range_and_global_addresses_are_tried(self):
        connector = self.connector(allowed=["loopback"])
        for n, address in enumerate(["127.0.0.1", "::1", "8.8.8.8", "2a00:1450:4001:80b::200e"]):
            domain = f"ok{n}.example"
            self.point(domain, address)
            attempt = connector.connect(domain, _Factory())
            # The DNS answers arrive over real loopback; wait for the attempt.
            for _ in range(100):
                if len(self.tcp.tcpClients) > n:
                    break
                yield deferLater(0.02)
            self.assertEqual(self.tcp.tcpClients[n][:2], (address, 5270))
            attempt.cancel()
            with self.assertRaises(defer.CancelledError):
                yield attempt  # cancelling stops the attempt, not "try the next"
        self.assertEqual(len(self.tcp.tcpClients), 4)

    @defer.inlineCallbacks
    def test_static_peers_are_exempt(self):
        self.point("partner.example", "10.1.2.3")
        attempt = self.connector(static={"partner.example"}).connect("partner.example", _Factory())
        for _ in range(100):
            if self.tcp.tcpClients:
                break
            yield deferLater(0.02)
        self.assertEqual(self.tcp.tcpClients[0][:2], ("10.1.2.3", 5270))
        attempt.cancel()
        yield attempt.addErrback(lambda f: f.trap(defer.CancelledError))

    @defer.inlineCallbacks
    def test_ip_literal_domains_are_refused_before_any_lookup(self):
        connector = self.connector(allowed=["loopback", "private"])
        for domain in ["[::1]", "127.0.0.1", "10.0.0.1", "8.8.8.8"]:
            with self.assertRaises(ConnectError) as info:
                yield connector.connect(domain, _Factory())
            self.assertNotIn("tried", info.exception.text)
            self.assertIn("IP address", info.exception.detail)
        self.assertEqual(self.dns.queries, [])
        self.assertEqual(self.tcp.tcpClients, [])
        # ... unless the operator configured the literal as a static peer.
        self.assertIsNone(self.connector(static={"10.0.0.1"}).refusal("10.0.0.1", "10.0.0.1"))


def deferLater(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class BounceTextTests(unittest.TestCase):
    """The text a bounce carries says what was tried and why it failed, and
    names no address and no server host name (real DNS, real sockets)."""

    timeout = 30

    def setUp(self):
        self.dns = TestDNSServer(reactor)
        port = self.dns.start()
        self.addCleanup(self.dns.stop)
        self.connector = DomainConnector(reactor, S2SResolver(make_client_resolver(reactor, port)),
                                         timeout=5, addresses=AddressPolicy(allowed_networks(["loopback"])))

    @defer.inlineCallbacks
    def failure(self, domain):
        with self.assertRaises(ConnectError) as info:
            yield self.connector.connect(domain, _Factory())
        return info.exception

    @defer.inlineCallbacks
    def test_no_srv_and_no_address(self):
        error = yield self.failure("nowhere.example")
        self.assertEqual(error.text, "could not connect to the servers of nowhere.example: "
                                     "nowhere.example itself (port 5269, no SRV records) has no address in DNS")

    @defer.inlineCallbacks
    def test_several_servers(self):
        import socket
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
        probe.close()
        self.dns.add_srv("_xmpp-server._tcp.p.example", 0, 0, closed, "up.internal.p.example")
        self.dns.add_srv("_xmpp-server._tcp.p.example", 1, 0, 5269, "gone.internal.p.example")
        self.dns.add_a("up.internal.p.example", "127.0.0.1")
        error = yield self.failure("p.example")
        self.assertEqual(error.text, "could not connect to the servers of p.example: of the 2 servers "
                                     "its SRV records name, 1 refused the connection, 1 has no address in DNS")
        self.assertNotIn("internal", error.text)
        self.assertNotIn("127.0.0.1", error.text)
        self.assertIn(f"127.0.0.1:{closed}", error.detail)  # the log and /diagnose keep it
