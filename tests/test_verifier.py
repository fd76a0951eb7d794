"""The Receiving Server's verification connection (db:verify) in memory."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from fedgate.s2s.connect import ConnectError
from fedgate.s2s.verifier import DialbackError, DialbackVerifier
from fedgate.stream.parser import StreamParser
from fedgate.stream.protocol import XmppStream
from tests.support.memory import MemoryStream, server_header
from tests.support.s2s import FakeConnector, make_context

FEATURES = b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>"


class VerifierTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.connector = FakeConnector(self.clock)
        ctx = make_context(self.clock, local_domains={"gw.example"}, secret="s")
        self.verifier = DialbackVerifier(self.connector, self.clock,
                                         lambda handler: XmppStream(handler, self.clock), timeout=30,
                                         ctx=ctx)
        self.results = []

    def start(self):
        self.finished = []
        d = self.verifier.verify("gw.example", "remote.example", "SID", "KEY",
                                 finished=lambda: self.finished.append(True))
        self.d = d
        d.addBoth(self.results.append)
        domain, factory, connecting = self.connector.attempts[-1]
        self.assertEqual(domain, "remote.example")
        peer = MemoryStream(None, self.clock, stream=factory(None))
        connecting.callback(peer.stream)
        peer.read()
        self.assertEqual((peer.header.get("to"), peer.header.get("from")), ("remote.example", "gw.example"))
        peer.stream.dataReceived(server_header(id="AUTH", **{"from": "remote.example"}, version="1.0") + FEATURES)
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
        self.assertTrue(peer.disconnecting, "the verification connection is closed after the answer")

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
        finished = []
        d = self.verifier.verify("gw.example", "remote.example", "SID", "KEY",
                                 finished=lambda: finished.append(True))
        d.addBoth(self.results.append)
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

    def test_only_xep_0220_conditions(self):
        with self.assertRaises(ValueError):
            DialbackError("remote-connection-failed")

    def test_in_flight_until_the_connection_is_gone(self):
        peer = self.start()
        self.answer(peer, "valid")
        self.assertEqual(self.results, [True])
        self.assertTrue(peer.disconnecting)
        self.assertEqual(self.finished, [], "the connection is still closing")
        peer.stream.connectionLost(None)
        self.assertEqual(self.finished, [True])
        self.clock.advance(100)
        self.assertEqual(self.finished, [True], "once only")

    def test_cancel_while_connecting_stops_the_attempt(self):
        finished = []
        d = self.verifier.verify("gw.example", "remote.example", "SID", "KEY",
                                 finished=lambda: finished.append(True))
        d.addBoth(self.results.append)
        connecting = self.connector.attempts[-1][2]
        d.cancel()
        self.assertTrue(connecting.called, "the connect attempt was cancelled")
        [failure] = self.results
        self.assertTrue(failure.check(defer.CancelledError))
        self.assertEqual(finished, [True])
        self.clock.advance(100)
        self.assertEqual(finished, [True])

    def test_cancel_when_connected_closes_the_connection(self):
        peer = self.start()
        self.d.cancel()
        [failure] = self.results
        self.assertTrue(failure.check(defer.CancelledError))
        self.assertTrue(peer.disconnecting, "the verification connection is closed")
        self.assertEqual(self.finished, [])
        peer.stream.connectionLost(None)
        self.assertEqual(self.finished, [True])

    def test_timeout_aborts_the_connection(self):
        peer = self.start()
        self.clock.advance(31)
        [failure] = self.results
        self.assertEqual(failure.value.condition, "remote-server-timeout")
        self.assertTrue(peer.transport.disconnecting)

    def test_closed_without_answer(self):
        peer = self.start()
        peer.stream.connectionLost(None)
        [failure] = self.results
        self.assertEqual(failure.value.condition, "remote-server-timeout")

    def test_timeout(self):
        self.start()
        self.clock.advance(31)
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
        verifier.verify("gw.example", "remote.example", self.HOSTILE_ID, self.HOSTILE_KEY)
        _, factory, connecting = connector.attempts[-1]
        peer = MemoryStream(None, clock, stream=factory(None))
        connecting.callback(peer.stream)
        peer.read()
        peer.stream.dataReceived(server_header(id="AUTH", **{"from": "remote.example"}, version="1.0") + FEATURES)
        elements = peer.read()
        self.assertEqual(len(elements), 1, "one element, not an injected second one")
        [request] = elements
        self.assertEqual((request.name, request["id"], str(request)),
                         ("verify", self.HOSTILE_ID, self.HOSTILE_KEY))
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
