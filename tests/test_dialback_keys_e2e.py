"""Review finding 1 over real loopback sockets: a peer that claims another
domain and sends a huge dialback key must not get a huge <db:verify> onto
our own authenticated outbound stream to that domain (whose server would
end the stream for it, bouncing everything queued there).  Two gateways:
gw.example (the victim's Receiving Server) and b.example (the domain
claimed, whose server keeps its 512 KiB stanza limit)."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from fedgate.stream import namespaces as ns
from tests.support.federation import add_component, start_dns
from tests.support.gateway import gateway_config, publish, start_gateway, temp_dir
from tests.support.rawpeer import RawPeer, Reply
from tests.support.s2speer import s2s_header, wait_until

GW, B = "gw.example", "b.example"


def results(data: bytes) -> list:
    return [e for e in Reply(data).elements if (e.uri, e.name) == (ns.DIALBACK, "result")]


def condition(result) -> str | None:
    return next((c.name for e in result.elements() if e.name == "error" for c in e.elements()
                 if c.uri == ns.STANZA_ERRORS and c.name != "text"), None)


class OversizedKeyTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.dns, dns_port = start_dns(self)
        self.gw = yield start_gateway(reactor, gateway_config(
            temp_dir(self), [GW], {"chat.gw.example": "sc"}, policy={"encryption": "optional"}),
            dns_port, self)
        publish(self.dns, self.gw, [GW, "chat.gw.example"], "xmpp.gw.example")
        self.b = yield start_gateway(reactor, gateway_config(temp_dir(self), [B], {"chat.b.example": "sb"}),
                                     dns_port, self)
        publish(self.dns, self.b, [B, "chat.b.example"], "xmpp.b.example")

    @defer.inlineCallbacks
    def test_outbound_stream_to_the_claimed_domain_survives(self):
        ours = yield add_component(self, self.gw, "chat.gw.example", "sc")
        theirs = yield add_component(self, self.b, "chat.b.example", "sb")
        ours.send("<message from='a@chat.gw.example' to='x@chat.b.example' id='m1'><body>1</body></message>")
        got = yield theirs.next_element(timeout=20)
        self.assertEqual(got["id"], "m1")
        [stream] = self.gw.sender.streams_to("chat.b.example")

        attacker = RawPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.gw.port_of("s2s")), attacker)
        self.addCleanup(lambda: attacker.transport.abortConnection() if not attacker.lost.called else None)
        attacker.transport.write(s2s_header("chat.b.example", GW))
        yield wait_until(lambda: b"</stream:features>" in attacker.data, "features")
        # 200 KB of '>' (legal unescaped in text): 800 KB once escaped in a
        # db:verify, past b.example's 512 KiB stanza limit.
        attacker.transport.write(f"<db:result from='chat.b.example' to='{GW}'>{'>' * 200_000}"
                                 f"</db:result>".encode())
        yield wait_until(lambda: results(bytes(attacker.data)), "the answer to the attacker", timeout=20)

        # Our stream to chat.b.example is the same one, still open, and carries the next stanza.
        ours.send("<message from='a@chat.gw.example' to='x@chat.b.example' id='m2'><body>2</body></message>")
        got = yield theirs.next_element(timeout=20)
        self.assertEqual(got["id"], "m2")
        self.assertEqual(self.gw.sender.streams_to("chat.b.example"), [stream], "the same stream")
        self.assertTrue(stream.is_open)
        [answer] = results(bytes(attacker.data))
        self.assertEqual((answer["type"], condition(answer)), ("error", "not-acceptable"))
        self.assertFalse(attacker.lost.called, "a dialback error, not a stream error")
        # Nothing bounced to our component.
        bounced = ours.next_element(timeout=1)
        try:
            element = yield bounced
        except Exception:
            element = None
        self.assertIsNone(element, f"nothing comes back: {element and element.toXml()}")
