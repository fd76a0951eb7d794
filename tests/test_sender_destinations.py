"""The sender's destinations in memory: their bound and idle eviction, which
stream carries a second local domain, pending-pair timeouts, and how
dialback errors bounce."""

from __future__ import annotations

from twisted.words.xish import domish

from fedgate.admin.views import destination_json
from fedgate.policy import MODE_ALLOWLIST, PeerPolicy, PolicyTable
from fedgate.s2s.sender import BACKOFF, IDLE, SenderSettings
from tests.support.memory import server_header
from tests.test_sender import SenderCase, message

DIALBACK_FEATURES = (b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
                     b"</stream:features>")
NO_DIALBACK_FEATURES = b"<stream:features/>"


def to(remote: str, n: int, sender: str = "a@chat.gw.example") -> domish.Element:
    return message(n, sender=sender, to=f"b@{remote}")


class BoundCase(SenderCase):
    def setUp(self):
        super().setUp()
        self.sender.settings = SenderSettings(max_stanzas=5, max_bytes=100_000, max_wait=60.0,
                                              backoff_initial=2.0, backoff_max=30.0,
                                              idle_timeout=300.0, max_destinations=100)

    def deliver_and_close(self, remote: str, n: int) -> None:
        """One stanza to ``remote``: connect, authenticate, deliver, and the
        peer closes the stream (the destination is then idle)."""
        self.sender.send("chat.gw.example", remote, to(remote, n))
        peer = self.connector.succeed()
        peer.read()
        peer.stream.dataReceived(server_header(id="S", **{"from": remote}, version="1.0") + DIALBACK_FEATURES)
        peer.read()
        peer.stream.dataReceived(
            f"<db:result from='{remote}' to='chat.gw.example' type='valid'/>".encode())
        peer.read()
        self.assertEqual(self.delivered_ids(peer), [f"m{n}"])
        peer.stream.connectionLost(None)


class DestinationBoundTests(BoundCase):
    def test_3000_domains_stay_within_the_bound_and_are_forgotten_when_idle(self):
        most = 0
        for n in range(3000):
            self.deliver_and_close(f"d{n}.example", n)
            most = max(most, len(self.sender.destinations))
            self.clock.advance(0.05)
        self.assertEqual(most, 100)
        self.assertEqual((self.sender.accepted, self.sender.delivered, self.sender.bounced), (3000, 3000, 0))
        self.assertEqual(self.sender.evicted, 2900)
        self.clock.advance(299)
        self.assertGreater(len(self.sender.destinations), 0, "not before the idle time")
        self.clock.advance(2)
        self.assertEqual(self.sender.destinations, {})
        self.assertEqual(len(self.table), 0)

    def test_forgotten_after_the_idle_time_without_pressure(self):
        for n in range(3):
            self.deliver_and_close(f"d{n}.example", n)
        self.clock.advance(299.9)
        self.assertEqual(len(self.sender.destinations), 3)
        self.clock.advance(0.2)
        self.assertEqual(self.sender.destinations, {})

    def test_use_keeps_a_destination(self):
        self.deliver_and_close("d0.example", 0)
        self.clock.advance(200)
        self.deliver_and_close("d0.example", 1)
        self.clock.advance(200)
        self.assertIn("d0.example", self.sender.destinations)
        self.clock.advance(101)
        self.assertNotIn("d0.example", self.sender.destinations)

    def test_full_of_busy_destinations_bounces_resource_constraint(self):
        self.sender.settings = SenderSettings(max_destinations=2)
        self.sender.send("chat.gw.example", "d0.example", to("d0.example", 0))
        self.sender.send("chat.gw.example", "d1.example", to("d1.example", 1))
        self.sender.send("chat.gw.example", "d2.example", to("d2.example", 2))
        self.assertEqual(self.bounced(), [("m2", "resource-constraint")])
        self.assertEqual(sorted(self.sender.destinations), ["d0.example", "d1.example"])
        # Known domains still queue.
        self.sender.send("chat.gw.example", "d0.example", to("d0.example", 3))
        self.assertEqual(len(self.sender.destinations["d0.example"].queue), 2)

    def test_blocked_domain_creates_no_destination(self):
        self.sender.ctx.policy.peers["bad.example"] = PeerPolicy(domain="bad.example", allowed=False)
        for n in range(50):
            self.sender.send("chat.gw.example", "bad.example", to("bad.example", n))
        self.assertEqual(self.sender.destinations, {})
        self.assertEqual({c for _, c in self.bounced()}, {"policy-violation"})
        self.assertEqual(self.connector.attempts, [])

    def test_allowlist_mode_creates_none_for_unlisted_domains(self):
        from dataclasses import replace
        self.sender.ctx = replace(self.ctx, policy=PolicyTable(PeerPolicy(encryption="optional"), {},
                                                               MODE_ALLOWLIST))
        for n in range(3000):
            self.sender.send("chat.gw.example", f"d{n}.example", to(f"d{n}.example", n))
        self.assertEqual(self.sender.destinations, {})
        self.assertEqual(self.sender.bounced, 3000)
        [(_, _, text)] = self.router.bounced[:1]
        self.assertIn("allow-list", text)

    def test_backoff_is_never_forgotten_early(self):
        """A destination in backoff is not idle; once its backoff is over it
        is kept as long as the next backoff would last beyond the idle time,
        so eviction never shortens a backoff."""
        self.sender.settings = SenderSettings(max_destinations=1, idle_timeout=300.0,
                                              backoff_initial=2.0, backoff_max=600.0)
        self.sender.send("chat.gw.example", "dead.example", to("dead.example", 0))
        self.connector.fail()
        dead = self.sender.destinations["dead.example"]
        self.assertEqual(dead.state, BACKOFF)
        # At capacity, a new domain may not push out the one in backoff.
        self.sender.send("chat.gw.example", "new.example", to("new.example", 1))
        self.assertEqual(self.bounced()[-1], ("m1", "resource-constraint"))
        self.clock.advance(dead.retry_at - self.clock.seconds())
        self.assertEqual((dead.state, dead.failures), (IDLE, 1))
        # Its next attempt would wait 4 s: not even at capacity before that.
        self.clock.advance(3.5)
        self.sender.send("chat.gw.example", "new.example", to("new.example", 2))
        self.assertEqual(self.bounced()[-1], ("m2", "resource-constraint"))
        self.clock.advance(1)
        self.sender.send("chat.gw.example", "new.example", to("new.example", 3))
        self.assertEqual(sorted(self.sender.destinations), ["new.example"])
        self.assertEqual(self.sender.evicted, 1)

    def test_backoff_memory_delays_idle_eviction(self):
        self.sender.settings = SenderSettings(idle_timeout=300.0, backoff_initial=2.0, backoff_max=600.0)
        for _ in range(6):  # six failures in a row: the next backoff is 128 s
            self.sender.send("chat.gw.example", "dead.example", to("dead.example", 0))
            if self.sender.destinations["dead.example"].state == BACKOFF:
                self.clock.advance(self.sender.destinations["dead.example"].retry_at - self.clock.seconds())
            self.connector.fail()
        dead = self.sender.destinations["dead.example"]
        self.clock.advance(dead.retry_at - self.clock.seconds())
        self.assertEqual((dead.state, dead.failures), (IDLE, 6))
        self.clock.advance(300 + 100)
        self.assertIn("dead.example", self.sender.destinations)
        self.clock.advance(60)
        self.assertNotIn("dead.example", self.sender.destinations)


class PiggybackTests(SenderCase):
    def open_with(self, peer, features: bytes, stream_id="SID"):
        peer.read()
        peer.stream.dataReceived(server_header(id=stream_id, **{"from": "remote.example"}, version="1.0")
                                 + features)
        return peer.read()

    def first_valid(self, features: bytes):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        peer = self.connector.succeed()
        self.open_with(peer, features)
        self.answer(peer, "chat.gw.example", "valid")
        self.assertEqual(self.delivered_ids(peer), ["m0"])
        return peer

    def test_without_the_dialback_feature_a_second_domain_gets_its_own_stream(self):
        """The peer's features offered no dialback: no db:result for the
        second domain on that stream, but a stream of its own."""
        peer = self.first_valid(NO_DIALBACK_FEATURES)
        self.sender.send("gw.example", "remote.example", message(1, sender="gw.example"))
        self.assertEqual([e for e in peer.read() if e.name == "result"], [], "no piggybacking")
        self.assertEqual(len(self.connector.attempts), 2)
        own = self.connector.succeed()
        own.read()
        self.assertEqual((own.header.get("from"), own.header.get("to")), ("gw.example", "remote.example"))
        self.open_with(own, DIALBACK_FEATURES, stream_id="SID2")
        self.answer(own, "gw.example", "valid")
        self.assertEqual(self.delivered_ids(own), ["m1"])
        # Later stanzas of each domain take its stream.
        self.sender.send("gw.example", "remote.example", message(2, sender="gw.example"))
        self.sender.send("chat.gw.example", "remote.example", message(3))
        own.read(), peer.read()
        self.assertEqual((self.delivered_ids(peer), self.delivered_ids(own)), (["m0", "m3"], ["m1", "m2"]))
        destination = self.sender.destinations["remote.example"]
        self.assertEqual(len(destination.streams()), 2)

    def test_queued_before_open_waits_for_the_features(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        self.sender.send("gw.example", "remote.example", message(1, sender="gw.example"))
        peer = self.connector.succeed()
        requests = [e for e in self.open_with(peer, NO_DIALBACK_FEATURES) if e.name == "result"]
        self.assertEqual([r["from"] for r in requests], ["chat.gw.example"])
        self.assertEqual(len(self.connector.attempts), 2)
        self.sender.destinations["remote.example"].close()

    def test_with_the_dialback_feature_it_piggybacks(self):
        peer = self.first_valid(DIALBACK_FEATURES)
        self.sender.send("gw.example", "remote.example", message(1, sender="gw.example"))
        [request] = [e for e in peer.read() if e.name == "result"]
        self.assertEqual(request["from"], "gw.example")
        self.assertEqual(len(self.connector.attempts), 1)

    def test_pending_pair_times_out_and_shows_its_age(self):
        """The peer offered dialback but never answers for the second
        domain: the pair shows as pending with its age, then times out,
        its stanzas bounce with remote-server-timeout, and the domain's next
        stanza takes a stream of its own."""
        self.sender.settings = SenderSettings(pair_timeout=30.0, max_wait=60.0)
        peer = self.first_valid(DIALBACK_FEATURES)
        self.sender.send("gw.example", "remote.example", message(1, sender="gw.example"))
        destination = self.sender.destinations["remote.example"]
        self.clock.advance(12.5)
        view = destination_json(destination.status(), self.clock.seconds(), False)
        [record] = list(self.table)
        self.assertEqual(view["pending_pairs"],
                         [{"local": "gw.example", "connection_id": record.id, "age_seconds": 12.5}])
        self.assertEqual(self.bounced(), [])
        self.clock.advance(17.5)
        self.assertEqual(self.bounced(), [("m1", "remote-server-timeout")])
        self.assertEqual(destination_json(destination.status(), self.clock.seconds(), False)["pending_pairs"], [])
        self.assertIn("did not answer", destination.last_error)
        # A late answer changes nothing; the next stanza goes another way.
        self.answer(peer, "gw.example", "valid")
        self.assertFalse(destination.stream.is_valid("gw.example"))
        self.sender.send("gw.example", "remote.example", message(2, sender="gw.example"))
        self.assertEqual(len(self.connector.attempts), 2)

    def test_first_pair_times_out_too(self):
        self.sender.settings = SenderSettings(pair_timeout=30.0, max_wait=60.0)
        self.sender.send("chat.gw.example", "remote.example", message(0))
        peer = self.connector.succeed()
        self.open_with(peer, NO_DIALBACK_FEATURES)
        self.clock.advance(30)
        self.assertEqual(self.bounced(), [("m0", "remote-server-timeout")])
        peer.stream.connectionLost(None)

    def test_dialback_error_on_own_stream_bounces_and_closes_it(self):
        peer = self.first_valid(NO_DIALBACK_FEATURES)
        self.sender.send("gw.example", "remote.example", message(1, sender="gw.example"))
        own = self.connector.succeed()
        self.open_with(own, DIALBACK_FEATURES, stream_id="SID2")
        self.answer(own, "gw.example", "error",
                    "<error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>")
        self.assertEqual(self.bounced(), [("m1", "remote-server-timeout")])
        self.assertTrue(own.ended or own.transport.disconnecting)
        own.stream.connectionLost(None)
        destination = self.sender.destinations["remote.example"]
        self.assertEqual(destination.streams(), [destination.stream])
        self.assertEqual(destination.state, "open", "the shared stream is unaffected")
        peer.read()
