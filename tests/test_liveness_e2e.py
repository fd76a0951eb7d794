"""Liveness end to end: two real gateways on loopback, A's streams to B
through a TCP proxy that can make B vanish without closing TCP.

A pings its idle outbound stream (ping_idle 1 s, ping_timeout 1 s); B's
answers keep it open, over B's own stream to A on a plain stream or over
the same one on a bidi stream.  Then the proxy freezes: no byte passes
either way and nothing is closed.  A must close the stream within the
bound, reconnect, and deliver what was queued meanwhile over the new
stream, bouncing nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from fedgate.component.scram import derive
from fedgate.s2s.pairs import OUTBOUND
from fedgate.stream.liveness import DEAD_GRACE
from tests.support.component_client import connect_component
from tests.support.federation import add_component, start_dns
from tests.support.gateway import gateway_config, publish, start_gateway, temp_dir
from tests.support.tcpproxy import TcpProxy
from tests.support.xep0225_client import connect as connect_xep0225

TIMEOUT = 15
PING_IDLE, PING_TIMEOUT = 1.0, 1.0
#: the bound, the grace for the stream error, and scheduling slack on a
#: loaded machine
BOUND = PING_IDLE + PING_TIMEOUT + DEAD_GRACE + 1.0


def sleep(seconds: float):
    return task.deferLater(reactor, seconds, lambda: None)


class LivenessEndToEnd(unittest.TestCase):
    timeout = 90
    bidi = False

    @defer.inlineCallbacks
    def setUp(self):
        self.dns, dns_port = start_dns(self)
        a_config = gateway_config(temp_dir(self), ["a.example"], {"chat.a.example": "secret-a"},
                                  bidi=self.bidi, ping_idle=PING_IDLE, ping_timeout=PING_TIMEOUT)
        b_config = gateway_config(temp_dir(self), ["b.example"], {"chat.b.example": "secret-b"},
                                  bidi=self.bidi)
        self.a = yield start_gateway(reactor, a_config, dns_port, self)
        self.b = yield start_gateway(reactor, b_config, dns_port, self)
        self.proxy = TcpProxy(reactor, self.b.port_of("s2s"))
        proxy_port = yield self.proxy.start()
        self.addCleanup(self.proxy.stop)
        publish(self.dns, self.a, ["a.example", "chat.a.example"], "gw-a.example")
        self.dns.add_a("gw-b.example", "127.0.0.1")
        for domain in ("b.example", "chat.b.example"):
            self.dns.add_srv(f"_xmpp-server._tcp.{domain}", 0, 0, proxy_port, "gw-b.example")
        self.ca = yield add_component(self, self.a, "chat.a.example", "secret-a")
        self.cb = yield add_component(self, self.b, "chat.b.example", "secret-b")
        # A's pings go to the remote domain of the pair, chat.b.example: the
        # component answers them (RFC 6120 8.2.3: every iq get is answered).
        self.cb.xmlstream.addObserver("/iq[@type='get']/ping[@xmlns='urn:xmpp:ping']", self.pong)
        self.pongs = 0

    def pong(self, iq) -> None:
        self.pongs += 1
        self.cb.send(f"<iq type='result' id='{iq['id']}' from='{iq['to']}' to='{iq['from']}'/>")

    @defer.inlineCallbacks
    def next_message(self):
        while True:
            got = yield self.cb.next_element(timeout=TIMEOUT)
            if got.name == "message":
                return got

    def send(self, n: int) -> None:
        self.ca.send(f"<message from='alice@chat.a.example' to='bob@chat.b.example' id='m{n}'>"
                     f"<body>{n}</body></message>")

    def outbound_ids(self) -> set:
        return {r.id for r in self.a.table if r.direction == OUTBOUND and r.remote_domain == "chat.b.example"}

    @defer.inlineCallbacks
    def wait_for(self, predicate, within: float, what: str) -> float:
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > within:
                self.fail(f"{what}: not within {within:g} s")
            yield sleep(0.05)
        return time.monotonic() - start

    @defer.inlineCallbacks
    def test_vanished_peer_is_detected_and_the_queue_goes_out_on_a_new_stream(self):
        self.send(1)
        got = yield self.next_message()
        self.assertEqual(got["id"], "m1")
        [first] = self.outbound_ids()
        destination = self.a.sender.destinations["chat.b.example"]
        monitor = destination.stream.liveness

        # Idle but answering: pings go out and their answers keep it open.
        yield sleep(3 * (PING_IDLE + PING_TIMEOUT))
        self.assertEqual(self.outbound_ids(), {first}, "a live peer's stream stays open")
        self.assertGreaterEqual(monitor.pings_sent, 2)
        self.assertGreaterEqual(self.pongs, monitor.pings_sent - 1,
                                "every ping reached B and was answered (the last may be in flight)")

        # B vanishes: nothing passes either way, nothing is closed.
        self.proxy.hold()  # and a new connection waits until released
        self.assertGreaterEqual(self.proxy.freeze(), 1)
        closed_after = yield self.wait_for(lambda: first not in self.outbound_ids(), 30,
                                           "the dead stream closed")
        self.assertLessEqual(closed_after, BOUND)
        self.assertEqual(monitor.state, "done")

        # Nothing was queued: the destination goes idle, not into backoff ...
        self.assertEqual((destination.state, destination.failures), ("idle", 0))
        # ... a stanza sent now opens a new connection and waits in the
        # queue while the connection is held ...
        self.send(2)
        yield self.wait_for(lambda: len(self.proxy.held) == 1, 5, "a new connection")
        self.assertEqual(destination.state, "connecting")
        self.assertEqual(self.a.sender.pending_stanza_count("chat.b.example"), 1)
        # ... until the new stream is up, over which it goes.
        self.proxy.release()
        got = yield self.next_message()
        self.assertEqual(got["id"], "m2")
        [second] = self.outbound_ids()
        self.assertNotEqual(second, first)
        self.assertEqual(self.a.sender.bounced, 0)
        limit = PING_IDLE + PING_TIMEOUT + DEAD_GRACE
        print(f"\nliveness e2e (bidi={self.bidi}): dead connection gone {closed_after:.2f} s after "
              f"the freeze; bound {limit:g} s (ping_idle + ping_timeout + grace; "
              f"ratio {closed_after / limit:.2f})")


class LivenessEndToEndBidi(LivenessEndToEnd):
    """With bidi the answer to a ping comes back over the same stream."""

    bidi = True


class ComponentLivenessEndToEnd(unittest.TestCase):
    """An XEP-0114 component behind the proxy: answered pings keep it bound;
    once it vanishes the gateway closes its stream within the bound and the
    domain is free for the component's next connection."""

    timeout = 60

    @defer.inlineCallbacks
    def test_vanished_component_is_closed_and_may_connect_again(self):
        dns, dns_port = start_dns(self)
        config = gateway_config(temp_dir(self), ["gw.example"], {"chat.gw.example": "s-chat"})
        config["components"].update(ping_idle=PING_IDLE, ping_timeout=PING_TIMEOUT)
        gateway = yield start_gateway(reactor, config, dns_port, self)
        self.proxy = TcpProxy(reactor, gateway.port_of("components"))
        port = yield self.proxy.start()
        self.addCleanup(self.proxy.stop)
        client = yield connect_component(reactor, "127.0.0.1", port, "chat.gw.example", "s-chat")
        self.addCleanup(client.close)
        pongs = []

        def pong(iq):
            pongs.append(iq["id"])
            client.send(f"<iq type='result' id='{iq['id']}' from='{iq['to']}' to='{iq['from']}'/>")

        client.xmlstream.addObserver("/iq[@type='get']/ping[@xmlns='urn:xmpp:ping']", pong)
        yield sleep(3 * (PING_IDLE + PING_TIMEOUT))
        self.assertGreaterEqual(len(pongs), 2, "pinged while idle")
        self.assertEqual(gateway.router.connected_components(), ["chat.gw.example"])

        self.assertEqual(self.proxy.freeze(), 1)
        start = time.monotonic()
        while gateway.router.connected_components():
            self.assertLess(time.monotonic() - start, 30, "the vanished component was never closed")
            yield sleep(0.05)
        closed_after = time.monotonic() - start
        self.assertLessEqual(closed_after, BOUND)
        again = yield connect_component(reactor, "127.0.0.1", gateway.port_of("components"),
                                        "chat.gw.example", "s-chat")
        self.addCleanup(again.close)
        self.assertEqual(gateway.router.connected_components(), ["chat.gw.example"])
        print(f"\ncomponent liveness e2e: unbound {closed_after:.2f} s after the freeze; bound "
              f"{PING_IDLE + PING_TIMEOUT:g} s (ratio {closed_after / (PING_IDLE + PING_TIMEOUT):.2f})")


class Xep0225LivenessEndToEnd(unittest.TestCase):
    """An XEP-0225 component is pinged at its bound hostname from the
    gateway's domain; when it stops answering, connection-timeout."""

    timeout = 60

    @defer.inlineCallbacks
    def test_pinged_at_its_hostname_and_closed_when_it_stops_answering(self):
        dns, dns_port = start_dns(self)
        state = temp_dir(self)
        config = gateway_config(state, ["gw.example"], {}, extra_hosted=["svc.gw.example"])
        config["components"].update(ping_idle=PING_IDLE, ping_timeout=PING_TIMEOUT, credentials={
            "svc.gw.example": {"scram_sha256": derive("pw", "sha256").encode()}})
        gateway = yield start_gateway(reactor, config, dns_port, self)
        client = yield connect_xep0225(reactor, gateway.port_of("components"), "gw.example", "svc.gw.example")
        self.addCleanup(client.close)
        yield client.starttls(Path(state) / "ca.pem")
        yield client.auth("SCRAM-SHA-256", "svc.gw.example", "pw")
        reply = yield client.bind("svc.gw.example")
        self.assertEqual(reply["type"], "result")
        ping = yield client.next()
        self.assertEqual((ping.name, ping["type"], ping["from"], ping["to"], ping.ping.uri),
                         ("iq", "get", "gw.example", "svc.gw.example", "urn:xmpp:ping"))
        client.send(f"<iq type='result' id='{ping['id']}' from='svc.gw.example' to='gw.example'/>")
        answered = time.monotonic()
        second = yield client.next()  # a full idle time later; this one goes unanswered
        self.assertEqual(second.ping.uri, "urn:xmpp:ping")
        self.assertGreaterEqual(time.monotonic() - answered, PING_IDLE * 0.9)
        asked = time.monotonic()
        error = yield client.next()
        self.assertEqual((error.name, client.stream_error), ("error", "connection-timeout"))
        self.assertLessEqual(time.monotonic() - asked, PING_TIMEOUT + 1.0)
        yield client.closed
        yield sleep(0.2)
        self.assertEqual(gateway.router.connected_components(), [])
