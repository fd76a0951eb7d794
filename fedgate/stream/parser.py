"""A restricted, bounded XMPP stream parser on expat.

XMPP forbids comments, processing instructions, DTDs and entity declarations
(RFC 6120 section 11.1); Twisted's own expat stream installs no handlers for
them, so they would pass silently.  This parser rejects each with
``restricted-xml`` (a DOCTYPE or other declaration after the stream header
too, which expat itself only calls a bad token), never expands an entity, checks the UTF-8 of every byte
before expat sees it (expat would call bad UTF-8 merely "not well-formed"),
and bounds every stanza by size, depth and element count so a peer cannot
make us buffer without limit.  Names, namespace declarations and attribute
values are bounded too: each is checked at the start of its element, before
anything is cached or kept, so that a peer cannot pin memory with one huge
header or with unique names (``policy-violation`` for each: these are local
size limits on well-formed, permitted XML, RFC 6120 section 4.9.3.15).

A parser and its expat object refer to each other through the handlers;
:meth:`StreamParser.close` breaks that cycle (and drops expat's buffers and
namespace bindings) at once, so a closed or restarted stream's memory is
freed without waiting for the cyclic garbage collector.

Parse results go to three callbacks: the stream header (attributes of the
root element with their namespaces), each complete top-level element, and the
end of the stream.  Every problem is raised as a :class:`StreamFailure`.

Each top-level ``message``, ``presence`` and ``iq`` in a stanza namespace
comes out as a :class:`fedgate.stream.stanza.Stanza`: its start tag's
attributes, the exact bytes it arrived as, and whether those bytes are
self-contained enough to be forwarded as they are.  No DOM is built for it
here (every bound above is still checked on every event); the stanza builds
one from its bytes when something asks.  Other top-level elements
(negotiation, dialback, stream errors) are built as ``domish`` elements at
once.  The bytes since the start of the current stanza are kept (never more
than the stanza size limit plus one read) so that a stanza split across any
number of reads is sliced out whole.
"""

from __future__ import annotations

import codecs
import functools
from dataclasses import dataclass, fields
from typing import Callable
from xml.parsers import expat

from twisted.words.xish import domish

from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StreamFailure
from fedgate.stream.stanza import SourceContext, Stanza


@dataclass(frozen=True)
class Limits:
    """Bounds applied to every stanza (and to anything between stanzas)."""

    max_stanza_bytes: int = 512 * 1024
    max_depth: int = 32
    max_elements: int = 2000
    max_attributes: int = 64
    #: namespace declarations on one element, the stream header included
    max_namespace_declarations: int = 32
    #: bytes in one element or attribute name, prefix or namespace name
    max_name_bytes: int = 256
    #: bytes in one attribute value
    max_attribute_bytes: int = 64 * 1024

    @classmethod
    def from_config(cls, config) -> "Limits":
        """The parser's bounds from the ``[limits]`` table (other keys ignored)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)})


#: No bounds: for re-parsing bytes that already passed a stream's bounds.
UNBOUNDED = Limits(max_stanza_bytes=1 << 62, max_depth=1 << 30, max_elements=1 << 62,
                   max_attributes=1 << 30, max_namespace_declarations=1 << 30,
                   max_name_bytes=1 << 30, max_attribute_bytes=1 << 62)

_STANZA_NS = ns.STANZA_NAMESPACES
_STANZA_NAMES = ns.STANZA_NAMES


#: A stream header's attributes ('to', 'from', 'id', 'version', 'xml:lang')
#: are addresses or short tokens; the longest legitimate one is a full JID,
#: 3 x 1023 bytes plus two separators (RFC 7622 section 3.1).
MAX_HEADER_ATTRIBUTE_BYTES = 3071


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
#: Expat names ('uri local prefix') longer than this are split without the
#: cache: 1024 entries of at most 256 characters (and their parts) bound it
#: to about a megabyte whatever names a peer sends.
_CACHED_NAME = 256


def _split_name(name: str) -> tuple[str | None, str, str | None]:
    parts = name.split(" ")
    if len(parts) == 1:
        return None, parts[0], None
    if len(parts) == 2:
        return parts[0], parts[1], None
    return parts[0], parts[1], parts[2]


_split_cached = functools.lru_cache(maxsize=1024)(_split_name)


def _split(name: str) -> tuple[str | None, str, str | None]:
    """Split an expat name 'uri local prefix' into its parts."""
    if len(name) <= _CACHED_NAME:
        return _split_cached(name)
    return _split_name(name)


def _too_long(text: str, limit: int) -> bool:
    if len(text) > limit:
        return True
    return not text.isascii() and len(text.encode("utf-8")) > limit


class _Stopped(Exception):
    """Raised by the handlers of a closed parser to stop expat mid-chunk."""


def _stop(*args):
    raise _Stopped()


def _local(name: str) -> str:
    """The local part of an expat name 'uri local prefix' (without caching)."""
    first = name.find(" ")
    if first < 0:
        return name
    second = name.find(" ", first + 1)
    return name[first + 1:] if second < 0 else name[first + 1:second]


#: Expat's character-data buffer per parser (pyexpat's default is 8 KiB,
#: held for the whole life of every stream).  Longer text only reaches the
#: handler in several calls, which it adds up; 1 KiB keeps one call for the
#: text of almost any stanza built as a DOM (lazy stanzas ignore it).
TEXT_BUFFER = 1024

#: Namespace names and prefixes that every stream declares: one shared copy
#: instead of expat's fresh strings, which a stream's header context keeps.
_COMMON_NAMES = {name: name for name in (
    ns.STREAMS, ns.SERVER, ns.CLIENT, ns.COMPONENT_ACCEPT, ns.DIALBACK, ns.XML,
    "stream", "db", "xml")}

def _restricted(what: str):
    def handler(*args):
        raise StreamFailure("restricted-xml", f"{what} is not allowed in XMPP")
    return handler


#: The header contexts of the usual S2S and component streams, one shared
#: copy each (a fixed set, never keyed by what a peer sends): a stream whose
#: header declares exactly these uses it instead of its own.
_USUAL_CONTEXTS = {
    frozenset(d.items()): SourceContext(d) for d in (
        {None: ns.SERVER, "stream": ns.STREAMS, "db": ns.DIALBACK},
        {None: ns.SERVER, "stream": ns.STREAMS},
        {None: ns.COMPONENT_ACCEPT, "stream": ns.STREAMS})}


#: The handlers that refuse what XMPP's restricted XML forbids, shared by
#: every parser (none needs the parser itself).
_RESTRICTED = {
    "CommentHandler": _restricted("comment"),
    "ProcessingInstructionHandler": _restricted("processing instruction"),
    "StartDoctypeDeclHandler": _restricted("DOCTYPE"),
    "EntityDeclHandler": _restricted("entity declaration"),
    "UnparsedEntityDeclHandler": _restricted("entity declaration"),
    "NotationDeclHandler": _restricted("notation declaration"),
    "ExternalEntityRefHandler": _restricted("external entity"),
    "SkippedEntityHandler": _restricted("entity reference"),
}

_HANDLERS = ("CharacterDataHandler", "StartNamespaceDeclHandler", "XmlDeclHandler",
             "CommentHandler", "ProcessingInstructionHandler", "StartDoctypeDeclHandler",
             "EntityDeclHandler", "UnparsedEntityDeclHandler", "NotationDeclHandler",
             "ExternalEntityRefHandler", "SkippedEntityHandler")


class StreamParser:
    """Feed bytes; get a header, elements and an end through callbacks.

    A parser lives for one stream instance: after a stream restart (STARTTLS,
    SASL) make a new one and throw away whatever bytes were left.
    """

    # One per open stream, for its whole life.
    __slots__ = ("_on_header", "_on_element", "_on_end", "limits", "_utf8", "_depth", "_current",
                 "_stanza_start", "_elements", "_fed", "_tail", "_mark", "_ns_decls", "_header_seen",
                 "_ended", "_lazy", "_stanza", "_forwardable", "_context", "_buf", "_buf_start",
                 "_keep_from", "_parser", "__weakref__")

    def __init__(self, on_header: Callable[[StreamHeader], None],
                 on_element: Callable[[domish.Element], None],
                 on_end: Callable[[], None], limits: Limits = Limits(), lazy: bool = True):
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
        #: build no DOM for stanzas (a Stanza builds its own when asked)
        self._lazy = lazy
        #: inside a stanza that is built lazily: its name, uri, attributes
        self._stanza: tuple | None = None
        self._forwardable = False
        self._context: SourceContext | None = None
        #: the input since byte offset _buf_start (the current stanza's start)
        self._buf = bytearray()
        self._buf_start = 0
        self._keep_from = 0
        # intern=None: no per-parser dictionary keeping every element and
        # attribute name the peer ever sent for the stream's whole life.
        p = self._parser = expat.ParserCreate("UTF-8", " ", intern=None)
        p.namespace_prefixes = True
        p.buffer_size = TEXT_BUFFER
        p.buffer_text = True
        p.ordered_attributes = False
        p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        p.StartElementHandler = self._start
        p.EndElementHandler = self._end
        p.CharacterDataHandler = self._text
        p.StartNamespaceDeclHandler = self._ns_decl
        p.XmlDeclHandler = self._xml_decl
        for handler_name, refuse in _RESTRICTED.items():
            setattr(p, handler_name, refuse)

    @property
    def header_seen(self) -> bool:
        return self._header_seen

    @property
    def closed(self) -> bool:
        return self._parser is None

    def close(self) -> None:
        """Forget the expat parser and the callbacks, so that nothing is left
        in a reference cycle; idempotent, and safe inside a callback (expat
        then stops at the next tag and the rest of the chunk is dropped)."""
        p, self._parser = self._parser, None
        self._ended = True
        self._on_header = self._on_element = self._on_end = None
        self._current = None
        self._stanza = None
        self._ns_decls = {}
        self._buf = bytearray()
        if p is None:
            return
        for name in _HANDLERS:
            setattr(p, name, None)
        p.StartElementHandler = _stop
        p.EndElementHandler = _stop

    def feed(self, data: bytes) -> None:
        """Parse ``data``; raises :class:`StreamFailure` on any violation."""
        if self._ended or self._parser is None:
            return
        try:
            self._utf8.decode(data)
        except UnicodeDecodeError:
            raise StreamFailure("unsupported-encoding", "stream is not valid UTF-8") from None
        self._fed += len(data)
        self._buf += data
        try:
            self._parse(data)
        except StreamFailure:
            self.close()  # a failed stream is over: free expat's memory now
            raise
        if self._parser is not None:
            # Forget what no stanza needs any more: everything before the
            # current stanza's start (or the end of the last one).
            drop = self._keep_from - self._buf_start
            if drop > 0:
                del self._buf[:drop]
                self._buf_start = self._keep_from

    def _parse(self, data: bytes) -> None:
        try:
            self._parser.Parse(data, False)
        except _Stopped:
            return  # closed by a callback: the rest of the chunk is dropped
        except expat.ExpatError as exc:
            if self._parser is None:
                return  # closed by a callback before expat found the error
            if self._is_declaration(exc, data):
                raise StreamFailure("restricted-xml", "DTD markup is not allowed in XMPP") from None
            raise self._translate(exc) from None
        if self._parser is None:
            return
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

    def _xml_decl(self, version, encoding, standalone):
        if encoding is not None and encoding.lower() not in ("utf-8", "utf8"):
            raise StreamFailure("unsupported-encoding", "only UTF-8 is allowed")

    def _ns_decl(self, prefix, uri):
        decls = self._ns_decls
        limits = self.limits
        if len(decls) >= limits.max_namespace_declarations:
            raise StreamFailure("policy-violation", "too many namespace declarations")
        if (prefix is not None and _too_long(prefix, limits.max_name_bytes)) or (
                uri is not None and _too_long(uri, limits.max_name_bytes)):
            raise StreamFailure("policy-violation", "namespace prefix or name too long")
        common = _COMMON_NAMES
        decls[common.get(prefix, prefix) if prefix is not None else None] = (
            common.get(uri, uri) if uri is not None else None)
        if self._stanza is not None and uri in _STANZA_NS:
            # Inside a stanza, (re)declaring a stanza namespace: re-serialise
            # it (the stanza element's own declarations are checked in
            # _start_stanza).
            self._forwardable = False

    def _check_names(self, name: str, attrs: dict) -> None:
        """Bound the element's name and its attributes' names and values,
        before any of them is split, cached or copied.  The namespace and
        prefix parts were bounded by :meth:`_ns_decl` already."""
        limits = self.limits
        max_name = limits.max_name_bytes
        # Fast paths first: an ASCII name no longer than max_name bytes, or
        # a value of at most max_value / 4 characters (4 bytes at most each
        # in UTF-8), is within every bound; only longer ones are measured.
        if (len(name) > max_name or not name.isascii()) and (
                _too_long(name, 3 * max_name + 2) or _too_long(_local(name), max_name)):
            raise StreamFailure("policy-violation", "element name too long")
        if not attrs:
            return
        if len(attrs) > limits.max_attributes:
            raise StreamFailure("policy-violation", "too many attributes")
        max_value = limits.max_attribute_bytes if self._depth > 1 else min(
            limits.max_attribute_bytes, MAX_HEADER_ATTRIBUTE_BYTES)
        short_value = max_value // 4
        for key, value in attrs.items():
            if (len(key) > max_name or not key.isascii()) and (
                    _too_long(key, 3 * max_name + 2) or _too_long(_local(key), max_name)):
                raise StreamFailure("policy-violation", "attribute name too long")
            if len(value) > short_value and _too_long(value, max_value):
                raise StreamFailure("policy-violation", "attribute value too long")

    def _start(self, name: str, attrs: dict) -> None:
        depth = self._depth
        self._depth = depth + 1
        limits = self.limits
        self._check_names(name, attrs)
        if depth == 0:
            self._header(name, attrs)
            return
        if self._stanza is not None:
            self._stanza_child(name, attrs, depth)
            return
        uri, local, prefix = _split(name)
        if depth == 1 and self._lazy and local in _STANZA_NAMES and uri in _STANZA_NS:
            self._start_stanza(uri, local, prefix, attrs)
            return
        if depth == 1:
            self._stanza_start = self._keep_from = self._parser.CurrentByteIndex
            self._elements = 0
            element = domish.Element((uri, local), defaultUri=uri if prefix is None else None)
        else:
            if depth > limits.max_depth:
                raise StreamFailure("policy-violation", "elements nested too deeply")
            parent = self._current
            if uri is None:
                uri = ""  # in no namespace (xmlns=''), not "the parent's": serialised as such
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

    def _start_stanza(self, uri, local, prefix, attrs: dict) -> None:
        """A stanza begins: keep its bytes from here, note its attributes."""
        self._stanza_start = self._keep_from = self._parser.CurrentByteIndex
        self._elements = 1
        context = self._context
        forwardable = prefix is None and context is not None and context.default_ns in _STANZA_NS
        plain = attrs
        for key in attrs:
            if " " in key:
                plain = {}
                for key, value in attrs.items():
                    if " " in key:
                        a_uri, a_local, a_prefix = _split(key)
                        plain[(a_uri, a_local)] = value
                        if a_prefix is not None and a_prefix in context.prefixes:
                            forwardable = False
                    else:
                        plain[key] = value
                break
        self._forwardable = forwardable
        if self._ns_decls:
            if None in self._ns_decls or any(u in _STANZA_NS for u in self._ns_decls.values()):
                self._forwardable = False
            self._ns_decls = {}
        self._stanza = (local, uri, plain, prefix)

    def _stanza_child(self, name: str, attrs: dict, depth: int) -> None:
        """An element inside a lazily built stanza: bounded and checked for
        header prefixes, but not built."""
        limits = self.limits
        if depth > limits.max_depth:
            raise StreamFailure("policy-violation", "elements nested too deeply")
        self._elements += 1
        if self._elements > limits.max_elements:
            raise StreamFailure("policy-violation", "too many elements in one stanza")
        if self._ns_decls:
            self._ns_decls = {}
        if self._forwardable:
            prefixes = self._context.prefixes
            if prefixes:
                if name.count(" ") == 2 and name.rpartition(" ")[2] in prefixes:
                    self._forwardable = False
                    return
                for key in attrs:
                    if key.count(" ") == 2 and key.rpartition(" ")[2] in prefixes:
                        self._forwardable = False
                        return

    def _end_stanza(self) -> None:
        """The stanza's end tag (or its empty-element tag): slice its bytes."""
        local, uri, attrs, prefix = self._stanza
        self._stanza = None
        buf, base = self._buf, self._buf_start
        at = self._parser.CurrentByteIndex - base
        qname = (local if prefix is None else f"{prefix}:{local}").encode("utf-8")
        # Expat reports an end tag at its '<' and an empty-element tag's end
        # just past its '/>' (where the stream's own end tag may follow).
        if buf.startswith(b"</" + qname, at) and buf[at + 2 + len(qname):at + 3 + len(qname)] in (
                b">", b" ", b"\t", b"\r", b"\n"):
            end = buf.index(b">", at) + 1
        else:
            end = at
        start = self._stanza_start - base
        raw = bytes(buf[start:end])
        self._keep_from = base + end
        self._mark = self._parser.CurrentByteIndex
        self._on_element(Stanza(local, uri, attrs, raw, self._context, self._forwardable))

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
        self._context = _USUAL_CONTEXTS.get(frozenset(decls.items())) or SourceContext(decls)
        self._keep_from = self._mark
        self._on_header(header)

    def _check_size(self) -> None:
        if self._parser.CurrentByteIndex - self._stanza_start > self.limits.max_stanza_bytes:
            raise StreamFailure("policy-violation", "stanza too large")

    def _text(self, data: str) -> None:
        if self._parser is None:
            # Closed: setting CharacterDataHandler in close() flushes
            # expat's buffered text to this (old) handler; it is dropped.
            return
        if self._depth >= 2:
            if self._stanza is None:
                self._current.addContent(data)
        elif self._depth == 1:
            if data.strip():
                raise StreamFailure("bad-format", "text is not allowed between stanzas")
            self._mark = self._keep_from = self._parser.CurrentByteIndex  # whitespace keepalive

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
        if self._stanza is not None:
            if depth == 1:
                self._end_stanza()
            return
        element = self._current
        self._current = element.parent
        if depth == 1:
            element.parent = None
            self._current = None
            self._mark = self._keep_from = self._parser.CurrentByteIndex
            self._on_element(element)
