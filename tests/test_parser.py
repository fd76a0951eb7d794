"""Tests for fedgate.stream.parser: the restricted, bounded stream parser."""

from __future__ import annotations

from twisted.trial import unittest

from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StreamFailure
from fedgate.stream.parser import TEXT_BUFFER, Limits, StreamParser

HEADER = ("<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'"
          " xmlns:db='jabber:server:dialback' to='a.example' from='b.example' version='1.0'>")
DECL = "<?xml version='1.0'?>"
OPEN = (DECL + HEADER).encode()

SMALL = Limits(max_stanza_bytes=4096, max_depth=4, max_elements=10, max_attributes=5)


class Recorder:
    """A parser plus everything its callbacks reported, in order."""

    def __init__(self, limits: Limits = Limits()):
        self.events: list = []
        self.parser = StreamParser(lambda h: self.events.append(("header", h)),
                                   lambda e: self.events.append(("element", e)),
                                   lambda: self.events.append(("end",)), limits)

    def feed(self, *chunks: bytes) -> "Recorder":
        for chunk in chunks:
            self.parser.feed(chunk)
        return self

    @property
    def header(self):
        return [e[1] for e in self.events if e[0] == "header"][0]

    @property
    def elements(self) -> list:
        return [e[1] for e in self.events if e[0] == "element"]


class ParserCase(unittest.SynchronousTestCase):
    def fails(self, condition: str, *chunks: bytes, limits: Limits = Limits()) -> Recorder:
        """Feed ``chunks``; assert a StreamFailure with ``condition``."""
        rec = Recorder(limits)
        with self.assertRaises(StreamFailure) as caught:
            rec.feed(*chunks)
        self.assertEqual(caught.exception.condition, condition, caught.exception)
        return rec


class HeaderTests(ParserCase):
    def test_header_fields(self):
        rec = Recorder().feed(DECL.encode(),
                              b"<stream:stream xmlns='jabber:server' xmlns:stream="
                              b"'http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback'"
                              b" to='a.example' version='1.0' xml:lang='en' xmlns:x='urn:x' x:extra='1'>")
        header = rec.header
        self.assertEqual(header.default_ns, ns.SERVER)
        self.assertEqual(header.prefix, "stream")
        self.assertEqual(header.namespaces, {None: ns.SERVER, "stream": ns.STREAMS,
                                             "db": ns.DIALBACK, "x": "urn:x"})
        self.assertEqual(header.attributes, {"to": "a.example", "version": "1.0",
                                             "xml:lang": "en", ("urn:x", "extra"): "1"})
        self.assertEqual(header.get("to"), "a.example")
        self.assertIsNone(header.get("from"))
        self.assertTrue(rec.parser.header_seen)
        self.assertEqual(rec.elements, [])

    def test_header_split_byte_by_byte(self):
        rec = Recorder().feed(*[OPEN[i:i + 1] for i in range(len(OPEN))])
        self.assertEqual(rec.header.attributes,
                         {"to": "a.example", "from": "b.example", "version": "1.0"})

    def test_no_header_yet(self):
        rec = Recorder().feed(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'")
        self.assertFalse(rec.parser.header_seen)
        self.assertEqual(rec.events, [])

    def test_header_without_default_namespace(self):
        rec = Recorder().feed(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>")
        self.assertIsNone(rec.header.default_ns)

    def test_root_not_stream(self):
        self.fails("bad-format", b"<message xmlns='jabber:server'>")

    def test_stream_in_wrong_namespace(self):
        self.fails("invalid-namespace", b"<stream:stream xmlns:stream='urn:not-streams'>")

    def test_stream_with_no_namespace(self):
        self.fails("invalid-namespace", b"<stream xmlns='jabber:server'>")

    def test_stream_prefix_other_than_stream(self):
        self.fails("bad-namespace-prefix",
                   b"<s:stream xmlns:s='http://etherx.jabber.org/streams' xmlns='jabber:server'>")

    def test_streams_namespace_as_default(self):
        self.fails("bad-namespace-prefix", b"<stream xmlns='http://etherx.jabber.org/streams'>")

    def test_undeclared_stream_prefix(self):
        self.fails("bad-namespace-prefix", b"<stream:stream xmlns='jabber:server'>")


class ElementTests(ParserCase):
    def test_stanza_namespaces(self):
        rec = Recorder().feed(OPEN,
                              b"<message to='x@a.example' from='y@b.example' xml:lang='de'>"
                              b"<body>hi</body><x xmlns='urn:ext'><y/></x>"
                              b"<p:q xmlns:p='urn:pre' p:attr='v'/></message>"
                              b"<db:result from='b.example' to='a.example'>key</db:result>")
        message, result = rec.elements
        self.assertEqual((message.uri, message.name, message.defaultUri), (ns.SERVER, "message", ns.SERVER))
        self.assertIsNone(message.parent)
        self.assertEqual(message["to"], "x@a.example")
        self.assertEqual(message.attributes[(ns.XML, "lang")], "de")
        body, x, q = list(message.elements())
        self.assertEqual((body.uri, str(body)), (ns.SERVER, "hi"))
        self.assertEqual((x.uri, x.defaultUri), ("urn:ext", "urn:ext"))
        self.assertEqual(next(x.elements()).uri, "urn:ext")
        self.assertEqual((q.uri, q.name), ("urn:pre", "q"))
        self.assertEqual(q.attributes, {("urn:pre", "attr"): "v"})
        self.assertEqual((result.uri, result.name, str(result)), (ns.DIALBACK, "result", "key"))
        self.assertEqual(result["from"], "b.example")

    def test_element_delivered_when_complete(self):
        rec = Recorder().feed(OPEN, b"<message id='1'/><message id=")
        self.assertEqual([e["id"] for e in rec.elements], ["1"])
        rec.feed(b"'2'/>")
        self.assertEqual([e["id"] for e in rec.elements], ["1", "2"])

    def test_byte_by_byte_gives_same_result(self):
        data = OPEN + "<message><body>caf\u00e9 \u2603</body></message>".encode()
        rec = Recorder().feed(*[data[i:i + 1] for i in range(len(data))])
        self.assertEqual(str(rec.elements[0].body), "caf\u00e9 \u2603")

    def test_entities_char_refs_and_cdata_are_legal(self):
        rec = Recorder().feed(OPEN, b"<message a='&lt;&#65;&#x42;&quot;'><body>&amp;&gt;&apos;"
                                    b"<![CDATA[<not a tag> & ]]></body></message>")
        message = rec.elements[0]
        self.assertEqual(message["a"], '<AB"')
        self.assertEqual(str(message.body), "&>'<not a tag> & ")

    def test_text_longer_than_expat_buffer_arrives_whole(self):
        # Expat hands text over in pieces of at most TEXT_BUFFER characters;
        # an element built as a DOM (here a dialback key) gets all of it.
        key = ("k\u00e9&amp;" * (3 * TEXT_BUFFER)).encode()
        data = OPEN + b"<db:result from='b.example' to='a.example'>" + key + b"</db:result>"
        for chunks in ([data], [data[i:i + 700] for i in range(0, len(data), 700)]):
            rec = Recorder().feed(*chunks)
            self.assertEqual(str(rec.elements[0]), "k\u00e9&" * (3 * TEXT_BUFFER))

    def test_whitespace_longer_than_expat_buffer(self):
        rec = Recorder().feed(OPEN, b" \n" * (2 * TEXT_BUFFER), b"<message/>")
        self.assertEqual(len(rec.elements), 1)
        self.fails("bad-format", OPEN, b" " * (3 * TEXT_BUFFER) + b"x<message/>")

    def test_header_namespaces_share_the_common_strings(self):
        # Every stream keeps its header's declarations: the usual names are
        # one shared copy, not a fresh string per stream.
        header = ("<stream:stream xmlns='" + "jabber:" + "server' xmlns:stream='http://etherx."
                  "jabber.org/streams' xmlns:db='jabber:server:dialback' to='a' version='1.0'>")
        declared = Recorder().feed(header.encode()).header.namespaces
        self.assertIs(declared[None], ns.SERVER)
        self.assertIs(declared["stream"], ns.STREAMS)
        self.assertIs(declared["db"], ns.DIALBACK)
        self.assertIs([p for p in declared if p == "db"][0], "db")

    def test_usual_headers_share_one_context(self):
        # A stanza's context (the header's declarations) is kept as long as
        # the stanza; streams with the usual header share one, others not.
        first = Recorder().feed(OPEN, b"<message id='1'/>").elements[0]
        second = Recorder().feed(OPEN, b"<message id='2'/>").elements[0]
        self.assertIs(first._context, second._context)
        other = OPEN.replace(b"xmlns:db=", b"xmlns:x='urn:x' xmlns:db=")
        third = Recorder().feed(other, b"<message id='3'><x:y/></message>").elements[0]
        self.assertIsNot(third._context, first._context)
        self.assertEqual(third._context.declarations["x"], "urn:x")
        self.assertEqual(third.element.firstChildElement().uri, "urn:x")

    def test_whitespace_keepalives(self):
        rec = Recorder().feed(OPEN, b" ", b"\n\t ", b"<message/>", b"\r\n", b" ")
        self.assertEqual(len(rec.elements), 1)
        self.assertEqual([e[0] for e in rec.events], ["header", "element"])

    def test_many_keepalives_never_hit_the_size_limit(self):
        rec = Recorder(SMALL).feed(OPEN, *[b" " * 1000] * 20, b"<message/>")
        self.assertEqual(len(rec.elements), 1)

    def test_stream_end(self):
        rec = Recorder().feed(OPEN, b"<message/></stream:stream>")
        self.assertEqual([e[0] for e in rec.events], ["header", "element", "end"])
        rec.feed(b"<message/>")  # ignored once the stream ended
        self.assertEqual(len(rec.elements), 1)

    def test_text_between_stanzas(self):
        rec = self.fails("bad-format", OPEN, b"<message/>hello<message/>")
        self.assertEqual(len(rec.elements), 1)

    def test_undeclared_element_prefix(self):
        self.fails("bad-namespace-prefix", OPEN, b"<foo:message/>")

    def test_undeclared_attribute_prefix(self):
        self.fails("bad-namespace-prefix", OPEN, b"<message foo:a='1'/>")

    def test_undeclared_prefix_in_child(self):
        self.fails("bad-namespace-prefix", OPEN, b"<message><body/><z:x/></message>")

    def test_mismatched_tag(self):
        self.fails("not-well-formed", OPEN, b"<message></presence>")

    def test_mismatched_tag_after_text(self):
        """Text still in expat's buffer when a stanza turns out malformed
        is dropped with the parser (found by the fuzzer: closing flushed it
        into a stanza that was already gone, an AttributeError instead of
        the stream error)."""
        for chunks in ([OPEN, b"<message><body>hello</wrong>"], [OPEN + b"<message>hi", b"</presence>"],
                       [OPEN, b"<message>a<b>c</b>d&amp;</x>"]):
            rec = self.fails("not-well-formed", *chunks)
            self.assertTrue(rec.parser.closed)
            self.assertEqual(rec.elements, [])

    def test_garbage_before_header(self):
        self.fails("not-well-formed", b"HELLO " + OPEN)


class RestrictedXmlTests(ParserCase):
    def test_comment(self):
        rec = self.fails("restricted-xml", OPEN, b"<message/><!-- hi --><message/>")
        self.assertEqual(len(rec.elements), 1)

    def test_comment_before_header(self):
        self.fails("restricted-xml", b"<!-- hi -->" + OPEN)

    def test_comment_inside_stanza(self):
        self.fails("restricted-xml", OPEN, b"<message><!-- x --></message>")

    def test_processing_instruction(self):
        self.fails("restricted-xml", OPEN, b"<message><?evil stuff?></message>")

    def test_doctype(self):
        self.fails("restricted-xml", b"<?xml version='1.0'?><!DOCTYPE stream:stream>", HEADER.encode())

    def test_doctype_after_the_header(self):
        # RFC 6120 11.1: restricted-xml, not the not-well-formed that expat's
        # own error would give.
        rec = self.fails("restricted-xml", OPEN, b"<message/><!DOCTYPE stream:stream>")
        self.assertEqual(len(rec.elements), 1)
        self.fails("restricted-xml", OPEN + b"<!DOCTYPE s [<!ENTITY a 'b'>]>")
        self.fails("restricted-xml", OPEN, b"<message><body><!DOCTYPE x></body></message>")
        self.fails("restricted-xml", OPEN, b"<!ENTITY lol 'lol'>")

    def test_doctype_after_the_header_split_across_feeds(self):
        for cut in range(1, len(b"<!DOCTYPE x>")):
            data = b"<message/><!DOCTYPE x>"
            self.fails("restricted-xml", OPEN, data[:10 + cut], data[10 + cut:])
        self.fails("restricted-xml", OPEN + b"<", b"!", b"D", b"OCTYPE x>")

    def test_other_bad_tokens_stay_not_well_formed(self):
        self.fails("not-well-formed", OPEN, b"<!-x>")
        self.fails("not-well-formed", OPEN, b"<message></message><!>")
        self.fails("not-well-formed", OPEN, b"<message><body>a</body><!1></message>")
        # CDATA is well-formed XML (and allowed); text that looks like a
        # declaration inside it is just text.
        rec = Recorder().feed(OPEN, b"<message><body><![CDATA[<!DOCTYPE x>]]></body></message>")
        self.assertEqual(str(rec.elements[0].body), "<!DOCTYPE x>")

    def test_internal_entity_declaration(self):
        self.fails("restricted-xml", b"<!DOCTYPE s [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;'>]>",
                   HEADER.encode(), b"<message>&lol2;</message>")

    def test_external_entity(self):
        rec = self.fails("restricted-xml",
                         b"<!DOCTYPE s [<!ENTITY xxe SYSTEM 'file:///etc/passwd'>]>" + OPEN,
                         b"<message>&xxe;</message>")
        self.assertEqual(rec.events, [])

    def test_undefined_entity_in_text(self):
        rec = self.fails("restricted-xml", OPEN, b"<message>&foo;</message>")
        self.assertEqual(rec.elements, [])

    def test_undefined_entity_in_attribute(self):
        self.fails("restricted-xml", OPEN, b"<message to='&foo;'/>")


class EncodingTests(ParserCase):
    def test_utf8_split_across_feeds_is_fine(self):
        rec = Recorder().feed(OPEN, b"<message><body>\xc3", b"\xa9</body></message>")
        self.assertEqual(str(rec.elements[0].body), "\u00e9")

    def test_bad_utf8_split_across_feeds(self):
        rec = self.fails("unsupported-encoding", OPEN, b"<message><body>\xc3", b"(</body></message>")
        self.assertEqual(rec.elements, [])

    def test_bad_utf8_byte(self):
        self.fails("unsupported-encoding", OPEN, b"<message><body>\xff</body></message>")

    def test_overlong_encoding(self):
        self.fails("unsupported-encoding", OPEN, b"<message a='\xc0\xbc'/>")

    def test_latin1_declaration(self):
        rec = self.fails("unsupported-encoding",
                         b"<?xml version='1.0' encoding='ISO-8859-1'?>" + HEADER.encode())
        self.assertEqual(rec.events, [])

    def test_utf8_declaration_is_fine(self):
        rec = Recorder().feed(b"<?xml version='1.0' encoding='UTF-8'?>" + HEADER.encode())
        self.assertEqual(rec.header.default_ns, ns.SERVER)


class LimitTests(ParserCase):
    def test_stanza_under_the_limit(self):
        rec = Recorder(SMALL).feed(OPEN, b"<message><body>" + b"y" * 3900 + b"</body></message>")
        self.assertEqual(len(str(rec.elements[0].body)), 3900)

    def test_huge_attribute_in_one_chunk(self):
        rec = self.fails("policy-violation", OPEN, b"<message a='" + b"x" * 5000 + b"'/>", limits=SMALL)
        self.assertEqual(rec.elements, [])

    def test_huge_attribute_on_open_element_in_one_chunk(self):
        rec = self.fails("policy-violation", OPEN + b"<message a='" + b"x" * 5000 + b"'><b/></message>",
                         limits=SMALL)
        self.assertEqual(rec.elements, [])

    def test_huge_attribute_on_child_in_one_chunk(self):
        self.fails("policy-violation", OPEN, b"<message><x a='" + b"x" * 5000 + b"'/></message>",
                   limits=SMALL)

    def test_huge_text_in_one_chunk(self):
        self.fails("policy-violation", OPEN, b"<message><body>" + b"y" * 5000 + b"</body></message>",
                   limits=SMALL)

    def test_huge_text_split_across_many_feeds(self):
        rec = Recorder(SMALL).feed(OPEN, b"<message><body>")
        for count in range(100):
            try:
                rec.feed(b"y" * 100)
            except StreamFailure as failure:
                self.assertEqual(failure.condition, "policy-violation")
                break
        else:
            self.fail("never failed")
        self.assertLessEqual(count * 100, 4096 + 200, "failed late")
        self.assertEqual(rec.elements, [])

    def test_never_ending_start_tag(self):
        rec = Recorder(SMALL).feed(OPEN, b"<message a='1'")
        with self.assertRaises(StreamFailure) as caught:
            for i in range(100):
                rec.feed(b" a%d" % i + b"b" * 90 + b"='1'")
        self.assertEqual(caught.exception.condition, "policy-violation")

    def test_never_ending_attribute_value(self):
        self.fails("policy-violation", OPEN, b"<message a='", *[b"x" * 100] * 50, limits=SMALL)

    def test_many_stanzas_each_under_the_limit(self):
        stanza = b"<message><body>" + b"y" * 3000 + b"</body></message>"
        rec = Recorder(SMALL).feed(OPEN, stanza * 5)
        self.assertEqual(len(rec.elements), 5)

    def test_depth_limit(self):
        Recorder(SMALL).feed(OPEN, b"<m><a><b><c/></b></a></m>")  # depth 4: fine
        rec = self.fails("policy-violation", OPEN, b"<m><a><b><c><d/></c></b></a></m>", limits=SMALL)
        self.assertEqual(rec.elements, [])

    def test_element_count_limit(self):
        rec = Recorder(SMALL).feed(OPEN, b"<m>" + b"<x/>" * 9 + b"</m>")
        self.assertEqual(len(list(rec.elements[0].elements())), 9)
        self.fails("policy-violation", OPEN, b"<m>" + b"<x/>" * 10 + b"</m>", limits=SMALL)

    def test_element_count_is_per_stanza(self):
        rec = Recorder(SMALL).feed(OPEN, (b"<m>" + b"<x/>" * 9 + b"</m>") * 3)
        self.assertEqual(len(rec.elements), 3)

    def test_attribute_count_limit(self):
        Recorder(SMALL).feed(OPEN, b"<m a='1' b='2' c='3' d='4' e='5'/>")
        self.fails("policy-violation", OPEN, b"<m a='1' b='2' c='3' d='4' e='5' f='6'/>", limits=SMALL)
