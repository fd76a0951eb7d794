"""The S2S DNS cache (fedgate.dnscache) in front of a real twisted.names
client asking a real DNS server on loopback; a task.Clock stands for time."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from fedgate.config import ConfigError, parse_config
from fedgate.dnscache import NEGATIVE_TTL, CachingResolver
from fedgate.s2s.resolver import S2SResolver
from tests.support.dnsserver import TestDNSServer, make_client_resolver

TTL = 60  # what tests.support.dnsserver gives every record


class WithDNS(unittest.TestCase):
    """The real test DNS server, a client resolver on it and a fake clock."""

    def setUp(self):
        self.dns = TestDNSServer(reactor)
        port = self.dns.start()
        self.addCleanup(self.dns.stop)
        self.clock = Clock()
        self.client = make_client_resolver(reactor, port)


class CachingResolverTests(WithDNS):
    def setUp(self):
        super().setUp()
        for n in range(5):
            self.dns.add_a(f"h{n}.example", f"192.0.2.{n + 1}")
        self.dns.add_srv("_xmpp-server._tcp.d.example", 0, 0, 5269, "h0.example")

    def asked(self, name: str) -> int:
        return sum(1 for qname, _ in self.dns.queries if qname.rstrip(".").lower() == name)

    @defer.inlineCallbacks
    def test_an_answer_is_kept_for_its_ttl(self):
        cache = CachingResolver(self.client, self.clock, 8)
        first, _, _ = yield cache.lookupAddress("h1.example")
        second, _, _ = yield cache.lookupAddress("H1.example")
        self.assertEqual(self.asked("h1.example"), 1)
        self.assertEqual(first[0].payload.dottedQuad(), "192.0.2.2")
        self.assertIs(first, second)
        self.clock.advance(TTL - 1)
        yield cache.lookupAddress("h1.example")
        self.assertEqual(self.asked("h1.example"), 1)
        self.clock.advance(1)  # the TTL has run out
        yield cache.lookupAddress("h1.example")
        self.assertEqual(self.asked("h1.example"), 2)
        self.assertEqual((cache.hits, cache.misses), (2, 2))

    @defer.inlineCallbacks
    def test_past_the_bound_the_least_recently_used_goes(self):
        cache = CachingResolver(self.client, self.clock, 3)
        for n in range(3):
            yield cache.lookupAddress(f"h{n}.example")
        yield cache.lookupAddress("h0.example")  # h0 used again: h1 is now the oldest
        yield cache.lookupAddress("h3.example")
        yield cache.lookupAddress("h4.example")
        self.assertEqual(len(cache), 3)
        yield cache.lookupAddress("h0.example")
        yield cache.lookupAddress("h4.example")
        self.assertEqual((self.asked("h0.example"), self.asked("h4.example")), (1, 1))
        yield cache.lookupAddress("h1.example")  # pushed out: asked again
        yield cache.lookupAddress("h2.example")
        self.assertEqual((self.asked("h1.example"), self.asked("h2.example")), (2, 2))
        self.assertEqual(len(cache), 3)

    @defer.inlineCallbacks
    def test_errors_are_not_kept(self):
        cache = CachingResolver(self.client, self.clock, 8)
        for _ in range(2):
            try:
                yield cache.lookupAddress("missing.example")
            except Exception:
                pass
        self.assertEqual(self.asked("missing.example"), 2)
        self.assertEqual(len(cache), 0)

    @defer.inlineCallbacks
    def test_the_s2s_resolver_asks_once_for_srv_and_addresses(self):
        cache = CachingResolver(self.client, self.clock, 8)
        s2s = S2SResolver(cache, rng=None)
        for _ in range(3):
            targets = yield s2s.resolve("d.example")
            addresses = yield s2s.resolve_host(targets[0].host)
        self.assertEqual(addresses, ["192.0.2.1"])
        self.assertEqual(self.asked("_xmpp-server._tcp.d.example"), 1)
        self.assertEqual(self.asked("h0.example"), 2)  # A and (empty) AAAA, once each

    @defer.inlineCallbacks
    def test_an_empty_answer_is_kept_briefly(self):
        cache = CachingResolver(self.client, self.clock, 8)
        answers, _, _ = yield cache.lookupIPV6Address("h1.example")  # no AAAA record
        self.assertEqual(answers, [])
        yield cache.lookupIPV6Address("h1.example")
        self.assertEqual(self.asked("h1.example"), 1)
        self.clock.advance(NEGATIVE_TTL)
        yield cache.lookupIPV6Address("h1.example")
        self.assertEqual(self.asked("h1.example"), 2)


class ConfigTests(unittest.SynchronousTestCase):
    BASE = {"state_dir": "/tmp/x", "domains": ["a.example"], "s2s": {"listen": []}}

    def test_default_and_off(self):
        self.assertEqual(parse_config(self.BASE, "<t>").s2s.dns_cache_entries, 1024)
        off = parse_config({**self.BASE, "s2s": {"listen": [], "dns_cache_entries": 0}}, "<t>")
        self.assertEqual(off.s2s.dns_cache_entries, 0)

    def test_negative_is_refused_naming_the_key(self):
        with self.assertRaisesRegex(ConfigError, "s2s.dns_cache_entries"):
            parse_config({**self.BASE, "s2s": {"listen": [], "dns_cache_entries": -1}}, "<t>")


class TapResolverTests(unittest.TestCase):
    """What twistd builds (fedgate.tap.make_resolver): the configured
    servers behind the cache, or no cache with dns_cache_entries = 0."""

    def config(self, port: int, entries: int):
        return parse_config({"state_dir": "/tmp/x", "domains": ["a.example"],
                             "s2s": {"listen": [], "dns_servers": [f"127.0.0.1:{port}"],
                                     "dns_cache_entries": entries}}, "<t>")

    @defer.inlineCallbacks
    def test_the_configured_servers_behind_the_cache(self):
        from fedgate.tap import make_resolver
        dns = TestDNSServer(reactor)
        port = dns.start()
        self.addCleanup(dns.stop)
        dns.add_a("h.example", "192.0.2.9")
        cached = make_resolver(self.config(port, 2), reactor)
        self.assertIsInstance(cached, CachingResolver)
        self.assertEqual(cached.max_entries, 2)
        for _ in range(3):
            answers, _, _ = yield cached.lookupAddress("h.example")
        self.assertEqual(answers[0].payload.dottedQuad(), "192.0.2.9")
        self.assertEqual(len(dns.queries), 1)
        plain = make_resolver(self.config(port, 0), reactor)
        self.assertNotIsInstance(plain, CachingResolver)
        for _ in range(2):
            yield plain.lookupAddress("h.example")
        self.assertEqual(len(dns.queries), 3)



class RecordBoundTests(WithDNS):
    """Finding 4: what one entry holds is bounded, and so is the total,
    against a zone that answers hundreds of records per name."""


    def asked(self, name: str) -> int:
        return sum(1 for qname, _ in self.dns.queries if qname.rstrip(".").lower() == name)

    def test_the_documented_defaults(self):
        from fedgate.dnscache import DEFAULT_MAX_RECORDS, MAX_RECORDS_PER_ENTRY
        self.assertEqual((MAX_RECORDS_PER_ENTRY, DEFAULT_MAX_RECORDS), (32, 8192))
        self.assertEqual(CachingResolver(self.client, self.clock).max_records, DEFAULT_MAX_RECORDS)

    @defer.inlineCallbacks
    def test_an_oversized_answer_is_used_but_not_kept(self):
        from fedgate.dnscache import MAX_RECORDS_PER_ENTRY
        for n in range(200):  # a few KB on the wire: over TCP after truncation
            self.dns.add_a("big.evil.example", f"192.0.2.{n + 1}")
        for n in range(MAX_RECORDS_PER_ENTRY):
            self.dns.add_a("fits.evil.example", f"198.51.100.{n + 1}")
        cache = CachingResolver(self.client, self.clock, 64)
        answers, _, _ = yield cache.lookupAddress("big.evil.example")
        self.assertEqual(len(answers), 200, "the caller still gets the whole answer")
        yield cache.lookupAddress("big.evil.example")
        self.assertGreaterEqual(self.asked("big.evil.example"), 2, "not kept: asked again")
        self.assertEqual((len(cache), cache.records, cache.too_large), (0, 0, 2))
        answers, _, _ = yield cache.lookupAddress("fits.evil.example")
        yield cache.lookupAddress("fits.evil.example")
        self.assertEqual(len(cache), 1, "an answer at the bound is kept")
        self.assertEqual(cache.records, MAX_RECORDS_PER_ENTRY)
        self.assertEqual(cache.hits, 1)

    @defer.inlineCallbacks
    def test_the_total_number_of_records_is_bounded(self):
        for n in range(20):
            for k in range(10):
                self.dns.add_a(f"w{n}.evil.example", f"192.0.2.{k + 1}")
        cache = CachingResolver(self.client, self.clock, max_entries=1000, max_records=50)
        for n in range(20):
            yield cache.lookupAddress(f"w{n}.evil.example")
            self.assertLessEqual(cache.records, 50)
        self.assertEqual((len(cache), cache.records), (5, 50), "the 5 most recent names")
        yield cache.lookupAddress("w19.evil.example")
        yield cache.lookupAddress("w0.evil.example")
        self.assertEqual((self.asked("w19.evil.example"), self.asked("w0.evil.example")), (1, 2))
        self.assertEqual(cache.records, sum(e[2] for e in cache._entries.values()))
