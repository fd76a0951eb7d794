"""The parser's bounds on names, namespace declarations and attribute values,
its split cache, and the end of its reference cycle with expat."""

from __future__ import annotations

import gc
import weakref

from twisted.internet.testing import StringTransport
from twisted.internet.task import Clock
from twisted.trial import unittest

from fedgate.stream import parser as parser_module
from fedgate.stream.errors import StreamFailure
from fedgate.stream.parser import MAX_HEADER_ATTRIBUTE_BYTES, Limits, StreamParser
from fedgate.stream.protocol import XmppStream

DECL = b"<?xml version='1.0'?>"
STREAM_NS = b"xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'"
# three declarations of its own: the default namespace, stream and db
HEADER = (DECL + b"<stream:stream " + STREAM_NS + b" xmlns:db='jabber:server:dialback'"
          b" to='a.example' from='b.example' version='1.0'>")
LIMITS = Limits()


def header_with(extra: bytes) -> bytes:
    return (DECL + b"<stream:stream " + STREAM_NS + b" xmlns:db='jabber:server:dialback'"
            + extra + b" to='a.example' from='b.example' version='1.0'>")


def declarations(count: int, start: int = 0) -> bytes:
    return b"".join(b" xmlns:p%d='urn:example:%d'" % (i, i) for i in range(start, start + count))


class Sink:
    def __init__(self, limits: Limits = LIMITS):
        self.headers, self.elements, self.ended = [], [], []
        self.parser = StreamParser(self.headers.append, self.elements.append,
                                   lambda: self.ended.append(True), limits)


class BoundsTests(unittest.SynchronousTestCase):
    def refused(self, *chunks: bytes, limits: Limits = LIMITS) -> StreamFailure:
        sink = Sink(limits)
        with self.assertRaises(StreamFailure) as caught:
            for chunk in chunks:
                sink.parser.feed(chunk)
        self.assertEqual(caught.exception.condition, "policy-violation", caught.exception)
        self.assertTrue(sink.parser.closed, "a failed parser lets go of expat at once")
        return caught.exception

    def accepted(self, *chunks: bytes, limits: Limits = LIMITS) -> Sink:
        sink = Sink(limits)
        for chunk in chunks:
            sink.parser.feed(chunk)
        return sink

    # -- namespace declarations ------------------------------------------------
    def test_header_namespace_flood_is_refused(self):
        # The attack of the issue: 20,000 declarations in the header.
        failure = self.refused(header_with(declarations(20000)))
        self.assertEqual(failure.text, "too many namespace declarations")

    def test_header_declarations_up_to_the_limit_are_accepted(self):
        limit = LIMITS.max_namespace_declarations
        sink = self.accepted(header_with(declarations(limit - 3)))  # 3 in HEADER already
        self.assertEqual(len(sink.headers[0].namespaces), limit)
        self.refused(header_with(declarations(limit - 2)))

    def test_element_declarations_are_bounded(self):
        limit = LIMITS.max_namespace_declarations
        ok = b"<message" + declarations(limit) + b"/>"
        sink = self.accepted(HEADER, ok)
        self.assertEqual(len(sink.elements), 1)
        self.refused(HEADER, b"<message" + declarations(limit + 1) + b"/>")

    def test_declarations_counted_per_element(self):
        limit = LIMITS.max_namespace_declarations
        nested = (b"<message" + declarations(limit) + b"><x" + declarations(limit, limit)
                  + b"/></message>")
        self.assertEqual(len(self.accepted(HEADER, nested).elements), 1)

    def test_configured_declaration_limit(self):
        small = Limits(max_namespace_declarations=4)
        self.accepted(HEADER, b"<message" + declarations(4) + b"/>", limits=small)
        self.refused(HEADER, b"<message" + declarations(5) + b"/>", limits=small)

    def test_long_namespace_name_is_refused(self):
        uri = b"urn:" + b"x" * LIMITS.max_name_bytes
        self.refused(HEADER, b"<message xmlns:p='" + uri + b"'/>")
        self.refused(HEADER, b"<message xmlns='" + uri + b"'/>")
        self.accepted(HEADER, b"<message xmlns='" + uri[:LIMITS.max_name_bytes] + b"'/>")

    def test_long_prefix_is_refused(self):
        prefix = b"p" * (LIMITS.max_name_bytes + 1)
        self.refused(HEADER, b"<message xmlns:" + prefix + b"='urn:x'/>")

    # -- names ---------------------------------------------------------------------
    def test_long_element_name_is_refused(self):
        failure = self.refused(HEADER, b"<" + b"n" * (400 * 1024) + b"/>")
        self.assertEqual(failure.text, "element name too long")

    def test_element_name_at_the_limit_is_accepted(self):
        name = b"n" * LIMITS.max_name_bytes
        sink = self.accepted(HEADER, b"<" + name + b"/>")
        self.assertEqual(sink.elements[0].name, name.decode())
        self.refused(HEADER, b"<" + name + b"n/>")

    def test_name_limit_counts_bytes_not_characters(self):
        name = "\u00e9" * (LIMITS.max_name_bytes // 2 + 1)  # two bytes each
        self.refused(HEADER, b"<" + name.encode() + b"/>")

    def test_long_child_and_prefixed_names_are_refused(self):
        long = b"n" * (LIMITS.max_name_bytes + 1)
        self.refused(HEADER, b"<message><" + long + b"/></message>")
        self.refused(HEADER, b"<message xmlns:p='urn:x'><p:" + long + b"/></message>")

    def test_long_header_name_is_refused(self):
        long = b"s" * (LIMITS.max_name_bytes + 1)
        self.refused(DECL + b"<stream:" + long + b" " + STREAM_NS + b">")

    def test_long_attribute_name_is_refused(self):
        long = b"a" * (LIMITS.max_name_bytes + 1)
        failure = self.refused(HEADER, b"<message " + long + b"='1'/>")
        self.assertEqual(failure.text, "attribute name too long")
        self.refused(HEADER, b"<message xmlns:p='urn:x' p:" + long + b"='1'/>")
        self.refused(header_with(b" " + long + b"='1'"))

    # -- attribute values and counts -------------------------------------------------
    def test_attribute_value_is_bounded(self):
        limit = LIMITS.max_attribute_bytes
        sink = self.accepted(HEADER, b"<message id='" + b"v" * limit + b"'/>")
        self.assertEqual(len(sink.elements[0]["id"]), limit)
        failure = self.refused(HEADER, b"<message id='" + b"v" * (limit + 1) + b"'/>")
        self.assertEqual(failure.text, "attribute value too long")

    def test_a_longest_jid_passes_in_a_stanza_and_the_header(self):
        jid = b"l" * 1023 + b"@" + b"d" * 1023 + b"/" + b"r" * 1023
        self.assertEqual(len(jid), MAX_HEADER_ATTRIBUTE_BYTES)
        self.accepted(HEADER, b"<message to='" + jid + b"'/>")
        self.accepted(header_with(b" id='" + jid + b"'"))

    def test_header_attribute_values_are_held_to_a_jid(self):
        self.refused(header_with(b" id='" + b"i" * (MAX_HEADER_ATTRIBUTE_BYTES + 1) + b"'"))

    def test_configured_attribute_limit(self):
        small = Limits(max_attribute_bytes=16)
        self.accepted(HEADER, b"<message id='" + b"v" * 16 + b"'/>", limits=small)
        self.refused(HEADER, b"<message id='" + b"v" * 17 + b"'/>", limits=small)
        self.refused(header_with(b" id='" + b"v" * 17 + b"'"), limits=small)

    def test_attribute_count_is_bounded_in_the_header_too(self):
        many = b"".join(b" a%d='1'" % i for i in range(LIMITS.max_attributes + 1))
        self.refused(header_with(many))

    def test_the_check_comes_before_the_split_cache(self):
        parser_module._split_cached.cache_clear()
        sink = Sink()
        sink.parser.feed(HEADER)
        before = parser_module._split_cached.cache_info().currsize
        with self.assertRaises(StreamFailure):
            sink.parser.feed(b"<q xmlns:p='urn:x' p:" + b"q" * (LIMITS.max_name_bytes + 1) + b"='1'/>")
        self.assertEqual(parser_module._split_cached.cache_info().currsize, before)


class SplitCacheTests(unittest.SynchronousTestCase):
    def test_long_names_are_never_cached(self):
        # Even with the name limit raised far past the cache's own bound.
        parser_module._split_cached.cache_clear()
        wide = Limits(max_name_bytes=1 << 20)
        sink = Sink(wide)
        sink.parser.feed(HEADER)
        parser_module._split_cached.cache_clear()
        short_name = "urn:example:short"
        long_name = "l" * (parser_module._CACHED_NAME + 1)
        sink.parser.feed(f"<{long_name} xmlns='{short_name}'/>".encode())
        sink.parser.feed(f"<n xmlns='{short_name}'/>".encode())
        self.assertEqual([e.name for e in sink.elements], [long_name, "n"])
        cached = parser_module._split_cached.cache_parameters()
        self.assertEqual(cached["maxsize"], 1024)
        info = parser_module._split_cached.cache_info()
        self.assertEqual(info.currsize, 1, "only the short name is kept")
        self.assertEqual(parser_module._split(f"{short_name} n"), (short_name, "n", None))
        self.assertEqual(parser_module._split_cached.cache_info().hits, info.hits + 1)


class CycleTests(unittest.SynchronousTestCase):
    """With the cyclic collector off, a closed parser is freed by reference
    counting alone: it holds no cycle with its expat parser."""

    def setUp(self):
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)

    def test_closed_parser_is_freed_at_once(self):
        sink = Sink()
        sink.parser.feed(header_with(declarations(20)))
        ref = weakref.ref(sink.parser)
        sink.parser.close()
        sink.parser = None
        self.assertIsNone(ref(), "the closed parser is gone without gc")

    def test_failed_parser_is_freed_at_once(self):
        sink = Sink()
        with self.assertRaises(StreamFailure):
            sink.parser.feed(header_with(declarations(20000)))
        ref = weakref.ref(sink.parser)
        sink.parser = None
        self.assertIsNone(ref())

    def test_close_inside_a_callback_drops_the_rest_of_the_chunk(self):
        holder = {}

        def on_element(element):
            seen.append(element.name)
            holder["parser"].close()

        seen: list = []
        holder["parser"] = StreamParser(lambda h: None, on_element, lambda: None)
        holder["parser"].feed(HEADER + b"<a/><b/><c/>")
        self.assertEqual(seen, ["a"])
        holder["parser"].feed(b"<d/>")
        self.assertEqual(seen, ["a"])
        ref = weakref.ref(holder.pop("parser"))
        self.assertIsNone(ref())

    def xmpp_stream(self):
        class Handler:
            def connected(self, stream):
                self.io = stream

            def header_received(self, header):
                self.io.open_stream({"from": "a.example"})

            def element_received(self, element):
                pass

            def error_header(self):
                return {}

            def disconnected(self, reason):
                pass

        stream = XmppStream(Handler(), Clock())
        stream.makeConnection(StringTransport())
        return stream

    def test_stream_close_frees_its_parser(self):
        stream = self.xmpp_stream()
        stream.dataReceived(header_with(declarations(20)))
        ref = weakref.ref(stream._parser)
        stream.close()
        stream._parser = None  # what the stream still holds is the closed parser alone
        self.assertIsNone(ref())

    def test_stream_error_frees_its_parser(self):
        stream = self.xmpp_stream()
        ref = weakref.ref(stream._parser)
        stream.dataReceived(header_with(declarations(20000)))
        self.assertIn(b"policy-violation", stream.transport.value())
        stream._parser = None
        self.assertIsNone(ref())

    def test_restart_frees_the_old_parser(self):
        stream = self.xmpp_stream()
        stream.dataReceived(HEADER)
        ref = weakref.ref(stream._parser)
        stream.restart()
        self.assertIsNone(ref(), "the old parser is gone without gc")
