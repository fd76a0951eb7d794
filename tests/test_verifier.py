"""The Receiving Server's verification connection (db:verify) in memory."""

from __future__ import annotations

from dataclasses import replace

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from fedgate.s2s.connect import ConnectError
from fedgate.s2s.inbound import InboundS2S
from fedgate.s2s.verifier import DialbackError, DialbackVerifier
from fedgate.stream.parser import StreamParser
from fedgate.stream.protocol import XmppStream
from tests.support.memory import MemoryStream, server_header
from fedgate.s2s.outbound import OutboundS2S
from tests.support.s2s import FakeConnector, FakeOwner, make_context

FEATURES = b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>"


class VerifierTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.connector = FakeConnector(self.clock)
        ctx = make_context(self.clock, local_domains={"gw.example"}, secret="s")
        self.verifier = DialbackVerifier(self.connector, self.clock,
                                         lambda handler: XmppStream(handler, self.clock), timeout=30,
                                         ctx=ctx, idle_timeout=self.IDLE, pipeline=3, max_idle=2)
        self.results = []

    IDLE = 20

    def ask(self, stream_id="SID", originating="remote.example", key="KEY"):
        finished = []
        d = self.verifier.verify("gw.example", originating, stream_id, key,
                                 finished=lambda: finished.append(True))
        d.addBoth(self.results.append)
        return d, finished

    def connect(self, index=-1):
        """Complete a connect attempt; the peer sends its header and features."""
        domain, factory, connecting = self.connector.attempts[index]
        peer = MemoryStream(None, self.clock, stream=factory(None))
        connecting.callback(peer.stream)
        peer.read()
        self.assertEqual((peer.header.get("to"), peer.header.get("from")), (domain, "gw.example"))
        peer.stream.dataReceived(server_header(id="AUTH", **{"from": domain}, version="1.0") + FEATURES)
        return peer

    def start(self):
        self.d, self.finished = self.ask()
        peer = self.connect()
        [request] = peer.read()
        self.assertEqual((request.name, request["id"], request["from"], request["to"], str(request)),
                         ("verify", "SID", "gw.example", "remote.example", "KEY"))
        return peer

    def answer(self, peer, kind, stream_id="SID", sender="remote.example", body=""):
        peer.stream.dataReceived(
            f"<db:verify from='{sender}' to='gw.example' id='{stream_id}' type='{kind}'>{body}</db:verify>".encode())

    def test_valid(self):
        peer = self.start()
        self.answer(peer, "valid")
        self.assertEqual(self.results, [True])
        self.assertEqual(self.finished, [True], "the verification counts no more once answered")
        self.assertFalse(peer.disconnecting, "the connection stays for the next verification")

    def assert_junk_ends_the_pooled_connection(self, junk: bytes):
        """A peer sending anything but db:verify on a verification
        connection gets unsupported-stanza-type, and the connection leaves
        the pool instead of idling there.  Before the fix the element was
        ignored and the connection stayed open."""
        peer = self.start()
        self.answer(peer, "valid")
        peer.stream.dataReceived(junk)
        peer.read()
        self.assertEqual(peer.stream_error(), "unsupported-stanza-type")
        self.assertTrue(peer.disconnecting)
        self.ask(stream_id="SID2")
        self.assertEqual(len(self.connector.attempts), 2, "not kept for the next verification")

    def test_a_stanza_ends_the_pooled_connection(self):
        self.assert_junk_ends_the_pooled_connection(
            b"<message from='remote.example' to='gw.example'><body>x</body></message>")

    def test_a_nested_stream_header_ends_the_pooled_connection(self):
        # A child element named like the stream header swallows the peer's
        # own </stream:stream> (found by the fuzzer, seed 3612010363).
        self.assert_junk_ends_the_pooled_connection(
            b"<stream:stream to='gw.example' from='gw.example' version='1.0'></stream:stream>")

    def test_invalid(self):
        self.answer(self.start(), "invalid")
        self.assertEqual(self.results, [False])

    def test_answer_for_another_id_is_ignored(self):
        peer = self.start()
        self.answer(peer, "valid", stream_id="OTHER")
        self.answer(peer, "valid", sender="evil.example")
        self.assertEqual(self.results, [])
        self.answer(peer, "invalid")
        self.assertEqual(self.results, [False])

    def test_authoritative_error_maps_to_remote_server_not_found(self):
        self.answer(self.start(), "error",
                    body="<error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>")
        [failure] = self.results
        self.assertEqual(failure.value.condition, "remote-server-not-found")

    def test_connect_failure(self):
        d, finished = self.ask()
        self.connector.attempts[-1][2].errback(ConnectError(
            "remote-server-not-found", "could not connect to the servers of remote.example",
            "tried 10.0.0.7:5269 refused: private address; ::1:5269 refused: loopback address"))
        [failure] = self.results
        self.assertIsInstance(failure.value, DialbackError)
        self.assertEqual(failure.value.condition, "remote-server-not-found")
        # What goes back to the remote server names no address; the log keeps them.
        self.assertNotIn("10.0.0.7", failure.value.text)
        self.assertNotIn("::1", failure.value.text)
        self.assertIn("10.0.0.7", failure.value.detail)
        self.assertEqual(finished, [True])
        self.assertEqual(self.verifier.pool, {}, "a failed connection is not pooled")

    def test_only_xep_0220_conditions(self):
        with self.assertRaises(ValueError):
            DialbackError("remote-connection-failed")

    # -- pooling ---------------------------------------------------------------
    def test_the_next_verification_reuses_the_idle_connection(self):
        peer = self.start()
        self.answer(peer, "valid")
        self.ask(stream_id="SID2", key="KEY2")
        self.assertEqual(len(self.connector.attempts), 1, "no second connection")
        [request] = peer.read()
        self.assertEqual((request["id"], str(request)), ("SID2", "KEY2"))
        self.answer(peer, "invalid", stream_id="SID2")
        self.assertEqual(self.results, [True, False])

    def test_another_domain_pair_gets_its_own_connection(self):
        peer = self.start()
        self.answer(peer, "valid")
        self.ask(originating="other.example")
        self.assertEqual([a[0] for a in self.connector.attempts], ["remote.example", "other.example"])
        self.assertEqual(peer.read(), [])

    def test_pipelined_requests_wait_for_the_connection_and_match_by_id(self):
        for n in range(3):
            self.ask(stream_id=f"S{n}", key=f"K{n}")
        self.assertEqual(len(self.connector.attempts), 1, "three requests, one connection")
        peer = self.connect()
        self.assertEqual([(r["id"], str(r)) for r in peer.read()], [("S0", "K0"), ("S1", "K1"), ("S2", "K2")])
        # Answers in any order, each to its own request.
        self.answer(peer, "invalid", stream_id="S2")
        self.answer(peer, "valid", stream_id="S0")
        self.answer(peer, "valid", stream_id="S1")
        self.assertEqual(self.results, [False, True, True])

    def test_past_the_pipeline_a_second_connection(self):
        for n in range(4):
            self.ask(stream_id=f"S{n}")
        self.assertEqual(len(self.connector.attempts), 2, "pipeline of 3: the fourth opens another")
        first, second = self.connect(0), self.connect(1)
        self.assertEqual([r["id"] for r in first.read()], ["S0", "S1", "S2"])
        self.assertEqual([r["id"] for r in second.read()], ["S3"])

    def test_the_same_question_twice_never_shares_a_connection(self):
        self.ask()
        self.ask()
        self.assertEqual(len(self.connector.attempts), 2, "(id, from, to) is unique on a connection")

    def test_idle_connection_closes_after_the_idle_timeout(self):
        peer = self.start()
        self.answer(peer, "valid")
        self.clock.advance(self.IDLE - 1)
        self.assertFalse(peer.disconnecting)
        self.clock.advance(1)
        self.assertTrue(peer.disconnecting, "closed after the idle time")
        self.ask(stream_id="SID2")
        self.assertEqual(len(self.connector.attempts), 2, "a closing connection takes no request")

    def test_busy_connection_does_not_expire(self):
        peer = self.start()
        self.answer(peer, "valid")
        self.clock.advance(self.IDLE - 1)
        self.ask(stream_id="SID2")
        self.clock.advance(self.IDLE)
        self.assertFalse(peer.disconnecting, "a request in flight keeps it open")
        self.answer(peer, "valid", stream_id="SID2")
        self.clock.advance(self.IDLE)
        self.assertTrue(peer.disconnecting)

    def test_no_request_on_a_connection_the_peer_is_closing(self):
        peer = self.start()
        self.answer(peer, "valid")
        peer.stream.dataReceived(b"</stream:stream>")  # the peer ends its stream; TCP still up
        self.ask(stream_id="SID2")
        self.assertEqual(len(self.connector.attempts), 2, "a new connection, not the closing one")
        self.assertEqual([r for r in peer.read() if r.name == "verify"], [])

    def test_idle_zero_closes_after_the_last_answer(self):
        self.verifier.idle_timeout = 0
        peer = self.start()
        self.answer(peer, "valid")
        self.assertTrue(peer.disconnecting)

    def test_idle_connections_are_capped(self):
        peers = []
        for n, domain in enumerate(["a.example", "b.example", "c.example"]):
            self.ask(originating=domain)
            peer = self.connect()
            self.answer(peer, "valid", sender=domain)
            peers.append(peer)
        self.assertEqual([p.disconnecting for p in peers], [True, False, False],
                         "max_idle 2: the longest idle one closes")
        self.assertEqual(self.verifier.idle_count(), 2)

    # -- cancelling ------------------------------------------------------------
    def test_cancel_while_connecting_stops_the_attempt(self):
        d, finished = self.ask()
        connecting = self.connector.attempts[-1][2]
        d.cancel()
        self.assertTrue(connecting.called, "the connect attempt was cancelled")
        [failure] = self.results
        self.assertTrue(failure.check(defer.CancelledError))
        self.assertEqual(finished, [True])
        self.clock.advance(100)
        self.assertEqual(finished, [True])

    def test_cancel_of_a_shared_connection_cancels_only_the_request(self):
        d0, finished0 = self.ask(stream_id="S0")
        d1, finished1 = self.ask(stream_id="S1")
        d0.cancel()
        self.assertFalse(self.connector.attempts[-1][2].called, "the attempt goes on for S1")
        self.assertEqual(finished0, [], "counted until the attempt is up")
        peer = self.connect()
        self.assertEqual(finished0, [True])
        self.assertEqual([r["id"] for r in peer.read()], ["S1"], "the cancelled request is not sent")
        d2, _ = self.ask(stream_id="S2")
        d2.cancel()
        self.assertFalse(peer.disconnecting, "S1 still needs the connection")
        self.answer(peer, "valid", stream_id="S2")  # a late answer: taken silently
        self.answer(peer, "valid", stream_id="S1")
        self.assertEqual(len(self.results), 3)
        self.assertEqual(self.results[2], True)
        self.assertFalse(peer.disconnecting)

    def test_cancel_of_the_last_request_closes_the_connection(self):
        peer = self.start()
        self.d.cancel()
        [failure] = self.results
        self.assertTrue(failure.check(defer.CancelledError))
        self.assertTrue(peer.disconnecting, "nobody needs the connection: closed")
        self.assertEqual(self.finished, [], "counted until the connection is gone")
        peer.stream.connectionLost(None)
        self.assertEqual(self.finished, [True])
        self.clock.advance(100)
        self.assertEqual(self.finished, [True], "once only")

    def test_a_late_answer_never_answers_a_later_request(self):
        d0, _ = self.ask(stream_id="S0")
        self.ask(stream_id="S1")
        peer = self.connect()
        peer.read()
        d0.cancel()
        d0b, _ = self.ask(stream_id="S0", key="OTHER")
        self.assertEqual(len(self.connector.attempts), 2, "S0 is still outstanding on the first connection")
        self.answer(peer, "valid", stream_id="S0")
        self.assertEqual(len(self.results), 1, "the late answer went to the cancelled request only")

    # -- timeouts and loss -----------------------------------------------------
    def test_timeout_ends_the_connection_and_fails_its_requests(self):
        peer = self.start()
        self.clock.advance(20)
        self.ask(stream_id="SID2")
        self.clock.advance(11)
        [failure] = self.results
        self.assertEqual(failure.value.condition, "remote-server-timeout")
        self.assertTrue(peer.transport.disconnecting)
        # a stream error and our close, not a dropped connection (RFC 6120 4.9.3.4)
        tail = peer.transport.value()
        self.assertIn(b"<connection-timeout", tail)
        self.assertTrue(tail.endswith(b"</stream:stream>"), tail[-120:])
        peer.stream.connectionLost(None)
        [_, other] = self.results
        self.assertEqual(other.value.condition, "remote-server-timeout")
        self.assertEqual(self.verifier.pool, {})

    def test_closed_without_answer(self):
        peer = self.start()
        peer.stream.connectionLost(None)
        [failure] = self.results
        self.assertEqual(failure.value.condition, "remote-server-timeout")
        self.assertEqual(self.finished, [True])

    def test_timeout_while_connecting(self):
        d, finished = self.ask()
        self.clock.advance(31)
        [failure] = self.results
        self.assertEqual(failure.value.condition, "remote-server-timeout")
        self.assertTrue(self.connector.attempts[-1][2].called, "the attempt was given up")
        self.assertEqual(finished, [True])


class OutboundStreamChannelTests(unittest.TestCase):
    """<db:verify> over our authenticated outbound stream to the
    authoritative domain, where its peer offered dialback."""

    def setUp(self):
        self.clock = Clock()
        self.connector = FakeConnector(self.clock)
        self.ctx = make_context(self.clock, local_domains={"gw.example"}, secret="s")
        self.streams = []
        self.verifier = DialbackVerifier(self.connector, self.clock,
                                         lambda handler: XmppStream(handler, self.clock), timeout=30,
                                         ctx=self.ctx, outbound=lambda domain: [
                                             s for s in self.streams if s.remote == domain])
        self.results = []

    def outbound(self, dialback=True):
        handler = OutboundS2S(self.ctx, "remote.example", "gw.example", FakeOwner())
        peer = MemoryStream(None, self.clock, stream=XmppStream(handler, self.clock))
        handler.authenticate("gw.example")
        features = "<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>" if dialback else ""
        peer.stream.dataReceived(server_header(id="OUT", **{"from": "remote.example"}, version="1.0")
                                 + f"<stream:features>{features}</stream:features>".encode())
        peer.feed("<db:result from='remote.example' to='gw.example' type='valid'/>")
        peer.take()
        self.streams.append(handler)
        return handler, peer

    def ask(self, stream_id="SID"):
        d = self.verifier.verify("gw.example", "remote.example", stream_id, "KEY")
        d.addBoth(self.results.append)
        return d

    def test_verify_goes_over_the_outbound_stream(self):
        _, peer = self.outbound()
        self.ask()
        self.assertEqual(self.connector.attempts, [], "no verification connection")
        [request] = peer.take()
        self.assertEqual((request.name, request["id"], request["to"], str(request)),
                         ("verify", "SID", "remote.example", "KEY"))
        peer.feed("<db:verify from='remote.example' to='gw.example' id='SID' type='valid'/>")
        self.assertEqual(self.results, [True])
        self.assertFalse(peer.disconnecting)

    def test_not_where_the_peer_offered_no_dialback(self):
        # A peer without dialback (ejabberd without mod_s2s_dialback) would
        # silently ignore db:verify.  Authenticated here by SASL instead:
        handler = OutboundS2S(self.ctx, "remote.example", "gw.example", FakeOwner())
        peer = MemoryStream(None, self.clock, stream=XmppStream(handler, self.clock))
        peer.stream.dataReceived(server_header(id="OUT", **{"from": "remote.example"}, version="1.0")
                                 + b"<stream:features/>")
        handler.record.set_pair("gw.example", "remote.example", "valid", "sasl-external", 0)
        self.assertTrue(handler.record.authenticated and handler.is_open)
        self.streams.append(handler)
        peer.take()
        self.ask()
        self.assertEqual(len(self.connector.attempts), 1, "a verification connection instead")
        self.assertEqual(peer.take(), [])

    def test_not_before_the_stream_is_authenticated(self):
        handler = OutboundS2S(self.ctx, "remote.example", "gw.example", FakeOwner())
        peer = MemoryStream(None, self.clock, stream=XmppStream(handler, self.clock))
        handler.authenticate("gw.example")
        peer.stream.dataReceived(server_header(id="OUT", **{"from": "remote.example"}, version="1.0")
                                 + FEATURES)
        self.streams.append(handler)
        self.ask()
        self.assertEqual(len(self.connector.attempts), 1)

    def test_an_answer_on_another_stream_is_ignored(self):
        _, peer = self.outbound()
        self.ask()
        # The same answer on a verification connection of ours, or on any
        # other stream, is not the answer to a request sent here.
        self.ask(stream_id="SID2")
        other_peer = None
        for n in range(8):
            self.ask(stream_id=f"X{n}")
        self.ask(stream_id="OVER")  # pipeline of 10 on the stream: this one takes a connection
        self.assertEqual(len(self.connector.attempts), 1)
        domain, factory, connecting = self.connector.attempts[0]
        other_peer = MemoryStream(None, self.clock, stream=factory(None))
        connecting.callback(other_peer.stream)
        other_peer.stream.dataReceived(server_header(id="A", **{"from": "remote.example"}, version="1.0")
                                       + FEATURES)
        other_peer.feed("<db:verify from='remote.example' to='gw.example' id='SID' type='valid'/>")
        self.assertEqual(self.results, [], "SID was sent on the outbound stream, not here")
        peer.feed("<db:verify from='remote.example' to='gw.example' id='OVER' type='valid'/>")
        self.assertEqual(self.results, [], "OVER was sent on the verification connection, not here")
        peer.feed("<db:verify from='remote.example' to='gw.example' id='SID' type='invalid'/>")
        self.assertEqual(self.results, [False])

    def test_timeout_leaves_the_outbound_stream_open(self):
        _, peer = self.outbound()
        self.ask()
        self.clock.advance(31)
        [failure] = self.results
        self.assertEqual(failure.value.condition, "remote-server-timeout")
        self.assertFalse(peer.disconnecting)

    def test_stream_lost_fails_its_requests(self):
        handler, peer = self.outbound()
        self.ask()
        peer.stream.connectionLost(None)
        [failure] = self.results
        self.assertEqual(failure.value.condition, "remote-server-timeout")


class HostileValuesTests(unittest.TestCase):
    """The peer's stream id and dialback key reach <db:verify> escaped."""

    HOSTILE_ID = "S'<x/>&\"id"
    HOSTILE_KEY = "K</db:verify><db:verify from='gw.example' to='remote.example' id='SID' type='valid'/>&\"'"

    def test_verify_request_escapes_the_peer_values(self):
        clock = Clock()
        connector = FakeConnector(clock)
        ctx = make_context(clock, local_domains={"gw.example"}, secret="s")
        verifier = DialbackVerifier(connector, clock, lambda handler: XmppStream(handler, clock),
                                    timeout=30, ctx=ctx)
        # (A key with markup is refused before any <db:verify>: test_dialback_keys;
        # the escaping of keys is checked on verify_request below.)
        verifier.verify("gw.example", "remote.example", self.HOSTILE_ID, "KEY")
        _, factory, connecting = connector.attempts[-1]
        peer = MemoryStream(None, clock, stream=factory(None))
        connecting.callback(peer.stream)
        peer.read()
        peer.stream.dataReceived(server_header(id="AUTH", **{"from": "remote.example"}, version="1.0") + FEATURES)
        elements = peer.read()
        self.assertEqual(len(elements), 1, "one element, not an injected second one")
        [request] = elements
        self.assertEqual((request.name, request["id"], str(request)),
                         ("verify", self.HOSTILE_ID, "KEY"))
        self.assertEqual(set(request.attributes), {"from", "to", "id"})

    def test_result_request_escapes(self):
        from twisted.words.xish import domish
        from fedgate.s2s.dialback import result_request, verify_request

        def parse_one(text):
            found = []
            parser = StreamParser(lambda h: None, found.append, lambda: None)
            parser.feed(b"<stream:stream xmlns='jabber:server' xmlns:db='jabber:server:dialback'"
                        b" xmlns:stream='http://etherx.jabber.org/streams'>" + text.encode())
            self.assertEqual(len(found), 1)
            return found[0]

        for text in (result_request("a'<>&\"", "b'<>&\"", self.HOSTILE_KEY),
                     verify_request("a'<>&\"", "b'<>&\"", self.HOSTILE_ID, self.HOSTILE_KEY)):
            element = parse_one(text)
            self.assertIsInstance(element, domish.Element)
            self.assertEqual((element["from"], element["to"], str(element)),
                             ("a'<>&\"", "b'<>&\"", self.HOSTILE_KEY))
            self.assertEqual([c for c in element.children if not isinstance(c, str)], [])



class PoolLeakTests(unittest.TestCase):
    """Finding 2: a connect attempt that fails at once leaves no pool entry."""

    def test_a_thousand_failing_verifications_leave_the_pool_empty(self):
        from twisted.internet.testing import MemoryReactorClock
        from fedgate.s2s.connect import DomainConnector
        clock = Clock()
        # The real connector: an IP-literal domain is refused before any
        # DNS lookup, synchronously.
        connector = DomainConnector(MemoryReactorClock(), resolver=None)
        ctx = make_context(clock, local_domains={"gw.example"}, secret="s")
        verifier = DialbackVerifier(connector, clock, lambda handler: XmppStream(handler, clock),
                                    timeout=30, ctx=ctx, pipeline=3, max_idle=2)
        results, finished = [], []
        for n in range(1000):
            d = verifier.verify("gw.example", f"10.0.{n // 256}.{n % 256}", f"SID{n}", "KEY",
                                finished=lambda: finished.append(True))
            d.addBoth(results.append)
        self.assertEqual(len(results), 1000)
        self.assertTrue(all(isinstance(r.value, DialbackError) for r in results))
        self.assertEqual(len(finished), 1000)
        self.assertEqual(verifier.connections_opened, 1000)
        self.assertEqual(verifier.pool, {}, "no entry, empty or not, per failed attempt")
        self.assertEqual(verifier.idle_count(), 0)


class CancelledCountTests(unittest.TestCase):
    """Finding 7: a cancelled request counts until its connection is gone."""

    IDLE = VerifierTests.IDLE
    setUp, ask, connect, answer = (VerifierTests.setUp, VerifierTests.ask, VerifierTests.connect,
                                   VerifierTests.answer)

    def test_cancelled_request_counts_until_the_connection_is_gone(self):
        d0, finished0 = self.ask(stream_id="S0")
        d1, finished1 = self.ask(stream_id="S1")
        peer = self.connect()
        self.assertEqual([r["id"] for r in peer.read()], ["S0", "S1"])
        d0.cancel()
        self.assertEqual(finished0, [], "sent and on a connection still in use: still counted")
        self.assertFalse(peer.disconnecting, "S1 still needs the connection")
        self.answer(peer, "valid", stream_id="S1")
        self.assertEqual(finished1, [True])
        self.assertTrue(peer.disconnecting, "only a cancelled request left: closed")
        self.assertEqual(finished0, [], "counted until the connection is gone")
        peer.stream.connectionLost(None)
        self.assertEqual(finished0, [True])
        self.clock.advance(100)
        self.assertEqual((finished0, finished1), ([True], [True]), "once only")

    def test_cancelled_request_answered_late_counts_no_more(self):
        d0, finished0 = self.ask(stream_id="S0")
        self.ask(stream_id="S1")
        peer = self.connect()
        peer.read()
        d0.cancel()
        self.assertEqual(finished0, [])
        self.answer(peer, "valid", stream_id="S0")  # its answer: its place is free
        self.assertEqual(finished0, [True])
        self.assertFalse(peer.disconnecting, "S1 still needs the connection")


class PooledPolicyTests(unittest.TestCase):
    """Finding 5: pooled verification connections follow peer policy
    changes and live at most MAX_LIFETIME seconds however busy."""

    IDLE = VerifierTests.IDLE
    setUp, ask, connect, answer = (VerifierTests.setUp, VerifierTests.ask, VerifierTests.connect,
                                   VerifierTests.answer)

    def first(self):
        self.ask(stream_id="S0")
        peer = self.connect()
        peer.read()
        self.answer(peer, "valid", stream_id="S0")
        self.assertFalse(peer.disconnecting)
        self.assertEqual(self.verifier.idle_count(), 1)
        return peer

    def test_a_policy_change_retires_the_idle_connection(self):
        from fedgate.policy import PeerPolicy
        peer = self.first()
        self.verifier.ctx.policy.set_peer(PeerPolicy("remote.example", encryption="required"))
        self.ask(stream_id="S1")
        self.assertEqual(len(self.connector.attempts), 2, "a new connection on the new terms")
        self.assertTrue(peer.disconnecting, "the old one is closed")
        self.assertEqual(self.verifier.idle_count(), 0)

    def test_another_domains_policy_change_keeps_it(self):
        from fedgate.policy import PeerPolicy
        peer = self.first()
        self.verifier.ctx.policy.set_peer(PeerPolicy("other.example", encryption="required"))
        self.ask(stream_id="S1")
        self.assertEqual(len(self.connector.attempts), 1)
        self.assertFalse(peer.disconnecting)

    def test_a_busy_connection_finishes_and_closes_after_a_policy_change(self):
        from fedgate.policy import PeerPolicy
        self.ask(stream_id="S0")
        peer = self.connect()
        peer.read()
        self.verifier.ctx.policy.set_peer(PeerPolicy("remote.example", encryption="required"))
        self.ask(stream_id="S1")
        self.assertEqual(len(self.connector.attempts), 2)
        self.assertFalse(peer.disconnecting, "S0 is still answered there")
        self.answer(peer, "valid", stream_id="S0")
        self.assertEqual(self.results, [True])
        self.assertTrue(peer.disconnecting, "then it closes instead of waiting idle")

    def test_lifetime_is_capped_however_busy(self):
        from fedgate.s2s.verifier import MAX_LIFETIME
        self.assertEqual(MAX_LIFETIME, 600.0)
        peer = self.first()
        n = 1
        while self.clock.seconds() + 10 < MAX_LIFETIME:
            self.clock.advance(10)  # well inside the idle timeout: it never idles out
            self.ask(stream_id=f"S{n}")
            self.assertEqual(len(self.connector.attempts), 1, f"reused at {self.clock.seconds()}")
            self.answer(peer, "valid", stream_id=f"S{n}")
            n += 1
        self.assertFalse(peer.disconnecting)
        self.clock.advance(10)
        self.ask(stream_id="LAST")
        self.assertEqual(len(self.connector.attempts), 2, "past its lifetime: a new connection")
        self.assertTrue(peer.disconnecting)


class PooledPolicyNoteTests(unittest.TestCase):
    IDLE = VerifierTests.IDLE
    setUp, ask, connect, answer = (VerifierTests.setUp, VerifierTests.ask, VerifierTests.connect,
                                   VerifierTests.answer)
    first = PooledPolicyTests.first

    def test_a_note_or_rate_limit_change_keeps_it(self):
        from dataclasses import replace
        peer = self.first()
        policy = self.verifier.ctx.policy
        policy.set_peer(replace(policy.for_peer("remote.example"), note="watch them", rate_limit=5.0))
        self.ask(stream_id="S1")
        self.assertEqual(len(self.connector.attempts), 1)
        self.assertFalse(peer.disconnecting)


class PooledPolicyManyTests(unittest.TestCase):
    IDLE = VerifierTests.IDLE
    setUp, ask, connect, answer = (VerifierTests.setUp, VerifierTests.ask, VerifierTests.connect,
                                   VerifierTests.answer)

    def test_every_idle_connection_of_the_domain_is_retired(self):
        from fedgate.policy import PeerPolicy
        for n in range(4):  # pipeline 3: two connections
            self.ask(stream_id=f"S{n}")
        peers = [self.connect(0), self.connect(1)]
        for peer in peers:
            for request in peer.read():
                self.answer(peer, "valid", stream_id=request["id"])
        self.assertEqual(self.results, [True] * 4)
        self.assertEqual(self.verifier.idle_count(), 2)
        self.verifier.ctx.policy.set_peer(PeerPolicy("remote.example", encryption="required"))
        self.ask(stream_id="NEW")
        self.assertEqual(len(self.connector.attempts), 3)
        self.assertEqual([p.disconnecting for p in peers], [True, True])
        self.assertEqual(self.verifier.idle_count(), 0)

    def test_switching_to_an_allowlist_retires_it(self):
        peer = PooledPolicyTests.first(self)
        policy = self.verifier.ctx.policy
        policy.set_default(policy.default, mode="allowlist")
        self.ask(stream_id="S1")
        self.assertTrue(peer.disconnecting)


class SendingTransport(StringTransport):
    """A TCP-like transport: counts writes and the sends made at once
    (``doWrite``, which the reactor would otherwise call on its next turn)."""

    _writeDisconnected = False

    def __init__(self):
        super().__init__()
        self.writes = 0
        self.sent = b""

    def write(self, data):
        self.writes += 1
        super().write(data)

    def doWrite(self):
        self.sent = self.value()


class HandshakeSendsTests(unittest.TestCase):
    """A plaintext dialback handshake over the pooled verification
    connection: each step's bytes leave within the read that caused them
    (no reactor turn in between), one write per stream per read."""

    def setUp(self):
        self.clock = Clock()
        self.connections = []
        ctx = make_context(self.clock, local_domains={"gw.example"}, secret="s")

        def connect(domain, factory):
            stream = factory(None)
            stream.makeConnection(SendingTransport())
            self.connections.append(stream)
            return defer.succeed(stream)
        self.connector = FakeConnector(self.clock)
        self.connector.connect = connect
        verifier = DialbackVerifier(self.connector, self.clock,
                                    lambda handler: XmppStream(handler, self.clock), timeout=30, ctx=ctx)
        self.ctx = replace(ctx, verifier=verifier)

    def test_verify_request_and_answer_are_sent_within_the_reads(self):
        inbound = XmppStream(InboundS2S(self.ctx), self.clock)
        transport = SendingTransport()
        inbound.makeConnection(transport)
        inbound.dataReceived(server_header(to="gw.example", **{"from": "remote.example"}, version="1.0"))
        self.assertEqual((transport.writes, transport.sent), (1, transport.value()),
                         "header and features: one write, sent at once")
        # The verification connection is up (at once here) and negotiated.
        inbound.dataReceived(b"<db:result from='remote.example' to='gw.example'>KEY</db:result>")
        [verification] = self.connections
        verification.dataReceived(server_header(id="AUTH", **{"from": "remote.example"}, version="1.0")
                                  + FEATURES)
        vt = verification.transport
        self.assertIn(b"<db:verify ", vt.value())
        self.assertEqual(vt.sent, vt.value(), "the db:verify is sent within the read")
        stream_id = inbound.handler.stream_id
        before = transport.writes
        verification.dataReceived(f"<db:verify from='remote.example' to='gw.example' id='{stream_id}'"
                                  f" type='valid'/>".encode())
        self.assertEqual(transport.writes, before + 1)
        self.assertTrue(transport.sent.endswith(b'<db:result from="gw.example" to="remote.example" type="valid"/>'),
                        "the answer is sent within the verification connection's read")
        # The next handshake reuses the connection: its db:verify goes out
        # within the inbound stream's read.
        second = XmppStream(InboundS2S(self.ctx), self.clock)
        second.makeConnection(SendingTransport())
        second.dataReceived(server_header(to="gw.example", **{"from": "remote.example"}, version="1.0"))
        vt.clear()
        vt.sent = b""
        writes = vt.writes
        second.dataReceived(b"<db:result from='remote.example' to='gw.example'>KEY2</db:result>")
        self.assertEqual(len(self.connections), 1)
        self.assertEqual(vt.writes, writes + 1)
        self.assertTrue(vt.sent.startswith(b"<db:verify ") and vt.sent == vt.value(),
                        "sent within the inbound stream's read")
