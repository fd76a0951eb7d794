"""Liveness of authenticated streams in memory: pings on streams that can
send, whitespace on plain inbound ones, connection-timeout when a ping goes
unanswered, the destination reconnecting with its queue, the idle close,
components, the router handing answers back, and the config keys."""

from __future__ import annotations

import random
import socket

from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.words.xish import domish

from fedgate.component.accept import ComponentAccept, handshake_digest
from fedgate.config import ConfigError, parse_config
from fedgate.router import Router
from fedgate.s2s.inbound import InboundS2S
from fedgate.s2s.pairs import ConnectionTable
from fedgate.s2s.sender import CONNECTING, IDLE, S2SSender, SenderSettings
from fedgate.stream import namespaces as ns
from fedgate.stream.liveness import (AWAITING, DONE, WATCHING, ComponentWatch, LivenessSettings,
                                     PingRegistry, is_keepalive, tcp_keepalive)
from fedgate.stream.protocol import XmppStream
from tests.support.memory import MemoryStream, RecordingRouter, server_header
from tests.support.s2s import FakeConnector, FakeVerifier, make_context

REMOTE = "remote.example"
LOCAL = "gw.example"
SETTINGS = LivenessSettings(ping_idle=60.0, ping_timeout=30.0, idle_close=600.0)


def message(n, sender=f"a@{LOCAL}", to=f"b@{REMOTE}"):
    el = domish.Element((ns.COMPONENT_ACCEPT, "message"))
    el["from"], el["to"], el["id"] = sender, to, f"m{n}"
    el.addElement("body", content=f"body {n}")
    return el


def pings_in(elements) -> list:
    return [e for e in elements if e.name == "iq" and e.getAttribute("type") == "get"
            and any(c.uri == ns.PING and c.name == "ping" for c in e.elements())]


def error_of(stream) -> str | None:
    stream.read()
    return stream.stream_error()


class Bare:
    """A handler that does nothing (the monitor alone is under test)."""

    def connected(self, io): pass
    def disconnected(self, reason): pass
    def error_header(self): return {}


def answer_to(ping, kind="result") -> domish.Element:
    reply = domish.Element((None, "iq"))
    reply["type"], reply["id"] = kind, ping["id"]
    reply["from"], reply["to"] = ping["to"], ping["from"]
    return reply


class OutboundCase(unittest.TestCase):
    """A real sender and outbound stream in memory, with liveness on."""

    settings = SETTINGS

    def setUp(self):
        self.clock = Clock()
        self.router = RecordingRouter()
        self.table = ConnectionTable()
        self.pings = PingRegistry()
        self.connector = FakeConnector(self.clock)
        self.ctx = make_context(self.clock, local_domains={LOCAL}, table=self.table, router=self.router,
                                auth_timeout=90.0, liveness=self.settings, pings=self.pings)
        self.sender = S2SSender(self.ctx, self.connector, lambda handler: XmppStream(handler, self.clock),
                                SenderSettings(max_wait=600.0, pair_timeout=30.0), rng=random.Random(3))

    def connect(self) -> MemoryStream:
        """A stanza out, the stream up and its pair valid: the peer side."""
        self.sender.send(LOCAL, REMOTE, message(0))
        peer = self.connector.succeed()
        peer.read()
        peer.stream.dataReceived(server_header(id="SID", **{"from": REMOTE}, version="1.0")
                                 + b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/>"
                                   b"</stream:features>")
        peer.stream.dataReceived(f"<db:result from='{REMOTE}' to='{LOCAL}' type='valid'/>".encode())
        peer.take()
        self.destination = self.sender.destinations[REMOTE]
        return peer

    def advance(self, seconds: float, step: float = 1.0) -> None:
        while seconds > 1e-9:
            self.clock.advance(min(step, seconds))
            seconds -= step

    def messages(self, peer) -> list:
        return [e["id"] for e in peer.elements if e.name == "message"]


class OutboundPingTests(OutboundCase):
    def test_ping_after_idle(self):
        peer = self.connect()
        self.advance(59)
        self.assertEqual(pings_in(peer.read()), [])
        self.advance(1)
        [ping] = pings_in(peer.read())
        self.assertEqual((ping["from"], ping["to"]), (LOCAL, REMOTE))
        self.assertTrue(ping["id"].startswith("fg-ping-"))
        self.assertEqual(len(self.pings), 1)

    def test_answer_clears_it_and_the_next_ping_waits_a_full_idle_time(self):
        peer = self.connect()
        self.advance(60)
        [ping] = pings_in(peer.read())
        self.advance(10)
        self.assertTrue(self.pings.answer(answer_to(ping)))
        self.assertEqual(len(self.pings), 0)
        self.assertFalse(self.pings.answer(answer_to(ping)), "a repeated answer goes on as usual")
        self.advance(59)  # t = 129: nothing closed, no second ping yet
        self.assertFalse(peer.disconnecting)
        self.assertEqual(pings_in(peer.read()), [])
        self.advance(1)
        self.assertEqual(len(pings_in(peer.read())), 1)

    def test_an_error_answer_also_proves_the_peer_alive(self):
        peer = self.connect()
        self.advance(60)
        [ping] = pings_in(peer.read())
        self.pings.answer(answer_to(ping, "error"))
        self.advance(40)
        self.assertFalse(peer.disconnecting)

    def test_an_answer_from_another_domain_does_not_count(self):
        peer = self.connect()
        self.advance(60)
        [ping] = pings_in(peer.read())
        forged = answer_to(ping)
        forged["from"] = "other.example"
        self.assertFalse(self.pings.answer(forged), "not taken: routed as any other stanza")
        self.advance(30)
        self.assertEqual(error_of(peer), "connection-timeout", "it proved nothing")

    def test_no_answer_is_connection_timeout_at_90_s(self):
        peer = self.connect()
        self.advance(89.5, step=0.5)
        self.assertFalse(peer.disconnecting)
        self.assertIsNone(peer.stream_error())
        self.advance(0.5, step=0.5)
        peer.read()
        self.assertEqual(peer.stream_error(), "connection-timeout")
        self.assertTrue(peer.transport.disconnecting)
        self.assertEqual(len(self.pings), 0, "the unanswered ping is forgotten")
        self.assertFalse(peer.transport.disconnected, "the stream error gets a moment to go out")
        self.advance(1)
        self.assertTrue(peer.transport.disconnected, "then the connection is dropped")

    def test_the_destination_reconnects_and_the_queue_goes_out_on_the_new_stream(self):
        peer = self.connect()
        self.advance(90)
        self.assertEqual(error_of(peer), "connection-timeout")
        # A stanza while the dead stream is closing waits in the queue.
        self.sender.send(LOCAL, REMOTE, message(1))
        peer.stream.connectionLost(None)
        self.assertEqual(self.router.bounced, [], "a liveness close bounces nothing")
        self.assertEqual(len(self.connector.attempts), 2, "a new connection at once")
        self.assertEqual((self.destination.state, self.destination.failures), (CONNECTING, 0))
        self.sender.send(LOCAL, REMOTE, message(2))
        fresh = self.connector.succeed()
        fresh.read()
        fresh.stream.dataReceived(server_header(id="SID2", **{"from": REMOTE}, version="1.0")
                                  + b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/>"
                                    b"</stream:features>")
        fresh.stream.dataReceived(f"<db:result from='{REMOTE}' to='{LOCAL}' type='valid'/>".encode())
        fresh.read()
        self.assertEqual(self.messages(fresh), ["m1", "m2"])

    def test_bytes_from_the_peer_keep_it_alive_without_pings(self):
        peer = self.connect()
        for _ in range(10):
            self.advance(50)
            peer.stream.dataReceived(b" ")
        self.assertEqual(pings_in(peer.read()), [])
        self.assertFalse(peer.disconnecting)

    def test_bytes_after_the_ping_count_as_its_answer(self):
        peer = self.connect()
        self.advance(60)
        self.assertEqual(len(pings_in(peer.read())), 1)
        self.advance(20)
        peer.stream.dataReceived(b" ")
        self.advance(30)
        self.assertFalse(peer.disconnecting)
        self.assertEqual(len(self.pings), 0)


class IdleCloseTests(OutboundCase):
    def answer_pings(self, peer, seconds: float) -> None:
        """``seconds`` pass with the peer answering every ping at once."""
        for _ in range(int(seconds)):
            self.clock.advance(1)
            for ping in pings_in(peer.read()):
                self.pings.answer(answer_to(ping))

    def test_idle_close_at_600_s_is_clean_and_reopens_on_demand(self):
        peer = self.connect()  # m0 went out at t = 0
        self.answer_pings(peer, 599)
        self.assertFalse(peer.disconnecting, "answered pings keep it open, not busy")
        self.answer_pings(peer, 1)
        self.assertTrue(peer.disconnecting)
        self.assertIsNone(peer.stream_error(), "a clean close, no stream error")
        self.assertTrue(peer.transport.value().endswith(b"</stream:stream>"))
        peer.stream.connectionLost(None)
        self.assertEqual((self.destination.state, self.router.bounced), (IDLE, []))
        self.sender.send(LOCAL, REMOTE, message(1))
        self.assertEqual(len(self.connector.attempts), 2, "reopened on demand")

    def test_stanzas_either_way_keep_it_open(self):
        peer = self.connect()
        self.answer_pings(peer, 500)
        self.sender.send(LOCAL, REMOTE, message(1))  # out at t = 500
        self.answer_pings(peer, 599)
        self.assertFalse(peer.disconnecting)
        self.answer_pings(peer, 1)
        self.assertTrue(peer.disconnecting, "closed 600 s after the last stanza")

    def test_pings_and_answers_do_not_count_as_stanzas(self):
        ping = domish.Element((None, "iq"))
        ping["type"] = "get"
        ping.addElement((ns.PING, "ping"))
        self.assertTrue(is_keepalive(ping))
        self.assertTrue(is_keepalive(answer_to({"id": "x", "to": "a", "from": "b"})))
        query = domish.Element((None, "iq"))
        query["type"] = "get"
        query.addElement((ns.DISCO_INFO, "query"))
        self.assertFalse(is_keepalive(query))
        self.assertFalse(is_keepalive(message(0)))


class InboundTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.verifier = FakeVerifier()
        self.pings = PingRegistry()
        self.ctx = make_context(self.clock, local_domains={LOCAL}, router=RecordingRouter(),
                                verifier=self.verifier, auth_timeout=90.0, liveness=SETTINGS,
                                pings=self.pings)

    def authenticated(self) -> MemoryStream:
        stream = MemoryStream(InboundS2S(self.ctx), self.clock)
        stream.feed(server_header(to=LOCAL, **{"from": REMOTE}, version="1.0"))
        stream.feed(f"<db:result from='{REMOTE}' to='{LOCAL}'>key</db:result>")
        self.verifier.calls[-1][1].callback(True)
        stream.take()
        return stream

    def written_since(self, stream, mark: int) -> bytes:
        return stream.transport.value()[mark:]

    def test_whitespace_keepalive_on_an_idle_plain_inbound_stream(self):
        stream = self.authenticated()
        mark = len(stream.transport.value())
        self.clock.advance(59)
        self.assertEqual(self.written_since(stream, mark), b"")
        self.clock.advance(1)
        self.assertEqual(self.written_since(stream, mark), b" ", "one space, and no ping")
        self.clock.advance(60)
        self.assertEqual(self.written_since(stream, mark), b"  ")
        self.assertFalse(stream.disconnecting, "no answer is expected to whitespace")

    def test_stanzas_from_the_peer_hold_the_keepalive_back(self):
        stream = self.authenticated()
        mark = len(stream.transport.value())
        for n in range(5):
            self.clock.advance(40)
            stream.feed(f"<message from='u@{REMOTE}' to='v@{LOCAL}' id='i{n}'/>")
        self.assertEqual(self.written_since(stream, mark), b"")

    def test_idle_close_of_an_inbound_stream(self):
        stream = self.authenticated()
        self.clock.advance(599)
        self.assertFalse(stream.disconnecting)
        self.clock.advance(1)
        self.assertTrue(stream.disconnecting)
        self.assertIsNone(stream.stream_error())

    def test_a_bidi_inbound_stream_is_pinged_over_itself(self):
        stream = MemoryStream(InboundS2S(self.ctx), self.clock)
        stream.feed(server_header(to=LOCAL, **{"from": REMOTE}, version="1.0"))
        stream.feed("<bidi xmlns='urn:xmpp:bidi'/>")
        stream.feed(f"<db:result from='{REMOTE}' to='{LOCAL}'>key</db:result>")
        self.verifier.calls[-1][1].callback(True)
        stream.take()
        self.clock.advance(60)
        [ping] = pings_in(stream.read())
        self.assertEqual((ping["from"], ping["to"]), (LOCAL, REMOTE))
        self.clock.advance(30)
        self.assertEqual(error_of(stream), "connection-timeout")

    def test_an_idle_close_shorter_than_the_auth_timeout_waits_for_it(self):
        self.ctx = make_context(self.clock, local_domains={LOCAL}, router=RecordingRouter(),
                                verifier=self.verifier, auth_timeout=90.0, pings=self.pings,
                                liveness=LivenessSettings(60.0, 30.0, idle_close=30.0))
        stream = MemoryStream(InboundS2S(self.ctx), self.clock)
        stream.feed(server_header(to=LOCAL, **{"from": REMOTE}, version="1.0"))
        self.clock.advance(31)
        self.assertEqual(len(self.clock.getDelayedCalls()), 2, "the auth timer and one of ours, no spin")
        self.assertFalse(stream.disconnecting)
        self.clock.advance(59)
        self.assertEqual(error_of(stream), "connection-timeout", "the authentication timeout closed it")

    def test_nothing_before_authentication(self):
        stream = MemoryStream(InboundS2S(self.ctx), self.clock)
        stream.feed(server_header(to=LOCAL, **{"from": REMOTE}, version="1.0"))
        mark = len(stream.transport.value())
        self.clock.advance(89)
        self.assertEqual(self.written_since(stream, mark), b"", "the auth timeout rules here")


class RouterTests(unittest.TestCase):
    def test_the_router_hands_ping_answers_to_the_registry(self):
        clock = Clock()
        pings = PingRegistry()
        handled = []

        class Local:
            def handle(self, stanza):
                handled.append(stanza)

        router = Router({LOCAL}, set(), local_handler=Local(), pings=pings)
        stream = MemoryStream(None, clock, stream=XmppStream(Bare(), clock))
        fired = []
        from fedgate.stream.liveness import Liveness
        monitor = Liveness(stream.stream, clock, SETTINGS, pings, ping_pair=lambda: (LOCAL, REMOTE),
                           authenticated=lambda: True, on_dead=fired.append, on_idle=fired.append)
        stream.stream.open_stream({"from": LOCAL, "to": REMOTE})
        clock.advance(60)
        [ping] = pings_in(stream.read())
        self.assertEqual(monitor.state, AWAITING)
        router.route(answer_to(ping))
        self.assertEqual((monitor.state, handled), (WATCHING, []))
        other = answer_to({"id": "q1", "to": REMOTE, "from": LOCAL})
        router.route(other)
        self.assertEqual([h.element for h in handled], [other], "other results go on as before")
        monitor.stop()
        self.assertEqual((monitor.state, fired), (DONE, []))


class ComponentTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.pings = PingRegistry()
        self.router = RecordingRouter()
        self.router.bind = lambda domain, session: True
        self.router.unbind = lambda domain, session: None

    def bound(self, settings) -> MemoryStream:
        watch = ComponentWatch(settings, self.pings, LOCAL)
        handler = ComponentAccept({"c.gw.example": "sec"}, self.router, self.clock, 30.0, liveness=watch)
        stream = MemoryStream(handler, self.clock, stream_ns=ns.COMPONENT_ACCEPT)
        stream.feed("<stream:stream xmlns='jabber:component:accept' "
                    "xmlns:stream='http://etherx.jabber.org/streams' to='c.gw.example'>")
        stream.feed(f"<handshake>{handshake_digest(stream.header.get('id'), 'sec')}</handshake>")
        stream.take()
        return stream

    def test_component_pinged_from_the_gateway_domain_and_closed_without_answer(self):
        stream = self.bound(LivenessSettings(60.0, 30.0, 0.0))
        self.clock.advance(60)
        [ping] = pings_in(stream.read())
        self.assertEqual((ping["from"], ping["to"]), (LOCAL, "c.gw.example"))
        self.pings.answer(answer_to(ping))
        self.clock.advance(60)
        [ping] = pings_in(stream.read())
        self.clock.advance(29)
        self.assertFalse(stream.disconnecting)
        self.clock.advance(1)
        self.assertEqual(error_of(stream), "connection-timeout")

    def test_components_are_not_idle_closed_by_default(self):
        stream = self.bound(LivenessSettings(60.0, 30.0, 0.0))
        for _ in range(60):  # an hour, every ping answered
            self.clock.advance(60)
            for ping in pings_in(stream.read()):
                self.pings.answer(answer_to(ping))
        self.assertFalse(stream.disconnecting)

    def test_component_idle_close_when_configured(self):
        stream = self.bound(LivenessSettings(60.0, 30.0, 300.0))
        for _ in range(5):
            self.clock.advance(60)
            for ping in pings_in(stream.read()):
                self.pings.answer(answer_to(ping))
        self.assertTrue(stream.disconnecting)
        self.assertIsNone(stream.stream_error())


class TcpKeepaliveTests(unittest.TestCase):
    def test_keepalive_options_on_a_real_socket(self):
        sock = socket.socket()
        self.addCleanup(sock.close)

        class Transport:
            def getHandle(self):
                return sock

        class Wrapper:  # a TLS wrapping protocol over the TCP transport
            transport = Transport()

        self.assertTrue(tcp_keepalive(Wrapper(), SETTINGS))
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), 60)
            self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL), 10)
            self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT), 3)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT), 90_000)

    def test_no_socket_no_keepalive(self):
        stream = MemoryStream(None, Clock(), stream=XmppStream(Bare(), Clock()))
        self.assertFalse(stream.stream.keep_alive(SETTINGS))


class ConfigTests(unittest.TestCase):
    def parse(self, **sections):
        data = {"domains": [LOCAL], "state_dir": "/nonexistent"}
        data.update(sections)
        return parse_config(data, "<test>")

    def test_defaults(self):
        config = self.parse()
        self.assertEqual((config.s2s.ping_idle, config.s2s.ping_timeout, config.s2s.idle_close),
                         (60.0, 30.0, 600.0))
        c = config.components
        self.assertEqual((c.ping_idle, c.ping_timeout, c.idle_close), (60.0, 30.0, 0.0))

    def test_values_and_errors_name_the_key(self):
        config = self.parse(s2s={"ping_idle": 5, "ping_timeout": 2, "idle_close": 0},
                            components={"idle_close": 120})
        self.assertEqual((config.s2s.ping_idle, config.s2s.ping_timeout, config.s2s.idle_close),
                         (5.0, 2.0, 0.0))
        self.assertEqual(config.components.idle_close, 120.0)
        for section, key, value in (("s2s", "ping_idle", 0), ("s2s", "ping_timeout", -1),
                                    ("s2s", "idle_close", -5), ("components", "ping_idle", "x"),
                                    ("components", "idle_close", -1)):
            with self.assertRaises(ConfigError) as caught:
                self.parse(**{section: {key: value}})
            self.assertIn(f"{section}.{key}", str(caught.exception))
