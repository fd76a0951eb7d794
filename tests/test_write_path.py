"""The one guarded write path: XmppStream.send_stanza refuses once the stream
is closing, and a refused stanza is requeued (then delivered over a new
connection) or bounced, never counted delivered."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone
from twisted.trial import unittest

from fedgate.router import Router
from fedgate.stream import namespaces as ns
from fedgate.stream.parser import StreamParser
from fedgate.stream.protocol import XmppStream
from fedgate.stream.stanza import Stanza
from tests.support.memory import MemoryStream
from tests.test_sender import SenderCase, message

HEADER = (b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'"
          b" xmlns:db='jabber:server:dialback'>")


def parsed(raw: bytes) -> Stanza:
    found = []
    parser = StreamParser(lambda h: None, found.append, lambda: None)
    parser.feed(HEADER + raw)
    [stanza] = found
    return stanza


class _Handler:
    def __init__(self):
        self.lost = []

    def connected(self, io):
        self.io = io

    def disconnected(self, reason):
        self.lost.append(reason)

    def error_header(self):
        return {}


class SendStanzaTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.handler = _Handler()
        self.stream = XmppStream(self.handler, self.clock, stream_ns=ns.COMPONENT_ACCEPT)
        self.transport = StringTransport()
        self.stream.makeConnection(self.transport)
        self.stream.open_stream({"id": "x"})
        self.taken = []
        self.stream.observe_stanzas(lambda stanza, size: self.taken.append((stanza.id, size)))

    def test_open_stream_takes_the_original_bytes(self):
        raw = b"<message to=\"a@b\" from='c@d' id='1'><body>x &amp; &#x41;</body></message>"
        before = len(self.transport.value())
        self.assertTrue(self.stream.send_stanza(parsed(raw)))
        self.assertEqual(self.transport.value()[before:], raw)
        self.assertEqual(self.taken, [("1", len(raw))])

    def test_refused_once_closing_and_nothing_after_the_stream_end(self):
        self.stream.close()  # connectionLost has not happened yet
        self.assertFalse(self.stream.closed)
        self.assertFalse(self.stream.send_stanza(parsed(b"<message id='2' to='a@b'/>")))
        self.assertFalse(self.stream.write("<presence/>"))
        self.stream.send(parsed(b"<message id='3' to='a@b'/>").element)
        self.assertTrue(self.transport.value().endswith(b"</stream:stream>"))
        self.assertEqual(self.taken, [])

    def test_refused_once_closed(self):
        self.stream.connectionLost(Failure(ConnectionDone()))
        before = self.transport.value()
        self.assertFalse(self.stream.send_stanza(parsed(b"<message id='4' to='a@b'/>")))
        self.assertFalse(self.stream.write("<presence/>"))
        self.assertEqual(self.transport.value(), before)


class RefusedStanzaTests(SenderCase):
    """A stanza sent to a stream that is closing (close() called, no
    connectionLost yet) is requeued, then delivered over a new connection or
    bounced; the counters stay honest at every step."""

    def assert_counts(self, accepted, delivered, bounced, queued):
        outcomes = self.sender.outcomes()
        self.assertEqual((outcomes["accepted"], outcomes["delivered"], outcomes["bounced"],
                          self.sender.pending_stanza_count()),
                         (accepted, delivered, bounced, queued))
        self.assertEqual(outcomes["accepted"], outcomes["delivered"] + outcomes["bounced"]
                         + self.sender.pending_stanza_count())

    def open_valid(self):
        self.sender.send("chat.gw.example", "remote.example", message(0))
        peer = self.connector.succeed()
        self.open_peer(peer)
        self.answer(peer, "chat.gw.example", "valid")
        self.assertEqual(self.delivered_ids(peer), ["m0"])
        return peer

    def test_peer_close_requeues_then_delivers_over_a_new_connection(self):
        peer = self.open_valid()
        peer.stream.dataReceived(b"</stream:stream>")  # the peer ends its stream: we close
        self.assertTrue(peer.stream.closing and not peer.stream.closed)
        written = peer.transport.value()
        for n in (1, 2, 3):
            self.sender.send("chat.gw.example", "remote.example", message(n))
        self.assertEqual(peer.transport.value(), written, "nothing written after </stream:stream>")
        self.assert_counts(accepted=4, delivered=1, bounced=0, queued=3)
        [record] = list(self.table)
        self.assertEqual(record.pairs[("chat.gw.example", "remote.example")].stanzas_out, 1)
        peer.stream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.connector.attempts), 2, "a new connection for what was refused")
        self.assert_counts(accepted=4, delivered=1, bounced=0, queued=3)
        second = self.connector.succeed()
        self.open_peer(second)
        self.answer(second, "chat.gw.example", "valid")
        self.assertEqual(self.delivered_ids(second), ["m1", "m2", "m3"])
        self.assert_counts(accepted=4, delivered=4, bounced=0, queued=0)
        self.assertEqual(self.bounced(), [])

    def test_refused_then_the_new_connection_fails_bounces(self):
        peer = self.open_valid()
        peer.stream.dataReceived(b"</stream:stream>")
        self.sender.send("chat.gw.example", "remote.example", message(1))
        peer.stream.connectionLost(Failure(ConnectionDone()))
        self.connector.fail()
        self.assertEqual(self.bounced(), [("m1", "remote-server-not-found")])
        self.assert_counts(accepted=2, delivered=1, bounced=1, queued=0)

    def test_stream_error_close_bounces_what_was_refused(self):
        peer = self.open_valid()
        peer.stream.dataReceived(
            b"<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>"
            b"</stream:stream>")
        self.assertTrue(peer.stream.closing)
        self.sender.send("chat.gw.example", "remote.example", message(1))
        self.sender.send("chat.gw.example", "remote.example", message(2))
        self.assert_counts(accepted=3, delivered=1, bounced=0, queued=2)
        peer.stream.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.bounced(), [("m1", "remote-server-timeout"), ("m2", "remote-server-timeout")])
        self.assertEqual(len(self.connector.attempts), 1, "backoff, no new connection yet")
        self.assert_counts(accepted=3, delivered=1, bounced=2, queued=0)

    def test_refused_flush_keeps_the_order(self):
        """A bidi route that takes one stanza and then refuses (it is
        closing): the refused one and the rest stay queued, in order."""
        from dataclasses import replace
        from fedgate.s2s.pairs import INBOUND, VALID, ConnectionRecord

        class Route:
            def __init__(self):
                self.written, self.open = [], True

            def authenticate_reverse(self, local, remote):
                return True

            def is_writable(self):
                return True

            def write_stanza(self, local, remote, stanza):
                if not self.open:
                    return False
                self.written.append(stanza["id"])
                self.open = False  # closing after the first one
                return True

        self.sender.ctx = replace(self.ctx, reverse_dialback=True)
        record = ConnectionRecord(INBOUND, "peer", 0.0, remote_domain="remote.example", bidi=True)
        record.set_pair("gw.example", "remote.example", VALID, "sasl-external", 0.0)
        route = Route()
        self.table.add(record, route=route)
        for n in range(3):
            self.sender.send("chat.gw.example", "remote.example", message(n))
        self.assert_counts(accepted=3, delivered=0, bounced=0, queued=3)
        record.set_pair("chat.gw.example", "remote.example", VALID, "dialback", 0.0)
        self.table.pair_changed("chat.gw.example", "remote.example", True)
        self.assertEqual(route.written, ["m0"])
        self.assertEqual([item.stanza["id"] for item in self.sender.destinations["remote.example"].queue],
                         ["m1", "m2"])
        self.assert_counts(accepted=3, delivered=1, bounced=0, queued=2)
        # A new stanza for the pair never overtakes those waiting.
        self.sender.send("chat.gw.example", "remote.example", message(3))
        self.assertEqual([item.stanza["id"] for item in self.sender.destinations["remote.example"].queue],
                         ["m1", "m2", "m3"])
        self.assert_counts(accepted=4, delivered=1, bounced=0, queued=3)


class _Component:
    def __init__(self, stream):
        self.io = stream
        self.got = 0

    def deliver(self, stanza):
        if not self.io.send_stanza(stanza):
            return False
        self.got += 1
        return True


class ComponentRefusalTests(unittest.TestCase):
    def setUp(self):
        from fedgate.component.accept import ComponentAccept

        self.router = Router({"gw.example"}, {"chat.gw.example"})
        self.clock = Clock()
        self.peer = MemoryStream(ComponentAccept({"chat.gw.example": "pw"}, self.router, self.clock),
                                 self.clock, stream_ns=ns.COMPONENT_ACCEPT)
        self.component = self.peer.stream.handler
        self.router.bind("chat.gw.example", self.component)
        self.component.bound = True
        self.peer.stream.header_sent = True

    def test_closing_component_stream_bounces(self):
        bounced = []
        self.router.sender = type("S", (), {"send": lambda s, local, remote, stanza: bounced.append(stanza)})()
        stanza = parsed(b"<message from='u@remote.example' to='bot@chat.gw.example' id='9'><body>b</body></message>")
        self.router.route(stanza, "chat.gw.example", "remote.example")
        self.assertEqual(self.component.stanzas_out, 1)
        self.peer.stream.close()
        self.router.route(parsed(b"<message from='u@remote.example' to='bot@chat.gw.example' id='10'/>"),
                          "chat.gw.example", "remote.example")
        self.assertEqual(self.component.stanzas_out, 1, "not counted delivered")
        self.assertEqual(self.router.bounces, {"service-unavailable": 1})
        [reply] = bounced
        self.assertEqual((reply.getAttribute("type"), reply.getAttribute("id"), reply.getAttribute("to")),
                         ("error", "10", "u@remote.example"))

    def test_shared_domain_goes_to_a_member_that_takes_it(self):
        self.router.unbind("chat.gw.example", self.component)
        streams = []
        members = []
        for _ in range(2):
            stream = XmppStream(_Handler(), self.clock)
            stream.makeConnection(StringTransport())
            streams.append(stream)
            members.append(_Component(stream))
            self.router.bind("chat.gw.example", members[-1], shared=True)
        streams[0].close()
        for n in range(4):
            self.router.route(parsed(f"<message from='u@remote.example' to='c@chat.gw.example' id='{n}'/>".encode()),
                              "chat.gw.example", "remote.example")
        self.assertEqual([m.got for m in members], [0, 4])
        self.assertEqual(self.router.bounces, {})


class HotPathTests(SenderCase):
    """The relay path reads addresses only: no DOM is built for a stanza
    that goes from a component to S2S or from S2S to a component."""

    def test_component_to_s2s_builds_no_dom(self):
        from fedgate.component.accept import ComponentAccept, handshake_digest

        taken = []
        router = Router({"gw.example"}, {"chat.gw.example"})
        router.sender = type("S", (), {"send": lambda s, local, remote, stanza: taken.append(stanza)})()
        component = MemoryStream(ComponentAccept({"chat.gw.example": "pw"}, router, self.clock),
                                 self.clock, stream_ns=ns.COMPONENT_ACCEPT)
        component.feed("<stream:stream xmlns='jabber:component:accept' "
                       "xmlns:stream='http://etherx.jabber.org/streams' to='chat.gw.example'>")
        stream_id = component.header.get("id")
        component.feed(f"<handshake>{handshake_digest(stream_id, 'pw')}</handshake>")
        raw = b"<message from='a@chat.gw.example' to='b@remote.example' id='h1'><body>x</body></message>"
        component.feed(raw)
        [stanza] = taken
        self.assertIsInstance(stanza, Stanza)
        self.assertEqual(stanza.raw, raw)
        # ... then out over an S2S stream, still as the original bytes.
        self.sender.send("chat.gw.example", "remote.example", stanza)
        peer = self.connector.succeed()
        self.open_peer(peer)
        self.answer(peer, "chat.gw.example", "valid")
        self.assertIn(raw, peer.transport.value())
        self.assertFalse(stanza.built, "no DOM built on the way")

    def test_s2s_to_component_builds_no_dom(self):
        from fedgate.component.accept import ComponentAccept

        router = Router({"gw.example"}, {"chat.gw.example"})
        component = MemoryStream(ComponentAccept({"chat.gw.example": "pw"}, router, self.clock),
                                 self.clock, stream_ns=ns.COMPONENT_ACCEPT)
        router.bind("chat.gw.example", component.stream.handler)
        component.stream.header_sent = True
        raw = b"<message from='u@remote.example' to='bot@chat.gw.example' id='h2'><body>y</body></message>"
        stanza = parsed(raw)
        router.route(stanza, "chat.gw.example", "remote.example")
        self.assertTrue(component.transport.value().endswith(raw))
        self.assertFalse(stanza.built)
