"""A grammar of XMPP S2S and component streams for hypothesis, rendered to
bytes, then mutated byte by byte and cut into random reads.

A fuzz case is a list of :class:`Step`: one grammar item (bytes, or a
:class:`Sym` that the role resolves when it is fed, for what depends on the
stream so far: a handshake digest over the stream id, a SCRAM proof over
the server's nonce, an action of our own side), an optional list of byte
mutations, whether the bytes go out now or with the next item (so reads
span items), where the read is cut, and how far the clock moves after it.

Each role's case mixes a prefix of its happy path (so deep states are
reached: authenticated pairs, bidi, bound hostnames) with items drawn from
the whole grammar, hostile ones included (huge names, deep nesting, many
namespace declarations, restricted XML, bad UTF-8).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from hypothesis import strategies as st

from fedgate.stream import namespaces as ns

LOCAL = ("gw.example", "chat.gw.example", "muc.gw.example")
REMOTE = ("remote.example", "other.example")
COMPONENTS = ("chat.gw.example", "muc.gw.example", "bots.example", "weather.example", "lb.example")
GOOD_DOMAINS = LOCAL + REMOTE + COMPONENTS
#: malformed or awkward addresses (RFC 7622 and our normalisation)
BAD_DOMAINS = ("", ".", "gw.example.", "GW.Example", "[::1]", "127.0.0.1", "a..b", "-x.example",
               "x_y.example", "\u00e9t\u00e9.example", "xn--", "a b.example", "@", "/", "a@b/c",
               "\u200b.example", "x" * 64 + ".example", "d" * 1100 + ".example", "\ufffd")
STREAM_ERRORS = ("bad-format", "host-unknown", "not-authorized", "policy-violation",
                 "internal-server-error", "conflict", "undefined-condition", "made-up")
MECHANISMS = ("EXTERNAL", "PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256", "DIGEST-MD5", "", "X" * 300)
NAMESPACES = (ns.SERVER, ns.CLIENT, ns.COMPONENT_ACCEPT, ns.DIALBACK, ns.TLS, ns.SASL, ns.BIDI,
              ns.STREAMS, "urn:xmpp:component:0", "jabber:iq:roster", "", "urn:x:" + "n" * 300)


@dataclass(frozen=True)
class Sym:
    """An item the role renders when it is fed (see the role's ``resolve``)."""

    name: str
    arg: object = None


@dataclass(frozen=True)
class Step:
    item: object  # bytes or Sym
    mutations: tuple = ()
    flush: bool = True
    cuts: tuple = ()
    advance: float = 0.0


def esc(value: str) -> str:
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("'", "&apos;").replace('"', "&quot;"))


def attrs(**values) -> str:
    return "".join(f" {k.rstrip('_').replace('__', ':')}='{esc(v)}'" for k, v in values.items()
                   if v is not None)


# -- leaves ---------------------------------------------------------------
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
domain = st.one_of(st.sampled_from(GOOD_DOMAINS), st.sampled_from(GOOD_DOMAINS),
                   st.sampled_from(BAD_DOMAINS), text)
localpart = st.one_of(st.sampled_from(("a", "user", "room", "x" * 1030, "a@b", "\u00c5", "",)), text)
jid = st.one_of(
    domain,
    st.builds(lambda l, d: f"{l}@{d}", localpart, domain),
    st.builds(lambda l, d, r: f"{l}@{d}/{r}", localpart, domain, st.one_of(text, st.just("r" * 1030))),
    st.none(),
)
opt_domain = st.one_of(domain, st.none())
key = st.sampled_from(("valid", "invalid", "error", "never", "", "k" * 500,))
b64 = st.one_of(st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode() if b else "="),
                st.sampled_from(("=", "", "!!!", "AAA", "====", "Zm9v\n",)))


def stream_error(condition: str, body: str) -> bytes:
    return (f"<stream:error><{condition} xmlns='{ns.STREAM_ERRORS}'/>"
            f"<text xmlns='{ns.STREAM_ERRORS}'>{esc(body)}</text></stream:error>").encode()


@st.composite
def header(draw, default_ns=None, to=None, sender=None, version=None, sid=None):
    """A stream header with random attributes and namespace declarations."""
    default_ns = draw(st.one_of(st.sampled_from(NAMESPACES), st.none())) if default_ns is None else default_ns
    parts = []
    if draw(st.booleans()):
        parts.append(draw(st.sampled_from(("<?xml version='1.0'?>", "<?xml version='1.0' encoding='UTF-8'?>",
                                           "<?xml version='1.0' encoding='ISO-8859-1'?>", "\n",))))
    prefix = draw(st.sampled_from(("stream", "stream", "stream", "s", "",)))
    tag = f"{prefix}:stream" if prefix else "stream"
    parts.append(f"<{tag}")
    if default_ns:
        parts.append(f" xmlns='{esc(default_ns)}'")
    streams_ns = draw(st.sampled_from((ns.STREAMS, ns.STREAMS, ns.STREAMS, "urn:wrong",)))
    parts.append(f" xmlns:{prefix}='{streams_ns}'" if prefix else "")
    if draw(st.booleans()):
        parts.append(f" xmlns:db='{ns.DIALBACK}'")
    values = {
        "to": to if to is not None else draw(opt_domain),
        "from": sender if sender is not None else draw(opt_domain),
        "version": version if version is not None else draw(st.sampled_from(("1.0", "1.0", "0.9", "1.5", "2.0", "x", None,))),
        "id": sid if sid is not None else draw(st.one_of(st.none(), st.just("SID"), text)),
        "xml:lang": draw(st.sampled_from((None, "en", "", "x" * 40,))),
    }
    for name, value in values.items():
        if value is not None:
            parts.append(f" {name}='{esc(value)}'")
    extra = draw(st.integers(0, 3))
    if extra == 3:  # a namespace declaration flood
        count = draw(st.integers(10, 40))
        parts.append("".join(f" xmlns:p{i}='urn:p:{i}'" for i in range(count)))
    elif extra == 2:
        parts.append(f" {draw(st.sampled_from(('a', 'foo:bar', 'xml:space', 'x' * 300,)))}='{esc(draw(text))}'")
    if draw(st.integers(0, 15)) == 0:
        parts.append(f" big='{'v' * draw(st.sampled_from((3000, 3100, 70000,)))}'")
    parts.append(">")
    return "".join(parts).encode()


def _children(draw, depth=0) -> str:
    out = []
    for _ in range(draw(st.integers(0, 2 if depth < 2 else 0))):
        kind = draw(st.integers(0, 5))
        if kind == 0:
            out.append(f"<body>{esc(draw(text))}</body>")
        elif kind == 1:
            out.append(f"<ping xmlns='{ns.PING}'/>")
        elif kind == 2:
            out.append(f"<query xmlns='{ns.DISCO_INFO}'/>")
        elif kind == 3:
            out.append(f"<error type='cancel'><item-not-found xmlns='{ns.STANZA_ERRORS}'/></error>")
        elif kind == 4:
            out.append(f"<x xmlns='{esc(draw(st.sampled_from(NAMESPACES)))}'>{_children(draw, depth + 1)}</x>")
        else:
            out.append(esc(draw(text)))
    return "".join(out)


@st.composite
def stanza(draw, sender=None, to=None):
    if sender is not None:  # on a happy path: a stanza the stream may carry
        name, xmlns = draw(st.sampled_from(("message", "presence", "iq"))), None
    else:
        name = draw(st.sampled_from(("message", "presence", "iq", "iq", "foo",)))
        xmlns = draw(st.sampled_from((None, None, None, ns.CLIENT, ns.SERVER, "urn:other",)))
    values = {
        "from": sender if sender is not None else draw(jid),
        "to": to if to is not None else draw(jid),
        "type": draw(st.sampled_from((None, "get", "set", "result", "error", "chat", "unavailable", "x",))),
        "id": draw(st.sampled_from((None, "1", "x" * 200,))),
        "xmlns": xmlns,
    }
    head = "".join(f" {k}='{esc(v)}'" for k, v in values.items() if v is not None)
    return f"<{name}{head}>{_children(draw)}</{name}>".encode()


@st.composite
def db_result(draw, sender=None, to=None, kind=None):
    values = {"from": sender if sender is not None else draw(opt_domain),
              "to": to if to is not None else draw(opt_domain),
              "type": kind if kind is not None else draw(st.sampled_from((None, None, "valid", "invalid", "error", "x",)))}
    body = draw(key)
    if values["type"] == "error":
        body = f"<error type='cancel'><{draw(st.sampled_from(('item-not-found', 'remote-connection-failed', 'x',)))} xmlns='{ns.STANZA_ERRORS}'/></error>"
    else:
        body = esc(body)
    return f"<db:result{attrs(from_=values['from'], to=values['to'], type=values['type'])}>{body}</db:result>".encode()


@st.composite
def db_verify(draw, sender=None, to=None, sid=None, kind=None):
    values = {"from": sender if sender is not None else draw(opt_domain),
              "to": to if to is not None else draw(opt_domain),
              "id": sid if sid is not None else draw(st.sampled_from(("SID", "other", "", None,))),
              "type": kind if kind is not None else draw(st.sampled_from((None, None, "valid", "invalid", "error",)))}
    return (f"<db:verify{attrs(from_=values['from'], to=values['to'], id=values['id'], type=values['type'])}>"
            f"{esc(draw(key))}</db:verify>").encode()


@st.composite
def features(draw):
    children = []
    if draw(st.booleans()):
        children.append(f"<starttls xmlns='{ns.TLS}'>{'<required/>' if draw(st.booleans()) else ''}</starttls>")
    if draw(st.booleans()):
        mechs = "".join(f"<mechanism>{esc(m)}</mechanism>" for m in draw(st.lists(st.sampled_from(MECHANISMS), max_size=3)))
        children.append(f"<mechanisms xmlns='{ns.SASL}'>{mechs}</mechanisms>")
    if draw(st.booleans()):
        children.append(f"<dialback xmlns='{ns.DIALBACK_FEATURE}'><errors/></dialback>")
    if draw(st.booleans()):
        children.append(f"<bidi xmlns='{ns.BIDI_FEATURE}'/>")
    if draw(st.integers(0, 4)) == 0:
        children.append("<bind xmlns='urn:xmpp:component:0'/>")
    children = draw(st.permutations(children))
    return ("<stream:features>" + "".join(children) + "</stream:features>").encode()


@st.composite
def sasl(draw):
    kind = draw(st.integers(0, 6))
    if kind <= 2:
        return f"<auth xmlns='{ns.SASL}' mechanism='{esc(draw(st.sampled_from(MECHANISMS)))}'>{draw(b64)}</auth>".encode()
    if kind == 3:
        return f"<response xmlns='{ns.SASL}'>{draw(b64)}</response>".encode()
    if kind == 4:
        return f"<abort xmlns='{ns.SASL}'/>".encode()
    name = draw(st.sampled_from(("success", "failure", "challenge",)))
    return f"<{name} xmlns='{ns.SASL}'>{draw(b64)}</{name}>".encode()


@st.composite
def component_iq(draw):
    verb = draw(st.sampled_from(("bind", "unbind",)))
    host = draw(st.one_of(st.sampled_from(COMPONENTS), domain, st.just("weather.example/res")))
    names = "".join(f"<hostname>{esc(host)}</hostname>" for _ in range(draw(st.sampled_from((1, 1, 1, 0, 2,)))))
    return (f"<iq type='{draw(st.sampled_from(('set', 'set', 'get',)))}' id='b'{attrs(to=draw(st.one_of(st.none(), domain)))}>"
            f"<{verb} xmlns='urn:xmpp:component:0'>{names}</{verb}></iq>").encode()


RESTRICTED = (b"<!-- c -->", b"<?pi x?>", b"<!DOCTYPE x>", b"<!ENTITY e 'x'>",
              b"<message>&e;</message>", b"<message>&#0;</message>",
              b"<message><![CDATA[</stream:stream>]]></message>",
              b"<![CDATA[x]]>", b"&amp;", b"text between", b"]]>",
              # never closed: the rest of the stream is inside them
              b"<!-- never closed", b"<?pi never closed", b"<message><![CDATA[")


@st.composite
def hostile(draw):
    """Items that push on the parser's bounds and XMPP's XML restrictions."""
    kind = draw(st.integers(0, 13))
    if kind == 0:
        depth = draw(st.integers(10, 40))
        return ("<message>" + "<a>" * depth + "</a>" * depth + "</message>").encode()
    if kind == 1:
        count = draw(st.integers(10, 80))
        return ("<message" + "".join(f" a{i}='{i}'" for i in range(count)) + "/>").encode()
    if kind == 2:
        return f"<{'n' * draw(st.integers(60, 3000))}/>".encode()
    if kind == 3:
        return f"<message a='{'v' * draw(st.integers(1000, 70000))}'/>".encode()
    if kind == 4:
        count = draw(st.integers(5, 40))
        return ("<message" + "".join(f" xmlns:q{i}='urn:q:{i}'" for i in range(count)) + "/>").encode()
    if kind == 5:
        return draw(st.sampled_from(RESTRICTED))
    if kind == 6:
        return draw(st.sampled_from((b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00",
                                     b"\xef\xbb\xbf", "\ufffe".encode(),)))
    if kind == 7:
        count = draw(st.integers(50, 300))
        return ("<message>" + "<a/>" * count + "</message>").encode()
    if kind == 8:
        return f"<message><body>{'x' * draw(st.integers(8000, 40000))}</body></message>".encode()
    if kind == 9:
        return f"<p:message xmlns:p='{ns.SERVER}'/><undeclared:x/>".encode()
    if kind == 10:
        return f"<message xmlns='{'u' * draw(st.integers(200, 2000))}'/>".encode()
    if kind == 11:
        return draw(st.sampled_from((b" ", b"\n", b"\r\n\t ", b"</stream:stream>", b"</stream>", b"<stream:stream>",)))
    if kind == 12:
        return stream_error(draw(st.sampled_from(STREAM_ERRORS)), draw(text))
    return draw(st.binary(max_size=64))


def any_item(extra=()):
    """Any grammar item, for every role (plus the role's own ``extra``)."""
    return st.one_of(
        header(), stanza(), db_result(), db_verify(), features(), sasl(), component_iq(),
        hostile(), hostile(),
        st.sampled_from((f"<starttls xmlns='{ns.TLS}'/>".encode(), f"<proceed xmlns='{ns.TLS}'/>".encode(),
                         f"<failure xmlns='{ns.TLS}'/>".encode(), f"<bidi xmlns='{ns.BIDI}'/>".encode(),
                         b"<handshake>00</handshake>", b"<handshake/>", b"</stream:stream>",)),
        *extra)


# -- mutation and segmentation ----------------------------------------------
SPECIALS = (b"<", b">", b"&", b"'", b"\"", b"]]>", b"<!--", b"<?x?>", b"\x00", b"\xff", b"\xc3",
            b"</", b"/>", b"<a>" * 40, b"xmlns:z='u'", b"\xed\xa0\x80", b"=", b" ")

mutation = st.tuples(st.integers(0, 6), st.integers(0, 1 << 16), st.integers(0, 1 << 16),
                     st.sampled_from(SPECIALS))


def mutate(data: bytes, mutations) -> bytes:
    """Flip, insert, delete, duplicate or truncate spans of ``data``."""
    for op, a, b, special in mutations:
        n = len(data)
        i = a % (n + 1)
        j = min(n, i + 1 + b % 32)
        if op == 0 and n:
            i = min(i, n - 1)
            data = data[:i] + bytes([data[i] ^ (1 << (b % 8))]) + data[i + 1:]
        elif op == 1:
            data = data[:i] + special + data[i:]
        elif op == 2:
            data = data[:i] + data[j:]
        elif op == 3:
            data = data[:j] + data[i:j] * (1 + b % 3) + data[j:]
        elif op == 4:
            data = data[:i]
        elif op == 5:
            data = data[:i] + bytes([b % 256]) + data[i:]
        else:
            data = data[:i] + special * (1 + b % 64) + data[i:]
    return data


def split(data: bytes, cuts) -> list[bytes]:
    """``data`` cut at the fractions (in 1/65536) in ``cuts``."""
    if not cuts or len(data) < 2:
        return [data] if data else []
    points = sorted({(c * len(data)) >> 16 for c in cuts} - {0})
    pieces, last = [], 0
    for p in points:
        if p > last:
            pieces.append(data[last:p])
            last = p
    pieces.append(data[last:])
    return [p for p in pieces if p]




def delivery(mutated_one_in: int):
    """How a step is sent: mutated one time in ``mutated_one_in``, cut into
    up to four reads, sometimes held back to go out with the next item,
    then the clock moves."""
    return st.tuples(
        st.integers(1, mutated_one_in).flatmap(
            lambda n: st.lists(mutation, min_size=1, max_size=4).map(tuple) if n == 1 else st.just(())),
        st.sampled_from((True, True, True, False)),
        st.one_of(st.just(()), st.lists(st.integers(0, 1 << 16), max_size=3).map(tuple)),
        st.sampled_from((0.0, 0.0, 0.0, 0.1, 1.0, 5.0)))


#: noise is mutated often; a happy path's steps seldom (or few would get far)
DELIVERY = delivery(4)
HAPPY_DELIVERY = delivery(30)


def steps(item_strategy):
    """Steps over ``item_strategy``, each with a drawn :data:`DELIVERY`."""
    return st.builds(lambda item, how: Step(item, *how), item_strategy, DELIVERY)


_NOISE: dict = {}


def noise(extra):
    """Steps over the whole grammar plus ``extra`` (built once per extra)."""
    if extra not in _NOISE:
        one = steps(any_item(extra))
        _NOISE[extra] = st.one_of(st.just([]), st.lists(one, max_size=2), st.lists(one, max_size=6))
    return _NOISE[extra]


@st.composite
def script(draw, happy: list, extra: tuple = ()):
    """A prefix of the role's happy path with random steps mixed in."""
    # Half the cases follow the whole happy path (with noise): deep states.
    cut = len(happy) if draw(st.booleans()) else draw(st.integers(0, len(happy)))
    prefix = happy[:cut]
    path = []
    for item in prefix:
        if isinstance(item, st.SearchStrategy):
            item = draw(item)
        path.append(Step(item, *draw(HAPPY_DELIVERY)))
    for step in draw(noise(extra)):
        path.insert(draw(st.integers(0, len(path))), step)
    return path
