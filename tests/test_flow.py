"""Output flow control in memory: the stream's high-water mark driven by
the transport's pauseProducing/resumeProducing (a StringTransport holds the
stream's producer as a socket transport would), the component queue, the
S2S destination holding and flushing, and the router's bounces."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from fedgate.component.accept import ComponentAccept
from fedgate.router import Router
from fedgate.s2s.sender import S2SSender, SenderSettings
from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StanzaFailure
from fedgate.stream.flow import OutputFlow, StanzaQueue
from fedgate.stream.protocol import XmppStream
from fedgate.stream.stanza import Stanza
from tests.support.memory import MemoryStream
from tests.test_sender import SenderCase, message
from tests.test_write_path import parsed


class _Handler:
    def connected(self, io):
        pass

    def disconnected(self, reason):
        pass


def stream_on_transport(high_water: int) -> tuple[XmppStream, StringTransport]:
    stream = XmppStream(_Handler(), Clock(), output_high_water=high_water)
    transport = StringTransport()
    stream.makeConnection(transport)
    return stream, transport


class OutputFlowTests(unittest.TestCase):
    def test_the_stream_is_its_transports_streaming_producer(self):
        stream, transport = stream_on_transport(100)
        self.assertIs(transport.producer, stream.flow)
        self.assertTrue(transport.streaming)

    def test_writable_until_the_mark_past_the_transports_pause(self):
        stream, transport = stream_on_transport(100)
        woken = []
        stream.on_writable(lambda: woken.append(True))
        stream.write("x" * 500)
        self.assertTrue(stream.writable, "the transport has not paused us")
        transport.producer.pauseProducing()
        stream.write("x" * 60)
        self.assertTrue(stream.writable, "60 bytes past the pause, mark 100")
        self.assertTrue(stream.send_stanza(parsed(b"<message to='a@b.example' id='big'><body>"
                                                  + b"y" * 200 + b"</body></message>")),
                        "one stanza past the mark still goes out")
        self.assertFalse(stream.writable)
        self.assertEqual(stream.flow.stalls, 1)
        transport.producer.resumeProducing()
        self.assertTrue(stream.writable)
        self.assertEqual(woken, [True])

    def test_no_wake_up_when_resumed_before_the_mark(self):
        stream, transport = stream_on_transport(100)
        woken = []
        stream.on_writable(lambda: woken.append(True))
        transport.producer.pauseProducing()
        stream.write("x" * 10)
        transport.producer.resumeProducing()
        self.assertEqual(woken, [])

    def test_close_unregisters_the_producer(self):
        # TLS holds a close while a producer is registered.
        stream, transport = stream_on_transport(100)
        stream.close()
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.disconnecting)

    def test_flow_alone(self):
        flow = OutputFlow(10)
        flow.wrote(1000)
        self.assertTrue(flow.writable)
        flow.pauseProducing()
        flow.wrote(9)
        self.assertTrue(flow.writable)
        flow.wrote(1)
        self.assertFalse(flow.writable)
        flow.stopProducing()
        self.assertTrue(flow.writable)


def stanza(n: int, size: int = 0) -> Stanza:
    return parsed(f"<message from='u@remote.example' to='bot@chat.gw.example' id='q{n}'>"
                  f"<body>{'z' * size}</body></message>".encode())


class StanzaQueueTests(unittest.TestCase):
    def setUp(self):
        self.sent = []
        self.open = True
        self.writable = True

        def send(s):
            if not self.open:
                return False
            self.sent.append(s.id)
            return True
        self.queue = StanzaQueue(send, lambda: self.writable, max_stanzas=3, max_bytes=10_000)

    def honest(self):
        out = self.queue.outcomes()
        self.assertEqual(out["accepted"], out["delivered"] + out["bounced"] + out["queued"], out)

    def test_held_in_order_past_the_mark_then_flushed(self):
        self.assertTrue(self.queue.put(stanza(0)))
        self.writable = False
        for n in (1, 2):
            self.assertTrue(self.queue.put(stanza(n)))
        self.writable = True
        self.assertTrue(self.queue.put(stanza(3)), "new stanzas never overtake held ones")
        self.assertEqual(self.sent, ["q0"])
        self.queue.flush()
        self.assertEqual(self.sent, ["q0", "q1", "q2", "q3"])
        self.honest()

    def test_full_by_count_raises_resource_constraint(self):
        self.writable = False
        for n in range(3):
            self.queue.put(stanza(n))
        with self.assertRaises(StanzaFailure) as caught:
            self.queue.put(stanza(3))
        self.assertEqual(caught.exception.condition, "resource-constraint")
        self.assertEqual(self.queue.outcomes(), {"accepted": 4, "delivered": 0, "bounced": 1, "queued": 3})
        self.honest()

    def test_full_by_bytes(self):
        self.writable = False
        self.queue.put(stanza(0, 9000))
        with self.assertRaises(StanzaFailure):
            self.queue.put(stanza(1, 2000))
        self.assertEqual(len(self.queue), 1)

    def test_flush_stops_when_the_mark_is_passed_again(self):
        self.writable = False
        for n in range(3):
            self.queue.put(stanza(n))
        sends = iter([True, False])
        self.queue._writable = lambda: next(sends, False)
        self.queue.flush()
        self.assertEqual(self.sent, ["q0"])
        self.assertEqual(len(self.queue), 2)

    def test_closing_stream_keeps_the_rest_for_drain(self):
        self.writable = False
        for n in range(2):
            self.queue.put(stanza(n))
        self.open, self.writable = False, True
        self.queue.flush()
        self.assertEqual([s.id for s in self.queue.drain()], ["q0", "q1"])
        self.assertEqual(self.queue.outcomes(), {"accepted": 2, "delivered": 0, "bounced": 2, "queued": 0})
        self.assertFalse(self.queue.put(stanza(9)), "a closing stream refuses; the router bounces")


class ComponentBackpressureTests(unittest.TestCase):
    """A component whose output is past its mark, through the real router."""

    def setUp(self):
        self.clock = Clock()
        self.router = Router({"gw.example"}, {"slow.gw.example", "ok.gw.example"})
        self.replies = []
        self.router.sender = type("S", (), {"send": lambda s, local, remote, st: self.replies.append(st)})()
        self.peers = {}
        for domain in ("slow.gw.example", "ok.gw.example"):
            peer = MemoryStream(ComponentAccept({domain: "pw"}, self.router, self.clock, queue_max_stanzas=2),
                                self.clock, stream_ns=ns.COMPONENT_ACCEPT)
            peer.stream.flow.high_water = 50
            handler = peer.stream.handler
            self.router.bind(domain, handler)
            handler.bound, handler.domain = True, domain
            peer.stream.open_stream({"id": "s", "from": domain})
            self.peers[domain] = peer

    def route(self, n: int, domain: str) -> None:
        self.router.route(parsed(f"<message from='u@remote.example' to='bot@{domain}' id='c{n}'>"
                                 f"<body>{'b' * 40}</body></message>".encode()), domain, "remote.example")

    def ids(self, domain: str) -> list:
        return [e["id"] for e in self.peers[domain].take() if e.name == "message"]

    def test_slow_component_holds_then_bounces_and_others_flow(self):
        slow = self.peers["slow.gw.example"]
        slow.transport.producer.pauseProducing()  # its socket buffer is full
        for n in range(6):
            self.route(n, "slow.gw.example")
            self.route(100 + n, "ok.gw.example")
        out = slow.stream.handler.output.outcomes()
        self.assertEqual(out, {"accepted": 6, "delivered": 1, "bounced": 3, "queued": 2})
        self.assertEqual(self.router.bounces, {"resource-constraint": 3})
        self.assertEqual([r.getAttribute("id") for r in self.replies], ["c3", "c4", "c5"])
        self.assertEqual(self.ids("ok.gw.example"), [f"c{100 + n}" for n in range(6)], "not slowed")
        self.assertEqual(self.ids("slow.gw.example"), ["c0"])
        slow.transport.producer.resumeProducing()
        self.assertEqual(self.ids("slow.gw.example"), ["c1", "c2"], "flushed in order on drain")
        self.assertEqual(slow.stream.handler.stanzas_out, 3)

    def test_held_stanzas_bounce_when_the_component_goes(self):
        slow = self.peers["slow.gw.example"]
        slow.transport.producer.pauseProducing()
        for n in range(3):
            self.route(n, "slow.gw.example")
        slow.stream.connectionLost(None)
        self.assertEqual(self.router.bounces, {"service-unavailable": 2})
        self.assertEqual([r.getAttribute("id") for r in self.replies], ["c1", "c2"])


class DestinationBackpressureTests(SenderCase):
    """An S2S destination whose stream's output is past its mark."""

    def setUp(self):
        super().setUp()
        self.sender = S2SSender(self.ctx, self.connector,
                                lambda handler: XmppStream(handler, self.clock, output_high_water=300),
                                SenderSettings(max_stanzas=3, max_bytes=100_000), rng=self.sender.rng)

    def valid_peer(self, remote="remote.example"):
        self.sender.send("chat.gw.example", remote, message(0, to=f"b@{remote}"))
        peer = self.connector.succeed()
        peer.read()
        peer.stream.dataReceived(
            f"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
            f"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
            f"id='S' from='{remote}' version='1.0'><stream:features><dialback "
            f"xmlns='urn:xmpp:features:dialback'/></stream:features>".encode())
        peer.stream.dataReceived(f"<db:result from='{remote}' to='chat.gw.example' type='valid'/>".encode())
        return peer

    def honest(self):
        out = self.sender.outcomes()
        self.assertEqual(out["accepted"], out["delivered"] + out["bounced"] + self.sender.pending_stanza_count(),
                         out)

    def test_holds_past_the_mark_bounces_past_the_queue_and_flushes_on_drain(self):
        peer = self.valid_peer()
        self.assertEqual(self.delivered_ids(peer.read() and peer), ["m0"])
        peer.transport.producer.pauseProducing()
        for n in range(1, 10):
            self.sender.send("chat.gw.example", "remote.example", message(n, pad="p" * 60))
        peer.read()
        delivered = self.delivered_ids(peer)
        self.assertLess(len(delivered), 10, "stopped writing past the mark")
        self.assertEqual(self.sender.pending_stanza_count("remote.example"), 3)
        self.assertEqual({c for _, c in self.bounced()}, {"resource-constraint"})
        self.honest()
        peer.transport.producer.resumeProducing()
        peer.read()
        after = self.delivered_ids(peer)
        self.assertEqual(after, sorted(after, key=lambda i: int(i[1:])), "in order")
        self.assertEqual(len(after), len(delivered) + 3)
        self.assertEqual(self.sender.pending_stanza_count(), 0)
        self.assertEqual(set(after) | {i for i, _ in self.bounced()}, {f"m{n}" for n in range(10)})
        self.honest()

    def test_another_destination_keeps_flowing(self):
        slow = self.valid_peer("slow.example")
        fast = self.valid_peer("fast.example")
        slow.transport.producer.pauseProducing()
        for n in range(1, 20):
            self.sender.send("chat.gw.example", "slow.example", message(n, to="b@slow.example", pad="p" * 60))
            self.sender.send("chat.gw.example", "fast.example", message(100 + n, to="b@fast.example"))
        fast.read()
        self.assertEqual(self.delivered_ids(fast), ["m0"] + [f"m{100 + n}" for n in range(1, 20)])
        self.assertEqual(self.sender.pending_stanza_count("fast.example"), 0)
        self.assertEqual(self.sender.pending_stanza_count("slow.example"), 3)
        self.honest()


class BufferingTransport(StringTransport):
    """A StringTransport that pauses its streaming producer, synchronously
    within ``write``, once more than ``buffer_size`` bytes wait unsent, as
    Twisted's socket transports do (FileDescriptor.bufferSize)."""

    def __init__(self, buffer_size: int = 64 * 1024):
        super().__init__()
        self.buffer_size = buffer_size
        self.sent = 0
        self.producer_paused = False
        #: bytes written when the producer was paused
        self.paused_at = None

    def write(self, data) -> None:
        super().write(data)
        if (self.producer is not None and self.streaming and not self.producer_paused
                and self.io.tell() - self.sent > self.buffer_size):
            self.producer_paused = True
            self.paused_at = self.io.tell()
            self.producer.pauseProducing()

    def drain(self) -> None:
        """The socket took everything: the producer resumes."""
        self.sent = self.io.tell()
        if self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()


class FlushInsideAReadTests(SenderCase):
    """A long queue flushed inside a read (the peer's ``<db:result
    type='valid'/>``) stops at the output high-water mark: the writes of a
    read are not all held back until its end (review finding 3)."""

    HIGH_WATER = 100_000
    PAD = "p" * 2000

    def setUp(self):
        super().setUp()
        self.sender = S2SSender(
            self.ctx, self.connector,
            lambda handler: XmppStream(handler, self.clock, output_high_water=self.HIGH_WATER),
            SenderSettings(max_stanzas=1000, max_bytes=10_000_000), rng=self.sender.rng)

    def test_a_queue_flushed_in_a_read_stops_at_the_mark_and_the_rest_stays_queued(self):
        count = 300  # about 630 KB
        for n in range(count):
            self.sender.send("chat.gw.example", "remote.example", message(n, pad=self.PAD))
        domain, factory, d = self.connector.attempts[-1]
        stream = factory(None)
        transport = BufferingTransport()
        peer = MemoryStream(None, self.clock, stream=stream, transport=transport)
        d.callback(stream)
        peer.stream.dataReceived(
            b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
            b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
            b"id='S' from='remote.example' version='1.0'><stream:features><dialback "
            b"xmlns='urn:xmpp:features:dialback'/></stream:features>")
        before = transport.io.tell()
        peer.stream.dataReceived(b"<db:result from='remote.example' to='chat.gw.example' type='valid'/>")
        written = transport.io.tell() - before
        self.assertIsNotNone(transport.paused_at, "the transport paused within the read")
        self.assertFalse(stream.writable)
        stanza_size = len(message(0, pad=self.PAD).toXml()) + 100
        self.assertLessEqual(written, transport.buffer_size + self.HIGH_WATER + 64 * 1024 + stanza_size)
        peer.read()
        delivered = self.delivered_ids(peer)
        self.assertEqual(delivered, [f"m{n}" for n in range(len(delivered))])
        self.assertLess(len(delivered), count // 2)
        out = self.sender.outcomes()
        self.assertEqual((out["delivered"], self.sender.pending_stanza_count("remote.example")),
                         (len(delivered), count - len(delivered)),
                         "without XEP-0198 only what the transport took counts delivered")
        # the socket drains: the rest follows, in order, mark by mark
        for _ in range(20):
            if not self.sender.pending_stanza_count():
                break
            transport.drain()
        peer.read()
        self.assertEqual(self.delivered_ids(peer), [f"m{n}" for n in range(count)])
        self.assertEqual(self.sender.outcomes()["delivered"], count)


class ConfigTests(unittest.TestCase):
    def test_defaults_and_errors_name_the_key(self):
        from fedgate.config import ConfigError, parse_config

        base = {"domains": ["gw.example"], "state_dir": "/nonexistent/fedgate-test"}
        config = parse_config(base, "<t>")
        self.assertEqual((config.s2s.output_high_water, config.components.output_high_water,
                          config.components.queue_max_stanzas, config.components.queue_max_bytes),
                         (1024 * 1024, 1024 * 1024, 1000, 4 * 1024 * 1024))
        for section, key in (("s2s", "output_high_water"), ("components", "output_high_water"),
                             ("components", "queue_max_stanzas"), ("components", "queue_max_bytes")):
            with self.assertRaises(ConfigError) as caught:
                parse_config(dict(base, **{section: {key: 0}}), "<t>")
            self.assertIn(f"{section}.{key}", str(caught.exception))
