"""The sender's bounds and pair timeout end to end: a real gateway on
loopback, the test DNS server, and (for the timeout) a remote server over
TLS that never answers dialback (tests/support/silentpeer.py)."""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.support.admin import AdminClient
from tests.support.federation import add_component, start_dns
from tests.support.gateway import gateway_config, publish, shared_ca, start_gateway, temp_dir
from tests.support.silentpeer import SilentDialbackPeer

TIMEOUT = 15
CHAT = "chat.gw.example"
SILENT = "silent.example"


def conditions(stanza) -> list[str]:
    return [c.name for c in stanza.error.elements()
            if c.uri == "urn:ietf:params:xml:ns:xmpp-stanzas" and c.name != "text"]


class SenderEndToEnd(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def start(self, **s2s):
        self.dns, dns_port = start_dns(self)
        self.gateway = yield start_gateway(reactor, gateway_config(
            temp_dir(self), ["gw.example"], {CHAT: "s-chat"}, **s2s), dns_port, self)
        publish(self.dns, self.gateway, ["gw.example", CHAT], "xmpp.gw.example")
        self.client = yield add_component(self, self.gateway, CHAT, "s-chat", timeout=TIMEOUT)
        self.admin = AdminClient(reactor, self.gateway)

    def send(self, n: int, domain: str) -> None:
        self.client.send(f"<message from='bot@{CHAT}' to='u@{domain}' id='m{n}'><body>{n}</body></message>")

    @defer.inlineCallbacks
    def bounces(self, count: int) -> list:
        got = []
        for _ in range(count):
            stanza = yield self.client.next_element(timeout=TIMEOUT)
            self.assertEqual(stanza["type"], "error", stanza.toXml())
            got.append((stanza["id"], conditions(stanza)[0]))
        return got

    @defer.inlineCallbacks
    def destinations(self) -> list:
        answer = yield self.admin.get("/api/v1/destinations")
        self.assertEqual(answer.status, 200)
        return answer.json["destinations"]

    @defer.inlineCallbacks
    def test_allowlist_refusals_leave_no_destination(self):
        yield self.start(policy={"mode": "allowlist"})
        for n in range(20):
            self.send(n, f"d{n}.example")
        got = yield self.bounces(20)
        self.assertEqual({c for _, c in got}, {"policy-violation"})
        self.assertEqual((yield self.destinations()), [])
        self.assertEqual(self.dns.queries, [], "nothing was even looked up")

    @defer.inlineCallbacks
    def test_destinations_are_bounded_and_forgotten_when_idle(self):
        """Unresolvable domains: each attempt fails (a backoff to remember),
        at most max_destinations exist at once, the rest bounce with
        resource-constraint, and once idle past the idle time (plus the
        remembered backoff) they are all forgotten."""
        yield self.start(max_destinations=3, destination_idle_timeout=0.5,
                         backoff_initial=0.1, backoff_max=0.2)
        for n in range(10):
            self.send(n, f"nowhere{n}.example")
        got = yield self.bounces(10)
        counts = {c: sum(1 for _, k in got if k == c) for _, c in got}
        self.assertEqual(counts, {"remote-server-not-found": 3, "resource-constraint": 7}, got)
        self.assertEqual(len((yield self.destinations())), 3)
        for _ in range(50):
            yield task.deferLater(reactor, 0.1, lambda: None)
            if not (yield self.destinations()):
                break
        self.assertEqual((yield self.destinations()), [])
        self.assertEqual(self.gateway.sender.evicted, 3)
        # Room again: a new domain gets a destination.
        self.send(99, "nowhere99.example")
        got = yield self.bounces(1)
        self.assertEqual(got, [("m99", "remote-server-not-found")])

    @defer.inlineCallbacks
    def test_stuck_pair_shows_its_age_and_times_out(self):
        peer = SilentDialbackPeer(SILENT, shared_ca().issue(dns=(SILENT,)))
        port = reactor.listenTCP(0, peer, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        yield self.start(pair_timeout=2.0, queue_max_wait=30)
        self.dns.add_a("xmpp.silent.example", "127.0.0.1")
        self.dns.add_srv(f"_xmpp-server._tcp.{SILENT}", 0, 0, port.getHost().port, "xmpp.silent.example")
        started = reactor.seconds()
        self.send(1, SILENT)
        self.send(2, SILENT)
        peer.asked.addTimeout(TIMEOUT, reactor)
        yield peer.asked
        self.assertEqual(peer.requests, [(CHAT, SILENT)])
        yield task.deferLater(reactor, 0.3, lambda: None)
        answer = yield self.admin.get(f"/api/v1/destinations/{SILENT}")
        view = answer.json
        [pending] = view["pending_pairs"]
        self.assertEqual((pending["local"], pending["connection_id"]), (CHAT, view["connection_id"]))
        self.assertGreater(pending["age_seconds"], 0.2)
        self.assertLess(pending["age_seconds"], 2.0)
        got = yield self.bounces(2)
        waited = reactor.seconds() - started
        self.assertEqual(got, [("m1", "remote-server-timeout"), ("m2", "remote-server-timeout")])
        self.assertGreater(waited, 1.5)
        self.assertLess(waited, 10, "at the pair timeout, long before the queue's 30 s")
        answer = yield self.admin.get(f"/api/v1/destinations/{SILENT}")
        self.assertEqual(answer.json["pending_pairs"], [])
        self.assertIn("did not answer dialback", answer.json["last_error"])
