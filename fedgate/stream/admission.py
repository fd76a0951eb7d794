"""Admission of connections to the S2S and component listeners: caps on the
connections whose peer has not authenticated yet.

Before this module 1,100 unauthenticated S2S streams from one address took
every file descriptor of a gateway with the usual 1,024 limit; a legitimate
dialback peer could neither connect nor be called back.  Now each listener
pool counts the unauthenticated connections per source and in total:

- the source is the IPv4 address, or the /64 of an IPv6 address (one host
  gets a whole /64), with an IPv4-mapped IPv6 address counted as its IPv4
  address (a dual-stack socket must not double a peer's share);
- a connection counts from its accept until its peer authenticates (a first
  valid domain pair on S2S, a successful handshake or SASL on a component
  stream: :meth:`Ticket.authenticated`, reached through
  ``IXmppStream.authenticated``), or until it closes (:meth:`Ticket.release`);
- past the per-address cap the connection is refused at once, before any
  handler, parser or connection record exists (:class:`AdmittingFactory`):
  a plain stream gets our header and a stream error, a Direct TLS
  connection is closed before any TLS (the handshake is what a flood would
  make us pay for);
- at the total cap, a connection from a source that holds fewer
  unauthenticated connections than the source holding the most takes the
  place of that source's oldest one, which is closed with a stream error
  (it is *evicted*); from any other source it is refused like the above.

Why evict: with the total cap full of a flood's connections, refusing every
newcomer would lock out exactly the legitimate peer the cap is there to
protect, until the flood's connections time out (90 s).  Evicting from the
heaviest source keeps the total bounded, lets a peer on a fresh address in
at once, and shares the pool out evenly when many addresses flood it: a
flood can still push a newcomer out, but only by opening as many
connections as the pool holds before the newcomer authenticates.

Conditions (RFC 6120 4.9.3): past the per-address cap the peer itself broke
a local policy, so ``policy-violation`` (4.9.3.13: "violated some local
service policy"); at the total cap (refused or evicted) the gateway "lacks
the system resources necessary to service the stream",
``resource-constraint`` (4.9.3.15), which a peer may retry later.

The two S2S listeners (plain and Direct TLS) share one pool: the same peer
servers reach us over either, and the per-address habit below is theirs as
a whole.  Components have a pool of their own, so that a flood on the
public S2S port can never lock a component out of its loopback port.

The totals leave a reserve of descriptors for authenticated streams,
outbound connects, dialback verifications, storage and logs:
:func:`fit_to_fd_limit` lowers the configured totals when the soft limit
on open files minus the reserve cannot hold them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from twisted.internet import protocol
from twisted.logger import Logger

from fedgate.logsafe import throttled
from fedgate.stream import namespaces as ns
from fedgate.stream.serialize import escape_attr

log = Logger(namespace="fedgate.admission")

#: why a connection was refused
PER_ADDRESS = "per-address"
TOTAL = "total"
REASONS = (PER_ADDRESS, TOTAL)

#: the stream error each refusal gets on a plain stream (see the docstring)
CONDITIONS = {PER_ADDRESS: "policy-violation", TOTAL: "resource-constraint"}
TEXTS = {PER_ADDRESS: "too many unauthenticated connections from your address",
         TOTAL: "too many unauthenticated connections; try again later"}
#: the stream error of an evicted connection
EVICTED = ("resource-constraint", "closed to make room: your address holds the most "
                                  "unauthenticated connections")


def source_key(host: str) -> str:
    """What a connection from ``host`` counts against: the IPv4 address, the
    /64 network of an IPv6 address, an IPv4-mapped address as IPv4; anything
    else (a UNIX socket path, say) as it is."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(frozen=True)
class Caps:
    """The caps of one pool: unauthenticated connections per source and in all."""

    per_address: int
    total: int


class Admission:
    """The unauthenticated connections of one pool (``name``: "s2s" or
    "components"), per source and in total, and the refusals so far."""

    def __init__(self, name: str, caps: Caps):
        self.name = name
        self.caps = caps
        #: source -> its tickets, oldest first (a dict as an ordered set)
        self._by_source: dict[str, dict] = {}
        self._total = 0
        #: refusals so far, by reason, and evictions (the metrics read them)
        self.refused = {reason: 0 for reason in REASONS}
        self.evicted = 0

    @property
    def unauthenticated(self) -> int:
        """Connections in the pool now whose peer has not authenticated."""
        return self._total

    def count_for(self, host: str) -> int:
        """Unauthenticated connections now from ``host``'s source."""
        return len(self._by_source.get(source_key(host), ()))

    def admit(self, host: str) -> "Ticket | str":
        """A :class:`Ticket` for a new connection from ``host`` (at the total
        cap, after evicting another), or the reason it is refused
        (:data:`PER_ADDRESS` or :data:`TOTAL`)."""
        key = source_key(host)
        held = len(self._by_source.get(key, ()))
        if held >= self.caps.per_address:
            return self._refuse(host, PER_ADDRESS)
        if self._total >= self.caps.total:
            victim = self._victim(held)
            if victim is None:
                return self._refuse(host, TOTAL)
            self.evicted += 1
            throttled(log, self).info(
                "Evicted an unauthenticated {pool} connection from {victim} for one from {host}: "
                "total cap ({cap}) reached", pool=self.name, victim=victim._key, host=host,
                cap=self.caps.total)
            victim.evict()
        ticket = Ticket(self, key)
        self._by_source.setdefault(key, {})[ticket] = None
        self._total += 1
        return ticket

    def _victim(self, held: int) -> "Ticket | None":
        """The oldest connection, with a stream to close, of the source that
        holds the most unauthenticated connections, if that is more than
        ``held``."""
        heaviest = max(self._by_source.values(), key=len, default={})
        if len(heaviest) <= held:
            return None
        return next((ticket for ticket in heaviest if ticket._evict is not None), None)

    def _refuse(self, host: str, reason: str) -> str:
        self.refused[reason] += 1
        throttled(log, self).info(
            "Refused a {pool} connection from {host}: {reason} cap of unauthenticated connections "
            "({cap}) reached", pool=self.name, host=host, reason=reason,
            cap=self.caps.per_address if reason == PER_ADDRESS else self.caps.total)
        return reason

    def _leave(self, ticket: "Ticket") -> None:
        tickets = self._by_source[ticket._key]
        del tickets[ticket]
        if not tickets:
            del self._by_source[ticket._key]
        self._total -= 1


class Ticket:
    """One admitted connection's place among the unauthenticated ones: given
    back once, when its peer authenticates, when it closes or when it is
    evicted.  Its stream gives it (:meth:`attach`) the way to close it with
    a stream error; until then it cannot be evicted."""

    __slots__ = ("_admission", "_key", "_evict")

    def __init__(self, admission: Admission, key: str):
        self._admission: Admission | None = admission
        self._key = key
        self._evict = None

    def attach(self, fail) -> None:
        """``fail(condition, text)`` ends the connection with a stream error
        (``IXmppStream.fail``): used if the connection is evicted."""
        self._evict = fail

    def evict(self) -> None:
        """Give the place back and end the connection (resource-constraint)."""
        fail, self._evict = self._evict, None
        self.release()
        if fail is not None:
            fail(*EVICTED)

    @property
    def held(self) -> bool:
        """Does the connection still count as unauthenticated?"""
        return self._admission is not None

    def authenticated(self) -> None:
        """The peer proved who it is: the connection no longer counts."""
        self.release()

    def release(self) -> None:
        """The connection is gone (or authenticated); idempotent."""
        admission, self._admission = self._admission, None
        self._evict = None
        if admission is not None:
            admission._leave(self)


def fit_to_fd_limit(pools: dict[str, Caps], soft_limit: int | None, reserve: int) -> dict[str, Caps]:
    """The pools' caps, with totals lowered so that together they leave
    ``reserve`` descriptors of the ``soft_limit`` free (shared out in
    proportion to the configured totals, at least one each); unchanged when
    there is no limit (None or RLIM_INFINITY's -1) or they already fit.  A
    per-address cap is never above its pool's total."""
    wanted = sum(c.total for c in pools.values())
    if soft_limit is None or soft_limit < 0 or wanted <= soft_limit - reserve:
        return dict(pools)
    room = max(soft_limit - reserve, len(pools))
    fitted = {}
    for name, caps in pools.items():
        total = max(1, room * caps.total // wanted)
        fitted[name] = Caps(min(caps.per_address, total), total)
    return fitted


class _RefusedStream(protocol.Protocol):
    """A refused plain connection: our header and the stream error at once,
    then the close; nothing is read or kept."""

    def __init__(self, payload: bytes):
        self.payload = payload

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        pass  # never parsed


def refusal_bytes(stream_ns: str, reason: str) -> bytes:
    """Our header and the stream error for a refusal (RFC 6120 4.9.1.2: the
    header first, since the error comes before it); no 'from', since the
    domain asked for is not known yet."""
    declare_db = f" xmlns:db='{ns.DIALBACK}'" if stream_ns == ns.SERVER else ""
    return (f"<?xml version='1.0'?><stream:stream xmlns='{escape_attr(stream_ns)}'"
            f" xmlns:stream='{ns.STREAMS}'{declare_db} version='1.0'>"
            f"<stream:error><{CONDITIONS[reason]} xmlns='{ns.STREAM_ERRORS}'/>"
            f"<text xmlns='{ns.STREAM_ERRORS}'>{TEXTS[reason]}</text></stream:error>"
            "</stream:stream>").encode()


class AdmittingFactory(protocol.Factory):
    """A listener's factory that admits before it builds.

    ``build(ticket)`` makes the protocol of an admitted connection (which
    releases the ticket on authentication and on close).  A refused
    connection gets ``stream_ns``'s header and stream error when the stream
    is plain, and when ``direct_tls`` no protocol at all: Twisted closes
    the accepted socket at once, before a byte of TLS."""

    noisy = False

    def __init__(self, admission: Admission, build, stream_ns: str, direct_tls: bool = False):
        self.admission = admission
        self.build = build
        self.direct_tls = direct_tls
        self._refusals = {reason: refusal_bytes(stream_ns, reason) for reason in REASONS}

    def buildProtocol(self, addr):
        outcome = self.admission.admit(getattr(addr, "host", "?"))
        if isinstance(outcome, Ticket):
            try:
                return self.build(outcome)
            except BaseException:
                outcome.release()
                raise
        if self.direct_tls:
            return None
        return _RefusedStream(self._refusals[outcome])
