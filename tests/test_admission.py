"""The caps on unauthenticated connections (fedgate.stream.admission), in
memory: source keys, counting, release on authentication and on close,
eviction at the total cap, refusal without state, the fit to the fd limit,
the config keys."""

from __future__ import annotations

import gc

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from fedgate.config import ConfigError, parse_config
from fedgate.metrics import GatewayMetrics
from fedgate.s2s.inbound import InboundS2S
from fedgate.stream import namespaces as ns
from fedgate.stream.admission import (PER_ADDRESS, TOTAL, Admission, AdmittingFactory, Caps,
                                      Ticket, fit_to_fd_limit, source_key)
from fedgate.stream.protocol import XmppStream
from tests.support.memory import MemoryStream, server_header
from tests.support.rawpeer import Reply
from tests.support.s2s import FakeVerifier, make_context
from tests.test_metrics import fake_gateway, samples, value


class SourceKeyTests(unittest.TestCase):
    def test_ipv4_is_its_address(self):
        self.assertEqual(source_key("192.0.2.7"), "192.0.2.7")

    def test_ipv6_counts_by_64(self):
        self.assertEqual(source_key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        self.assertEqual(source_key("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::/64")
        self.assertNotEqual(source_key("2001:db8:1:3::1"), source_key("2001:db8:1:2::1"))

    def test_ipv4_mapped_counts_as_ipv4(self):
        self.assertEqual(source_key("::ffff:192.0.2.7"), "192.0.2.7")

    def test_zone_index_is_ignored_and_non_ip_stays(self):
        self.assertEqual(source_key("fe80::1%eth0"), "fe80::/64")
        self.assertEqual(source_key("/run/fedgate.sock"), "/run/fedgate.sock")


class AdmissionTests(unittest.TestCase):
    def test_per_address_cap_refuses_the_next(self):
        pool = Admission("s2s", Caps(per_address=2, total=10))
        first, second = pool.admit("192.0.2.1"), pool.admit("192.0.2.1")
        self.assertIsInstance(first, Ticket)
        self.assertIsInstance(second, Ticket)
        self.assertEqual(pool.admit("192.0.2.1"), PER_ADDRESS)
        self.assertIsInstance(pool.admit("192.0.2.2"), Ticket)
        self.assertEqual((pool.unauthenticated, pool.refused[PER_ADDRESS]), (3, 1))

    def test_an_ipv6_64_shares_one_cap_and_mapped_shares_with_ipv4(self):
        pool = Admission("s2s", Caps(per_address=2, total=10))
        pool.admit("2001:db8::1")
        pool.admit("2001:db8::ffff:2")
        self.assertEqual(pool.admit("2001:db8::3"), PER_ADDRESS)
        self.assertIsInstance(pool.admit("2001:db8:0:1::1"), Ticket)
        pool.admit("198.51.100.1")
        pool.admit("::ffff:198.51.100.1")
        self.assertEqual(pool.admit("198.51.100.1"), PER_ADDRESS)

    def test_authentication_and_close_give_the_place_back_once(self):
        pool = Admission("s2s", Caps(per_address=1, total=10))
        ticket = pool.admit("192.0.2.1")
        self.assertEqual(pool.admit("192.0.2.1"), PER_ADDRESS)
        ticket.authenticated()
        self.assertFalse(ticket.held)
        again = pool.admit("192.0.2.1")
        self.assertIsInstance(again, Ticket)
        ticket.release()  # the authenticated connection closes later: counted once only
        self.assertEqual((pool.unauthenticated, pool.count_for("192.0.2.1")), (1, 1))
        again.release()
        self.assertEqual((pool.unauthenticated, pool.count_for("192.0.2.1")), (0, 0))

    def test_pools_count_apart(self):
        s2s = Admission("s2s", Caps(per_address=1, total=1))
        components = Admission("components", Caps(per_address=1, total=1))
        s2s.admit("127.0.0.1")
        self.assertIsInstance(components.admit("127.0.0.1"), Ticket)
        self.assertEqual(s2s.admit("127.0.0.2"), TOTAL)

    def test_at_the_total_cap_a_lighter_source_evicts_the_heaviest_oldest(self):
        pool = Admission("s2s", Caps(per_address=5, total=4))
        closed = []
        heavy = [pool.admit("192.0.2.1") for _ in range(3)]
        light = pool.admit("192.0.2.2")
        for i, ticket in enumerate(heavy + [light]):
            ticket.attach(lambda condition, text, i=i: closed.append((i, condition)))
        newcomer = pool.admit("192.0.2.3")
        self.assertIsInstance(newcomer, Ticket)
        self.assertEqual(closed, [(0, "resource-constraint")])  # the heaviest source's oldest
        self.assertFalse(heavy[0].held)
        self.assertEqual((pool.unauthenticated, pool.evicted, pool.count_for("192.0.2.1")), (4, 1, 2))

    def test_at_the_total_cap_the_heaviest_source_is_refused(self):
        pool = Admission("s2s", Caps(per_address=5, total=4))
        tickets = [pool.admit("192.0.2.1") for _ in range(2)] + [pool.admit("192.0.2.2") for _ in range(2)]
        for ticket in tickets:
            ticket.attach(lambda condition, text: self.fail("nothing is evicted"))
        self.assertEqual(pool.admit("192.0.2.1"), TOTAL)  # holds as many as any: no gain
        self.assertEqual((pool.refused[TOTAL], pool.evicted, pool.unauthenticated), (1, 0, 4))

    def test_a_connection_not_yet_attached_is_never_evicted(self):
        pool = Admission("s2s", Caps(per_address=5, total=2))
        pool.admit("192.0.2.1")
        pool.admit("192.0.2.1")
        self.assertEqual(pool.admit("192.0.2.2"), TOTAL)


class FitTests(unittest.TestCase):
    POOLS = {"s2s": Caps(32, 512), "components": Caps(16, 64)}

    def test_unchanged_when_they_fit_or_no_limit(self):
        self.assertEqual(fit_to_fd_limit(self.POOLS, 1024, 256), self.POOLS)
        self.assertEqual(fit_to_fd_limit(self.POOLS, None, 256), self.POOLS)
        self.assertEqual(fit_to_fd_limit(self.POOLS, -1, 256), self.POOLS)  # RLIM_INFINITY

    def test_lowered_in_proportion_to_leave_the_reserve(self):
        fitted = fit_to_fd_limit(self.POOLS, 512, 256)  # 256 for 576 wanted
        self.assertEqual(fitted, {"s2s": Caps(32, 227), "components": Caps(16, 28)})
        self.assertLessEqual(sum(c.total for c in fitted.values()), 512 - 256)

    def test_never_below_one_and_per_address_within_total(self):
        fitted = fit_to_fd_limit(self.POOLS, 100, 256)
        self.assertEqual(fitted, {"s2s": Caps(1, 1), "components": Caps(1, 1)})


def _factory(pool, direct_tls=False, built=None):
    clock = Clock()

    def build(ticket):
        handler = InboundS2S(make_context(clock), direct_tls=direct_tls)
        stream = XmppStream(handler, clock, admission=ticket)
        if built is not None:
            built.append(stream)
        return stream
    return AdmittingFactory(pool, build, ns.SERVER, direct_tls=direct_tls)


class FactoryTests(unittest.TestCase):
    def test_a_refused_plain_connection_gets_a_stream_error_and_no_stream(self):
        built = []
        factory = _factory(Admission("s2s", Caps(1, 10)), built=built)
        first = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 4000))
        self.assertIsInstance(first, XmppStream)
        before = len([o for o in gc.get_objects() if isinstance(o, (XmppStream, InboundS2S))])
        refused = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 4001))
        transport = StringTransport()
        refused.makeConnection(transport)
        refused.dataReceived(server_header(to="gw.example", **{"from": "b.example", "version": "1.0"}))
        self.assertEqual(len(built), 1)  # no stream, no handler, no record for the refused one
        after = len([o for o in gc.get_objects() if isinstance(o, (XmppStream, InboundS2S))])
        self.assertEqual(after, before)
        self.assertTrue(transport.disconnecting)
        reply = Reply(transport.value())
        self.assertEqual(reply.root.defaultUri, ns.SERVER)
        self.assertTrue(reply.ended)
        self.assertEqual(reply.stream_errors(), ["policy-violation"])

    def test_past_the_total_cap_the_error_is_resource_constraint(self):
        factory = _factory(Admission("s2s", Caps(5, 1)))
        factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 4000))
        refused = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 4001))
        transport = StringTransport()
        refused.makeConnection(transport)
        self.assertEqual(Reply(transport.value()).stream_errors(), ["resource-constraint"])

    def test_a_refused_direct_tls_connection_gets_no_protocol(self):
        factory = _factory(Admission("s2s", Caps(1, 10)), direct_tls=True)
        self.assertIsNotNone(factory.buildProtocol(IPv6Address("TCP", "2001:db8::1", 4000)))
        self.assertIsNone(factory.buildProtocol(IPv6Address("TCP", "2001:db8::2", 4001)))

    def test_the_stream_gives_the_place_back_when_it_closes(self):
        pool = Admission("s2s", Caps(1, 10))
        stream = _factory(pool).buildProtocol(IPv4Address("TCP", "192.0.2.1", 4000))
        stream.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 4000)))
        self.assertEqual(pool.count_for("192.0.2.1"), 1)
        stream.connectionLost(None)
        self.assertEqual(pool.count_for("192.0.2.1"), 0)

    def test_an_evicted_stream_gets_resource_constraint(self):
        pool = Admission("s2s", Caps(5, 1))
        factory = _factory(pool)
        victim = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 4000))
        transport = StringTransport()
        victim.makeConnection(transport)
        self.assertIsInstance(factory.buildProtocol(IPv4Address("TCP", "192.0.2.2", 4000)), XmppStream)
        self.assertEqual(Reply(transport.value()).stream_errors(), ["resource-constraint"])
        self.assertTrue(transport.disconnecting)
        self.assertEqual((pool.count_for("192.0.2.1"), pool.count_for("192.0.2.2")), (0, 1))


CONFIG = {"state_dir": "/tmp/x", "domains": ["gw.example"]}


class ConfigTests(unittest.TestCase):
    def test_defaults(self):
        config = parse_config(dict(CONFIG))
        self.assertEqual((config.s2s.max_unauthenticated_per_address, config.s2s.max_unauthenticated),
                         (32, 512))
        self.assertEqual((config.components.max_unauthenticated_per_address,
                          config.components.max_unauthenticated), (16, 64))
        self.assertEqual(config.limits.fd_reserve, 256)

    def test_values_are_read(self):
        config = parse_config(dict(CONFIG, s2s={"max_unauthenticated_per_address": 4, "max_unauthenticated": 8},
                                   components={"max_unauthenticated": 3, "max_unauthenticated_per_address": 2},
                                   limits={"fd_reserve": 100}))
        self.assertEqual((config.s2s.max_unauthenticated_per_address, config.s2s.max_unauthenticated,
                          config.components.max_unauthenticated_per_address,
                          config.components.max_unauthenticated, config.limits.fd_reserve),
                         (4, 8, 2, 3, 100))

    def test_errors_name_the_key(self):
        for table, key, value in [("s2s", "max_unauthenticated", 0),
                                  ("components", "max_unauthenticated_per_address", "x"),
                                  ("limits", "fd_reserve", -1)]:
            with pytest.raises(ConfigError, match=f"{table}.{key}"):
                parse_config(dict(CONFIG, **{table: {key: value}}))
        with pytest.raises(ConfigError, match="s2s.max_unauthenticated_per_address: must not exceed"):
            parse_config(dict(CONFIG, s2s={"max_unauthenticated_per_address": 9, "max_unauthenticated": 8}))


class DialbackReleaseTests(unittest.TestCase):
    """An inbound S2S stream leaves the count when its first pair is valid
    by dialback (not before: a pending verification still counts)."""

    def test_a_valid_dialback_pair_releases_the_ticket(self):
        clock = Clock()
        verifier = FakeVerifier()
        pool = Admission("s2s", Caps(2, 10))
        ticket = pool.admit("192.0.2.1")
        handler = InboundS2S(make_context(clock, verifier=verifier))
        peer = MemoryStream(handler, clock, stream=XmppStream(handler, clock, admission=ticket))
        peer.feed(server_header(to="gw.example", **{"from": "b.example", "version": "1.0"}))
        peer.feed("<db:result from='b.example' to='gw.example'>key</db:result>")
        self.assertEqual(pool.count_for("192.0.2.1"), 1)  # pending: still counts
        verifier.answer("gw.example", "b.example", valid=True)
        self.assertEqual((pool.count_for("192.0.2.1"), pool.unauthenticated), (0, 0))
        self.assertFalse(ticket.held)


class MetricsTests(unittest.TestCase):
    def test_counts_refusals_and_evictions_per_pool(self):
        gateway = fake_gateway(Clock())
        pools = {"s2s": Admission("s2s", Caps(1, 2)), "components": Admission("components", Caps(1, 1))}
        metrics = GatewayMetrics(gateway.reactor, gateway.table, gateway.sender, gateway.router,
                                 gateway.component_credentials, gateway.policy, admission=pools)
        s2s = pools["s2s"]
        s2s.admit("192.0.2.1").attach(lambda condition, text: None)
        s2s.admit("192.0.2.1")  # per-address
        s2s.admit("192.0.2.2")
        s2s.admit("192.0.2.2")  # per-address
        s2s.admit("192.0.2.3")  # evicts 192.0.2.1's
        pools["components"].admit("127.0.0.1")
        pools["components"].admit("127.0.0.2")  # total
        scrape = samples(metrics.render().decode())
        self.assertEqual(value(scrape, "fedgate_unauthenticated_connections", pool="s2s"), 2)
        self.assertEqual(value(scrape, "fedgate_unauthenticated_connections", pool="components"), 1)
        self.assertEqual(value(scrape, "fedgate_connections_refused_total", pool="s2s", cap="per-address"), 2)
        self.assertEqual(value(scrape, "fedgate_connections_refused_total", pool="s2s", cap="total"), 0)
        self.assertEqual(value(scrape, "fedgate_connections_refused_total", pool="components", cap="total"), 1)
        self.assertEqual(value(scrape, "fedgate_connections_evicted_total", pool="s2s"), 1)
