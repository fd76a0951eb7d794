"""fedgate.stream.serialize: namespaces, prefixes, xml:lang, escaping and
namespaced attributes, checked as exact text and by parsing the text back."""

from __future__ import annotations

from twisted.trial import unittest
from twisted.words.xish import domish

from fedgate.stream import namespaces as ns
from fedgate.stream.parser import StreamParser
from fedgate.stream.serialize import escape_attr, escape_text, serialize


def header(stream_ns: str) -> bytes:
    return (f"<stream:stream xmlns='{stream_ns}' xmlns:stream='{ns.STREAMS}'"
            f" xmlns:db='{ns.DIALBACK}'>").encode()


def reparse(text: str, stream_ns: str) -> domish.Element:
    """``text`` read back as a top-level element of a ``stream_ns`` stream."""
    found = []
    parser = StreamParser(lambda h: None, found.append, lambda: None, lazy=False)
    parser.feed(header(stream_ns) + text.encode("utf-8"))
    assert len(found) == 1, found
    return found[0]


class EscapeTests(unittest.TestCase):
    def test_text(self):
        self.assertEqual(escape_text("a & b < c > d \" '"), "a &amp; b &lt; c &gt; d \" '")
        self.assertEqual(escape_text("&amp;"), "&amp;amp;")

    def test_attribute(self):
        self.assertEqual(escape_attr("a&<>\"'"), "a&amp;&lt;&gt;&quot;&apos;")

    def test_plain_strings_are_returned_unchanged(self):
        self.assertEqual(escape_text("plain"), "plain")
        self.assertEqual(escape_attr("plain"), "plain")


class SerializeTests(unittest.TestCase):
    def test_stanza_namespace_is_the_streams_default(self):
        for source in ns.STANZA_NAMESPACES:
            element = domish.Element((source, "message"))
            element["to"] = "a@b"
            element.addElement("body", content="hi")
            for target in ns.STANZA_NAMESPACES:
                text = serialize(element, target)
                self.assertEqual(text, '<message to="a@b"><body>hi</body></message>')
                back = reparse(text, target)
                self.assertEqual((back.uri, back.body.uri), (target, target))

    def test_foreign_namespace_declared_once_where_it_changes(self):
        element = domish.Element((ns.SERVER, "iq"))
        query = element.addElement(("urn:example:q", "query"))
        item = query.addElement(("urn:example:q", "item"))
        item.addElement(("urn:example:other", "x"))
        text = serialize(element, ns.SERVER)
        self.assertEqual(text, '<iq><query xmlns="urn:example:q"><item><x xmlns="urn:example:other"/>'
                               '</item></query></iq>')
        back = reparse(text, ns.SERVER)
        q = next(back.elements())
        i = next(q.elements())
        x = next(i.elements())
        self.assertEqual((q.uri, i.uri, x.uri), ("urn:example:q", "urn:example:q", "urn:example:other"))

    def test_stanza_inside_a_foreign_element_keeps_its_namespace(self):
        element = domish.Element((ns.SERVER, "message"))
        forwarded = element.addElement(("urn:xmpp:forward:0", "forwarded"))
        inner = forwarded.addElement((ns.CLIENT, "message"))
        inner.addElement((ns.CLIENT, "body"), content="x")
        text = serialize(element, ns.COMPONENT_ACCEPT)
        back = reparse(text, ns.COMPONENT_ACCEPT)
        inner_back = next(next(back.elements()).elements())
        self.assertEqual((back.uri, inner_back.uri, next(inner_back.elements()).uri),
                         (ns.COMPONENT_ACCEPT, ns.CLIENT, ns.CLIENT))

    def test_stream_and_dialback_elements_use_the_header_prefixes(self):
        result = domish.Element((ns.DIALBACK, "result"))
        result["from"], result["to"] = "a.example", "b.example"
        result.addContent("key")
        self.assertEqual(serialize(result, ns.SERVER), '<db:result from="a.example" to="b.example">key</db:result>')
        error = domish.Element((ns.STREAMS, "error"))
        error.addElement((ns.STREAM_ERRORS, "conflict"))
        text = serialize(error, ns.SERVER)
        self.assertEqual(text, f'<stream:error><conflict xmlns="{ns.STREAM_ERRORS}"/></stream:error>')
        back = reparse(text, ns.SERVER)
        self.assertEqual((back.uri, back.name, next(back.elements()).uri),
                         (ns.STREAMS, "error", ns.STREAM_ERRORS))
        self.assertEqual(reparse(serialize(result, ns.SERVER), ns.SERVER).uri, ns.DIALBACK)

    def test_xml_lang(self):
        element = domish.Element((ns.CLIENT, "message"))
        element[(ns.XML, "lang")] = "de"
        body = element.addElement("body", content="Hallo")
        body[(ns.XML, "lang")] = "de-CH"
        text = serialize(element, ns.SERVER)
        self.assertEqual(text, '<message xml:lang="de"><body xml:lang="de-CH">Hallo</body></message>')
        back = reparse(text, ns.SERVER)
        self.assertEqual((back[(ns.XML, "lang")], back.body[(ns.XML, "lang")]), ("de", "de-CH"))

    def test_namespaced_attributes_get_generated_prefixes(self):
        element = domish.Element((ns.SERVER, "presence"))
        x = element.addElement(("urn:example:x", "x"))
        x[("urn:example:a", "one")] = "1"
        x[("urn:example:b", "two")] = "<2>"
        x["plain"] = "p"
        text = serialize(element, ns.SERVER)
        self.assertIn('xmlns:a1="urn:example:a" a1:one="1"', text)
        self.assertIn('xmlns:a2="urn:example:b" a2:two="&lt;2&gt;"', text)
        back = reparse(text, ns.SERVER)
        xb = next(back.elements())
        self.assertEqual((xb[("urn:example:a", "one")], xb[("urn:example:b", "two")], xb["plain"]),
                         ("1", "<2>", "p"))

    def test_escaping_of_text_and_attributes(self):
        nasty = "a&b<c>d\"e'f ]]> &amp;"
        element = domish.Element((ns.SERVER, "message"))
        element["to"] = nasty
        element.addElement("body", content=nasty)
        text = serialize(element, ns.SERVER)
        self.assertNotIn("<c>", text)
        back = reparse(text, ns.SERVER)
        self.assertEqual((back["to"], str(back.body)), (nasty, nasty))

    def test_escaped_namespace_names(self):
        element = domish.Element((ns.SERVER, "iq"))
        element.addElement(("urn:x?a=1&b='2'", "q"))
        back = reparse(serialize(element, ns.SERVER), ns.SERVER)
        self.assertEqual(next(back.elements()).uri, "urn:x?a=1&b='2'")

    def test_no_namespace_inherits_the_parent(self):
        element = domish.Element((None, "message"))
        element.addElement((None, "body"), content="x")
        text = serialize(element, ns.CLIENT)
        self.assertEqual(text, "<message><body>x</body></message>")
        self.assertEqual(reparse(text, ns.CLIENT).uri, ns.CLIENT)

    def test_unicode_and_empty_elements(self):
        element = domish.Element((ns.SERVER, "message"))
        element.addElement("body", content="zwölf ✓ 𝄞")
        element.addElement(("urn:example:empty", "e"))
        text = serialize(element, ns.SERVER)
        self.assertTrue(text.endswith('<e xmlns="urn:example:empty"/></message>'))
        self.assertEqual(str(reparse(text, ns.SERVER).body), "zwölf ✓ 𝄞")
