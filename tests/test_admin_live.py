"""Policy changes through the admin API reach live traffic at once and
survive a restart: two real gateways federating over loopback."""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from fedgate.admin.enforce import violation
from fedgate.config import parse_config
from fedgate.policy import PeerPolicy
from fedgate.s2s.pairs import INBOUND, OUTBOUND, VALID, ConnectionRecord
from fedgate.service import Gateway
from fedgate.tap import choose_storage
from tests.support.admin import AdminClient
from tests.support.component_client import connect_component
from tests.support.dnsserver import make_client_resolver
from tests.support.gateway import publish
from tests.test_admin_api import TIMEOUT, V1, AdminCase, wait_for


def error_of(element) -> str | None:
    if element.getAttribute("type") != "error":
        return None
    error = next(e for e in element.elements() if e.name == "error")
    return next(c.name for c in error.elements() if c.name != "text")


class LivePolicyTests(AdminCase):
    def capture_stream_errors(self):
        seen = []

        def observe(event):
            # The stream layer logs each stream error it sends, with its text.
            if event.get("condition") and "Stream error" in event.get("log_format", ""):
                seen.append((event["condition"], event.get("text", "")))
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return seen

    @defer.inlineCallbacks
    def test_block_closes_streams_bounces_queue_and_survives_restart(self):
        ca, cb = yield self.federate()
        cb.send("<message from='y@chat.b.example' to='x@chat.a.example' id='r1'/>")
        self.assertEqual((yield ca.next_element(timeout=TIMEOUT))["id"], "r1")
        self.assertTrue(self.a.table.connections_of("chat.b.example"))
        # A destination whose server accepts TCP but never answers keeps its
        # stanzas queued; its address is set through the API as well.
        silent = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol),
                                   interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        got = yield self.api.put(f"{V1}/peers/slow.example",
                                 {"addresses": [f"127.0.0.1:{silent.getHost().port}"]})
        self.assertEqual(got.status, 201)
        ca.send("<message from='x@chat.a.example' to='z@slow.example' id='q1'/>")
        yield wait_for(lambda: "slow.example" in self.a.sender.destinations
                       and self.a.sender.destinations["slow.example"].queue)
        seen = self.capture_stream_errors()

        got = yield self.api.put(f"{V1}/peers/chat.b.example", {"allowed": False, "note": "abuse"})
        self.assertEqual(got.status, 201)
        # Its streams end at once, with policy-violation and a text, both ways.
        yield wait_for(lambda: not self.a.table.connections_of("chat.b.example"))
        yield wait_for(lambda: ("policy-violation", "federation with chat.b.example is blocked by "
                                "policy (changed by an operator)") in seen)
        got = yield self.api.put(f"{V1}/peers/slow.example", {"allowed": False})
        bounce = yield ca.next_element(timeout=TIMEOUT)
        self.assertEqual((bounce["id"], error_of(bounce)), ("q1", "policy-violation"))
        self.assertEqual(len(self.a.sender.destinations["slow.example"].queue), 0)
        # New stanzas for the blocked peer bounce too, in both directions.
        ca.send("<message from='x@chat.a.example' to='y@chat.b.example' id='m2'/>")
        bounce = yield ca.next_element(timeout=TIMEOUT)
        self.assertEqual((bounce["id"], error_of(bounce)), ("m2", "policy-violation"))
        cb.send("<message from='y@chat.b.example' to='x@chat.a.example' id='r2'/>")
        bounce = yield cb.next_element(timeout=TIMEOUT)
        self.assertEqual((bounce["id"], bounce["type"]), ("r2", "error"))

        # Restart A on the same state directory: the block is still there.
        yield self.a.stopService()
        config = parse_config(self.config_dict, "<test>")
        restarted = Gateway(config, reactor, make_client_resolver(reactor, self.dns.port),
                            choose_storage(config, reactor))
        yield restarted.startService()
        self.addCleanup(restarted.stopService)
        publish(self.dns, restarted, ["a.example", "chat.a.example"], "gw-a2.example")
        api = AdminClient(reactor, restarted)
        got = yield api.get(f"{V1}/peers/chat.b.example")
        self.assertEqual((got.json["allowed"], got.json["note"], got.json["source"]), (False, "abuse", "api"))
        self.assertTrue(restarted.policy.is_blocked("chat.b.example"))
        ca2 = yield connect_component(reactor, "127.0.0.1", restarted.port_of("components"),
                                      "chat.a.example", "secret-a")
        self.addCleanup(ca2.close)
        ca2.send("<message from='x@chat.a.example' to='y@chat.b.example' id='m3'/>")
        bounce = yield ca2.next_element(timeout=TIMEOUT)
        self.assertEqual((bounce["id"], error_of(bounce)), ("m3", "policy-violation"))

        # Unblocking takes effect at once as well.
        got = yield api.patch(f"{V1}/peers/chat.b.example", {"allowed": True})
        self.assertEqual(got.json["allowed"], True)
        ca2.send("<message from='x@chat.a.example' to='y@chat.b.example' id='m4'/>")
        self.assertEqual((yield cb.next_element(timeout=TIMEOUT))["id"], "m4")

    @defer.inlineCallbacks
    def test_allowlist_mode_closes_unlisted_peers(self):
        ca, cb = yield self.federate()
        got = yield self.api.patch(f"{V1}/policy", {"mode": "allowlist"})
        self.assertEqual(got.json["mode"], "allowlist")
        yield wait_for(lambda: len(self.a.table) == 0)
        ca.send("<message from='x@chat.a.example' to='y@chat.b.example' id='m2'/>")
        bounce = yield ca.next_element(timeout=TIMEOUT)
        self.assertEqual(error_of(bounce), "policy-violation")
        yield self.api.put(f"{V1}/peers/chat.b.example", {"allowed": True, "note": "partner"})
        ca.send("<message from='x@chat.a.example' to='y@chat.b.example' id='m3'/>")
        self.assertEqual((yield cb.next_element(timeout=TIMEOUT))["id"], "m3")

    @defer.inlineCallbacks
    def test_operator_close_keeps_queued_stanzas(self):
        ca, cb = yield self.federate()
        [out] = [r for r in self.a.table if r.direction == "outbound"]
        seen = self.capture_stream_errors()
        got = yield self.api.delete(f"{V1}/connections/{out.id}")
        self.assertEqual(got.status, 202)
        # Sent while the closed stream winds down: queued, then delivered on
        # a new connection, never bounced.
        for n in range(3):
            ca.send(f"<message from='x@chat.a.example' to='y@chat.b.example' id='k{n}'/>")
        ids = []
        for _ in range(3):
            got = yield cb.next_element(timeout=TIMEOUT)
            ids.append(got["id"])
        self.assertEqual(ids, ["k0", "k1", "k2"])
        self.assertNotIn(out.id, [r.id for r in self.a.table])
        self.assertEqual(self.a.sender.bounced, 0)
        self.assertIn(("policy-violation", "closed by an operator through the admin API"), seen)


class ViolationTests(unittest.TestCase):
    """Which live connections a policy change ends (besides blocking)."""

    def record(self, direction, tls, method="dialback"):
        record = ConnectionRecord(direction, "192.0.2.1:5269", 0.0, remote_domain="r.example")
        record.tls = tls
        record.set_pair("gw.example", "r.example", VALID, method, 1.0)
        return record

    def test_rules(self):
        tls_ok = {"version": "TLSv1.3", "chain_ok": True}
        tls_bad = {"version": "TLSv1.3", "chain_ok": False}
        optional = PeerPolicy("r.example", encryption="optional")
        required = PeerPolicy("r.example", encryption="required")
        certificate = PeerPolicy("r.example", encryption="optional", authentication="certificate")
        cases = [
            (self.record(INBOUND, None), optional, None),
            (self.record(INBOUND, None), required, "policy now requires TLS with r.example"),
            (self.record(INBOUND, tls_ok), required, None),
            (self.record(INBOUND, None), certificate, "policy now requires a valid certificate from r.example"),
            (self.record(INBOUND, tls_ok, "dialback"), certificate, "policy now requires a valid certificate from r.example"),
            (self.record(INBOUND, tls_ok, "dialback-with-valid-cert"), certificate, None),
            (self.record(INBOUND, tls_ok, "sasl-external"), certificate, None),
            (self.record(OUTBOUND, tls_ok, "dialback"), certificate, None),
            (self.record(OUTBOUND, tls_bad, "dialback"), certificate, "policy now requires a valid certificate from r.example"),
        ]
        for record, policy, expected in cases:
            self.assertEqual(violation(record, policy, "r.example"), expected, (record, policy))
