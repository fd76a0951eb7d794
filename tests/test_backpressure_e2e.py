"""Backpressure end to end, over real loopback: a remote peer and a component
that stop reading while 100,000 stanzas are sent towards them.

Each test checks that the gateway's memory stays bounded (RSS grows by at
most 50 MB), that the slow target's queue stays within its bound and the
excess bounces with ``resource-constraint``, that the counters are honest
(accepted = delivered + bounced + queued, and "delivered" is what the
target really gets once it reads again: nothing is lost), and that another
target keeps flowing meanwhile (no collateral damage).
"""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.support.federation import start_dns
from tests.support.flowpeers import StallingS2SPeer, connect_raw_component, rss_bytes
from tests.support.gateway import gateway_config, publish, shared_ca, start_gateway, temp_dir

TOTAL = 100_000
EVERY = 50  # every 50th stanza goes to the target that keeps reading
BODY = "x" * 600
RSS_LIMIT = 50 * 1024 * 1024
QUEUE = 1000
CHAT = "chat.gw.example"


def split(total: int) -> tuple[int, int]:
    """(stanzas to the slow target, stanzas to the other one)."""
    other = len(range(0, total, EVERY))
    return total - other, other


def stanzas(slow_to: str, other_to: str):
    for n in range(TOTAL):
        to = other_to if n % EVERY == 0 else slow_to
        yield (f"<message from='bot@{CHAT}' to='{to}' id='m{n}' type='chat'>"
               f"<body>{BODY}</body></message>").encode()


@defer.inlineCallbacks
def wait_for(predicate, what: str, timeout: float = 25.0, sample=None, detail=None):
    for _ in range(int(timeout / 0.05)):
        if sample is not None:
            sample()
        if predicate():
            return
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"timed out waiting for {what}" + (f": {detail()}" if detail else ""))


class _Peak:
    def __init__(self):
        self.base = rss_bytes()
        self.peak = self.base

    def __call__(self):
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.base


class RemotePeerStopsReading(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_remote_peer_that_stops_reading(self):
        dns, dns_port = start_dns(self)
        gateway = yield start_gateway(reactor, gateway_config(
            temp_dir(self), ["gw.example"], {CHAT: "s-chat"},
            queue_max_stanzas=QUEUE, queue_max_wait=120, pair_timeout=30), dns_port, self)
        publish(dns, gateway, ["gw.example", CHAT], "xmpp.gw.example")
        peers = {}
        for domain in ("slow.example", "fast.example"):
            peer = StallingS2SPeer(domain, shared_ca().issue(dns=(domain,)))
            port = reactor.listenTCP(0, peer, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            dns.add_a(f"xmpp.{domain}", "127.0.0.1")
            dns.add_srv(f"_xmpp-server._tcp.{domain}", 0, 0, port.getHost().port, f"xmpp.{domain}")
            peers[domain] = peer
        component = yield connect_raw_component(reactor, gateway.port_of("components"), CHAT, "s-chat")
        self.addCleanup(lambda: component.transport.abortConnection())
        slow, fast = peers["slow.example"], peers["fast.example"]
        sender = gateway.sender
        to_slow, to_fast = split(TOTAL)

        peak = _Peak()
        sent = component.send_many(stanzas("u@slow.example", "u@fast.example"))
        stream = yield slow.ready
        stream.stop_reading()  # the slow peer reads nothing more from here on
        yield sent
        yield wait_for(lambda: sender.accepted == TOTAL, "every stanza accepted", sample=peak)
        # The other remote domain kept flowing while the slow one stalled.
        yield wait_for(lambda: fast.received() == to_fast, "the fast peer's stanzas", sample=peak)
        mine = gateway.router.sessions_for(CHAT)[0].output  # the sender's own queue
        yield wait_for(lambda: not mine.held and component.received(b"<resource-constraint") + mine.bounced
                       == sender.bounced, "the bounces back at the component", sample=peak,
                       detail=lambda: (component.count.counts, mine.outcomes(), sender.outcomes()))
        peak()
        out = sender.outcomes()
        queued = sender.pending_stanza_count("slow.example")
        print(f"\nremote peer stopped reading: {TOTAL} sent, RSS +{peak.growth / 2**20:.1f} MiB, "
              f"{out}, queued {queued}, fast peer got {fast.received()}/{to_fast}, "
              f"bounces refused by the sender's own full queue {mine.bounced}")
        self.assertLessEqual(peak.growth, RSS_LIMIT)
        self.assertEqual(out["accepted"], out["delivered"] + out["bounced"] + queued)
        self.assertLessEqual(queued, QUEUE)
        self.assertGreater(out["bounced"], to_slow // 2, "the excess bounced")
        # Every bounce reached the component, except those its own full
        # queue refused (errors are never answered: counted, not lost silently).
        self.assertEqual(component.received(b"<resource-constraint") + mine.bounced, out["bounced"])
        self.assertEqual(sender.pending_stanza_count("fast.example"), 0)
        # "Delivered" to the slow peer is only what fits past the high-water
        # mark and in the kernel's buffers, not what piles up in memory.
        slow_delivered = out["delivered"] - to_fast
        self.assertLess(slow_delivered, to_slow // 4, "stanzas counted delivered to a peer that reads nothing")

        # The peer reads again: what was held goes out, and it gets exactly
        # what was counted delivered (nothing lost on the way).
        stream.resume_reading()
        yield wait_for(lambda: sender.pending_stanza_count("slow.example") == 0, "the queue flushed")
        out = sender.outcomes()
        yield wait_for(lambda: slow.received() == out["delivered"] - to_fast, "the slow peer caught up")
        print(f"after the peer read again: {out}, slow peer got {slow.received()}")
        self.assertEqual(out["accepted"], out["delivered"] + out["bounced"])


class ComponentStopsReading(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_component_that_stops_reading(self):
        dns, dns_port = start_dns(self)
        comps = {CHAT: "s-chat", "slow.gw.example": "s-slow", "ok.gw.example": "s-ok"}
        config = gateway_config(temp_dir(self), ["gw.example"], comps)
        config["components"].update(queue_max_stanzas=QUEUE)
        gateway = yield start_gateway(reactor, config, dns_port, self)
        clients = {}
        for domain, secret in comps.items():
            client = yield connect_raw_component(reactor, gateway.port_of("components"), domain, secret)
            self.addCleanup(client.transport.abortConnection)
            clients[domain] = client
        chat, slow, ok = clients[CHAT], clients["slow.gw.example"], clients["ok.gw.example"]
        slow.stop_reading()
        to_slow, to_ok = split(TOTAL)
        session = gateway.router.sessions_for("slow.gw.example")[0]

        peak = _Peak()
        yield chat.send_many(stanzas("u@slow.gw.example", "u@ok.gw.example"))
        yield wait_for(lambda: session.output.accepted == to_slow, "every stanza accepted", sample=peak)
        yield wait_for(lambda: ok.received() == to_ok, "the other component's stanzas", sample=peak,
                       detail=lambda: (ok.received(), to_ok, session.output.outcomes(), chat.count.counts))
        out = session.output.outcomes()
        mine = gateway.router.sessions_for(CHAT)[0].output  # the sender's own queue
        yield wait_for(lambda: not mine.held and chat.received(b"<resource-constraint") + mine.bounced
                       == out["bounced"], "the bounces back at the sender", sample=peak,
                       detail=lambda: (chat.count.counts, mine.outcomes(), out))
        peak()
        print(f"\ncomponent stopped reading: {TOTAL} sent, RSS +{peak.growth / 2**20:.1f} MiB, "
              f"{out}, other component got {ok.received()}/{to_ok}, "
              f"bounces refused by the sender's own full queue {mine.bounced}")
        self.assertLessEqual(peak.growth, RSS_LIMIT)
        self.assertEqual(out["accepted"], out["delivered"] + out["bounced"] + out["queued"])
        self.assertLessEqual(out["queued"], QUEUE)
        self.assertGreater(out["bounced"], to_slow // 2, "the excess bounced")
        self.assertEqual(chat.received(b"<resource-constraint") + mine.bounced, out["bounced"])
        self.assertLess(out["delivered"], to_slow // 4, "stanzas counted delivered to a component that reads nothing")

        slow.resume_reading()
        yield wait_for(lambda: not session.output.held, "the component's queue flushed")
        out = session.output.outcomes()
        yield wait_for(lambda: slow.received() == out["delivered"], "the component caught up")
        print(f"after the component read again: {out}, it got {slow.received()}")
        self.assertEqual(out["accepted"], out["delivered"] + out["bounced"])
