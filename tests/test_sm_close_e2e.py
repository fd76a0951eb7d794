"""XEP-0198 on a clean close between two real fedgate gateways over
loopback: an operator close and a graceful shutdown of A mid-flood ask B for
its last ack first, so that what B's component received is counted
delivered at A: never bounced, never sent twice (resumption is off here, so
nothing but the final ack can tell A what B had)."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.federation import TwoGatewaysFixture
from tests.support.gateway import gateway_config, temp_dir
from tests.test_sm_e2e import TIMEOUT, message, sleep

FLOOD = 3000
BATCH = 100


class CleanCloseE2E(TwoGatewaysFixture, unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        s2s = {"bidi": False, "queue_max_stanzas": 20000, "queue_max_bytes": 64 * 1024 * 1024,
               "sm_resume_timeout": 0, "sm_ack_every": 50}
        yield self.start_two_gateways(
            gateway_config(temp_dir(self), ["a.example"], {"chat.a.example": "secret-a"}, **s2s),
            gateway_config(temp_dir(self), ["b.example"], {"chat.b.example": "secret-b"}, **s2s))
        self.ca = yield self.add_component(self.a, "chat.a.example", "secret-a")
        self.cb = yield self.add_component(self.b, "chat.b.example", "secret-b")
        self.ca.send("<message from='alice@chat.a.example' to='bob@chat.b.example' id='warm'/>")
        got = yield self.cb.next_element(timeout=TIMEOUT)
        self.assertEqual(got["id"], "warm")

    @defer.inlineCallbacks
    def collect(self, expected: int, quiet: float = 1.5) -> list[str]:
        ids = []
        while True:
            try:
                got = yield self.cb.next_element(timeout=quiet if len(ids) >= expected else TIMEOUT)
            except Exception:
                return ids
            ids.append(got["id"])

    @defer.inlineCallbacks
    def flood(self, close) -> int:
        """Send FLOOD stanzas A -> B and call ``close(stream)`` a third of the
        way in, while stanzas are unacknowledged; their count then."""
        destination = self.a.sender.destinations["chat.b.example"]
        first = destination.stream
        unacked = None
        for start in range(0, FLOOD, BATCH):
            for n in range(start, start + BATCH):
                self.a.sender.send("chat.a.example", "chat.b.example", message(n))
            if unacked is None and start >= FLOOD // 3 and first.sm.out.unacked:
                unacked = len(first.sm.out.unacked)
                result = close(first)
                if isinstance(result, defer.Deferred):
                    yield result
                    return unacked
            yield sleep(0)
        self.assertIsNotNone(unacked)
        return unacked

    @defer.inlineCallbacks
    def test_operator_close_mid_flood_nothing_bounced_or_twice(self):
        def close(stream):
            destination = self.a.sender.destinations["chat.b.example"]
            destination.keep_queue_on_close(stream)
            destination.close()
        unacked = yield self.flood(close)
        ids = yield self.collect(FLOOD)
        expected = {f"f{n}" for n in range(FLOOD)}
        lost, duplicated = len(expected - set(ids)), len(ids) - len(set(ids))
        outcomes = self.a.sender.outcomes()
        print(f"\nXEP-0198 operator close mid-flood: {FLOOD} sent, {unacked} unacknowledged at "
              f"the close, {lost} lost, {duplicated} duplicated, {outcomes['bounced']} bounced")
        self.assertEqual((lost, duplicated, outcomes["bounced"]), (0, 0, 0))
        self.assertEqual(outcomes["in_flight"], 0)
        self.assertEqual(outcomes["accepted"], outcomes["delivered"])

    @defer.inlineCallbacks
    def test_shutdown_mid_flood_bounces_only_what_b_never_received(self):
        unacked = yield self.flood(lambda stream: self.a.stopService())
        ids = yield self.collect(0)
        received = set(ids)
        outcomes = self.a.sender.outcomes()
        duplicated = len(ids) - len(received)
        print(f"\nXEP-0198 shutdown mid-flood: {outcomes['accepted'] - 1} sent, {unacked} "
              f"unacknowledged at the stop, {len(received)} received by B, {duplicated} duplicated, "
              f"{outcomes['bounced']} bounced, {outcomes['in_flight']} in flight")
        self.assertEqual(duplicated, 0)
        self.assertEqual(outcomes["in_flight"], 0)
        self.assertEqual(outcomes["accepted"], outcomes["delivered"] + outcomes["bounced"])
        # Everything B's component received counts delivered at A (the warm-up
        # stanza too): none of it bounced.
        self.assertEqual(outcomes["delivered"], len(received) + 1)
        self.assertEqual(outcomes["bounced"], outcomes["accepted"] - 1 - len(received))
