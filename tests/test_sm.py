"""XEP-0198 stream management (fedgate.s2s.sm) in memory: the state machine
alone, then on an inbound S2S stream (dialback) and its resumption store."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.words.xish import domish

from fedgate.s2s import sm
from fedgate.s2s.inbound import InboundS2S
from fedgate.s2s.pairs import ConnectionTable
from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StreamFailure
from fedgate.stream.parser import StreamParser
from fedgate.stream.stanza import Stanza
from tests.support.memory import MemoryStream, RecordingRouter, server_header
from tests.support.s2s import FakeVerifier, make_context


def element(xml: str) -> domish.Element:
    found = []
    parser = StreamParser(lambda h: None, found.append, lambda: None)
    parser.feed(b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'>"
                + xml.encode())
    return found[0]


def stanza(n: int) -> Stanza:
    return Stanza.of(element(f"<message from='a@x.example' to='b@y.example' id='m{n}'/>"))


def written(m, item, routed: bool = True) -> None:
    """A stanza written on the stream: routed by the sender, or our own."""
    m.sm.sent(item, routed)


class Machine:
    """A StreamManagement with its writes and failures recorded."""

    def __init__(self, clock=None, **settings):
        self.clock = clock or Clock()
        self.written: list[str] = []
        self.failed: list = []
        self.acked: list = []
        self.sm = sm.StreamManagement(self.clock, sm.SMSettings(**settings), self.written.append,
                                      self.failed.append, on_acked=self.acked.extend)


class Arithmetic(unittest.TestCase):
    def test_h_wraps_at_2_32(self):
        self.assertEqual(sm.add(sm.MOD - 1, 1), 0)
        self.assertEqual(sm.add(sm.MOD - 2, 5), 3)
        self.assertEqual(sm.distance(2, sm.MOD - 3), 5)
        self.assertEqual(sm.distance(7, 7), 0)

    def test_outgoing_counts_across_the_wrap(self):
        out = sm.Outgoing(acked=sm.MOD - 2)
        for n in range(5):
            out.append(n)
        self.assertEqual(out.sent, 3)
        self.assertEqual(out.ack(1), [0, 1, 2])  # 2^32-2 -> 1 acknowledges three
        self.assertEqual(list(out.unacked), [3, 4])
        self.assertEqual(out.ack(3), [3, 4])
        self.assertEqual(out.ack(3), [], "the same h again acknowledges nothing")

    def test_h_beyond_what_was_sent_is_too_high(self):
        out = sm.Outgoing(acked=sm.MOD - 1)
        out.append("x")
        with self.assertRaises(sm.HandledCountTooHigh) as caught:
            out.ack(1)
        self.assertEqual((caught.exception.h, caught.exception.send_count), (1, 0))
        self.assertEqual(list(out.unacked), ["x"], "nothing acknowledged")

    def test_an_h_going_backwards_is_too_high(self):
        out = sm.Outgoing(acked=5)
        out.append("x")
        with self.assertRaises(sm.HandledCountTooHigh):
            out.ack(4)  # modulo 2^32 that is 2^32-1 more

    def test_incoming_wraps(self):
        inc = sm.Incoming(sm.MOD - 1)
        inc.stanza()
        self.assertEqual(inc.handled, 0)

    def test_h_must_be_an_unsigned_int(self):
        for bad in ("-1", "x", "", str(sm.MOD), "1.5"):
            with self.assertRaises(StreamFailure) as caught:
                sm.parse_h(element(f"<a xmlns='{sm.NS}' h='{bad}'/>"))
            self.assertEqual(caught.exception.condition, "invalid-xml")
        with self.assertRaises(StreamFailure):
            sm.parse_h(element(f"<a xmlns='{sm.NS}'/>"))
        self.assertEqual(sm.parse_h(element(f"<a xmlns='{sm.NS}' h='{sm.MOD - 1}'/>")), sm.MOD - 1)


class Initiating(unittest.TestCase):
    def enabled(self, **settings) -> Machine:
        m = Machine(**settings)
        m.sm.enable(resume=True)
        self.assertEqual(m.written, [f"<enable xmlns='{sm.NS}' resume='true'/>"])
        m.sm.element(element(f"<enabled xmlns='{sm.NS}' id='s1' resume='true' max='30'/>"), None)
        self.assertTrue(m.sm.enabled)
        self.assertEqual((m.sm.id, m.sm.resumable, m.sm.max), ("s1", True, 30))
        m.written.clear()
        return m

    def test_counts_from_enable_and_acks_free_the_queue(self):
        m = Machine()
        written(m, stanza(0))  # before enable: not counted
        m.sm.enable(resume=False)
        written(m, stanza(1))  # after enable, before enabled: counted
        m.sm.element(element(f"<enabled xmlns='{sm.NS}'/>"), None)
        self.assertFalse(m.sm.resumable)
        written(m, stanza(2), routed=False)
        self.assertEqual(m.sm.describe(), {"enabled": True, "unacked": 2, "resumable": False,
                                           "h_in": 0, "h_out": 2})
        m.sm.element(element(f"<a xmlns='{sm.NS}' h='1'/>"), None)
        self.assertEqual([s.id for s, routed in m.acked], ["m1"])
        m.sm.element(element(f"<a xmlns='{sm.NS}' h='2'/>"), None)
        self.assertEqual([(s.id, routed) for s, routed in m.acked], [("m1", True), ("m2", False)])
        self.assertEqual(m.sm.describe()["unacked"], 0)

    def test_ack_every_n_stanzas(self):
        m = self.enabled(ack_every=3, ack_interval=100)
        for n in range(3):
            written(m, stanza(n))
        self.assertEqual(m.written, [f"<r xmlns='{sm.NS}'/>"])
        m.sm.element(element(f"<a xmlns='{sm.NS}' h='2'/>"), None)
        for n in range(3, 7):
            written(m, stanza(n))
        self.assertEqual(m.written, [f"<r xmlns='{sm.NS}'/>"] * 2)

    def test_one_count_request_outstanding_and_the_burst_end_asks_again(self):
        """Past N while an <r/> is unanswered, no second one (the answer
        is on its way); the end of the burst asks for the rest."""
        m = self.enabled(ack_every=3, ack_interval=100)
        for n in range(10):
            written(m, stanza(n))
        self.assertEqual(m.written, [f"<r xmlns='{sm.NS}'/>"])
        m.clock.advance(0)
        self.assertEqual(m.written, [f"<r xmlns='{sm.NS}'/>"] * 2)
        m.sm.element(element(f"<a xmlns='{sm.NS}' h='10'/>"), None)
        m.clock.advance(0)
        self.assertEqual(len(m.written), 2, "nothing written since: nothing asked")

    def test_ack_after_t_seconds_and_at_the_end_of_a_burst(self):
        m = self.enabled(ack_every=100, ack_interval=5)
        written(m, stanza(0))
        self.assertEqual(m.written, [])
        m.clock.advance(0)  # the burst is over
        self.assertEqual(m.written, [f"<r xmlns='{sm.NS}'/>"])
        m.clock.advance(5)  # no answer yet: asked again after T
        self.assertEqual(len(m.written), 2)
        m.sm.element(element(f"<a xmlns='{sm.NS}' h='1'/>"), None)
        m.clock.advance(50)
        self.assertEqual(len(m.written), 2, "nothing unacknowledged: no more requests")
        self.assertEqual(m.clock.getDelayedCalls(), [])

    def test_handled_count_too_high_is_a_stream_error(self):
        m = self.enabled()
        written(m, stanza(0))
        written(m, stanza(1))
        m.sm.element(element(f"<a xmlns='{sm.NS}' h='3'/>"), None)
        [error] = m.failed
        children = [(c.uri, c.name) for c in error.elements()]
        self.assertEqual(children[0], (ns.STREAM_ERRORS, "undefined-condition"))
        app = next(c for c in error.elements() if c.uri == sm.NS)
        self.assertEqual((app.name, app["h"], app["send-count"]), ("handled-count-too-high", "3", "2"))
        self.assertEqual(m.acked, [], "nothing counted delivered")

    def test_answers_r_with_handled(self):
        m = self.enabled()
        m.sm.handled()
        m.sm.handled()
        m.sm.element(element(f"<r xmlns='{sm.NS}'/>"), None)
        self.assertEqual(m.written, [f"<a xmlns='{sm.NS}' h='2'/>"])

    def test_r_and_a_before_enable_are_errors(self):
        m = Machine()
        for xml in (f"<r xmlns='{sm.NS}'/>", f"<a xmlns='{sm.NS}' h='0'/>"):
            with self.assertRaises(StreamFailure) as caught:
                m.sm.element(element(xml), None)
            self.assertEqual(caught.exception.condition, "unsupported-stanza-type")

    def test_failed_enable_hands_back_what_was_counted(self):
        m = Machine()
        heard = []

        class Role:
            def sm_failed(self, condition, items, resuming):
                heard.append((condition, [s.id for s, _ in items], resuming))

        m.sm.enable(resume=True)
        written(m, stanza(1))
        m.sm.element(element(f"<failed xmlns='{sm.NS}'><unexpected-request "
                             f"xmlns='{sm.STANZAS}'/></failed>"), Role())
        self.assertEqual(heard, [("unexpected-request", ["m1"], False)])
        self.assertEqual(m.sm.state, sm.OFF)
        written(m, stanza(2))
        self.assertEqual(m.sm.describe()["unacked"], 0, "not counted once refused")

    def test_max_unacked_stops_writing(self):
        m = self.enabled(max_unacked=2, ack_every=100)
        written(m, stanza(0))
        self.assertTrue(m.sm.writable())
        written(m, stanza(1))
        self.assertFalse(m.sm.writable())
        m.sm.element(element(f"<a xmlns='{sm.NS}' h='1'/>"), None)
        self.assertTrue(m.sm.writable())

    def test_stop_returns_the_unacknowledged_in_order(self):
        m = self.enabled()
        for n in range(4):
            written(m, stanza(n))
        m.sm.element(element(f"<a xmlns='{sm.NS}' h='1'/>"), None)
        self.assertEqual([s.id for s, _ in m.sm.stop()], ["m1", "m2", "m3"])
        self.assertEqual(m.clock.getDelayedCalls(), [])


class Store(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.store = sm.ResumeStore(self.clock, sm.SMSettings())
        self.pairs = frozenset({("a.example", "b.example"), ("chat.a.example", "b.example")})
        self.store.keep(sm.Session("id1", "b.example", self.pairs, 7, 60.0))

    def test_same_domain_and_pair_resumes_once(self):
        session = self.store.take("id1", "b.example", {("a.example", "b.example")})
        self.assertEqual(session.handled, 7)
        self.assertIsNone(self.store.take("id1", "b.example", {("a.example", "b.example")}))

    def test_stolen_previd_from_another_domain_is_refused(self):
        self.assertIsNone(self.store.take("id1", "evil.example", {("a.example", "evil.example")}))
        self.assertIsNone(self.store.take("id1", None, set()))
        # A pair the session never had (another of our domains) is refused too.
        self.assertIsNone(self.store.take("id1", "b.example", {("other.a.example", "b.example")}))
        self.assertIsNotNone(self.store.take("id1", "b.example", {("chat.a.example", "b.example")}),
                             "the refusals did not consume the session")

    def test_expires_after_the_resume_timeout(self):
        self.clock.advance(60)
        self.assertIsNone(self.store.take("id1", "b.example", {("a.example", "b.example")}))

    def test_bounded(self):
        store = sm.ResumeStore(self.clock, sm.SMSettings(), max_sessions=2)
        for n in range(3):
            store.keep(sm.Session(f"s{n}", "b.example", self.pairs, 0, 60.0))
        self.assertEqual(sorted(store.sessions), ["s1", "s2"], "the oldest went")


class InboundDialback(unittest.TestCase):
    """The receiving entity on a dialback stream: SM in the first features,
    <enable/> accepted only once a pair is valid, resumption bound."""

    def setUp(self):
        self.clock = Clock()
        self.table = ConnectionTable()
        self.router = RecordingRouter()
        self.verifier = FakeVerifier()
        self.store = sm.ResumeStore(self.clock, sm.SMSettings(resume_timeout=60))

    def open(self, remote="remote.example") -> MemoryStream:
        ctx = make_context(self.clock, local_domains={"gw.example"}, table=self.table,
                           router=self.router, verifier=self.verifier, sm=self.store)
        self.handler = InboundS2S(ctx)
        stream = MemoryStream(self.handler, self.clock)
        stream.feed(server_header(to="gw.example", **{"from": remote}, version="1.0"))
        return stream

    def authenticate(self, stream, remote="remote.example"):
        stream.feed(f"<db:result from='{remote}' to='gw.example'>abc</db:result>")
        _, d = self.verifier.calls[-1]
        d.callback(True)
        stream.take()

    def sm_out(self, stream):
        return [e for e in stream.take() if e.uri == sm.NS]

    def test_offered_in_the_first_features(self):
        stream = self.open()
        [features] = stream.take()
        self.assertIn((sm.NS, "sm"), [(c.uri, c.name) for c in features.elements()])

    def test_enable_before_a_valid_pair_fails_and_after_it_succeeds(self):
        stream = self.open()
        stream.take()
        stream.feed(f"<enable xmlns='{sm.NS}' resume='true'/>")
        [failed] = self.sm_out(stream)
        self.assertEqual((failed.name, failed.firstChildElement().name), ("failed", "unexpected-request"))
        self.assertIsNone(stream.stream_error())
        self.authenticate(stream)
        stream.feed(f"<enable xmlns='{sm.NS}' resume='true'/>")
        [enabled] = self.sm_out(stream)
        self.assertEqual((enabled.name, enabled["resume"]), ("enabled", "true"))
        self.assertGreaterEqual(len(enabled["id"]), 16)
        self.assertEqual(self.handler.record.stream_management()["enabled"], True)
        # Stanzas are counted handled and the count answers <r/>.
        for n in range(3):
            stream.feed(f"<message from='u@remote.example' to='x@gw.example' id='m{n}'/>")
        stream.feed(f"<r xmlns='{sm.NS}'/>")
        [a] = self.sm_out(stream)
        self.assertEqual((a.name, a["h"]), ("a", "3"))
        # Enabling twice ends the stream.
        stream.feed(f"<enable xmlns='{sm.NS}'/>")
        self.assertIsNotNone(stream.stream_error())

    def drop(self, stream) -> str:
        stream.take()
        stream.feed(f"<enable xmlns='{sm.NS}' resume='true'/>")
        [enabled] = self.sm_out(stream)
        stream.feed("<message from='u@remote.example' to='x@gw.example' id='m0'/>")
        stream.feed("<message from='u@remote.example' to='x@gw.example' id='m1'/>")
        stream.stream.connectionLost(None)  # dropped, no closing handshake
        return enabled["id"]

    def test_resume_continues_the_count(self):
        first = self.open()
        self.authenticate(first)
        previd = self.drop(first)
        second = self.open()
        self.authenticate(second)
        second.feed(f"<resume xmlns='{sm.NS}' previd='{previd}' h='0'/>")
        [resumed] = self.sm_out(second)
        self.assertEqual((resumed.name, resumed["previd"], resumed["h"]), ("resumed", previd, "2"))
        second.feed("<message from='u@remote.example' to='x@gw.example' id='m2'/>")
        second.feed(f"<r xmlns='{sm.NS}'/>")
        [a] = self.sm_out(second)
        self.assertEqual(a["h"], "3")

    def test_stolen_previd_is_refused(self):
        first = self.open()
        self.authenticate(first)
        previd = self.drop(first)
        thief = self.open(remote="evil.example")
        self.authenticate(thief, remote="evil.example")
        thief.feed(f"<resume xmlns='{sm.NS}' previd='{previd}' h='0'/>")
        [failed] = self.sm_out(thief)
        self.assertEqual((failed.name, failed.firstChildElement().name), ("failed", "item-not-found"))
        self.assertIsNone(failed.getAttribute("h"), "nothing about the session is given away")
        self.assertFalse(self.thief_enabled(thief))
        # The owner can still resume it.
        owner = self.open()
        self.authenticate(owner)
        owner.feed(f"<resume xmlns='{sm.NS}' previd='{previd}' h='0'/>")
        self.assertEqual(self.sm_out(owner)[0].name, "resumed")

    def thief_enabled(self, stream) -> bool:
        return self.handler.record.stream_management()["enabled"]

    def test_resume_before_authentication_is_refused(self):
        first = self.open()
        self.authenticate(first)
        previd = self.drop(first)
        early = self.open()
        early.take()
        early.feed(f"<resume xmlns='{sm.NS}' previd='{previd}' h='0'/>")
        [failed] = self.sm_out(early)
        self.assertEqual(failed.firstChildElement().name, "unexpected-request")


class OutboundBound(unittest.TestCase):
    """Past ``sm_max_unacked`` the outbound stream takes no more: the rest
    waits in the destination's queue and flows as acks make room; a dead
    stream's unacknowledged stanzas go back to the queue's head in order."""

    def setUp(self):
        import random

        from fedgate.router import Router
        from fedgate.s2s.sender import S2SSender, SenderSettings
        from fedgate.stream.protocol import XmppStream
        from tests.support.s2s import FakeConnector

        self.clock = Clock()
        router = Router({"gw.example"}, set())
        ctx = make_context(self.clock, secret="s", router=router, auth_timeout=30.0,
                           sm=sm.ResumeStore(self.clock, sm.SMSettings(max_unacked=3, ack_every=100)))
        self.connector = FakeConnector(self.clock)
        self.sender = S2SSender(ctx, self.connector, lambda h: XmppStream(h, self.clock),
                                SenderSettings(), rng=random.Random(1))
        router.sender = self.sender

    def send(self, n: int):
        self.sender.send("gw.example", "remote.example", Stanza.of(element(
            f"<message from='u@gw.example' to='v@remote.example' id='m{n}'/>")))

    def open_peer(self):
        peer = self.connector.succeed()
        peer.read()
        peer.stream.dataReceived(
            server_header(id="SID", **{"from": "remote.example"}, version="1.0")
            + b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
            + f"<sm xmlns='{sm.NS}'/></stream:features>".encode())
        peer.read()
        peer.stream.dataReceived(b"<db:result from='remote.example' to='gw.example' type='valid'/>")
        peer.stream.dataReceived(f"<enabled xmlns='{sm.NS}' id='sess' resume='true'/>".encode())
        return peer

    def ids(self, peer):
        return [e["id"] for e in peer.take() if e.name == "message"]

    def test_past_the_bound_stanzas_wait_and_flow_with_acks(self):
        self.send(0)
        peer = self.open_peer()
        for n in range(1, 8):
            self.send(n)
        self.assertEqual(self.ids(peer), ["m0", "m1", "m2"])
        self.assertEqual(self.sender.pending_stanza_count(), 5)
        self.assertEqual(self.sender.outcomes()["in_flight"], 3)
        peer.stream.dataReceived(f"<a xmlns='{sm.NS}' h='2'/>".encode())
        self.assertEqual(self.ids(peer), ["m3", "m4"])
        self.assertEqual((self.sender.delivered, self.sender.outcomes()["in_flight"],
                          self.sender.pending_stanza_count()), (2, 3, 3))

    def test_dead_stream_requeues_the_unacknowledged_in_order(self):
        self.send(0)
        peer = self.open_peer()
        self.send(1)
        self.send(2)
        peer.stream.dataReceived(f"<a xmlns='{sm.NS}' h='1'/>".encode())
        self.send(3)  # queued behind nothing: the stream takes it (3 unacknowledged)
        self.send(4)  # past the bound: queued
        peer.stream.connectionLost(None)
        destination = self.sender.destinations["remote.example"]
        self.assertEqual([item.stanza.id for item in destination.queue], ["m1", "m2", "m3", "m4"])
        self.assertEqual((self.sender.delivered, self.sender.outcomes()["in_flight"]), (1, 0))
        # The next stream resumes the session: the peer had handled m1 only.
        again = self.connector.succeed()
        again.read()
        again.stream.dataReceived(
            server_header(id="SID2", **{"from": "remote.example"}, version="1.0")
            + b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
            + f"<sm xmlns='{sm.NS}'/></stream:features>".encode())
        again.read()
        again.stream.dataReceived(b"<db:result from='remote.example' to='gw.example' type='valid'/>")
        [resume] = [e for e in again.take() if e.uri == sm.NS]
        self.assertEqual((resume.name, resume["previd"]), ("resume", "sess"))
        self.assertEqual(self.ids(again), [], "nothing sent before the answer")
        again.stream.dataReceived(f"<resumed xmlns='{sm.NS}' previd='sess' h='2'/>".encode())
        self.assertEqual(self.ids(again), ["m2", "m3", "m4"])
        self.assertEqual(self.sender.delivered, 2)
        outcomes = self.sender.outcomes()
        self.assertEqual(outcomes["accepted"], outcomes["delivered"] + outcomes["in_flight"]
                         + outcomes["bounced"] + self.sender.pending_stanza_count())
