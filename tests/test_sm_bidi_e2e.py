"""XEP-0198 in the reverse direction of a bidi stream (XEP-0288) between
two real fedgate gateways over loopback.  A opens the stream (the
initiating entity) and B floods A over it; B's side of the transport is
aborted mid-flood.  Only A may resume (XEP-0198 5): it connects again and
resumes even though nothing of its own waits, B learns from the ``h`` of
A's ``<resume/>`` what had arrived and sends only the rest: counted at A's
component, nothing lost and nothing twice.  Without resumption what B had
not seen acknowledged goes out again (nothing lost; duplicates counted)."""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from fedgate.s2s.pairs import INBOUND
from fedgate.stream.parser import StreamParser
from fedgate.stream.stanza import Stanza
from tests.support.federation import TwoGatewaysFixture
from tests.support.gateway import gateway_config, temp_dir
from tests.test_sm_e2e import TIMEOUT, sleep

FLOOD = 3000
BATCH = 100


def reverse_message(n: int) -> Stanza:
    found = []
    parser = StreamParser(lambda h: None, found.append, lambda: None)
    parser.feed(b"<stream:stream xmlns='jabber:component:accept' xmlns:stream="
                b"'http://etherx.jabber.org/streams'>"
                + f"<message from='bob@chat.b.example' to='alice@chat.a.example' id='r{n}'>"
                  f"<body>{n}</body></message>".encode())
    return Stanza.of(found[0])


class ReverseDirectionE2E(TwoGatewaysFixture, unittest.TestCase):
    timeout = 120
    resume_timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        s2s = {"bidi": True, "queue_max_stanzas": 20000, "queue_max_bytes": 64 * 1024 * 1024,
               "sm_resume_timeout": self.resume_timeout}
        yield self.start_two_gateways(
            gateway_config(temp_dir(self), ["a.example"], {"chat.a.example": "secret-a"}, **s2s),
            gateway_config(temp_dir(self), ["b.example"], {"chat.b.example": "secret-b"}, **s2s))
        self.ca = yield self.add_component(self.a, "chat.a.example", "secret-a")
        self.cb = yield self.add_component(self.b, "chat.b.example", "secret-b")
        self.events: list[str] = []

        def observe(event):
            if event.get("log_namespace", "").startswith("fedgate.s2s"):
                self.events.append(event.get("log_format", ""))
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        # A opens the stream (bidi); B answers over it.
        self.ca.send("<message from='alice@chat.a.example' to='bob@chat.b.example' id='warm'/>")
        got = yield self.cb.next_element(timeout=TIMEOUT)
        self.assertEqual(got["id"], "warm")
        self.cb.send("<message from='bob@chat.b.example' to='alice@chat.a.example' id='back'/>")
        got = yield self.ca.next_element(timeout=TIMEOUT)
        self.assertEqual(got["id"], "back")
        self.assertEqual(self.b.sender.destinations["chat.a.example"].stream, None,
                         "B has no stream of its own: it sends over A's bidi stream")

    @defer.inlineCallbacks
    def collect(self, expected: int) -> list[str]:
        ids = []
        while True:
            try:
                got = yield self.ca.next_element(timeout=1.5 if len(ids) >= expected else TIMEOUT)
            except Exception:
                return ids
            ids.append(got["id"])

    @defer.inlineCallbacks
    def flood_with_abort(self):
        [record] = [r for r in self.b.table if r.direction == INBOUND and r.authenticated]
        route = self.b.sender.destinations["chat.a.example"]._route("chat.b.example")
        self.assertIs(route.record, record)
        self.assertTrue(route.sm.enabled)
        unacked = None
        for start in range(0, FLOOD, BATCH):
            for n in range(start, start + BATCH):
                self.b.sender.send("chat.b.example", "chat.a.example", reverse_message(n))
            if unacked is None and start >= FLOOD // 3 and route.sm.out.unacked:
                unacked = len(route.sm.out.unacked)
                route.io.transport.abortConnection()  # B's side of A's stream
            yield sleep(0)
        self.assertIsNotNone(unacked)
        ids = yield self.collect(FLOOD)
        expected = {f"r{n}" for n in range(FLOOD)}
        lost = len(expected - set(ids))
        duplicated = len(ids) - len(set(ids))
        outcomes = self.b.sender.outcomes()
        print(f"\nXEP-0198 reverse direction of a bidi stream, abort mid-flood (resume_timeout="
              f"{self.resume_timeout}): {FLOOD} sent by B, {unacked} unacknowledged at the abort, "
              f"{lost} lost, {duplicated} duplicated at A's component, {outcomes['bounced']} bounced")
        self.assertEqual(set(ids) - expected, set())
        self.assertEqual(outcomes["bounced"], 0)
        return lost, duplicated

    @defer.inlineCallbacks
    def test_abort_mid_flood_in_the_reverse_direction(self):
        lost, duplicated = yield self.flood_with_abort()
        self.assertEqual((lost, duplicated), (0, 0))
        self.assertTrue(any("connecting to resume it" in e for e in self.events), "A resumed")
        self.assertTrue(any("Resumed stream of" in e for e in self.events), "B sent the rest again")
        yield self.wait_in_flight()

    @defer.inlineCallbacks
    def wait_in_flight(self):
        for _ in range(200):
            if self.b.sender.outcomes()["in_flight"] == 0 and not self.b.ctx.sm.held():
                break
            yield sleep(0.05)
        outcomes = self.b.sender.outcomes()
        self.assertEqual(outcomes["in_flight"], 0)
        self.assertEqual(outcomes["accepted"], outcomes["delivered"] + outcomes["bounced"]
                         + self.b.sender.pending_stanza_count())


class ReverseWithoutResumption(ReverseDirectionE2E):
    resume_timeout = 0

    @defer.inlineCallbacks
    def test_abort_mid_flood_in_the_reverse_direction(self):
        lost, duplicated = yield self.flood_with_abort()
        self.assertEqual(lost, 0, "sent again on another stream")
        self.assertFalse(any("Resumed" in e for e in self.events))
        yield self.wait_in_flight()
