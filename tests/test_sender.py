"""Per-destination queues, outbound dialback and backoff, in memory."""

from __future__ import annotations

import random

from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.words.xish import domish

from fedgate.s2s.connect import ConnectError
from fedgate.s2s import dialback
from fedgate.s2s.pairs import INVALID, OUTBOUND, VALID, ConnectionTable
from fedgate.s2s.sender import BACKOFF, IDLE, S2SSender, SenderSettings
from tests.support.memory import RecordingRouter, server_header
from tests.support.s2s import FakeConnector, make_context

SECRET = "s3cret"


def message(n, sender="a@chat.gw.example", to="b@remote.example", **attrs):
    el = domish.Element(("jabber:component:accept", "message"))
    el["from"], el["to"], el["id"] = sender, to, f"m{n}"
    for k, v in attrs.items():
        el[k] = v
    el.addElement("body", content=f"body {n}")
    return el


class SenderCase(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.router = RecordingRouter()
        self.table = ConnectionTable()
        self.connector = FakeConnector(self.clock)
        self.ctx = make_context(self.clock, secret=SECRET, table=self.table, router=self.router,
                                auth_timeout=30.0)
        self.settings = SenderSettings(max_stanzas=5, max_bytes=100_000, max_wait=60.0,
                                       backoff_initial=2.0, backoff_max=30.0)
        from fedgate.stream.protocol import XmppStream
        self.sender = S2SSender(self.ctx, self.connector,
                                lambda handler: XmppStream(handler, self.clock),
                                self.settings, rng=random.Random(7))

    def open_peer(self, peer, stream_id="SID"):
        """Play the remote server up to its features."""
        peer.read()
        self.assertEqual(peer.header.get("to"), "remote.example")
        peer.stream.dataReceived(server_header(id=stream_id, **{"from": "remote.example"}, version="1.0")
                                 + b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>")
        return peer.read()

    def answer(self, peer, local, kind, extra=""):
        peer.stream.dataReceived(
            f"<db:result from='remote.example' to='{local}' type='{kind}'>{extra}</db:result>".encode())
        return peer.read()

    def delivered_ids(self, peer):
        return [e["id"] for e in peer.elements if e.name == "message"]

    def bounced(self):
        return [(s["id"], c) for s, c, _ in self.router.bounced]


class QueueAndDialbackTests(SenderCase):
    def test_queued_until_valid_then_flushed_in_order(self):
        for n in range(3):
            self.sender.send("chat.gw.example", "remote.example", message(n))
        self.assertEqual(len(self.connector.attempts), 1, "one connection per destination")
        peer = self.connector.succeed()
        [request] = self.open_peer(peer)
        self.assertEqual((request.name, request["from"], request["to"]),
                         ("result", "chat.gw.example", "remote.example"))
        self.assertEqual(str(request), dialback.dialback_key(SECRET, "remote.example", "chat.gw.example", "SID"))
        self.assertEqual(self.delivered_ids(peer), [])
        self.answer(peer, "chat.gw.example", "valid")
        self.assertEqual(self.delivered_ids(peer), ["m0", "m1", "m2"])
        # Later stanzas go straight out.
        self.sender.send("chat.gw.example", "remote.example", message(3))
        peer.read()
        self.assertEqual(self.delivered_ids(peer), ["m0", "m1", "m2", "m3"])
        [record] = list(self.table)
        self.assertEqual((record.direction, record.state_of("chat.gw.example", "remote.example")),
                         (OUTBOUND, VALID))
        self.assertEqual(record.pairs[("chat.gw.example", "remote.example")].stanzas_out, 4)

    def test_second_local_domain_piggybacks(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        peer = self.connector.succeed()
        self.open_peer(peer)
        self.answer(peer, "chat.gw.example", "valid")
        self.sender.send("gw.example", "remote.example", message(1, sender="gw.example"))
        [request] = [e for e in peer.read() if e.name == "result"]
        self.assertEqual(request["from"], "gw.example")
        self.assertEqual(len(self.connector.attempts), 1)
        self.answer(peer, "gw.example", "valid")
        self.assertEqual(self.delivered_ids(peer), ["m0", "m1"])

    def test_unsolicited_valid_is_ignored(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        peer = self.connector.succeed()
        self.open_peer(peer)
        self.answer(peer, "gw.example", "valid")  # never asked for gw.example
        [record] = list(self.table)
        self.assertIsNone(record.state_of("gw.example", "remote.example"))
        self.assertEqual(self.delivered_ids(peer), [])

    def test_invalid_bounces_with_internal_server_error(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        peer = self.connector.succeed()
        self.open_peer(peer)
        self.answer(peer, "chat.gw.example", "invalid")
        self.assertEqual(self.bounced(), [("m0", "internal-server-error")])

    def test_dialback_error_bounces_with_remote_server_timeout(self):
        """XEP-0220: after db:result type='error' the queued stanzas
        bounce with remote-server-timeout; the peer's condition is in the text."""
        self.sender.send("chat.gw.example", "remote.example", message(0))
        peer = self.connector.succeed()
        self.open_peer(peer)
        self.answer(peer, "chat.gw.example", "error",
                    "<error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>")
        self.assertEqual(self.bounced(), [("m0", "remote-server-timeout")])
        [(_, _, text)] = self.router.bounced
        self.assertIn("item-not-found", text)

    def test_unknown_dialback_error_condition_fails_that_pair_only(self):
        # remote-connection-failed is a stream error condition, unknown as a
        # stanza condition: it is taken as undefined-condition for the pair.
        self.sender.send("chat.gw.example", "remote.example", message(0))
        peer = self.connector.succeed()
        self.open_peer(peer)
        self.answer(peer, "chat.gw.example", "valid")
        self.sender.send("gw.example", "remote.example", message(1, sender="gw.example"))
        self.answer(peer, "gw.example", "error",
                    "<error type='cancel'><remote-connection-failed xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>")
        self.assertIsNone(peer.stream_error())
        self.assertFalse(peer.disconnecting)
        [(stanza_id, _)] = self.bounced()
        self.assertEqual(stanza_id, "m1")
        [record] = list(self.table)
        self.assertEqual(record.state_of("gw.example", "remote.example"), INVALID)
        self.sender.send("chat.gw.example", "remote.example", message(2))
        peer.read()
        self.assertEqual(self.delivered_ids(peer), ["m0", "m2"], "the valid pair still carries stanzas")

    def test_full_queue_bounces_resource_constraint(self):
        for n in range(7):
            self.sender.send("chat.gw.example", "remote.example", message(n))
        self.assertEqual(self.bounced(), [("m5", "resource-constraint"), ("m6", "resource-constraint")])

    def test_byte_bound(self):
        self.sender.settings = SenderSettings(max_stanzas=100, max_bytes=300)
        big = message(0)
        big.addElement("x", content="y" * 400)
        self.sender.send("chat.gw.example", "remote.example", big)
        self.assertEqual(self.bounced(), [("m0", "resource-constraint")])

    def test_stream_closed_before_auth(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        peer = self.connector.succeed()
        self.open_peer(peer)
        peer.stream.connectionLost(None)
        self.assertEqual(self.bounced(), [("m0", "remote-server-timeout")])
        self.assertEqual(len(self.table), 0)

    def test_auth_timeout_bounces(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        peer = self.connector.succeed()
        self.open_peer(peer)
        self.clock.advance(31)
        peer.read()
        self.assertEqual(peer.stream_error(), "connection-timeout")
        peer.stream.connectionLost(None)
        self.assertEqual(self.bounced(), [("m0", "remote-server-timeout")])


class BackoffTests(SenderCase):
    def test_connect_failure_bounces_and_backs_off(self):
        destination_calls = []
        self.sender.send("chat.gw.example", "remote.example", message(0))
        self.connector.fail()
        self.assertEqual(self.bounced(), [("m0", "remote-server-not-found")])
        destination = self.sender.destinations["remote.example"]
        self.assertEqual(destination.state, BACKOFF)
        first_delay = destination.retry_at - self.clock.seconds()
        self.assertTrue(1.0 <= first_delay <= 2.0, first_delay)
        # A stanza during backoff waits; no new attempt yet.
        self.sender.send("chat.gw.example", "remote.example", message(1))
        self.assertEqual(len(self.connector.attempts), 1)
        self.clock.advance(first_delay)
        self.assertEqual(len(self.connector.attempts), 2)
        self.connector.fail()
        second_delay = destination.retry_at - self.clock.seconds()
        self.assertTrue(2.0 <= second_delay <= 4.0, second_delay)
        destination_calls.append(second_delay)
        # Grows but is capped.
        for _ in range(10):
            self.sender.send("chat.gw.example", "remote.example", message(9))
            self.clock.advance(destination.retry_at - self.clock.seconds())
            self.connector.fail()
        self.assertLessEqual(destination.retry_at - self.clock.seconds(), 30.0)
        self.assertGreaterEqual(destination.retry_at - self.clock.seconds(), 15.0)

    def test_success_resets_backoff(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        self.connector.fail()
        destination = self.sender.destinations["remote.example"]
        self.sender.send("chat.gw.example", "remote.example", message(1))
        self.clock.advance(destination.retry_at - self.clock.seconds())
        peer = self.connector.succeed()
        self.open_peer(peer)
        self.answer(peer, "chat.gw.example", "valid")
        self.assertEqual(destination.failures, 0)
        self.assertEqual(self.delivered_ids(peer), ["m1"])

    def test_idle_backoff_ends_without_connecting(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        self.connector.fail()
        destination = self.sender.destinations["remote.example"]
        self.clock.advance(60)
        self.assertEqual(destination.state, IDLE)
        self.assertEqual(len(self.connector.attempts), 1)

    def test_waiting_too_long_bounces(self):
        self.sender.settings = SenderSettings(max_wait=10.0, backoff_initial=100.0, backoff_max=100.0)
        self.sender.send("chat.gw.example", "remote.example", message(0))
        self.connector.fail()
        self.sender.send("chat.gw.example", "remote.example", message(1))
        self.clock.advance(9.5)
        self.assertEqual(self.bounced(), [("m0", "remote-server-not-found")])
        self.clock.advance(1)
        self.assertEqual(self.bounced(), [("m0", "remote-server-not-found"), ("m1", "remote-server-not-found")])

    def test_reset_retries_now(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        self.connector.fail()
        self.sender.send("chat.gw.example", "remote.example", message(1))
        self.sender.destinations["remote.example"].reset()
        self.assertEqual(len(self.connector.attempts), 2)


class AccountingTests(SenderCase):
    def test_every_stanza_delivered_or_bounced(self):
        """A random run with failures of every kind: nothing vanishes."""
        rng = random.Random(2024)
        self.sender.settings = SenderSettings(max_stanzas=20, max_bytes=1_000_000, max_wait=5.0,
                                              backoff_initial=0.5, backoff_max=4.0)
        peers = []
        n = 0
        for step in range(400):
            action = rng.random()
            if action < 0.55:
                local = rng.choice(["chat.gw.example", "gw.example"])
                remote = rng.choice(["remote.example", "other.example"])
                self.sender.send(local, remote, message(n, sender=local, to=f"x@{remote}"))
                n += 1
            elif action < 0.7:
                pending = [i for i, a in enumerate(self.connector.attempts) if not a[2].called]
                if pending:
                    i = rng.choice(pending)
                    if rng.random() < 0.5:
                        self.connector.fail(i)
                    else:
                        peer = self.connector.succeed(i)
                        self.open_peer_any(peer)
                        peers.append(peer)
            elif action < 0.85 and peers:
                peer = rng.choice(peers)
                if not peer.stream.closed:
                    for local in ("chat.gw.example", "gw.example"):
                        remote = peer.header.get("to")
                        peer.stream.dataReceived(
                            f"<db:result from='{remote}' to='{local}' type='{rng.choice(['valid', 'valid', 'invalid'])}'/>".encode())
            elif action < 0.9 and peers:
                peer = rng.choice(peers)
                if not peer.stream.closed:
                    peer.stream.connectionLost(None)
            else:
                self.clock.advance(rng.random() * 3)
        self.clock.advance(120)
        for peer in peers:
            if not peer.stream.closed:
                peer.stream.connectionLost(None)
        self.clock.advance(120)
        for attempt in self.connector.attempts:
            if not attempt[2].called:
                attempt[2].errback(ConnectError("remote-server-not-found", "late"))
        self.clock.advance(120)
        sender = self.sender
        self.assertEqual(sender.accepted, n)
        self.assertEqual(sender.accepted, sender.delivered + sender.bounced,
                         (sender.accepted, sender.delivered, sender.bounced))
        self.assertGreater(sender.delivered, 0)
        self.assertGreater(sender.bounced, 0)
        self.assertEqual(len(self.router.bounced), sender.bounced)

    def open_peer_any(self, peer):
        peer.read()
        remote = peer.header.get("to")
        peer.stream.dataReceived(server_header(id="S", **{"from": remote}, version="1.0")
                                 + b"<stream:features/>")


class OperatorCloseTests(SenderCase):
    """An operator closing a stream (admin API) is not the peer failing."""

    def connected_with_queue(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        self.sender.send("chat.gw.example", "remote.example", message(1))
        peer = self.connector.succeed()
        self.open_peer(peer)
        [record] = list(self.table)
        return peer, record, self.sender.destinations["remote.example"]

    def test_marked_close_keeps_the_queue_and_reconnects(self):
        peer, record, destination = self.connected_with_queue()
        destination.keep_queue_on_close(destination.stream)
        self.assertTrue(self.table.close(record.id, "policy-violation", "closed by an operator"))
        peer.read()
        self.assertEqual(peer.stream_error(), "policy-violation")
        peer.stream.connectionLost(None)
        self.assertEqual(self.bounced(), [])
        self.assertEqual(len(self.connector.attempts), 2, "a new connection at once")
        self.assertEqual((destination.failures, len(destination.queue)), (0, 2))
        fresh = self.connector.succeed()
        self.open_peer(fresh)
        self.answer(fresh, "chat.gw.example", "valid")
        self.assertEqual(self.delivered_ids(fresh), ["m0", "m1"])

    def test_unmarked_close_is_a_failure(self):
        peer, record, destination = self.connected_with_queue()
        self.table.close(record.id, "policy-violation", "closed")
        peer.stream.connectionLost(None)
        self.assertEqual(self.bounced(), [("m0", "remote-server-timeout"), ("m1", "remote-server-timeout")])
        self.assertEqual(destination.state, BACKOFF)

    def test_mark_applies_to_that_stream_only(self):
        peer, record, destination = self.connected_with_queue()
        destination.keep_queue_on_close(object())
        peer.stream.connectionLost(None)
        self.assertEqual(len(self.bounced()), 2)

    def test_bounce_queue(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        destination = self.sender.destinations["remote.example"]
        destination.bounce_queue("policy-violation", "blocked by an operator")
        self.assertEqual(self.bounced(), [("m0", "policy-violation")])
        self.assertEqual((len(destination.queue), destination.queued_bytes), (0, 0))


class BidiFallbackTests(SenderCase):
    """A pair asked for in the reverse direction on a peer's bidi stream;
    when that stream goes away, queued stanzas take a connection of our own."""

    def test_reverse_then_fallback_keeps_the_queue(self):
        from dataclasses import replace
        from fedgate.s2s.pairs import INBOUND, ConnectionRecord

        class Route:
            def __init__(self):
                self.asked, self.written = [], []

            def authenticate_reverse(self, local, remote):
                self.asked.append((local, remote))
                return True

            def is_writable(self):
                return True

            def write_stanza(self, local, remote, stanza):
                self.written.append(stanza["id"])
                return True

        self.sender.ctx = replace(self.ctx, reverse_dialback=True)
        record = ConnectionRecord(INBOUND, "peer", 0.0, remote_domain="remote.example", bidi=True)
        record.set_pair("gw.example", "remote.example", VALID, "sasl-external", 0.0)
        route = Route()
        self.table.add(record, route=route)
        for n in range(3):
            self.sender.send("chat.gw.example", "remote.example", message(n))
        self.assertEqual(route.asked, [("chat.gw.example", "remote.example")] * 3)
        self.assertEqual(self.connector.attempts, [], "no connection of our own yet")
        # The bidi stream closes before the peer answered: fall back.
        self.table.remove(record)
        self.table.pair_changed("chat.gw.example", "remote.example", False)
        self.assertEqual(len(self.connector.attempts), 1)
        peer = self.connector.succeed()
        self.open_peer(peer)
        self.answer(peer, "chat.gw.example", "valid")
        self.assertEqual(self.delivered_ids(peer), ["m0", "m1", "m2"], "nothing was dropped")
        self.assertEqual(route.written, [])
        self.assertEqual(self.bounced(), [])
