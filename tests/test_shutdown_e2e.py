"""Graceful shutdown over loopback: a real gateway A with a component, a
queue for a remote gateway B whose connection is held back (it connects
during the flush time), and a queue for a remote server that never answers
dialback.  On stopService A flushes what B can take, bounces the rest to
the component while its stream is still open, and only then ends the
component's stream with system-shutdown."""

from __future__ import annotations

import hashlib
import re

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from fedgate.stream import namespaces as ns
from tests.support.federation import add_component, start_dns
from tests.support.gateway import gateway_config, publish, shared_ca, start_gateway, temp_dir
from tests.support.rawpeer import RawPeer, Reply
from tests.support.silentpeer import SilentDialbackPeer
from tests.support.tcpproxy import TcpProxy

TIMEOUT = 15
A_CHAT, B_CHAT, SILENT = "chat.gw-a.example", "chat.gw-b.example", "silent.example"
FLUSH = 3.0


@defer.inlineCallbacks
def wait_for(check, what: str, timeout: float = TIMEOUT):
    for _ in range(int(timeout / 0.05)):
        if check():
            return
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


@defer.inlineCallbacks
def raw_component(gateway, domain: str, secret: str) -> RawPeer:
    """An XEP-0114 component driven by hand, so that the order of what the
    gateway writes to it can be read back byte for byte."""
    peer = RawPeer()
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gateway.port_of("components")), peer)
    peer.transport.write(f"<stream:stream xmlns='{ns.COMPONENT_ACCEPT}' "
                         f"xmlns:stream='{ns.STREAMS}' to='{domain}'>".encode())
    yield wait_for(lambda: re.search(rb"\sid=['\"]([^'\"]+)", bytes(peer.data)), "the stream header")
    stream_id = re.search(rb"\sid=['\"]([^'\"]+)", bytes(peer.data)).group(1).decode()
    digest = hashlib.sha1((stream_id + secret).encode()).hexdigest()
    peer.transport.write(f"<handshake>{digest}</handshake>".encode())
    yield wait_for(lambda: b"<handshake" in bytes(peer.data), "the handshake answer")
    return peer


def stanza_error(element) -> str | None:
    if element.name != "message" or element.getAttribute("type") != "error":
        return None
    return next(c.name for e in element.elements() if e.name == "error"
                for c in e.elements() if c.uri == ns.STANZA_ERRORS and c.name != "text")


class GracefulShutdownEndToEnd(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_flush_then_bounce_to_the_component_before_system_shutdown(self):
        dns, dns_port = start_dns(self)
        b = yield start_gateway(reactor, gateway_config(
            temp_dir(self), ["gw-b.example"], {B_CHAT: "s-b"}), dns_port, self)
        # B is reached through a proxy that holds new connections back.
        proxy = TcpProxy(reactor, b.port_of("s2s"))
        proxy_port = yield proxy.start()
        self.addCleanup(proxy.stop)
        proxy.hold()
        dns.add_a("xmpp.gw-b.example", "127.0.0.1")
        for domain in ("gw-b.example", B_CHAT):
            dns.add_srv(f"_xmpp-server._tcp.{domain}", 0, 0, proxy_port, "xmpp.gw-b.example")
        silent = SilentDialbackPeer(SILENT, shared_ca().issue(dns=(SILENT,)))
        silent_port = reactor.listenTCP(0, silent, interface="127.0.0.1")
        self.addCleanup(silent_port.stopListening)
        dns.add_a("xmpp.silent.example", "127.0.0.1")
        dns.add_srv(f"_xmpp-server._tcp.{SILENT}", 0, 0, silent_port.getHost().port, "xmpp.silent.example")
        a = yield start_gateway(reactor, gateway_config(
            temp_dir(self), ["gw-a.example"], {A_CHAT: "s-a"}, shutdown_flush=FLUSH,
            queue_max_wait=60, pair_timeout=50), dns_port, self)
        publish(dns, a, ["gw-a.example", A_CHAT], "xmpp.gw-a.example")
        on_b = yield add_component(self, b, B_CHAT, "s-b", timeout=TIMEOUT)
        component = yield raw_component(a, A_CHAT, "s-a")

        for n in range(3):
            component.transport.write(f"<message from='bot@{A_CHAT}' to='u@{B_CHAT}' id='b{n}'>"
                                      f"<body>{n}</body></message>".encode())
            component.transport.write(f"<message from='bot@{A_CHAT}' to='u@{SILENT}' id='s{n}'>"
                                      f"<body>{n}</body></message>".encode())
        silent.asked.addTimeout(TIMEOUT, reactor)
        yield silent.asked
        yield wait_for(lambda: proxy.held, "A's connection to B")
        self.assertEqual(a.sender.pending_stanza_count(), 6)

        # B's connection goes through a second into the shutdown.
        reactor.callLater(1.0, proxy.release)
        started = reactor.seconds()
        yield a.stopService()
        took = reactor.seconds() - started
        yield component.lost.addTimeout(TIMEOUT, reactor)

        got = []
        for _ in range(3):
            stanza = yield on_b.next_element(timeout=TIMEOUT)
            got.append(stanza["id"])
        self.assertEqual(got, ["b0", "b1", "b2"], "flushed to B before the close")

        reply = Reply(bytes(component.data))
        after_handshake = [e for e in reply.elements if e.name != "handshake"]
        bounces = [(e["id"], stanza_error(e)) for e in after_handshake if e.name == "message"]
        self.assertEqual(bounces, [(f"s{n}", "remote-server-timeout") for n in range(3)])
        # Every bounce came before the stream error, which is the last thing.
        self.assertEqual([e.name for e in after_handshake], ["message"] * 3 + ["error"])
        self.assertEqual(reply.error_condition(), "system-shutdown")
        self.assertTrue(reply.ended)

        self.assertEqual(a.sender.outcomes(), {"accepted": 6, "delivered": 3, "bounced": 3, "in_flight": 0})
        self.assertEqual(a.shutdown_outcome, {"flushed": 3, "bounced": 3, "bounced_after_flush": 3})
        self.assertGreaterEqual(took, FLUSH - 0.1, "the silent peer's stanzas waited the flush time")
        self.assertLess(took, FLUSH + 5)

    @defer.inlineCallbacks
    def test_no_new_work_is_read_once_shutting_down(self):
        """A component's stanza that arrives after the shutdown began is not
        read: the gateway accepts nothing new, and ends the stream."""
        dns, dns_port = start_dns(self)
        a = yield start_gateway(reactor, gateway_config(
            temp_dir(self), ["gw-a.example"], {A_CHAT: "s-a"}, shutdown_flush=1.0), dns_port, self)
        component = yield raw_component(a, A_CHAT, "s-a")
        # A queue that keeps the flush waiting: a domain nobody serves yet.
        silent = SilentDialbackPeer(SILENT, shared_ca().issue(dns=(SILENT,)))
        silent_port = reactor.listenTCP(0, silent, interface="127.0.0.1")
        self.addCleanup(silent_port.stopListening)
        dns.add_a("xmpp.silent.example", "127.0.0.1")
        dns.add_srv(f"_xmpp-server._tcp.{SILENT}", 0, 0, silent_port.getHost().port, "xmpp.silent.example")
        component.transport.write(f"<message from='bot@{A_CHAT}' to='u@{SILENT}' id='s0'/>".encode())
        silent.asked.addTimeout(TIMEOUT, reactor)
        yield silent.asked
        stopping = a.stopService()
        yield task.deferLater(reactor, 0.2, lambda: None)
        # An iq to the gateway itself would be answered at once if it were read.
        component.transport.write(f"<iq type='get' from='bot@{A_CHAT}' to='gw-a.example' id='late'>"
                                  "<ping xmlns='urn:xmpp:ping'/></iq>".encode())
        yield stopping
        yield component.lost.addTimeout(TIMEOUT, reactor)
        reply = Reply(bytes(component.data))
        ids = [e.getAttribute("id") for e in reply.elements if e.name in ("iq", "message")]
        self.assertEqual(ids, ["s0"], "the late iq was never read")
        self.assertEqual(reply.error_condition(), "system-shutdown")
        self.assertEqual(a.sender.outcomes(), {"accepted": 1, "delivered": 0, "bounced": 1, "in_flight": 0})
