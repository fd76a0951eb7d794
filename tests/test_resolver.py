"""Tests for fedgate.s2s.resolver, mostly against a real DNS server on loopback."""

from __future__ import annotations

import random

from twisted.internet import defer, reactor
from twisted.names import dns, error
from twisted.trial import unittest

from fedgate.s2s.resolver import S2SResolver, Target
from tests.support.dnsserver import TestDNSServer, make_client_resolver

SRV = "_xmpp-server._tcp.{}"
SRVS = "_xmpps-server._tcp.{}"


class ScriptedRandom(random.Random):
    """randint answers from a script and remembers what it was asked."""

    def __init__(self, picks):
        super().__init__(0)
        self.picks = list(picks)
        self.asked = []

    def randint(self, a, b):
        self.asked.append((a, b))
        return self.picks.pop(0)


class DNSServerCase(unittest.TestCase):
    """A fresh authoritative server and a client pointed only at it, per test."""

    def setUp(self):
        self.dns = TestDNSServer(reactor)
        self.port = self.dns.start()
        self.addCleanup(self.dns.stop)
        self.client = make_client_resolver(reactor, self.port)

    def resolver(self, **kwargs) -> S2SResolver:
        return S2SResolver(self.client, **kwargs)


class SRVResolutionTests(DNSServerCase):
    @defer.inlineCallbacks
    def test_orders_by_priority(self):
        self.dns.add_srv(SRV.format("example.org"), 20, 0, 5270, "second.example.org")
        self.dns.add_srv(SRV.format("example.org"), 30, 0, 5271, "third.example.org.")
        self.dns.add_srv(SRV.format("example.org"), 10, 0, 5269, "first.example.org")
        targets = yield self.resolver().resolve("example.org")
        self.assertEqual(
            targets,
            [
                Target("first.example.org", 5269),
                Target("second.example.org", 5270),
                Target("third.example.org", 5271),
            ],
        )
        self.assertEqual(self.dns.queries, [("_xmpp-server._tcp.example.org", "SRV")])

    @defer.inlineCallbacks
    def test_weighted_selection_follows_rfc2782(self):
        name = SRV.format("example.org")
        self.dns.add_srv(name, 10, 20, 5269, "b.example.org")
        self.dns.add_srv(name, 10, 0, 5269, "z.example.org")
        self.dns.add_srv(name, 10, 10, 5269, "a.example.org")
        self.dns.add_srv(name, 5, 0, 5269, "top.example.org")
        # Canonical order within priority 10: z (weight 0 first), a (10), b (20).
        # Sum 30; 15 passes z (0) and a (10) and lands on b (30).  Then z and
        # a remain with sum 10; 0 selects z.  a is last.
        rng = ScriptedRandom([0, 15, 0, 10])
        targets = yield self.resolver(rng=rng).resolve("example.org")
        self.assertEqual(
            [t.host for t in targets],
            ["top.example.org", "b.example.org", "z.example.org", "a.example.org"],
        )
        self.assertEqual(rng.asked, [(0, 0), (0, 30), (0, 10), (0, 10)])

    @defer.inlineCallbacks
    def test_seeded_rng_is_reproducible_and_varies_with_seed(self):
        name = SRV.format("example.org")
        for host, weight in [("a", 1), ("b", 5), ("c", 10), ("d", 50)]:
            self.dns.add_srv(name, 0, weight, 5269, f"{host}.example.org")
        orders = []
        for seed in [1, 1, 2, 3, 4, 5, 6, 7]:
            targets = yield self.resolver(rng=random.Random(seed)).resolve("example.org")
            orders.append(tuple(t.host for t in targets))
        self.assertEqual(orders[0], orders[1])
        self.assertEqual(sorted(orders[0]), ["a.example.org", "b.example.org", "c.example.org", "d.example.org"])
        self.assertGreater(len(set(orders)), 1)

    @defer.inlineCallbacks
    def test_single_dot_target_means_no_service(self):
        self.dns.add_srv(SRV.format("noxmpp.example"), 0, 0, 0, ".")
        self.dns.add_a("noxmpp.example", "192.0.2.1")
        targets = yield self.resolver().resolve("noxmpp.example")
        self.assertEqual(targets, [])

    @defer.inlineCallbacks
    def test_dot_among_real_records_is_ignored(self):
        self.dns.add_srv(SRV.format("odd.example"), 0, 0, 0, ".")
        self.dns.add_srv(SRV.format("odd.example"), 5, 0, 5269, "xmpp.odd.example")
        targets = yield self.resolver().resolve("odd.example")
        self.assertEqual(targets, [Target("xmpp.odd.example", 5269)])

    @defer.inlineCallbacks
    def test_nxdomain_falls_back_to_domain_on_5269(self):
        targets = yield self.resolver().resolve("Plain.Example.")
        self.assertEqual(targets, [Target("plain.example", 5269)])
        self.assertEqual(self.dns.queries, [("_xmpp-server._tcp.plain.example", "SRV")])

    @defer.inlineCallbacks
    def test_no_srv_answer_falls_back(self):
        self.dns.add_a("aonly.example", "192.0.2.7")
        self.dns.add_srv("_xmpp-client._tcp.aonly.example", 0, 0, 5222, "c.aonly.example")
        targets = yield self.resolver().resolve("aonly.example")
        self.assertEqual(targets, [Target("aonly.example", 5269)])

    @defer.inlineCallbacks
    def test_srv_timeout_falls_back(self):
        self.dns.add_silent(SRV.format("slow.example"))
        client = make_client_resolver(reactor, self.port, timeout=(0.2,))
        targets = yield S2SResolver(client).resolve("slow.example")
        self.assertEqual(targets, [Target("slow.example", 5269)])
        self.assertEqual(self.dns.queries, [("_xmpp-server._tcp.slow.example", "SRV")])

    @defer.inlineCallbacks
    def test_resolver_timeout_is_passed_to_lookups(self):
        self.dns.add_silent(SRV.format("slow.example"))
        # The client's own default would wait 3 seconds; ours gives up sooner.
        client = make_client_resolver(reactor, self.port, timeout=(3.0,))
        started = reactor.seconds()
        targets = yield S2SResolver(client, timeout=(0.2,)).resolve("slow.example")
        self.assertEqual(targets, [Target("slow.example", 5269)])
        self.assertLess(reactor.seconds() - started, 2.0)

    @defer.inlineCallbacks
    def test_records_added_after_a_miss_are_seen(self):
        first = yield self.resolver().resolve("late.example")
        self.dns.add_srv(SRV.format("late.example"), 0, 0, 5999, "xmpp.late.example")
        second = yield self.resolver().resolve("late.example")
        self.assertEqual(first, [Target("late.example", 5269)])
        self.assertEqual(second, [Target("xmpp.late.example", 5999)])


class StaticAddressTests(DNSServerCase):
    @defer.inlineCallbacks
    def test_static_addresses_bypass_dns(self):
        self.dns.add_srv(SRV.format("static.example"), 0, 0, 5269, "dns.static.example")
        resolver = self.resolver(static_addresses={"Static.Example": [("10.0.0.2", 5270), ("peer.internal", 5269)]})
        targets = yield resolver.resolve("static.example.")
        self.assertEqual(targets, [Target("10.0.0.2", 5270), Target("peer.internal", 5269)])
        self.assertEqual(self.dns.queries, [])

    @defer.inlineCallbacks
    def test_other_domains_still_use_dns(self):
        self.dns.add_srv(SRV.format("dynamic.example"), 0, 0, 5300, "xmpp.dynamic.example")
        resolver = self.resolver(static_addresses={"static.example": [("10.0.0.2", 5270)]})
        targets = yield resolver.resolve("dynamic.example")
        self.assertEqual(targets, [Target("xmpp.dynamic.example", 5300)])
        self.assertEqual(len(self.dns.queries), 1)


class ResolveHostTests(DNSServerCase):
    @defer.inlineCallbacks
    def test_a_records_before_aaaa(self):
        self.dns.add_aaaa("xmpp.example.org", "2001:db8:0:0::1")
        self.dns.add_a("xmpp.example.org", "192.0.2.10")
        self.dns.add_a("xmpp.example.org", "192.0.2.11")
        addresses = yield self.resolver().resolve_host("xmpp.example.org")
        self.assertEqual(addresses, ["192.0.2.10", "192.0.2.11", "2001:db8::1"])
        self.assertEqual(
            sorted(self.dns.queries), [("xmpp.example.org", "A"), ("xmpp.example.org", "AAAA")]
        )

    @defer.inlineCallbacks
    def test_aaaa_only_host(self):
        self.dns.add_aaaa("v6.example.org", "2001:db8::5")
        addresses = yield self.resolver().resolve_host("v6.example.org")
        self.assertEqual(addresses, ["2001:db8::5"])

    @defer.inlineCallbacks
    def test_unknown_host_is_empty(self):
        addresses = yield self.resolver().resolve_host("nowhere.example.org")
        self.assertEqual(addresses, [])

    @defer.inlineCallbacks
    def test_ip_literals_are_returned_without_dns(self):
        v4 = yield self.resolver().resolve_host("192.0.2.1")
        v6 = yield self.resolver().resolve_host("2001:db8::1")
        self.assertEqual((v4, v6), (["192.0.2.1"], ["2001:db8::1"]))
        self.assertEqual(self.dns.queries, [])


class DirectTLSTests(DNSServerCase):
    @defer.inlineCallbacks
    def test_direct_tls_merged_and_preferred_at_equal_priority(self):
        domain = "both.example"
        self.dns.add_srv(SRV.format(domain), 10, 0, 5269, "starttls.both.example")
        self.dns.add_srv(SRV.format(domain), 20, 0, 5269, "backup.both.example")
        self.dns.add_srv(SRVS.format(domain), 10, 0, 5270, "tls.both.example")
        self.dns.add_srv(SRVS.format(domain), 30, 0, 443, "last.both.example")
        targets = yield self.resolver(include_direct_tls=True).resolve(domain)
        self.assertEqual(
            targets,
            [
                Target("tls.both.example", 5270, direct_tls=True),
                Target("starttls.both.example", 5269),
                Target("backup.both.example", 5269),
                Target("last.both.example", 443, direct_tls=True),
            ],
        )

    @defer.inlineCallbacks
    def test_direct_tls_not_asked_for_by_default(self):
        self.dns.add_srv(SRVS.format("both.example"), 0, 0, 5270, "tls.both.example")
        targets = yield self.resolver().resolve("both.example")
        self.assertEqual(targets, [Target("both.example", 5269)])
        self.assertEqual([q for q in self.dns.queries if q[0].startswith("_xmpps")], [])

    @defer.inlineCallbacks
    def test_only_direct_tls_records_means_no_fallback(self):
        self.dns.add_srv(SRVS.format("tlsonly.example"), 0, 0, 5270, "tls.tlsonly.example")
        targets = yield self.resolver(include_direct_tls=True).resolve("tlsonly.example")
        self.assertEqual(targets, [Target("tls.tlsonly.example", 5270, direct_tls=True)])

    @defer.inlineCallbacks
    def test_direct_tls_declined_still_falls_back(self):
        self.dns.add_srv(SRVS.format("nodirect.example"), 0, 0, 0, ".")
        targets = yield self.resolver(include_direct_tls=True).resolve("nodirect.example")
        self.assertEqual(targets, [Target("nodirect.example", 5269)])

    @defer.inlineCallbacks
    def test_starttls_declined_but_direct_tls_offered(self):
        self.dns.add_srv(SRV.format("mixed.example"), 0, 0, 0, ".")
        self.dns.add_srv(SRVS.format("mixed.example"), 0, 0, 5223, "tls.mixed.example")
        declined = yield self.resolver().resolve("mixed.example")
        direct = yield self.resolver(include_direct_tls=True).resolve("mixed.example")
        self.assertEqual(declined, [])
        self.assertEqual(direct, [Target("tls.mixed.example", 5223, direct_tls=True)])


class TestDNSServerTests(DNSServerCase):
    """The test server itself: TCP on the same port, authoritative negatives."""

    @defer.inlineCallbacks
    def test_nxdomain_is_authoritative(self):
        message = yield self.client.queryUDP([dns.Query("missing.example", dns.SRV)])
        self.assertEqual((message.rCode, message.auth), (dns.ENAME, 1))

    @defer.inlineCallbacks
    def test_empty_non_terminal_is_nodata(self):
        self.dns.add_a("deep.below.example", "192.0.2.3")
        message = yield self.client.queryUDP([dns.Query("below.example", dns.A)])
        self.assertEqual((message.rCode, message.answers), (dns.OK, []))

    @defer.inlineCallbacks
    def test_answers_over_tcp_on_the_same_port(self):
        self.dns.add_srv(SRV.format("tcp.example"), 1, 2, 5269, "xmpp.tcp.example")
        message = yield self.client.queryTCP([dns.Query(SRV.format("tcp.example"), dns.SRV)])
        for connection in list(self.client.connections):
            connection.transport.loseConnection()
        self.assertEqual(message.rCode, dns.OK)
        [answer] = message.answers
        self.assertEqual(
            (answer.payload.priority, answer.payload.weight, answer.payload.target.name),
            (1, 2, b"xmpp.tcp.example"),
        )


class FakeResolver:
    """Just enough IResolver: canned SRV results by name, failures as given."""

    def __init__(self, srv=None, failure=None):
        self.srv = srv or {}
        self.failure = failure
        self.asked = []

    def lookupService(self, name, timeout=None):
        self.asked.append(name)
        if self.failure is not None:
            return defer.fail(self.failure)
        records = [
            dns.RRHeader(name, dns.SRV, payload=dns.Record_SRV(p, w, port, target))
            for p, w, port, target in self.srv.get(name, [])
        ]
        if not records:
            return defer.fail(error.DNSNameError(name))
        return defer.succeed((records, [], []))


class FakeResolverTests(unittest.TestCase):
    def test_dns_errors_fall_back(self):
        for failure in [error.DNSServerError("servfail"), error.DNSQueryTimeoutError(1), defer.TimeoutError()]:
            d = S2SResolver(FakeResolver(failure=failure)).resolve("example.net")
            self.assertEqual(self.successResultOf(d), [Target("example.net", 5269)])

    def test_bugs_are_not_mistaken_for_dns_failure(self):
        d = S2SResolver(FakeResolver(failure=ZeroDivisionError())).resolve("example.net")
        self.failureResultOf(d, ZeroDivisionError)

    def test_idn_domain_is_queried_as_a_labels(self):
        fake = FakeResolver()
        d = S2SResolver(fake).resolve("Bücher.example")
        self.assertEqual(fake.asked, ["_xmpp-server._tcp.xn--bcher-kva.example"])
        self.assertEqual(self.successResultOf(d), [Target("xn--bcher-kva.example", 5269)])

    def test_weights_bias_the_first_choice(self):
        name = SRV.format("example.net")
        fake = FakeResolver({name: [(0, 9, 5269, "heavy.example.net"), (0, 1, 5269, "light.example.net")]})
        resolver = S2SResolver(fake, rng=random.Random(2024))
        firsts = [self.successResultOf(resolver.resolve("example.net"))[0].host for _ in range(2000)]
        heavy = firsts.count("heavy.example.net") / len(firsts)
        self.assertTrue(0.85 < heavy < 0.95, heavy)
