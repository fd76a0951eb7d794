"""Tests for fedgate.stream.protocol: the XmppStream shim, without sockets.

A small fake handler stands in for a stream role; a StringTransport and a
task.Clock stand in for the connection and time.  What we wrote is parsed
back with Twisted's own domish element stream, so the checks do not lean on
fedgate's parser.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface.verify import verifyClass, verifyObject

from fedgate.stream import namespaces as ns
from tests.support.rawpeer import Reply as Written
from fedgate.stream import protocol as protocol_module
from fedgate.stream.errors import StanzaFailure, StreamFailure
from fedgate.stream.interfaces import BACKPRESSURE, RATE_LIMIT, IStreamHandler, IXmppStream
from fedgate.stream.protocol import CLOSE_GRACE, XmppStream
from fedgate.tls.contexts import TLSInfo

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server'"
          b" xmlns:stream='http://etherx.jabber.org/streams'"
          b" xmlns:db='jabber:server:dialback' to='a.example' from='b.example' version='1.0'>")


class AbortRecordingTransport(StringTransport):
    aborted = False

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


class FakeHandler:
    """Records every call; optional hooks decide what happens on input."""

    def __init__(self):
        self.io = None
        self.headers: list = []
        self.elements: list = []
        self.rejected: list = []
        self.lost: list = []
        self.on_connected = None
        self.on_header = None
        self.on_element = None

    def connected(self, io):
        self.io = io
        if self.on_connected:
            self.on_connected()

    def header_received(self, header):
        self.headers.append(header)
        if self.on_header:
            self.on_header(header)
        else:
            self.io.open_stream({"id": "sid-1", "from": "a.example", "version": "1.0"})

    def element_received(self, element):
        self.elements.append(element)
        if self.on_element:
            self.on_element(element)

    def reject_stanza(self, stanza, failure):
        self.rejected.append((stanza.getAttribute("id"), failure.condition))

    def error_header(self):
        return {"id": "err-id", "from": "a.example", "version": "1.0"}

    def tls_established(self, info):
        pass

    def disconnected(self, reason):
        self.lost.append(reason)


class StreamCase(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.handler = FakeHandler()
        self.transport = AbortRecordingTransport()

    def connect(self, **kwargs) -> XmppStream:
        self.stream = XmppStream(self.handler, self.clock, **kwargs)
        self.stream.makeConnection(self.transport)
        return self.stream

    def written(self) -> Written:
        return Written(self.transport.value())

    def assert_closed_with(self, condition: str) -> Written:
        """One stream error ``condition``, then our close, then the TCP close."""
        out = self.written()
        self.assertEqual(out.stream_errors(), [condition])
        self.assertEqual(out.elements[-1].name, "error", "the error is the last thing written")
        self.assertTrue(out.ended, "no </stream:stream> after the error")
        self.assertEqual(self.transport.value().count(b"<stream:stream"), 1)
        self.assertTrue(self.transport.disconnecting)
        return out


def fail_with(condition):
    def hook(*_):
        raise StreamFailure(condition, "test")
    return hook


def raise_bug(*_):
    raise RuntimeError("handler bug")


class StreamErrorTests(StreamCase):
    def test_failure_before_our_header_sends_header_first(self):
        self.handler.on_header = fail_with("host-unknown")
        self.connect().dataReceived(HEADER)
        out = self.assert_closed_with("host-unknown")
        data = self.transport.value()
        self.assertTrue(data.startswith(b"<?xml version='1.0'?><stream:stream "))
        self.assertLess(data.index(b"<stream:stream "), data.index(b"xmpp-streams"))
        self.assertTrue(data.endswith(b"</stream:stream>"))
        self.assertEqual((out.root.uri, out.root.name), (ns.STREAMS, "stream"))
        self.assertEqual((out.root["id"], out.root["from"]), ("err-id", "a.example"))
        self.assertEqual(out.root.defaultUri, ns.SERVER)

    def test_bad_xml_before_any_header(self):
        self.connect().dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        out = self.assert_closed_with("not-well-formed")
        self.assertEqual(out.root["id"], "err-id")
        self.assertEqual(self.handler.headers, [])

    def test_malformed_stanza_after_its_text_is_not_an_internal_error(self):
        """Found by the fuzzer: a mismatched tag after text inside a
        stanza was an AttributeError in the parser's close (an
        internal-server-error and a traceback per connection), not the
        stream error the peer earned."""
        self.connect().dataReceived(HEADER + b"<message><body>hello</wrong>")
        self.assert_closed_with("not-well-formed")

    def test_failure_when_connected(self):
        self.handler.on_connected = fail_with("policy-violation")
        self.connect()
        self.assert_closed_with("policy-violation")

    def test_failure_after_our_header_sends_no_second_header(self):
        self.handler.on_element = fail_with("not-authorized")
        self.connect().dataReceived(HEADER + b"<message/>")
        out = self.assert_closed_with("not-authorized")
        self.assertEqual(out.root["id"], "sid-1")

    def test_nothing_after_a_raised_stream_error_is_handled(self):
        self.handler.on_element = fail_with("not-authorized")
        stream = self.connect()
        stream.dataReceived(HEADER + b"<message id='1'/><message id='2'/><presence id='3'/>")
        self.assertEqual([e["id"] for e in self.handler.elements], ["1"])
        stream.dataReceived(b"<message id='4'/>")
        self.assertEqual(len(self.handler.elements), 1)
        self.assert_closed_with("not-authorized")

    def test_nothing_after_fail_called_by_the_handler_is_handled(self):
        # The handler reports the error itself and returns normally; the
        # parser must still not deliver the rest of the chunk.
        self.handler.on_element = lambda e: self.handler.io.fail("policy-violation")
        stream = self.connect()
        stream.dataReceived(HEADER + b"<message id='1'/><message id='2'/></stream:stream>")
        self.assertEqual([e["id"] for e in self.handler.elements], ["1"])
        self.assert_closed_with("policy-violation")

    def test_fail_twice_sends_one_error(self):
        stream = self.connect()
        stream.dataReceived(HEADER)
        stream.fail("conflict")
        stream.fail("reset")
        self.assert_closed_with("conflict")

    def test_stanza_failure_rejects_only_that_stanza(self):
        def hook(element):
            if element["id"] == "bad":
                raise StanzaFailure("not-acceptable")
        self.handler.on_element = hook
        self.connect().dataReceived(HEADER + b"<message id='bad'/><message id='good'/>")
        self.assertEqual(self.handler.rejected, [("bad", "not-acceptable")])
        self.assertEqual([e["id"] for e in self.handler.elements], ["bad", "good"])
        self.assertFalse(self.transport.disconnecting)


class HandlerExceptionTests(StreamCase):
    def test_exception_on_a_stanza_rejects_it_and_keeps_the_stream(self):
        self.handler.on_element = lambda e: raise_bug() if e.getAttribute("id") == "bad" else None
        self.connect().dataReceived(HEADER + b"<iq id='bad' type='get'/><message id='next'/>")
        self.assertEqual(self.handler.rejected, [("bad", "internal-server-error")])
        self.assertEqual([e["id"] for e in self.handler.elements], ["bad", "next"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.written().stream_errors(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_exception_on_a_non_stanza_element_is_a_stream_error(self):
        self.handler.on_element = raise_bug
        self.connect().dataReceived(
            HEADER + b"<db:result from='b.example' to='a.example'>k</db:result><message id='x'/>")
        self.assert_closed_with("internal-server-error")
        self.assertEqual(self.handler.rejected, [])
        self.assertEqual(len(self.handler.elements), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_message_in_a_foreign_namespace_is_not_a_stanza(self):
        self.handler.on_element = raise_bug
        self.connect().dataReceived(HEADER + b"<message xmlns='urn:not-xmpp' id='m'/>")
        self.assert_closed_with("internal-server-error")
        self.assertEqual(self.handler.rejected, [])
        self.flushLoggedErrors(RuntimeError)

    def test_exception_in_disconnected_is_contained(self):
        stream = self.connect()
        self.handler.disconnected = raise_bug
        stream.connectionLost(Failure(ConnectionError("gone")))
        self.assertTrue(stream.closed)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class RestartTests(StreamCase):
    def test_restart_drops_the_rest_of_the_chunk(self):
        def hook(element):
            if element.name == "proceed":
                self.handler.io.restart()
        self.handler.on_element = hook
        stream = self.connect()
        stream.dataReceived(HEADER + b"<proceed xmlns='urn:test'/><message id='old'/>")
        self.assertEqual([e.name for e in self.handler.elements], ["proceed"])
        self.assertEqual(len(self.handler.headers), 1)
        # The next bytes are a fresh stream: a new header is accepted.
        stream.dataReceived(HEADER + b"<message id='new'/>")
        self.assertEqual(len(self.handler.headers), 2)
        self.assertEqual([e.getAttribute("id") for e in self.handler.elements], [None, "new"])
        self.assertFalse(self.transport.disconnecting)

    def test_error_after_restart_gets_a_new_header_first(self):
        stream = self.connect()
        stream.dataReceived(HEADER)
        stream.restart()
        self.transport.clear()
        stream.dataReceived(b"<!-- not a header -->")
        self.assert_closed_with("restricted-xml")
        self.assertEqual(self.written().root["id"], "err-id")

    def test_initiator_restart_sends_its_header_once(self):
        """The initiating side writes its new header as part of the restart;
        a later stream error must not repeat it (the peer would see a second
        header as not-well-formed instead of our error)."""
        def hook(element):
            if element.name == "proceed":
                self.handler.io.restart(lambda: self.handler.io.open_stream({"to": "b.example"}))
        self.handler.on_element = hook
        stream = self.connect()
        stream.open_stream({"to": "b.example"})
        stream.dataReceived(HEADER + b"<proceed xmlns='urn:test'/>")
        stream.fail("policy-violation", "operator")
        written = self.transport.value()
        # ours, the fake handler's answer to HEADER, our restart header; no fourth
        self.assertEqual(written.count(b"<stream:stream"), 3, written)
        self.assertLess(written.rindex(b"<stream:stream"), written.index(b"<stream:error>"))

    def test_restart_outside_parsing_replaces_the_parser(self):
        stream = self.connect()
        stream.dataReceived(HEADER + b"<message id='1'/><message")
        stream.restart()
        stream.dataReceived(HEADER + b"<message id='2'/>")
        self.assertEqual([e["id"] for e in self.handler.elements], ["1", "2"])
        self.assertEqual(len(self.handler.headers), 2)
        self.assertFalse(self.transport.disconnecting)


class CloseTests(StreamCase):
    def test_grace_timer_aborts_when_the_peer_never_closes(self):
        stream = self.connect()
        stream.dataReceived(HEADER)
        stream.close()
        self.assertTrue(self.transport.value().endswith(b"</stream:stream>"))
        self.assertTrue(self.transport.disconnecting)
        self.clock.advance(CLOSE_GRACE - 0.5)
        self.assertFalse(self.transport.aborted)
        self.clock.advance(1.0)
        self.assertTrue(self.transport.aborted)

    def test_grace_timer_cancelled_when_the_connection_goes(self):
        stream = self.connect()
        stream.dataReceived(HEADER)
        stream.fail("system-shutdown")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        stream.connectionLost(Failure(ConnectionError("closed")))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.handler.lost), 1)
        self.clock.advance(CLOSE_GRACE * 2)
        self.assertFalse(self.transport.aborted)

    def test_peer_closing_its_stream_closes_ours(self):
        stream = self.connect()
        stream.dataReceived(HEADER + b"<message id='1'/></stream:stream>")
        out = self.written()
        self.assertTrue(out.ended)
        self.assertEqual(out.stream_errors(), [])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len(self.handler.elements), 1)

    def test_close_before_our_header_writes_nothing(self):
        stream = self.connect()
        stream.close()
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(self.transport.disconnecting)

    def test_send_after_close_is_dropped(self):
        stream = self.connect()
        stream.dataReceived(HEADER)
        stream.close()
        stream.send("<message/>")
        self.assertTrue(self.transport.value().endswith(b"</stream:stream>"))


class TrafficLogTests(StreamCase):
    def setUp(self):
        super().setUp()
        self.events: list = []
        self.patch(protocol_module, "log", Logger(namespace="test", observer=self.events.append))

    def xml_lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_format", "").startswith("XML ")]

    def exchange(self, **kwargs) -> str:
        stream = self.connect(log_traffic=True, **kwargs)
        stream.dataReceived(HEADER + b"<message id='in'><body>incoming secret</body></message>")
        stream.send("<message id='out'><body xml:lang='en'>outgoing\nsecret</body></message>")
        return "\n".join(self.xml_lines())

    def test_bodies_redacted_by_default(self):
        text = self.exchange()
        self.assertNotIn("secret", text)
        self.assertEqual(text.count("[redacted]"), 2)
        self.assertIn("<message id='in'><body>[redacted]</body></message>", text)
        self.assertIn("<body xml:lang='en'>[redacted]</body>", text)

    def test_bodies_logged_when_asked(self):
        text = self.exchange(log_bodies=True)
        self.assertIn("incoming secret", text)
        self.assertIn("outgoing\nsecret", text)
        self.assertNotIn("[redacted]", text)

    def test_no_traffic_log_unless_enabled(self):
        stream = self.connect()
        stream.dataReceived(HEADER + b"<message><body>x</body></message>")
        self.assertEqual(self.xml_lines(), [])


class DeclaredInterfaceTests(StreamCase):
    """The stream provides IXmppStream, every role IStreamHandler, and
    reading is paused per reason."""

    def test_stream_provides_its_declared_interface(self):
        self.assertTrue(verifyObject(IXmppStream, self.connect()))

    def test_every_role_declares_the_handler_interface(self):
        from fedgate.component.accept import ComponentAccept
        from fedgate.component.listener import ComponentListenerStream
        from fedgate.component.xep0225 import Xep0225Stream
        from fedgate.s2s.inbound import InboundS2S
        from fedgate.s2s.outbound import OutboundS2S
        from fedgate.s2s.verifier import VerifyStream
        for role in (InboundS2S, OutboundS2S, VerifyStream, ComponentAccept, ComponentListenerStream,
                     Xep0225Stream):
            self.assertTrue(verifyClass(IStreamHandler, role), role)

    def test_both_component_protocols_are_component_sessions(self):
        """The router and the admin API see components only through
        IComponentSession (no getattr on handlers)."""
        from fedgate.component.accept import ComponentAccept
        from fedgate.component.session import IComponentSession
        from fedgate.component.xep0225 import Xep0225Stream
        for role in (ComponentAccept, Xep0225Stream):
            self.assertTrue(verifyClass(IComponentSession, role), role)

    def test_tls_established_reaches_the_handler(self):
        seen = []
        self.handler.tls_established = seen.append
        stream = self.connect()
        stream.transport.getHandle = lambda: None
        info = TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", None)
        self.patch(protocol_module, "tls_info", lambda handle: info)
        stream.handshakeCompleted()
        self.assertEqual(seen, [info])

    def test_one_reason_does_not_undo_another(self):
        stream = self.connect()
        stream.pause_reading(RATE_LIMIT)
        stream.pause_reading(RATE_LIMIT)  # the same reason holds one pause
        stream.pause_reading(BACKPRESSURE)
        self.assertEqual(self.transport.producerState, "paused")
        stream.resume_reading(RATE_LIMIT)
        self.assertEqual(self.transport.producerState, "paused", "backpressure still holds")
        self.assertEqual(stream.paused_for, {BACKPRESSURE})
        stream.resume_reading(RATE_LIMIT)  # not held any more: nothing happens
        self.assertEqual(self.transport.producerState, "paused")
        stream.resume_reading(BACKPRESSURE)
        self.assertEqual(self.transport.producerState, "producing")

    def test_no_pause_after_close(self):
        stream = self.connect()
        stream.connectionLost(Failure(RuntimeError("gone")))
        stream.pause_reading(RATE_LIMIT)
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(stream.paused_for, frozenset())

    def test_hand_over_connects_the_new_handler(self):
        stream = self.connect()
        other = FakeHandler()
        stream.hand_over(other)
        self.assertIs(other.io, stream)
        stream.dataReceived(HEADER)
        self.assertEqual(len(other.headers), 1)
        self.assertEqual(self.handler.headers, [])

    def test_stanza_namespace(self):
        stream = self.connect()
        stream.set_stanza_namespace(ns.CLIENT)
        stream.open_stream({"id": "x"})
        self.assertIn(b"xmlns='jabber:client'", self.transport.value())
        self.assertNotIn(b"xmlns:db=", self.transport.value())


class CountingTransport(AbortRecordingTransport):
    """Records each write separately, and what was written when TLS started."""

    def __init__(self):
        super().__init__()
        self.writes: list[bytes] = []
        self.before_tls: bytes | None = None

    def write(self, data):
        self.writes.append(data)
        super().write(data)

    def startTLS(self, creator):
        self.before_tls = self.value()


class CoalescedWriteTests(StreamCase):
    """What the stream writes while it handles one read goes to the transport
    as one write at the end of that read (a TLS record and Twisted's write
    bookkeeping per handshake step instead of per piece)."""

    def setUp(self):
        super().setUp()
        self.transport = CountingTransport()

    def test_header_and_features_in_one_write(self):
        def answer(header):
            features = protocol_module.domish.Element((ns.STREAMS, "features"))
            features.addElement((ns.DIALBACK_FEATURE, "dialback"))
            self.handler.io.open_stream({"id": "sid-1", "from": "a.example"}, features)
        self.handler.on_header = answer
        self.connect().dataReceived(HEADER)
        self.assertEqual(len(self.transport.writes), 1)
        out = self.written()
        self.assertEqual([e.name for e in out.elements], ["features"])

    def test_several_answers_to_one_read_in_one_write_in_order(self):
        self.handler.on_element = lambda element: self.handler.io.send(
            f"<r n='{element.getAttribute('n')}'/>")
        stream = self.connect()
        stream.dataReceived(HEADER)
        self.transport.writes.clear()
        stream.dataReceived(b"<x n='1'/><x n='2'/><x n='3'/>")
        self.assertEqual(self.transport.writes, [b"<r n='1'/><r n='2'/><r n='3'/>"])

    def test_writes_outside_a_read_go_at_once(self):
        stream = self.connect()
        stream.dataReceived(HEADER)
        self.transport.writes.clear()
        stream.send("<a/>")
        stream.send("<b/>")
        self.assertEqual(self.transport.writes, [b"<a/>", b"<b/>"])

    def test_proceed_goes_out_before_tls_starts(self):
        def on_starttls(element):
            self.handler.io.send("<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            self.handler.io.start_tls(object())
        self.handler.on_element = on_starttls
        stream = self.connect()
        stream.dataReceived(HEADER)
        stream.dataReceived(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        self.assertTrue(self.transport.before_tls.endswith(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"))

    def test_stream_error_in_a_read_is_written_before_the_close(self):
        self.handler.on_element = fail_with("policy-violation")
        stream = self.connect()
        stream.dataReceived(HEADER + b"<x/>")
        self.assertEqual(len(self.transport.writes), 1)
        self.assert_closed_with("policy-violation")

    def test_nothing_written_after_the_connection_is_lost_in_a_read(self):
        def lose(element):
            self.handler.io.send("<late/>")
            stream.connectionLost(Failure(ConnectionError("gone")))
        self.handler.on_element = lose
        stream = self.connect()
        stream.dataReceived(HEADER)
        self.transport.writes.clear()
        stream.dataReceived(b"<x/>")
        self.assertEqual(self.transport.writes, [])


class SendingTransport(CountingTransport):
    """A TCP-like transport: doWrite sends what write buffered (as the
    reactor would on its next turn), and counts the calls."""

    _writeDisconnected = False

    def __init__(self):
        super().__init__()
        self.sent = b""
        self.do_writes = 0

    def doWrite(self):
        self.do_writes += 1
        self.sent = self.value()


class SendNowTests(StreamCase):
    def setUp(self):
        super().setUp()
        self.transport = SendingTransport()

    def test_the_answer_to_a_read_is_sent_at_once(self):
        stream = self.connect()
        stream.dataReceived(HEADER)
        self.assertEqual(self.transport.do_writes, 1)
        self.assertEqual(self.transport.sent, self.transport.value())

    def test_writes_outside_a_read_are_left_to_the_reactor(self):
        stream = self.connect()
        stream.dataReceived(HEADER)
        stream.send("<a/>")
        self.assertEqual(self.transport.do_writes, 1)

    def test_nothing_sent_by_hand_once_the_transport_is_disconnecting(self):
        self.handler.on_element = lambda element: (self.handler.io.send("<r/>"),
                                                   setattr(self.transport, "disconnecting", True))
        stream = self.connect()
        stream.dataReceived(HEADER)
        stream.dataReceived(b"<x/>")
        self.assertEqual(self.transport.do_writes, 1)  # the header's only
        self.assertTrue(self.transport.value().endswith(b"<r/>"))

    def test_a_read_that_writes_nothing_sends_nothing(self):
        self.handler.on_header = lambda header: None
        self.connect().dataReceived(HEADER)
        self.assertEqual(self.transport.do_writes, 0)


class CrossStreamWriteTests(unittest.SynchronousTestCase):
    """What one stream's read makes other streams write (the <db:verify> on
    a verification connection, the <db:result> answer on an inbound stream,
    stanzas routed to a component) is written once per stream at the end of
    that read and sent at once, without waiting for the reactor's next
    turn."""

    def setUp(self):
        self.clock = Clock()
        self.streams = []
        for _ in range(3):
            handler = FakeHandler()
            transport = SendingTransport()
            stream = XmppStream(handler, self.clock)
            stream.makeConnection(transport)
            stream.dataReceived(HEADER)
            transport.writes.clear()
            transport.do_writes = 0
            transport.clear()
            self.streams.append((stream, handler, transport))

    def test_writes_to_another_stream_go_out_within_the_read(self):
        (reader, handler, _), (other, _, transport), _ = self.streams
        seen_during_read = []

        def route(element):
            other.send(f"<m n='{element.getAttribute('n')}'/>")
            seen_during_read.append(transport.value())
        handler.on_element = route
        reader.dataReceived(b"<x n='1'/><x n='2'/>")
        self.assertEqual(seen_during_read, [b"", b""], "kept until the read ends")
        self.assertEqual(transport.writes, [b"<m n='1'/><m n='2'/>"], "one write for the read")
        self.assertEqual(transport.do_writes, 1, "sent at once, not on the reactor's next turn")
        self.assertEqual(transport.sent, b"<m n='1'/><m n='2'/>")

    def test_each_stream_written_to_gets_its_own_write_in_order(self):
        (reader, handler, reader_transport), (b, _, tb), (c, _, tc) = self.streams
        handler.on_element = lambda element: (c.send("<c1/>"), b.send("<b1/>"), c.send("<c2/>"),
                                              reader.send("<r/>"))
        reader.dataReceived(b"<x/>")
        self.assertEqual(reader_transport.writes, [b"<r/>"])
        self.assertEqual(tb.writes, [b"<b1/>"])
        self.assertEqual(tc.writes, [b"<c1/><c2/>"])
        self.assertEqual((reader_transport.do_writes, tb.do_writes, tc.do_writes), (1, 1, 1))

    def test_a_stream_closed_during_the_read_writes_its_close_and_nothing_after(self):
        (reader, handler, _), (other, _, transport), _ = self.streams

        def close_other(element):
            other.send("<bye/>")
            other.close()
            other.send("<late/>")
        handler.on_element = close_other
        reader.dataReceived(b"<x/>")
        self.assertEqual(transport.value(), b"<bye/></stream:stream>")
        self.assertTrue(transport.disconnecting)

    def test_a_stream_lost_during_the_read_writes_nothing(self):
        (reader, handler, _), (other, _, transport), _ = self.streams

        def lose_other(element):
            other.send("<m/>")
            other.connectionLost(Failure(ConnectionError("gone")))
        handler.on_element = lose_other
        reader.dataReceived(b"<x/>")
        self.assertEqual(transport.writes, [])

    def test_a_failing_flush_of_one_stream_spares_the_others(self):
        (reader, handler, _), (b, _, tb), (c, _, tc) = self.streams

        def broken_write(data):
            raise RuntimeError("transport bug")
        tb.write = broken_write
        handler.on_element = lambda element: (b.send("<b/>"), c.send("<c/>"))
        reader.dataReceived(b"<x/>")
        self.assertEqual(tc.writes, [b"<c/>"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        # and the next read starts a fresh batch: b writes go at once again
        tb.write = SendingTransport.write.__get__(tb)
        b.send("<after/>")
        self.assertEqual(tb.writes, [b"<after/>"])

    def test_outside_any_read_writes_go_to_the_transport_at_once(self):
        _, (other, _, transport), _ = self.streams
        other.send("<a/>")
        other.send("<b/>")
        self.assertEqual(transport.writes, [b"<a/>", b"<b/>"])
        self.assertEqual(transport.do_writes, 0, "left to the reactor, as before")
