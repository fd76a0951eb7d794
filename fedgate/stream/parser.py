"""A restricted, bounded XMPP stream parser on expat.

XMPP forbids comments, processing instructions, DTDs and entity declarations
(RFC 6120 section 11.1); Twisted's own expat stream installs no handlers for
them, so they would pass silently.  This parser rejects each with
``restricted-xml`` (a DOCTYPE or other declaration after the stream header
too, which expat itself only calls a bad token), never expands an entity, checks the UTF-8 of every byte
before expat sees it (expat would call bad UTF-8 merely "not well-formed"),
and bounds every stanza by size, depth and element count so a peer cannot
make us buffer without limit.

Parse results go to three callbacks: the stream header (attributes of the
root element with their namespaces), each complete top-level element, and the
end of the stream.  Every problem is raised as a :class:`StreamFailure`.
"""

from __future__ import annotations

import codecs
import functools
from dataclasses import dataclass
from typing import Callable
from xml.parsers import expat

from twisted.words.xish import domish

from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StreamFailure


@dataclass(frozen=True)
class Limits:
    """Bounds applied to every stanza (and to anything between stanzas)."""

    max_stanza_bytes: int = 512 * 1024
    max_depth: int = 32
    max_elements: int = 2000
    max_attributes: int = 64


@dataclass(frozen=True)
class StreamHeader:
    """What the peer's ``<stream:stream>`` said."""

    default_ns: str | None
    attributes: dict
    prefix: str | None
    namespaces: dict

    def get(self, name: str) -> str | None:
        return self.attributes.get(name)


_XML_LANG = ns.XML + " lang"
_TAIL = 16


@functools.lru_cache(maxsize=1024)
def _split(name: str) -> tuple[str | None, str, str | None]:
    """Split an expat name 'uri local prefix' into its parts."""
    parts = name.split(" ")
    if len(parts) == 1:
        return None, parts[0], None
    if len(parts) == 2:
        return parts[0], parts[1], None
    return parts[0], parts[1], parts[2]


class StreamParser:
    """Feed bytes; get a header, elements and an end through callbacks.

    A parser lives for one stream instance: after a stream restart (STARTTLS,
    SASL) make a new one and throw away whatever bytes were left.
    """

    def __init__(self, on_header: Callable[[StreamHeader], None],
                 on_element: Callable[[domish.Element], None],
                 on_end: Callable[[], None], limits: Limits = Limits()):
        self._on_header = on_header
        self._on_element = on_element
        self._on_end = on_end
        self.limits = limits
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._depth = 0
        self._current: domish.Element | None = None
        self._stanza_start = 0
        self._elements = 0
        self._fed = 0
        self._tail = b""  # the last bytes fed, to read an error's context
        self._mark = 0  # byte offset of the last complete piece of markup
        self._ns_decls: dict = {}
        self._header_seen = False
        self._ended = False
        p = self._parser = expat.ParserCreate("UTF-8", " ")
        p.namespace_prefixes = True
        p.buffer_text = True
        p.ordered_attributes = False
        p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        p.StartElementHandler = self._start
        p.EndElementHandler = self._end
        p.CharacterDataHandler = self._text
        p.StartNamespaceDeclHandler = self._ns_decl
        p.XmlDeclHandler = self._xml_decl
        p.CommentHandler = self._restricted("comment")
        p.ProcessingInstructionHandler = self._restricted("processing instruction")
        p.StartDoctypeDeclHandler = self._restricted("DOCTYPE")
        p.EntityDeclHandler = self._restricted("entity declaration")
        p.UnparsedEntityDeclHandler = self._restricted("entity declaration")
        p.NotationDeclHandler = self._restricted("notation declaration")
        p.ExternalEntityRefHandler = self._restricted("external entity")
        p.SkippedEntityHandler = self._restricted("entity reference")

    @property
    def header_seen(self) -> bool:
        return self._header_seen

    def feed(self, data: bytes) -> None:
        """Parse ``data``; raises :class:`StreamFailure` on any violation."""
        if self._ended:
            return
        try:
            self._utf8.decode(data)
        except UnicodeDecodeError:
            raise StreamFailure("unsupported-encoding", "stream is not valid UTF-8") from None
        self._fed += len(data)
        try:
            self._parser.Parse(data, False)
        except expat.ExpatError as exc:
            if self._is_declaration(exc, data):
                raise StreamFailure("restricted-xml", "DTD markup is not allowed in XMPP") from None
            raise self._translate(exc) from None
        self._tail = (self._tail + data)[-_TAIL:] if len(data) < _TAIL else data[-_TAIL:]
        if self._fed - self._mark > self.limits.max_stanza_bytes:
            raise StreamFailure("policy-violation", "stanza too large")

    def _is_declaration(self, exc: expat.ExpatError, data: bytes) -> bool:
        """Was the error a markup declaration (``<!DOCTYPE``, ``<!ENTITY``...)
        inside the stream?  Before the root element expat reports a DOCTYPE
        to its handler; after it, only as an invalid token at the name."""
        if exc.code != expat.errors.codes[expat.errors.XML_ERROR_INVALID_TOKEN]:
            return False
        window = self._tail + data
        pos = self._parser.ErrorByteIndex - (self._fed - len(window))
        return 2 <= pos < len(window) and window[pos - 2:pos] == b"<!" and window[pos:pos + 1].isalpha()

    def _translate(self, exc: expat.ExpatError) -> StreamFailure:
        code = exc.code
        errors = expat.errors
        if code == expat.errors.codes[errors.XML_ERROR_UNBOUND_PREFIX]:
            return StreamFailure("bad-namespace-prefix", "undeclared namespace prefix")
        if code in (expat.errors.codes[errors.XML_ERROR_UNKNOWN_ENCODING],
                    expat.errors.codes[errors.XML_ERROR_INCORRECT_ENCODING]):
            return StreamFailure("unsupported-encoding", "only UTF-8 is allowed")
        if code in (expat.errors.codes[errors.XML_ERROR_UNDEFINED_ENTITY],
                    expat.errors.codes[errors.XML_ERROR_RECURSIVE_ENTITY_REF],
                    expat.errors.codes[errors.XML_ERROR_EXTERNAL_ENTITY_HANDLING]):
            return StreamFailure("restricted-xml", "entity references are not allowed")
        return StreamFailure("not-well-formed", exc.args[0] if exc.args else None)

    def _restricted(self, what: str):
        def handler(*args):
            raise StreamFailure("restricted-xml", f"{what} is not allowed in XMPP")
        return handler

    def _xml_decl(self, version, encoding, standalone):
        if encoding is not None and encoding.lower() not in ("utf-8", "utf8"):
            raise StreamFailure("unsupported-encoding", "only UTF-8 is allowed")

    def _ns_decl(self, prefix, uri):
        self._ns_decls[prefix] = uri

    def _start(self, name: str, attrs: dict) -> None:
        depth = self._depth
        self._depth = depth + 1
        limits = self.limits
        if len(attrs) > limits.max_attributes:
            raise StreamFailure("policy-violation", "too many attributes")
        if depth == 0:
            self._header(name, attrs)
            return
        uri, local, prefix = _split(name)
        if depth == 1:
            self._stanza_start = self._parser.CurrentByteIndex
            self._elements = 0
            element = domish.Element((uri, local), defaultUri=uri if prefix is None else None)
        else:
            if depth > limits.max_depth:
                raise StreamFailure("policy-violation", "elements nested too deeply")
            parent = self._current
            element = parent.addElement((uri, local), defaultUri=uri if prefix is None else None)
        self._elements += 1
        if self._elements > limits.max_elements:
            raise StreamFailure("policy-violation", "too many elements in one stanza")
        if attrs:
            element_attrs = element.attributes
            for key, value in attrs.items():
                if " " in key:
                    a_uri, a_local, _ = _split(key)
                    element_attrs[(a_uri, a_local)] = value
                else:
                    element_attrs[key] = value
        if self._ns_decls:
            if prefix is not None or any(p is not None for p in self._ns_decls):
                element.localPrefixes = {p: u for p, u in self._ns_decls.items() if p is not None}
            self._ns_decls = {}
        self._current = element

    def _header(self, name: str, attrs: dict) -> None:
        uri, local, prefix = _split(name)
        decls, self._ns_decls = self._ns_decls, {}
        self._header_seen = True
        self._mark = self._parser.CurrentByteIndex
        if local != "stream":
            raise StreamFailure("bad-format", "the root element must be a stream")
        if uri != ns.STREAMS:
            raise StreamFailure("invalid-namespace", "the stream element is not in the streams namespace")
        if prefix != "stream":
            raise StreamFailure("bad-namespace-prefix", "the stream element must use the 'stream' prefix")
        plain = {}
        for key, value in attrs.items():
            if " " in key:
                a_uri, a_local, _ = _split(key)
                if a_uri == ns.XML and a_local == "lang":
                    plain["xml:lang"] = value
                else:
                    plain[(a_uri, a_local)] = value
            else:
                plain[key] = value
        header = StreamHeader(default_ns=decls.get(None), attributes=plain,
                              prefix=prefix, namespaces=decls)
        self._on_header(header)

    def _check_size(self) -> None:
        if self._parser.CurrentByteIndex - self._stanza_start > self.limits.max_stanza_bytes:
            raise StreamFailure("policy-violation", "stanza too large")

    def _text(self, data: str) -> None:
        if self._depth >= 2:
            self._current.addContent(data)
        elif self._depth == 1:
            if data.strip():
                raise StreamFailure("bad-format", "text is not allowed between stanzas")
            self._mark = self._parser.CurrentByteIndex  # whitespace keepalive

    def _end(self, name: str) -> None:
        self._depth -= 1
        depth = self._depth
        if depth == 0:
            self._ended = True
            self._on_end()
            return
        # The start handler runs at the '<' of a tag, so a huge attribute
        # value arriving with the rest of the stanza in one chunk is only
        # measurable here, at the end of the element.
        self._check_size()
        element = self._current
        self._current = element.parent
        if depth == 1:
            element.parent = None
            self._current = None
            self._mark = self._parser.CurrentByteIndex
            self._on_element(element)
