"""Bidirectional streams (XEP-0288) in memory: negotiation in both roles,
reverse-direction dialback, and no stanza over an unauthenticated pair."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from fedgate.policy import PeerPolicy, PolicyTable
from fedgate.s2s import dialback
from fedgate.s2s.inbound import InboundS2S
from fedgate.s2s.outbound import OutboundS2S
from fedgate.s2s.pairs import LOCAL, PENDING, REMOTE, VALID, ConnectionTable
from fedgate.stream import namespaces as ns
from fedgate.stream.errors import error_condition
from fedgate.stream.protocol import XmppStream
from tests.support.memory import MemoryStream, RecordingRouter, server_header
from tests.support.s2s import FakeOwner, FakeTLS, FakeVerifier, TLSRecordingTransport, make_context

SECRET = "bidi secret"
LOCAL_DOMAINS = frozenset({"gw.example", "muc.gw.example"})


class BidiCase(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.table = ConnectionTable()
        self.changes = []
        self.table.on_pair_changed(lambda *args: self.changes.append(args))
        self.router = RecordingRouter()
        self.verifier = FakeVerifier()

    policy = PolicyTable(PeerPolicy(encryption="optional"))

    def ctx(self, tls=None):
        return make_context(self.clock, local_domains=LOCAL_DOMAINS, secret=SECRET, table=self.table,
                            router=self.router, verifier=self.verifier, tls=tls, policy=self.policy)

    def inbound(self, tls=None) -> MemoryStream:
        self.handler = InboundS2S(self.ctx(tls))
        stream = XmppStream(self.handler, self.clock)
        peer = MemoryStream(None, self.clock, stream=stream)
        peer.transport = TLSRecordingTransport()
        stream.makeConnection(peer.transport)
        stream.dataReceived(server_header(to="gw.example", **{"from": "remote.example"}, version="1.0"))
        peer.read()
        return peer

    def authenticate_inbound(self, peer, local="gw.example", remote="remote.example"):
        peer.feed(f"<db:result from='{remote}' to='{local}'>k</db:result>")
        self.verifier.calls[-1][1].callback(True)
        return peer.take()


class InboundBidiTests(BidiCase):
    def test_feature_offered_and_request_enables(self):
        peer = self.inbound()
        [features] = peer.take()
        self.assertIn((ns.BIDI_FEATURE, "bidi"), [(c.uri, c.name) for c in features.elements()])
        peer.feed("<bidi xmlns='urn:xmpp:bidi'/>")
        self.assertTrue(self.handler.record.bidi)
        self.assertEqual(peer.take(), [], "no reply to <bidi/>")

    def test_bidi_before_tls_does_not_survive_the_restart(self):
        peer = self.inbound(tls=FakeTLS())
        peer.take()
        peer.feed("<bidi xmlns='urn:xmpp:bidi'/><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        self.assertEqual(peer.transport.tls_creator, ("server", "gw.example"))
        self.assertFalse(self.handler.record.bidi)

    def test_without_bidi_nothing_is_sent_back(self):
        peer = self.inbound()
        peer.take()
        self.authenticate_inbound(peer)
        self.assertIsNone(self.table.route_for("gw.example", "remote.example"))
        self.assertFalse(self.handler.authenticate_reverse("muc.gw.example", "remote.example"))

    def test_with_bidi_the_proven_pair_carries_our_stanzas(self):
        peer = self.inbound()
        peer.take()
        peer.feed("<bidi xmlns='urn:xmpp:bidi'/>")
        self.authenticate_inbound(peer)
        self.assertIn(("gw.example", "remote.example", True), self.changes)
        record, route = self.table.route_for("gw.example", "remote.example")
        self.assertIs(route, self.handler)
        # Only that pair: the muc domain has not been proven to remote.example.
        self.assertIsNone(self.table.route_for("muc.gw.example", "remote.example"))
        self.assertIsNone(self.table.route_for("gw.example", "other.example"))

    def test_reverse_dialback(self):
        peer = self.inbound()
        peer.take()
        peer.feed("<bidi xmlns='urn:xmpp:bidi'/>")
        self.authenticate_inbound(peer)
        # Never towards a domain the peer has not proven here.
        self.assertFalse(self.handler.authenticate_reverse("muc.gw.example", "stranger.example"))
        self.assertTrue(self.handler.authenticate_reverse("muc.gw.example", "remote.example"))
        [request] = peer.take()
        self.assertEqual((request.name, request["from"], request["to"], request.getAttribute("type")),
                         ("result", "muc.gw.example", "remote.example", None))
        self.assertEqual(str(request), dialback.dialback_key(SECRET, "remote.example", "muc.gw.example",
                                                             self.handler.stream_id))
        pair = self.handler.record.pairs[("muc.gw.example", "remote.example")]
        self.assertEqual((pair.state, pair.origin), (PENDING, LOCAL))
        # A valid for something we did not ask is ignored; ours is accepted.
        peer.feed("<db:result from='remote.example' to='gw.example' type='valid'/>")
        peer.feed("<db:result from='stranger.example' to='muc.gw.example' type='valid'/>")
        self.assertEqual(self.handler.record.pairs[("gw.example", "remote.example")].origin, REMOTE)
        self.assertIsNone(self.handler.record.state_of("muc.gw.example", "stranger.example"))
        peer.feed("<db:result from='remote.example' to='muc.gw.example' type='valid'/>")
        self.assertEqual(pair.state, VALID)
        self.assertIn(("muc.gw.example", "remote.example", True), self.changes)
        self.assertIsNotNone(self.table.route_for("muc.gw.example", "remote.example"))
        # The peer may now also send to the muc domain over this stream.
        peer.feed("<message from='a@remote.example' to='room@muc.gw.example'/>")
        self.assertEqual([s["to"] for s in self.router.routed], ["room@muc.gw.example"])

    def test_reverse_request_fails_when_the_stream_closes(self):
        peer = self.inbound()
        peer.take()
        peer.feed("<bidi xmlns='urn:xmpp:bidi'/>")
        self.authenticate_inbound(peer)
        self.handler.authenticate_reverse("muc.gw.example", "remote.example")
        peer.stream.connectionLost(None)
        self.assertIn(("muc.gw.example", "remote.example", False), self.changes)
        self.assertIsNone(self.table.route_for("gw.example", "remote.example"), "no stale route")


class OutboundBidiTests(BidiCase):
    def outbound(self, offer_bidi=True):
        self.owner = FakeOwner()
        self.handler = OutboundS2S(self.ctx(), "remote.example", "gw.example", self.owner)
        peer = MemoryStream(None, self.clock, stream=XmppStream(self.handler, self.clock))
        peer.read()
        self.handler.authenticate("gw.example")  # the sender has a stanza for gw.example
        features = "<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
        if offer_bidi:
            features += "<bidi xmlns='urn:xmpp:features:bidi'/>"
        peer.stream.dataReceived(server_header(id="SID", **{"from": "remote.example"}, version="1.0")
                                 + (features + "</stream:features>").encode())
        return peer

    def test_requests_bidi_before_dialback(self):
        peer = self.outbound()
        raw = peer.transport.value().decode()
        self.assertLess(raw.index("<bidi xmlns='urn:xmpp:bidi'/>"), raw.index("<db:result"))
        self.assertTrue(self.handler.record.bidi)

    def test_no_bidi_when_not_offered(self):
        peer = self.outbound(offer_bidi=False)
        self.assertNotIn("urn:xmpp:bidi", peer.transport.value().decode())
        peer.feed("<db:result from='remote.example' to='gw.example' type='valid'/>")
        peer.feed("<message from='a@remote.example' to='b@gw.example'/>")
        self.assertEqual(peer.stream_error(), "unsupported-stanza-type")
        self.assertEqual(self.router.routed, [])

    def test_stanzas_for_authenticated_pairs_only(self):
        peer = self.outbound()
        peer.feed("<db:result from='remote.example' to='gw.example' type='valid'/>")
        peer.feed("<message from='a@remote.example' to='b@gw.example' id='ok'/>")
        self.assertEqual([s["id"] for s in self.router.routed], ["ok"])
        peer.feed("<message from='a@remote.example' to='room@muc.gw.example' id='no'/>")
        self.assertEqual(peer.stream_error(), "host-unknown")
        self.assertEqual([s["id"] for s in self.router.routed], ["ok"])

    def test_malformed_to_is_answered_from_a_domain_of_the_pair(self):
        """A malformed 'to' on an outbound bidi stream is a jid-malformed
        bounce from one of our domains the sender may hear from, and the
        stream stays up (as on inbound streams)."""
        peer = self.outbound()
        peer.feed("<db:result from='remote.example' to='gw.example' type='valid'/>")
        peer.feed(f"<message from='a@remote.example' to='b@{'d' * 1024}.example' id='bad'/>")
        [(stanza, condition, _)] = self.router.bounced
        self.assertEqual((stanza["id"], condition), ("bad", "jid-malformed"))
        self.assertEqual(self.router.reply_from, ["gw.example"])
        self.assertIsNone(peer.stream_error())

    def test_rate_limit_applies_on_bidi_streams_too(self):
        """One receive path: a peer over its rate on our outbound bidi
        stream gets its reading paused, exactly as on an inbound stream
        (they used to skip the per-peer rate limit)."""
        self.policy = PolicyTable(PeerPolicy(encryption="optional"),
                                  {"remote.example": PeerPolicy("remote.example", encryption="optional",
                                                                rate_limit=5.0)})
        peer = self.outbound()
        peer.feed("<db:result from='remote.example' to='gw.example' type='valid'/>")
        for n in range(12):  # a burst of 10 is allowed, then reading pauses
            peer.feed(f"<message from='a@remote.example' to='b@gw.example' id='{n}'/>")
        self.assertEqual(len(self.router.routed), 12, "what was read is still delivered")
        self.assertEqual(peer.transport.producerState, "paused")
        self.clock.advance(1.0)
        self.assertEqual(peer.transport.producerState, "producing")
        self.assertFalse(peer.disconnecting)

    def test_reverse_request_only_towards_proven_local_domains(self):
        peer = self.outbound()
        peer.feed("<db:result from='remote.example' to='gw.example' type='valid'/>")
        peer.take()
        peer.feed("<db:result from='conference.remote.example' to='muc.gw.example'>k</db:result>")
        [refused] = peer.take()
        self.assertEqual((refused["type"], error_condition(refused)), ("error", "not-authorized"))
        peer.feed("<db:result from='conference.remote.example' to='gw.example'>k2</db:result>")
        [(args, d)] = self.verifier.calls
        self.assertEqual(args, ("gw.example", "conference.remote.example", "SID", "k2"))
        d.callback(True)
        [answer] = peer.take()
        self.assertEqual((answer["type"], answer["to"]), ("valid", "conference.remote.example"))
        peer.feed("<message from='x@conference.remote.example' to='b@gw.example' id='c'/>")
        self.assertEqual([s["id"] for s in self.router.routed], ["c"])
