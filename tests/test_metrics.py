"""Prometheus metrics: values read from the live tables, totals that survive
closed connections, bounded label sets, and a real scrape over HTTP."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from fedgate.component.credentials import CredentialRegistry
from fedgate.metrics import GatewayMetrics
from fedgate.policy import PeerPolicy, PolicyTable
from fedgate.router import Router
from fedgate.s2s.pairs import INBOUND, OUTBOUND, VALID, ConnectionRecord, ConnectionTable
from tests.test_admin_api import TIMEOUT, AdminCase


def samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} of a scrape."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(scrape: dict, name: str, **labels) -> float:
    return scrape[(name, frozenset(labels.items()))]


class FakeSender:
    """The sender's narrow views, with a destination in a state the metrics
    do not know ("weird") and one idle one."""

    queues = {"x.example": (2, 300), "y.example": (0, 0)}

    def outcomes(self):
        return {"accepted": 5, "delivered": 3, "bounced": 2}

    def state_counts(self):
        return {"weird": 1, "idle": 1}

    def pending_stanza_count(self, remote=None):
        if remote is not None:
            return self.queues.get(remote, (0, 0))[0]
        return sum(n for n, _ in self.queues.values())

    def pending_bytes(self):
        return sum(b for _, b in self.queues.values())


def fake_gateway(clock):
    router = Router(["gw.example"], ["c.example", "d.example"])
    router.bounces.update({"remote-server-not-found": 2, "made-up-condition": 1})
    router.bind("c.example", object())
    return SimpleNamespace(
        reactor=clock, table=ConnectionTable(), sender=FakeSender(), router=router,
        component_credentials=CredentialRegistry(xep0114={"c.example": "s", "d.example": "t"}),
        policy=PolicyTable(PeerPolicy(), {"p.example": PeerPolicy("p.example", allowed=False)}))


def metrics_of(gateway, domains=()):
    return GatewayMetrics(gateway.reactor, gateway.table, gateway.sender, gateway.router,
                          gateway.component_credentials, gateway.policy, domains)


class UnitTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.gateway = fake_gateway(self.clock)
        self.metrics = metrics_of(self.gateway, ["x.example"])

    def scrape(self) -> dict:
        return samples(self.metrics.render().decode())

    def test_live_values_and_bounded_labels(self):
        record = ConnectionRecord(INBOUND, "192.0.2.1:1", 990.0)
        self.gateway.table.add(record)
        record.set_pair("gw.example", "x.example", VALID, "dialback", 992.5)
        record.set_pair("gw.example", "z.example", VALID, "password-of-sorts", 993.0)
        record.pairs[("gw.example", "x.example")].stanzas_in = 7
        got = self.scrape()
        self.assertEqual(value(got, "fedgate_s2s_connections", direction=INBOUND, state="authenticated"), 1)
        self.assertEqual(value(got, "fedgate_s2s_connections", direction=OUTBOUND, state="authenticating"), 0)
        self.assertEqual(value(got, "fedgate_s2s_domain_pairs", method="dialback", state="valid"), 1)
        self.assertEqual(value(got, "fedgate_s2s_domain_pairs", method="other", state="valid"), 1)
        self.assertEqual(value(got, "fedgate_s2s_stanzas_total", direction="in"), 7)
        self.assertEqual(value(got, "fedgate_bounces_total", condition="remote-server-not-found"), 2)
        self.assertEqual(value(got, "fedgate_bounces_total", condition="other"), 1)
        self.assertEqual(value(got, "fedgate_sender_stanzas_total", outcome="accepted"), 5)
        self.assertEqual(value(got, "fedgate_destinations", state="other"), 1)
        self.assertEqual(value(got, "fedgate_queue_stanzas"), 2)
        self.assertEqual(value(got, "fedgate_queue_bytes"), 300)
        self.assertEqual(value(got, "fedgate_peer_queue_stanzas", domain="x.example"), 2)
        self.assertEqual(value(got, "fedgate_peer_connections", domain="x.example"), 1)
        self.assertEqual(value(got, "fedgate_components", state="connected"), 1)
        self.assertEqual(value(got, "fedgate_peer_policies", allowed="false"), 1)
        self.assertEqual(value(got, "fedgate_s2s_handshake_seconds_count", direction=INBOUND), 1)
        self.assertEqual(value(got, "fedgate_s2s_handshake_seconds_sum", direction=INBOUND), 2.5)
        # Only opted-in domains are labels; y.example and z.example never are.
        domains = {dict(labels).get("domain") for _, labels in got} - {None}
        self.assertEqual(domains, {"x.example"})

    def test_closed_connections_keep_their_totals_and_are_observed_once(self):
        record = ConnectionRecord(OUTBOUND, "192.0.2.1:1", 990.0, remote_domain="x.example")
        self.gateway.table.add(record)
        record.set_pair("gw.example", "x.example", VALID, "sasl-external", 991.0)
        record.pairs[("gw.example", "x.example")].stanzas_out = 4
        self.assertEqual(value(self.scrape(), "fedgate_s2s_handshake_seconds_count", direction=OUTBOUND), 1)
        self.gateway.table.remove(record)
        got = self.scrape()
        self.assertEqual(value(got, "fedgate_s2s_stanzas_total", direction="out"), 4)
        self.assertEqual(value(got, "fedgate_s2s_handshake_seconds_count", direction=OUTBOUND), 1)
        # Authenticated and gone between two scrapes: observed at removal.
        quick = ConnectionRecord(INBOUND, "192.0.2.2:1", 995.0)
        self.gateway.table.add(quick)
        quick.set_pair("gw.example", "y.example", VALID, "dialback", 995.25)
        self.gateway.table.remove(quick)
        got = self.scrape()
        self.assertEqual(value(got, "fedgate_s2s_handshake_seconds_sum", direction=INBOUND), 0.25)

    def test_tls_failures_are_bounded(self):
        self.metrics.tls_failure("untrusted-certificate")
        self.metrics.tls_failure("something new")
        got = self.scrape()
        self.assertEqual(value(got, "fedgate_tls_failures_total", reason="untrusted-certificate"), 1)
        self.assertEqual(value(got, "fedgate_tls_failures_total", reason="other"), 1)

    def test_each_gateway_has_its_own_registry(self):
        other = metrics_of(fake_gateway(self.clock))
        self.assertIsNot(other.registry, self.metrics.registry)


class ScrapeTests(AdminCase):
    config_a = {"admin": {"metrics_domains": ["chat.b.example"]}}

    @defer.inlineCallbacks
    def test_scrape_after_federating(self):
        ca, _ = yield self.federate()
        ca.send("<message from='x@chat.a.example' to='y@nowhere.example' id='m2'/>")
        yield ca.next_element(timeout=TIMEOUT)
        got = yield self.api.get("/metrics")
        self.assertEqual(got.status, 200)
        scrape = samples(got.body.decode())
        self.assertEqual(value(scrape, "fedgate_s2s_connections", direction=OUTBOUND, state="authenticated"), 1)
        self.assertGreaterEqual(value(scrape, "fedgate_s2s_stanzas_total", direction="out"), 1)
        self.assertEqual(value(scrape, "fedgate_bounces_total", condition="remote-server-not-found"), 1)
        self.assertEqual(value(scrape, "fedgate_s2s_handshake_seconds_count", direction=OUTBOUND), 1)
        self.assertEqual(value(scrape, "fedgate_peer_connections", domain="chat.b.example"), 1)
        self.assertEqual(value(scrape, "fedgate_components", state="connected"), 1)
        # Remote domains only where opted in; the certificate expiry is
        # labelled by the gateway's own (configured) domains, and only them.
        expiry = "fedgate_certificate_expiry_timestamp_seconds"
        domains = {dict(labels).get("domain") for name, labels in scrape if name != expiry} - {None}
        self.assertEqual(domains, {"chat.b.example"})
        hosted = {dict(labels)["domain"] for name, labels in scrape if name == expiry}
        self.assertEqual(hosted, set(self.a.config.domains))
