"""XEP-0198 in both roles of a bidirectional stream (XEP-0288), in memory.

Only the initiating entity may resume (XEP-0198 5).  As the receiving
entity on a peer's bidi stream, what we sent and the peer never
acknowledged waits in the resumable session when the transport drops; the
``h`` of the peer's ``<resume/>`` says how much arrived (delivered), the
rest goes out again on the resumed stream: nothing lost, nothing twice.
Not resumed in time (or closed cleanly) it goes back to the queue; at
shutdown it bounces.  As the initiating entity we resume a dropped bidi
stream even with nothing of our own to send, and use the ``h`` of a
``<failed/>`` answer so that what the peer had is not sent again."""

from __future__ import annotations

import random

from twisted.internet.task import Clock
from twisted.trial import unittest

from fedgate.router import Router
from fedgate.s2s import sm
from fedgate.s2s.inbound import InboundS2S
from fedgate.s2s.pairs import ConnectionTable
from fedgate.s2s.sender import S2SSender, SenderSettings
from fedgate.stream.protocol import XmppStream
from fedgate.stream.stanza import Stanza
from tests.support.memory import MemoryStream, server_header
from tests.support.s2s import FakeConnector, FakeVerifier, make_context
from tests.test_sm import element

RESUME = 60.0


class Gateway:
    """A sender, a router and a resume store on a fake clock."""

    def __init__(self, case, **settings):
        self.clock = Clock()
        self.bounced: list = []
        router = Router({"gw.example"}, set())
        router.bounce = lambda stanza, condition, text=None, **kw: self.bounced.append((stanza.id, condition))
        self.store = sm.ResumeStore(self.clock, sm.SMSettings(ack_every=100, resume_timeout=RESUME,
                                                              **settings))
        self.verifier = FakeVerifier()
        self.ctx = make_context(self.clock, local_domains={"gw.example"}, secret="s", router=router,
                                table=ConnectionTable(), verifier=self.verifier, auth_timeout=30.0,
                                sm=self.store)
        self.connector = FakeConnector(self.clock)
        self.sender = S2SSender(self.ctx, self.connector, lambda h: XmppStream(h, self.clock),
                                SenderSettings(), rng=random.Random(1))
        router.sender = self.sender

    def send(self, n: int):
        self.sender.send("gw.example", "remote.example", Stanza.of(element(
            f"<message from='u@gw.example' to='v@remote.example' id='m{n}'/>")))

    def outcomes(self):
        o = self.sender.outcomes()
        return o["delivered"], o["in_flight"], o["bounced"], self.sender.pending_stanza_count()


class ReceivingEntity(unittest.TestCase):
    """We send over the peer's inbound bidi stream (the peer enabled with
    resume='true'); the peer is the one to resume."""

    def setUp(self):
        self.gw = Gateway(self)

    def inbound(self, resume_previd=None, h=0):
        handler = InboundS2S(self.gw.ctx)
        peer = MemoryStream(handler, self.gw.clock)
        peer.feed(server_header(to="gw.example", **{"from": "remote.example"}, version="1.0"))
        peer.feed("<bidi xmlns='urn:xmpp:bidi'/>")
        peer.feed("<db:result from='remote.example' to='gw.example'>k</db:result>")
        self.gw.verifier.calls[-1][1].callback(True)
        peer.take()
        if resume_previd is None:
            peer.feed(f"<enable xmlns='{sm.NS}' resume='true'/>")
        else:
            peer.feed(f"<resume xmlns='{sm.NS}' previd='{resume_previd}' h='{h}'/>")
        self.taken = peer.take()
        [self.answer] = [e for e in self.taken if e.uri == sm.NS]
        return handler, peer

    def flood(self, count=5):
        handler, peer = self.inbound()
        previd = self.answer["id"]
        for n in range(count):
            self.gw.send(n)
        self.assertEqual([e["id"] for e in peer.take() if e.name == "message"],
                         [f"m{n}" for n in range(count)])
        return handler, peer, previd

    def test_a_drop_holds_the_unacknowledged_for_the_peers_resumption(self):
        handler, peer, previd = self.flood()
        peer.feed(f"<a xmlns='{sm.NS}' h='1'/>")
        peer.stream.connectionLost(None)  # dropped: no close
        self.assertEqual(self.gw.outcomes(), (1, 4, 0, 0), "held, still in flight, not requeued")
        self.assertEqual(self.gw.store.held(), 4)
        # The peer resumes: it had handled m0..m2; m3 and m4 go out again here.
        again, peer2 = self.inbound(previd, h=3)
        self.assertEqual((self.answer.name, self.answer["h"]), ("resumed", "0"))
        self.assertEqual([e["id"] for e in self.taken if e.name == "message"], ["m3", "m4"])
        self.assertEqual(self.gw.outcomes(), (3, 2, 0, 0))
        self.assertEqual(self.gw.store.held(), 0)
        peer2.feed(f"<a xmlns='{sm.NS}' h='5'/>")  # numbered on from the old session
        self.assertEqual(self.gw.outcomes(), (5, 0, 0, 0))
        self.assertEqual(self.gw.bounced, [])

    def test_not_resumed_in_time_goes_back_to_the_queue(self):
        handler, peer, previd = self.flood(3)
        peer.stream.connectionLost(None)
        self.gw.clock.advance(RESUME - 1)
        self.assertEqual(self.gw.store.held(), 3)
        self.assertEqual(self.gw.outcomes(), (0, 3, 0, 0))
        self.gw.clock.advance(1)  # the session's lifetime is over
        self.assertEqual(self.gw.store.held(), 0)
        destination = self.gw.sender.destinations["remote.example"]
        self.assertEqual([item.stanza.id for item in destination.queue], ["m0", "m1", "m2"])
        self.assertEqual(self.gw.outcomes(), (0, 0, 0, 3))
        self.assertEqual(len(self.gw.connector.attempts), 1, "a stream of our own for them")

    def test_a_clean_close_requeues_at_once(self):
        handler, peer, previd = self.flood(3)
        peer.feed(f"<a xmlns='{sm.NS}' h='2'/>")
        peer.feed("</stream:stream>")
        peer.stream.connectionLost(None)
        self.assertEqual(self.gw.store.held(), 0)
        destination = self.gw.sender.destinations["remote.example"]
        self.assertEqual([item.stanza.id for item in destination.queue], ["m2"])
        self.assertEqual(self.gw.outcomes(), (2, 0, 0, 1))

    def test_a_resume_acknowledging_too_much_is_handled_count_too_high(self):
        handler, peer, previd = self.flood(3)
        peer.stream.connectionLost(None)
        handler2 = InboundS2S(self.gw.ctx)
        peer2 = MemoryStream(handler2, self.gw.clock)
        peer2.feed(server_header(to="gw.example", **{"from": "remote.example"}, version="1.0"))
        peer2.feed("<db:result from='remote.example' to='gw.example'>k</db:result>")
        self.gw.verifier.calls[-1][1].callback(True)
        peer2.feed(f"<resume xmlns='{sm.NS}' previd='{previd}' h='4'/>")
        self.assertEqual(peer2.stream_error(), "undefined-condition")
        error = [e for e in peer2.elements if e.name == "error"][-1]
        self.assertIn((sm.NS, "handled-count-too-high"), [(c.uri, c.name) for c in error.elements()])
        destination = self.gw.sender.destinations["remote.example"]
        self.assertEqual([item.stanza.id for item in destination.queue], ["m0", "m1", "m2"])
        self.assertEqual(self.gw.outcomes(), (0, 0, 0, 3))

    def resume_after_drop(self, previd, h):
        handler = InboundS2S(self.gw.ctx)
        peer = MemoryStream(handler, self.gw.clock)
        peer.feed(server_header(to="gw.example", **{"from": "remote.example"}, version="1.0"))
        peer.feed("<db:result from='remote.example' to='gw.example'>k</db:result>")
        self.gw.verifier.calls[-1][1].callback(True)
        peer.feed(f"<resume xmlns='{sm.NS}' previd='{previd}' h='{h}'/>")
        return peer

    def assert_too_high(self, peer):
        self.assertEqual(peer.stream_error(), "undefined-condition")
        error = [e for e in peer.elements if e.name == "error"][-1]
        self.assertIn((sm.NS, "handled-count-too-high"), [(c.uri, c.name) for c in error.elements()])
        self.assertEqual([e.name for e in peer.elements if e.uri == sm.NS], [])

    def test_a_resume_acknowledging_what_was_never_sent_is_too_high_with_nothing_held(self):
        # XEP-0198 6 holds whether or not the session kept unacknowledged
        # stanzas: here we never sent anything on the stream at all
        handler, peer = self.inbound()
        previd = self.answer["id"]
        peer.stream.connectionLost(None)
        self.assertEqual(self.gw.store.held(), 0)
        self.assert_too_high(self.resume_after_drop(previd, h=7))
        self.assertEqual(self.gw.outcomes(), (0, 0, 0, 0))

    def test_after_everything_was_acknowledged_a_higher_h_is_too_high(self):
        handler, peer, previd = self.flood(3)
        peer.feed(f"<a xmlns='{sm.NS}' h='3'/>")
        peer.stream.connectionLost(None)
        self.assertEqual(self.gw.store.held(), 0)
        self.assert_too_high(self.resume_after_drop(previd, h=4))
        self.assertEqual(self.gw.outcomes(), (3, 0, 0, 0))

    def test_a_clean_close_counts_what_went_back_to_the_queue_as_sent(self):
        # requeued at the clean close, not held: an h covering them is not
        # too high (they were sent), one beyond them is
        handler, peer, previd = self.flood(3)
        peer.feed("</stream:stream>")
        peer.stream.connectionLost(None)
        self.assertEqual(self.gw.store.held(), 0)
        self.assert_too_high(self.resume_after_drop(previd, h=4))

    def test_shutdown_bounces_what_is_held(self):
        handler, peer, previd = self.flood(2)
        peer.stream.connectionLost(None)
        self.gw.sender.stop()
        self.assertEqual([c for _, c in self.gw.bounced], ["remote-server-timeout"] * 2)
        self.assertEqual(self.gw.outcomes(), (0, 0, 2, 0))

    def test_a_stolen_previd_gets_nothing_held(self):
        handler, peer, previd = self.flood(2)
        peer.stream.connectionLost(None)
        other = InboundS2S(self.gw.ctx)
        peer2 = MemoryStream(other, self.gw.clock)
        peer2.feed(server_header(to="gw.example", **{"from": "evil.example"}, version="1.0"))
        peer2.feed("<bidi xmlns='urn:xmpp:bidi'/>")
        peer2.feed("<db:result from='evil.example' to='gw.example'>k</db:result>")
        self.gw.verifier.calls[-1][1].callback(True)
        peer2.take()
        peer2.feed(f"<resume xmlns='{sm.NS}' previd='{previd}' h='0'/>")
        [failed] = [e for e in peer2.take() if e.uri == sm.NS]
        self.assertEqual(failed.name, "failed")
        self.assertEqual([e for e in peer2.take() if e.name == "message"], [])
        self.assertEqual(self.gw.store.held(), 2)


class InitiatingEntity(unittest.TestCase):
    """Our outbound bidi stream: we resume it when it drops even with
    nothing of ours waiting; a <failed h/> answer still counts."""

    def setUp(self):
        self.gw = Gateway(self)

    def open(self, index=-1, features_extra="<bidi xmlns='urn:xmpp:features:bidi'/>"):
        peer = self.gw.connector.succeed(index)
        peer.read()
        peer.stream.dataReceived(
            server_header(id="SID", **{"from": "remote.example"}, version="1.0")
            + b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
            + f"{features_extra}<sm xmlns='{sm.NS}'/></stream:features>".encode())
        peer.read()
        peer.stream.dataReceived(b"<db:result from='remote.example' to='gw.example' type='valid'/>")
        return peer

    def sm_out(self, peer):
        return [e for e in peer.take() if e.uri == sm.NS]

    def test_a_dropped_bidi_stream_is_resumed_with_nothing_of_ours_to_send(self):
        self.gw.send(0)
        peer = self.open()
        peer.stream.dataReceived(f"<enabled xmlns='{sm.NS}' id='sess' resume='true'/>".encode())
        peer.stream.dataReceived(f"<a xmlns='{sm.NS}' h='1'/>".encode())
        # the peer sends us two stanzas over the bidi stream
        for n in range(2):
            peer.stream.dataReceived(f"<message from='v@remote.example' to='u@gw.example' "
                                     f"id='r{n}'/>".encode())
        peer.stream.connectionLost(None)
        self.assertEqual(len(self.gw.connector.attempts), 2, "connecting again to resume")
        again = self.open()
        [resume] = self.sm_out(again)
        self.assertEqual((resume.name, resume["previd"], resume["h"]), ("resume", "sess", "2"))
        again.stream.dataReceived(f"<resumed xmlns='{sm.NS}' previd='sess' h='1'/>".encode())
        self.assertTrue(again.stream.handler.sm.enabled)

    def test_no_resumption_for_a_plain_stream_or_a_clean_close(self):
        self.gw.send(0)
        peer = self.open(features_extra="")  # no bidi
        peer.stream.dataReceived(f"<enabled xmlns='{sm.NS}' id='sess' resume='true'/>".encode())
        peer.stream.dataReceived(f"<a xmlns='{sm.NS}' h='1'/>".encode())
        peer.stream.connectionLost(None)
        self.assertEqual(len(self.gw.connector.attempts), 1, "nothing held by the peer")
        self.gw.send(1)
        peer = self.open()
        peer.stream.dataReceived(f"<enabled xmlns='{sm.NS}' id='s2' resume='true'/>".encode())
        peer.stream.dataReceived(f"<a xmlns='{sm.NS}' h='1'/>".encode())
        peer.stream.dataReceived(b"</stream:stream>")
        peer.stream.connectionLost(None)
        self.assertEqual(len(self.gw.connector.attempts), 2, "a clean close: nothing held")

    def test_failed_with_h_sends_again_only_what_did_not_arrive(self):
        self.gw.send(0)
        peer = self.open(features_extra="")
        peer.stream.dataReceived(f"<enabled xmlns='{sm.NS}' id='sess' resume='true'/>".encode())
        for n in range(1, 4):
            self.gw.send(n)
        peer.stream.dataReceived(f"<a xmlns='{sm.NS}' h='1'/>".encode())
        peer.take()
        peer.stream.connectionLost(None)
        again = self.open(features_extra="")
        [resume] = self.sm_out(again)
        self.assertEqual(resume.name, "resume")
        # the session timed out at the peer, which still says what it had: m1
        again.stream.dataReceived(f"<failed xmlns='{sm.NS}' h='2'><item-not-found "
                                  f"xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>".encode())
        # a new session is asked for, and nothing goes out before it is up
        self.assertEqual([e.name for e in self.sm_out(again)], ["enable"])
        self.assertEqual([e for e in again.take() if e.name == "message"], [])
        again.stream.dataReceived(f"<enabled xmlns='{sm.NS}' id='sess2' resume='true'/>".encode())
        self.assertEqual([e["id"] for e in again.take() if e.name == "message"], ["m2", "m3"])
        self.assertEqual(self.gw.outcomes()[:3], (2, 2, 0))


class ResumeLoop(InitiatingEntity):
    """A peer that authenticates, enables bidi and resumable stream
    management, and then drops every connection (review finding 6): after
    the first attempt each resumption waits a growing backoff."""

    def attempt_times(self, answer: bool, cycles: int = 200, until: float = 2000.0) -> list[float]:
        """Play the peer (each connection dropped right after a valid pair,
        after ``<resumed/>`` if ``answer``) for ``until`` seconds or
        ``cycles`` connections; when each was made."""
        self.gw.send(0)
        peer = self.open()
        peer.stream.dataReceived(f"<enabled xmlns='{sm.NS}' id='sess' resume='true'/>".encode())
        peer.stream.dataReceived(f"<a xmlns='{sm.NS}' h='1'/>".encode())  # m0 delivered
        peer.stream.dataReceived(b"<message from='v@remote.example' to='u@gw.example' id='r0'/>")
        peer.stream.connectionLost(None)
        times, seen = [], 1
        while len(times) < cycles and self.gw.clock.seconds() < until:
            if len(self.gw.connector.attempts) > seen:
                seen = len(self.gw.connector.attempts)
                times.append(self.gw.clock.seconds())
                again = self.open()
                [resume] = self.sm_out(again)
                self.assertEqual((resume.name, resume["previd"]), ("resume", "sess"))
                if answer:
                    again.stream.dataReceived(f"<resumed xmlns='{sm.NS}' previd='sess' h='1'/>".encode())
                again.stream.connectionLost(None)
            else:
                self.gw.clock.advance(0.25)
        return times

    def assert_backs_off(self, times):
        # backoff_initial 2 s doubling (jitter 0.5..1) until a gap outlives
        # the session (resume_timeout 60 s): then there is nothing to resume
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertEqual(times[0], 0.0, "the first drop: at once")
        self.assertTrue(3 <= len(times) <= 9, times)
        self.assertTrue(all(gap >= 1.0 for gap in gaps), gaps)
        self.assertGreater(gaps[-1], 4 * gaps[0], f"growing: {gaps}")
        destination = self.gw.sender.destinations.get("remote.example")
        self.assertIn(destination and destination.state, (None, "idle"), "no more attempts")
        self.assertEqual(self.gw.outcomes(), (1, 0, 0, 0))

    def test_a_peer_dropping_every_resumed_stream_costs_a_growing_backoff(self):
        self.assert_backs_off(self.attempt_times(answer=True))

    def test_a_peer_dropping_before_answering_the_resume_costs_a_growing_backoff(self):
        self.assert_backs_off(self.attempt_times(answer=False))


class SaslOnBidi(unittest.TestCase):
    """A pair proved by SASL EXTERNAL on the peer's bidi stream carries our
    stanzas only after the peer restarted the stream: a stanza written
    between <success/> and the new header would go with the old stream."""

    def test_nothing_written_before_the_restart(self):
        from fedgate.tls.contexts import TLSInfo
        from tests.support.gateway import shared_ca

        gw = Gateway(self)
        handler = InboundS2S(gw.ctx)
        peer = MemoryStream(handler, gw.clock)
        peer.feed(server_header(to="gw.example", **{"from": "remote.example"}, version="1.0"))
        peer.feed("<bidi xmlns='urn:xmpp:bidi'/>")
        peer.stream.tls = TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256",
                                  shared_ca().issue(dns=("remote.example",)).cert)
        peer.take()
        gw.send(0)  # queued: nothing carries the pair yet
        peer.feed("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>")
        self.assertEqual([e.name for e in peer.take()], ["success"])
        gw.send(1)  # the stream is being restarted: held too
        peer.restart()
        self.assertEqual(peer.take(), [])
        peer.feed(server_header(to="gw.example", **{"from": "remote.example"}, version="1.0"))
        self.assertEqual([e.name for e in peer.elements], ["features", "message", "message"])
        self.assertEqual([e["id"] for e in peer.take() if e.name == "message"], ["m0", "m1"])
        self.assertEqual(gw.outcomes()[2:], (0, 0))


class ResumeWhileTheOldStreamIsUp(unittest.TestCase):
    """The peer saw the drop, we did not yet: its <resume/> takes the
    session from the stream still up here, which ends with 'conflict'
    (XEP-0198 5), and what it had sent unacknowledged is resumed."""

    def test_conflict_hands_the_session_over(self):
        case = ReceivingEntity("test_a_drop_holds_the_unacknowledged_for_the_peers_resumption")
        case.setUp()
        handler, peer, previd = case.flood(4)
        peer.feed(f"<a xmlns='{sm.NS}' h='1'/>")
        again, peer2 = case.inbound(previd, h=2)
        peer.read()
        self.assertEqual(peer.stream_error(), "conflict")
        self.assertEqual((case.answer.name, case.answer["h"]), ("resumed", "0"))
        self.assertEqual([e["id"] for e in case.taken if e.name == "message"], ["m2", "m3"])
        peer.stream.connectionLost(None)
        self.assertEqual(case.gw.store.held(), 0)
        self.assertEqual(case.gw.outcomes(), (2, 2, 0, 0))
        self.assertEqual(case.gw.bounced, [])

    def test_a_stolen_previd_leaves_the_live_stream_alone(self):
        case = ReceivingEntity("test_a_stolen_previd_gets_nothing_held")
        case.setUp()
        handler, peer, previd = case.flood(2)
        other = InboundS2S(case.gw.ctx)
        peer2 = MemoryStream(other, case.gw.clock)
        peer2.feed(server_header(to="gw.example", **{"from": "evil.example"}, version="1.0"))
        peer2.feed("<db:result from='evil.example' to='gw.example'>k</db:result>")
        case.gw.verifier.calls[-1][1].callback(True)
        peer2.take()
        peer2.feed(f"<resume xmlns='{sm.NS}' previd='{previd}' h='0'/>")
        [failed] = [e for e in peer2.take() if e.uri == sm.NS]
        self.assertEqual(failed.name, "failed")
        peer.read()
        self.assertIsNone(peer.stream_error())
        self.assertTrue(handler.sm.enabled)
