"""The one stanza type: addresses parsed once, original bytes, a lazy DOM.

The parser yields every top-level ``message``, ``presence`` and ``iq`` as a
:class:`Stanza`.  Its ``to``, ``sender`` (the 'from' attribute), ``type``
and ``id`` are read from the start tag once; the routing hot path needs
nothing else.  The stanza also keeps the bytes it arrived as (``raw``) and
whether those bytes may be written to another stream unchanged
(``forwardable``); the ``domish`` element is built from the bytes only when
something asks for it (a bounce, the local handler, a re-serialisation).

When bytes are forwarded
------------------------
Original bytes go out only when that is byte-for-byte correct
(:meth:`Stanza.encode`).  The parser clears ``forwardable`` when the stanza
element declares a default namespace, when anything in it uses a prefix the
source stream header declared (``db:``, ``stream:`` ...), or when anything in
it (re)declares a stanza namespace; a change
through this class (``stanza['from'] = ...``, or any ``domish`` method that
can mutate) clears it too.  What is left is self-contained XML whose
unprefixed names without their own ``xmlns`` (the stanza element and
children such as ``<body/>`` or ``<error/>``) inherit the stream's default
namespace.

"The same stanza namespace semantics" is the mapping RFC 6120 section 4.8.3
prescribes and :mod:`fedgate.stream.serialize` already applies: ``jabber:server``,
``jabber:client`` and ``jabber:component:accept`` are one content namespace,
so ``{jabber:server}body`` read from an S2S stream is ``{jabber:component:accept}body``
written to a component stream.  Raw bytes therefore go out only on a stream
whose default namespace is one of those three, from a stream whose default
namespace is one of them too; re-serialising gives the same XML infoset
modulo that mapping (``tests/test_stanza_golden.py``).
"""

from __future__ import annotations

from twisted.words.xish import domish

from fedgate.stream import namespaces as ns
from fedgate.stream.serialize import escape_attr, serialize

_STANZA_NS = ns.STANZA_NAMESPACES

#: domish members that can change an element: using any through a Stanza
#: makes its original bytes stale, so they are dropped first.
_MUTATORS = frozenset({"attributes", "children", "addChild", "addElement", "addContent",
                       "addRawXml", "addUniqueId", "swapAttributeValues", "removeChild"})


class SourceContext:
    """What a stanza's bytes depend on in the stream they came from: the
    header's namespace declarations (prefix -> URI, ``None`` the default)."""

    __slots__ = ("declarations", "default_ns", "prefixes", "_header")

    def __init__(self, declarations: dict):
        self.declarations = dict(declarations)
        self.default_ns = self.declarations.get(None)
        #: prefixes the header declares: a stanza using one is not self-contained
        self.prefixes = frozenset(p for p in self.declarations if p is not None and p != "xml")
        self._header: bytes | None = None

    def header(self) -> bytes:
        """A stream header declaring the same namespaces (to rebuild a DOM)."""
        if self._header is None:
            parts = [f"<stream:stream xmlns:stream='{escape_attr(ns.STREAMS)}'"]
            for prefix, uri in self.declarations.items():
                if prefix == "stream" or uri is None:
                    continue
                name = "xmlns" if prefix is None else f"xmlns:{prefix}"
                parts.append(f" {name}='{escape_attr(uri)}'")
            parts.append(">")
            self._header = "".join(parts).encode("utf-8")
        return self._header


class Stanza:
    """A top-level ``message``, ``presence`` or ``iq``.

    Read ``to``, ``sender``, ``type`` and ``id`` (None when absent) without
    building anything; ``element`` builds (once) and returns the ``domish``
    element.  Other ``domish`` attributes and methods are passed through to
    it, so code written for elements keeps working."""

    __slots__ = ("name", "uri", "to", "sender", "type", "id", "raw", "forwardable",
                 "_attrs", "_context", "_element",
                 # set only once an S2S destination queued it (unset: read
                 # with getattr): when, kept if it is queued again
                 "queued_since")

    def __init__(self, name: str, uri: str | None, attrs: dict, raw: bytes | None = None,
                 context: SourceContext | None = None, forwardable: bool = False,
                 element: domish.Element | None = None):
        self.name = name
        self.uri = uri
        self._attrs = attrs
        self.to = attrs.get("to")
        self.sender = attrs.get("from")
        self.type = attrs.get("type")
        self.id = attrs.get("id")
        self.raw = raw
        self._context = context
        self.forwardable = forwardable and raw is not None
        self._element = element

    @classmethod
    def of(cls, element) -> "Stanza":
        """``element`` as a Stanza (a Stanza is returned as it is)."""
        if isinstance(element, Stanza):
            return element
        return cls(element.name, element.uri, element.attributes, element=element)

    # -- the DOM, built on demand -------------------------------------------------
    @property
    def element(self) -> domish.Element:
        """The ``domish`` element (built from the original bytes on first use).
        Change the stanza through this class, not through the element."""
        element = self._element
        if element is None:
            element = self._element = _build(self.raw, self._context)
            self._attrs = element.attributes
        return element

    @property
    def built(self) -> bool:
        """Has the DOM been built (for tests and measurements)?"""
        return self._element is not None

    def _changed(self) -> domish.Element:
        element = self.element
        self.raw = None
        self.forwardable = False
        return element

    def getAttribute(self, name, default=None):
        return self._attrs.get(name, default)

    def hasAttribute(self, name) -> bool:
        return name in self._attrs

    def __getitem__(self, name):
        return self._attrs[name]

    def __setitem__(self, name, value) -> None:
        self._changed()[name] = value
        self._attrs = self._element.attributes
        if name == "to":
            self.to = value
        elif name == "from":
            self.sender = value
        elif name == "type":
            self.type = value
        elif name == "id":
            self.id = value

    def __getattr__(self, name):
        # Only called for what the slots above do not have: domish's API.
        if name.startswith("__"):
            raise AttributeError(name)
        element = self._changed() if name in _MUTATORS else self.element
        return getattr(element, name)

    def __str__(self) -> str:
        return str(self.element)

    def __repr__(self) -> str:
        return f"<Stanza {self.name} to={self.to!r} from={self.sender!r} type={self.type!r} id={self.id!r}>"

    # -- writing ----------------------------------------------------------------
    def encode(self, stream_ns: str | None) -> bytes:
        """The bytes to write for this stanza on a stream whose default
        namespace is ``stream_ns``: the original bytes where that is
        byte-for-byte correct, else a re-serialisation."""
        if self.forwardable and stream_ns in _STANZA_NS:
            return self.raw
        return serialize(self.element, stream_ns).encode("utf-8")

    def size(self) -> int:
        """Bytes for queue accounting: the original size, or an estimate."""
        if self.raw is not None:
            return len(self.raw)
        return _estimate(self.element)


def _estimate(element: domish.Element) -> int:
    total = 64
    for value in element.attributes.values():
        total += len(value) + 8
    for child in element.children:
        total += len(child) if isinstance(child, str) else _estimate(child)
    return total


def _build(raw: bytes | None, context: SourceContext | None) -> domish.Element:
    """The ``domish`` element of ``raw``, parsed in ``context`` by the same
    parser (building eagerly), so it is the element the stream would have built."""
    from fedgate.stream.parser import UNBOUNDED, StreamParser

    if raw is None or context is None:
        raise ValueError("a stanza without bytes needs an element")
    found: list = []
    parser = StreamParser(lambda header: None, found.append, lambda: None, UNBOUNDED, lazy=False)
    parser.feed(context.header() + raw)
    parser.close()
    if len(found) != 1:
        raise ValueError("the stanza bytes are not one element")
    return found[0]
