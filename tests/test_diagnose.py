"""/diagnose runs the gateway's own negotiation (InitiatingStream) and
dialback (Originating), in memory here; over loopback in test_admin_api."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from fedgate.admin.diagnose import ProbeStream
from fedgate.policy import PeerPolicy, PolicyTable
from fedgate.s2s import dialback
from fedgate.s2s.context import S2SContext, VerificationBudget
from fedgate.s2s.initiating import READY, NegotiationObserver
from fedgate.s2s.pairs import ConnectionTable
from tests.support.memory import MemoryStream, RecordingRouter, server_header

SECRET = "probe secret"
FEATURES = (b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
            b"<bidi xmlns='urn:xmpp:features:bidi'/></stream:features>")


class Steps(NegotiationObserver):
    def __init__(self):
        self.seen = []

    def step(self, name, outcome):
        self.seen.append(name)


class ProbeTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.table = ConnectionTable()
        self.ctx = S2SContext(clock=self.clock, local_domains=frozenset({"gw.example"}), secret=SECRET,
                              table=self.table, router=RecordingRouter(), verifier=None,
                              budget=VerificationBudget(1),
                              policy=PolicyTable(PeerPolicy(encryption="optional")))
        self.steps = Steps()
        self.probe = ProbeStream(self.ctx, "gw.example", "remote.example", "dialback", self.steps)
        self.peer = MemoryStream(self.probe, self.clock)
        self.peer.feed(server_header(id="SID", **{"from": "remote.example"}, version="1.0") + FEATURES)

    def test_the_real_steps_in_order(self):
        self.assertEqual(self.steps.seen, ["tls", "policy", "bidi", "sasl", "ready"])
        self.assertEqual(self.probe.state, READY)
        self.assertNotIn(b"urn:xmpp:bidi", self.peer.transport.value(), "a probe asks for no bidi")

    def test_a_proven_pair_never_reaches_the_pair_table(self):
        self.peer.take()
        self.probe.ask_dialback()
        [request] = self.peer.take()
        self.assertEqual(str(request), dialback.dialback_key(SECRET, "remote.example", "gw.example", "SID"))
        self.peer.feed("<db:result from='remote.example' to='gw.example' type='valid'/>")
        self.assertEqual(self.probe.answer, ("valid", None))
        self.assertEqual(list(self.table), [], "the probe's stream is its own")
        self.assertIsNone(self.table.route_for("gw.example", "remote.example"))

    def test_dialback_error_condition(self):
        self.probe.ask_dialback()
        self.peer.feed("<db:result from='remote.example' to='gw.example' type='error'>"
                       "<error type='cancel'><remote-server-not-found "
                       "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></db:result>")
        self.assertEqual(self.probe.answer, ("error", "remote-server-not-found"))
