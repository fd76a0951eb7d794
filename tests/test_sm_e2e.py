"""XEP-0198 between two real fedgate gateways over loopback: enabled, acks
flow, and a transport aborted mid-flood loses nothing (resumed: nothing
twice either; without resumption: sent again on the next stream)."""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from fedgate.s2s.pairs import INBOUND, OUTBOUND
from fedgate.stream.parser import StreamParser
from fedgate.stream.stanza import Stanza
from tests.support.federation import TwoGatewaysFixture
from tests.support.gateway import gateway_config, temp_dir

TIMEOUT = 15
FLOOD = 3000
BATCH = 100


def message(n: int) -> Stanza:
    found = []
    parser = StreamParser(lambda h: None, found.append, lambda: None)
    parser.feed(b"<stream:stream xmlns='jabber:component:accept' xmlns:stream="
                b"'http://etherx.jabber.org/streams'>"
                + f"<message from='alice@chat.a.example' to='bob@chat.b.example' id='f{n}'>"
                  f"<body>{n}</body></message>".encode())
    return Stanza.of(found[0])


def sleep(seconds: float):
    return task.deferLater(reactor, seconds, lambda: None)


class StreamManagementE2E(TwoGatewaysFixture, unittest.TestCase):
    timeout = 120
    resume_timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        s2s = {"bidi": False, "queue_max_stanzas": 20000, "queue_max_bytes": 64 * 1024 * 1024,
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
        self.ca.send("<message from='alice@chat.a.example' to='bob@chat.b.example' id='warm'/>")
        got = yield self.cb.next_element(timeout=TIMEOUT)
        self.assertEqual(got["id"], "warm")

    def wait_for(self, predicate, within: float = TIMEOUT):
        @defer.inlineCallbacks
        def poll():
            waited = 0.0
            while not predicate():
                if waited > within:
                    self.fail("condition not reached in time")
                yield sleep(0.02)
                waited += 0.02
        return poll()

    @defer.inlineCallbacks
    def collect(self, expected: int) -> list[str]:
        """Ids reaching B's component until ``expected`` arrived and a
        second passed with nothing more (so duplicates are seen too)."""
        ids = []
        while True:
            try:
                got = yield self.cb.next_element(timeout=1.0 if len(ids) >= expected else TIMEOUT)
            except Exception:
                return ids
            ids.append(got["id"])

    @defer.inlineCallbacks
    def test_enabled_and_acknowledged(self):
        [out_a] = [r for r in self.a.table if r.direction == OUTBOUND]
        [in_b] = [r for r in self.b.table if r.direction == INBOUND and r.authenticated]
        for n in range(25):
            self.a.sender.send("chat.a.example", "chat.b.example", message(n))
        ids = yield self.collect(25)
        self.assertEqual(len(ids), 25)
        yield self.wait_for(lambda: out_a.stream_management()["unacked"] == 0)
        sm_a, sm_b = out_a.stream_management(), in_b.stream_management()
        self.assertEqual((sm_a["enabled"], sm_a["resumable"], sm_a["h_out"]),
                         (True, self.resume_timeout > 0, 26))
        self.assertEqual((sm_b["enabled"], sm_b["h_in"]), (True, 26))
        outcomes = self.a.sender.outcomes()
        self.assertEqual((outcomes["accepted"], outcomes["delivered"], outcomes["in_flight"]),
                         (26, 26, 0), "delivered once acknowledged")

    @defer.inlineCallbacks
    def flood_with_abort(self):
        destination = self.a.sender.destinations["chat.b.example"]
        first = destination.stream
        aborted = False
        for start in range(0, FLOOD, BATCH):
            for n in range(start, start + BATCH):
                self.a.sender.send("chat.a.example", "chat.b.example", message(n))
            yield sleep(0)
            if not aborted and start >= FLOOD // 3 and first.sm.out.unacked:
                unacked = len(first.sm.out.unacked)
                first.io.transport.abortConnection()
                aborted = True
        self.assertTrue(aborted)
        ids = yield self.collect(FLOOD)
        self.assertIsNot(destination.stream, first, "a new stream")
        expected = {f"f{n}" for n in range(FLOOD)}
        lost = len(expected - set(ids))
        duplicated = len(ids) - len(set(ids))
        print(f"\nXEP-0198 abort mid-flood (resume_timeout={self.resume_timeout}): {FLOOD} sent, "
              f"{unacked} unacknowledged at the abort, {lost} lost, {duplicated} duplicated")
        self.assertEqual(set(ids) - expected, set())
        yield self.wait_for(lambda: self.a.sender.outcomes()["in_flight"] == 0)
        outcomes = self.a.sender.outcomes()
        self.assertEqual(outcomes["accepted"], outcomes["delivered"] + outcomes["bounced"]
                         + self.a.sender.pending_stanza_count())
        self.assertEqual(outcomes["bounced"], 0)
        return lost, duplicated

    @defer.inlineCallbacks
    def test_abort_mid_flood_resumes_with_nothing_lost_or_twice(self):
        lost, duplicated = yield self.flood_with_abort()
        self.assertEqual((lost, duplicated), (0, 0))
        self.assertTrue(any("Resumed our stream" in e for e in self.events), "resumed")
        self.assertTrue(any("Resumed the stream of" in e for e in self.events))


class WithoutResumption(StreamManagementE2E):
    resume_timeout = 0

    @defer.inlineCallbacks
    def test_abort_mid_flood_resumes_with_nothing_lost_or_twice(self):
        lost, duplicated = yield self.flood_with_abort()
        self.assertEqual(lost, 0, "sent again on the next stream")
        self.assertFalse(any("Resumed" in e for e in self.events))
        self.assertGreater(len([e for e in self.events if "unacknowledged: queued again" in e]), 0)
