"""Every closing path of an outbound S2S stream gives each queued stanza a
fate (fedgate.s2s.destination, the table in its docstring): peer close,
a stream error, a policy block or a changed requirement, and the graceful
shutdown's drain.  Operator and liveness closes keep the queue: see
tests/test_sender.py OperatorCloseTests and tests/test_liveness.py."""

from __future__ import annotations

from fedgate.admin.enforce import PolicyEnforcer
from fedgate.policy import PeerPolicy
from fedgate.s2s.sender import BACKOFF, CONNECTING, IDLE, OPEN, REVERSE
from tests.test_sender import SenderCase, message

CHAT = "chat.gw.example"
REMOTE = "remote.example"


class PeerCloseTests(SenderCase):
    """The peer ends its stream with ``</stream:stream>`` while stanzas wait
    for a pair: one new connection, then they bounce."""

    def open_with_queue(self, count=2):
        for n in range(count):
            self.sender.send(CHAT, REMOTE, message(n))
        peer = self.connector.succeed()
        self.open_peer(peer)  # our dialback request is pending
        return peer, self.sender.destinations[REMOTE]

    def end(self, peer):
        peer.stream.dataReceived(b"</stream:stream>")
        peer.stream.connectionLost(None)

    def test_peer_close_reconnects_once_then_bounces(self):
        peer, destination = self.open_with_queue()
        self.assertEqual(destination.state, OPEN)
        self.end(peer)
        self.assertEqual(self.bounced(), [])
        self.assertEqual((len(self.connector.attempts), destination.state), (2, CONNECTING))
        again = self.connector.succeed()
        self.open_peer(again)
        self.end(again)
        self.assertEqual(self.bounced(), [("m0", "remote-server-timeout"), ("m1", "remote-server-timeout")])
        self.assertEqual((len(self.connector.attempts), destination.state), (2, BACKOFF))
        outcomes = self.sender.outcomes()
        self.assertEqual(outcomes["accepted"], outcomes["delivered"] + outcomes["bounced"])

    def test_delivery_earns_a_new_reconnect(self):
        peer, destination = self.open_with_queue(1)
        self.end(peer)
        again = self.connector.succeed()
        self.open_peer(again)
        self.answer(again, CHAT, "valid")
        self.assertEqual(self.delivered_ids(again), ["m0"])
        # Another domain waits on a pair when this peer closes again.
        self.sender.send("gw.example", REMOTE, message(1, sender="gw.example"))
        self.end(again)
        self.assertEqual(self.bounced(), [])
        self.assertEqual(len(self.connector.attempts), 3)

    def test_dropped_connection_bounces(self):
        """No ``</stream:stream>``: the connection was lost, not closed."""
        peer, destination = self.open_with_queue(1)
        peer.stream.connectionLost(None)
        self.assertEqual(self.bounced(), [("m0", "remote-server-timeout")])
        self.assertEqual(len(self.connector.attempts), 1)


class StreamErrorTests(SenderCase):
    def failed_with(self, condition):
        self.sender.send(CHAT, REMOTE, message(0))
        peer = self.connector.succeed()
        self.open_peer(peer)
        peer.stream.dataReceived(
            f"<stream:error><{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>"
            "</stream:stream>".encode())
        peer.stream.connectionLost(None)
        return self.bounced()

    def test_host_unknown_bounces_remote_server_not_found(self):
        self.assertEqual(self.failed_with("host-unknown"), [("m0", "remote-server-not-found")])

    def test_peer_policy_violation_bounces_policy_violation(self):
        self.assertEqual(self.failed_with("policy-violation"), [("m0", "policy-violation")])

    def test_other_errors_bounce_remote_server_timeout(self):
        """A stream error is no clean close: no reconnect, and the text says which."""
        self.assertEqual(self.failed_with("undefined-condition"), [("m0", "remote-server-timeout")])
        self.assertIn("undefined-condition", self.router.bounced[0][2])
        self.assertEqual(len(self.connector.attempts), 1)


class PolicyTests(SenderCase):
    def setUp(self):
        super().setUp()
        self.policy = self.ctx.policy
        self.enforcer = PolicyEnforcer(self.policy, self.table, self.sender)
        self.enforcer.attach()

    def test_block_bounces_policy_violation_and_closes(self):
        self.sender.send(CHAT, REMOTE, message(0))
        peer = self.connector.succeed()
        self.open_peer(peer)
        self.policy.set_peer(PeerPolicy(domain=REMOTE, allowed=False, encryption="optional"))
        self.assertEqual(self.bounced(), [("m0", "policy-violation")])
        peer.read()
        self.assertEqual(peer.stream_error(), "policy-violation")
        peer.stream.connectionLost(None)
        self.sender.send(CHAT, REMOTE, message(1))
        self.assertEqual(self.bounced(), [("m0", "policy-violation"), ("m1", "policy-violation")])
        self.assertEqual(len(self.connector.attempts), 1, "no new connection to a blocked domain")

    def test_changed_requirement_keeps_the_queue_and_reconnects(self):
        """TLS now required on a plaintext stream: it ends with
        policy-violation, but the stanzas waiting there try the new terms."""
        self.sender.send(CHAT, REMOTE, message(0))
        peer = self.connector.succeed()
        self.open_peer(peer)
        self.policy.set_peer(PeerPolicy(domain=REMOTE, encryption="required"))
        peer.read()
        self.assertEqual(peer.stream_error(), "policy-violation")
        peer.stream.connectionLost(None)
        self.assertEqual(self.bounced(), [])
        self.assertEqual(len(self.connector.attempts), 2)
        self.assertEqual(len(self.sender.destinations[REMOTE].queue), 1)


class DrainTests(SenderCase):
    """Graceful shutdown, the sender's part: no new connection; what has no
    stream bounces at once; what waits on a stream may still go out; stop
    bounces the rest with remote-server-timeout."""

    def test_connecting_destination_may_finish_within_the_flush(self):
        self.sender.send(CHAT, REMOTE, message(0))
        self.sender.drain()
        self.assertEqual(self.bounced(), [])
        peer = self.connector.succeed()
        self.open_peer(peer)
        self.answer(peer, CHAT, "valid")
        self.assertEqual(self.delivered_ids(peer), ["m0"])
        self.assertEqual(self.sender.pending_stanza_count(), 0)

    def test_stop_bounces_what_is_left_and_leaves_the_stream_open(self):
        self.sender.send(CHAT, REMOTE, message(0))
        peer = self.connector.succeed()
        self.open_peer(peer)
        self.sender.drain()
        self.sender.stop()
        self.assertEqual(self.bounced(), [("m0", "remote-server-timeout")])
        self.assertFalse(peer.stream.closing, "the gateway ends it with system-shutdown")
        outcomes = self.sender.outcomes()
        self.assertEqual((outcomes["accepted"], outcomes["bounced"]), (1, 1))

    def test_no_new_connection_while_draining(self):
        self.sender.drain()
        self.sender.send(CHAT, "other.example", message(0, to="b@other.example"))
        self.assertEqual(self.bounced(), [("m0", "remote-server-timeout")])
        self.assertEqual(self.connector.attempts, [])

    def test_backoff_queue_and_retry_end_at_drain(self):
        self.sender.send(CHAT, REMOTE, message(0))
        self.connector.fail()
        destination = self.sender.destinations[REMOTE]
        self.assertEqual(destination.state, BACKOFF)
        self.sender.drain()
        self.assertEqual(destination.state, IDLE)
        self.clock.advance(600)
        self.assertEqual(len(self.connector.attempts), 1, "no retry once draining")

    def test_clean_close_while_draining_bounces_instead_of_reconnecting(self):
        self.sender.send(CHAT, REMOTE, message(0))
        peer = self.connector.succeed()
        self.open_peer(peer)
        self.sender.drain()
        peer.stream.dataReceived(b"</stream:stream>")
        peer.stream.connectionLost(None)
        self.assertEqual(self.bounced(), [("m0", "remote-server-timeout")])
        self.assertEqual(len(self.connector.attempts), 1)
        self.assertEqual(self.sender.destinations[REMOTE].state, IDLE)

    def test_reverse_request_bounces_at_drain(self):
        """Waiting for a pair in reverse on a peer's bidi stream, which is no
        longer read while shutting down: nothing can answer it, and no
        connection of our own is made for it."""
        from dataclasses import replace
        from fedgate.s2s.pairs import INBOUND, VALID, ConnectionRecord

        class Route:
            def authenticate_reverse(self, local, remote):
                return True

            def write_stanza(self, local, remote, stanza):
                raise AssertionError("the pair was never accepted")

        self.sender.ctx = replace(self.ctx, reverse_dialback=True)
        record = ConnectionRecord(INBOUND, "peer", 0.0, remote_domain=REMOTE, bidi=True)
        record.set_pair("gw.example", REMOTE, VALID, "sasl-external", 0.0)
        self.table.add(record, route=Route())
        self.sender.send(CHAT, REMOTE, message(0))
        destination = self.sender.destinations[REMOTE]
        self.assertEqual((destination.state, self.bounced()), (REVERSE, []))
        self.sender.drain()
        self.assertEqual(self.bounced(), [("m0", "remote-server-timeout")])
        self.assertEqual(destination.state, IDLE)
        # The bidi stream closing later makes no connection either.
        self.table.remove(record)
        self.table.pair_changed(CHAT, REMOTE, False)
        self.assertEqual(self.connector.attempts, [])
