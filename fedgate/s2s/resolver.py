"""Where to connect for a remote XMPP domain (RFC 6120 section 3.2).

The sender asks :class:`S2SResolver` for an ordered list of :class:`Target`
hostnames and ports and tries them in turn.  Ordering follows RFC 2782:
lowest priority first, weighted random order within a priority.  A lone SRV
record whose target is ``.`` means the domain decidedly offers no server to
server service, so the list is empty and the sender bounces at once.  When
there are no SRV records at all, or DNS fails, RFC 6120 section 3.2.2 says to
fall back to the domain itself on port 5269.

Hostnames are kept in the targets because the connector resolves them through
its endpoint and checks certificates against the domain, not an address;
:meth:`S2SResolver.resolve_host` is there for callers that want addresses.

XEP-0368 (``_xmpps-server._tcp``, TLS from the first byte) is merged in when
asked for: those targets carry ``direct_tls=True`` and come first within a
priority, as the XEP recommends.

The DNS resolver is injected (any ``twisted.names`` ``IResolver``) so that tests
point it at a real server on loopback and nothing here touches global state.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from types import MappingProxyType

import idna
from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns, error
from twisted.python.failure import Failure

from fedgate.logsafe import short

__all__ = ["DEFAULT_PORT", "S2SResolver", "Target"]

DEFAULT_PORT = 5269
STARTTLS_SERVICE = "_xmpp-server._tcp"
DIRECT_TLS_SERVICE = "_xmpps-server._tcp"

# What an ordinary DNS failure looks like through twisted.names: error
# responses (DomainError subclasses: NXDOMAIN, SERVFAIL, REFUSED...), the
# client's final timeout (a plain defer.TimeoutError, not DNSQueryTimeoutError),
# and socket trouble.  Anything else is a bug and is allowed to propagate.
_DNS_FAILURES = (
    error.DomainError,
    error.AuthoritativeDomainError,
    error.ResolverError,
    defer.TimeoutError,
    TimeoutError,
    OSError,
)

log = Logger()


@dataclass(frozen=True)
class Target:
    """One host and port to try, and whether to start TLS before the stream."""

    host: str
    port: int
    direct_tls: bool = False


@dataclass(frozen=True)
class _Srv:
    priority: int
    weight: int
    target: Target


@dataclass(frozen=True)
class _SrvAnswer:
    """What one SRV query told us: records, an explicit refusal, or nothing."""

    records: tuple[_Srv, ...] = ()
    declined: bool = False


class S2SResolver:
    """Turn a remote domain into the ordered targets RFC 6120 section 3.2 asks for.

    ``static_addresses`` (domain -> ``[(host, port), ...]``) overrides DNS
    entirely for that domain, for peers inside a private network or tests.
    ``rng`` drives the RFC 2782 weighted choice; inject a seeded one in tests.
    ``include_direct_tls`` also asks for XEP-0368 ``_xmpps-server._tcp`` records.
    ``timeout`` is passed to every lookup (the ``twisted.names`` default allows
    about a minute, too long for a queued stanza).
    """

    def __init__(
        self,
        resolver,
        static_addresses: Mapping[str, Sequence[tuple[str, int]]]
        | Callable[[str], Sequence[tuple[str, int]] | None] = MappingProxyType({}),
        rng: random.Random | None = None,
        *,
        include_direct_tls: bool = False,
        timeout: Sequence[float] | None = None,
    ) -> None:
        self._resolver = resolver
        if callable(static_addresses):
            # A live lookup (the peer policy table): changes apply at once.
            self._static_lookup = static_addresses
        else:
            table = {_dns_name(domain): tuple(addresses)
                     for domain, addresses in static_addresses.items()}
            self._static_lookup = table.get
        self._rng = rng if rng is not None else random.SystemRandom()
        self._include_direct_tls = include_direct_tls
        self._timeout = tuple(timeout) if timeout is not None else None

    def resolve(self, domain: str) -> defer.Deferred[list[Target]]:
        """Fire with the targets for ``domain``, best first; never errbacks on DNS trouble."""
        try:
            name = _dns_name(domain)
        except ValueError:
            log.warn("Cannot resolve invalid domain {domain!r}", domain=short(domain))
            return defer.succeed([])
        addresses = self._static_lookup(name)
        if addresses:
            static = tuple(Target(host, int(port)) for host, port in addresses)
            log.debug("Static addresses for {domain}: {targets}", domain=domain, targets=static)
            return defer.succeed(list(static))
        lookups = [self._lookup_srv(name, STARTTLS_SERVICE, direct_tls=False)]
        if self._include_direct_tls:
            lookups.append(self._lookup_srv(name, DIRECT_TLS_SERVICE, direct_tls=True))
        d = defer.gatherResults(lookups, consumeErrors=True)
        d.addCallback(self._targets, domain, name)
        d.addErrback(_unwrap_first_error)
        return d

    def resolve_host(self, host: str) -> defer.Deferred[list[str]]:
        """Fire with the A then AAAA addresses of ``host`` (an IP literal is itself).

        Fires with an empty list when neither lookup finds anything.
        """
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return defer.succeed([host])
        try:
            name = _dns_name(host)
        except ValueError:
            log.warn("Cannot resolve invalid host {host!r}", host=short(host))
            return defer.succeed([])
        lookups = [
            self._lookup_addresses(self._resolver.lookupAddress, name, dns.A, socket.AF_INET),
            self._lookup_addresses(self._resolver.lookupIPV6Address, name, dns.AAAA, socket.AF_INET6),
        ]
        d = defer.gatherResults(lookups, consumeErrors=True)
        d.addCallback(lambda results: list(dict.fromkeys(results[0] + results[1])))
        d.addErrback(_unwrap_first_error)
        return d

    def _lookup_srv(self, name: str, service: str, direct_tls: bool) -> defer.Deferred[_SrvAnswer]:
        qname = f"{service}.{name}"
        d = defer.maybeDeferred(self._resolver.lookupService, qname, self._timeout)
        # addCallbacks, not a chain: only the lookup's failure means "absent";
        # a fault while reading the answer is a bug and must surface.
        d.addCallbacks(_srv_answer, self._srv_failed, (qname, direct_tls), None, (qname,))
        return d

    def _srv_failed(self, failure: Failure, qname: str) -> _SrvAnswer:
        failure.trap(*_DNS_FAILURES)
        if failure.check(error.DNSNameError, error.AuthoritativeDomainError):
            log.debug("No SRV records at {qname} (NXDOMAIN)", qname=qname)
        else:
            log.debug(
                "SRV lookup for {qname} failed, treating as absent: {reason}",
                qname=qname,
                reason=failure.getErrorMessage() or failure.type.__name__,
            )
        return _SrvAnswer()

    def _targets(self, answers: list[_SrvAnswer], domain: str, name: str) -> list[Target]:
        records = [srv for answer in answers for srv in answer.records]
        if records:
            targets = _order(records, self._rng)
            log.debug("SRV targets for {domain}: {targets}", domain=domain, targets=targets)
            return targets
        if answers[0].declined:
            # Only the STARTTLS service's '.' counts: a '.' for direct TLS
            # says nothing about the ordinary service and its fallback.
            log.debug("{domain} declares no XMPP server service (SRV target '.')", domain=domain)
            return []
        log.debug(
            "No SRV records for {domain}, falling back to port {port}", domain=domain, port=DEFAULT_PORT
        )
        return [Target(name, DEFAULT_PORT)]

    def _lookup_addresses(self, method, name: str, rrtype: int, family: int) -> defer.Deferred[list[str]]:
        d = defer.maybeDeferred(method, name, self._timeout)

        def extract(result):
            answers = result[0]
            return [socket.inet_ntop(family, rr.payload.address) for rr in answers if rr.type == rrtype]

        def failed(failure: Failure) -> list[str]:
            failure.trap(*_DNS_FAILURES)
            log.debug(
                "{rrtype} lookup for {host} failed: {reason}",
                rrtype=dns.QUERY_TYPES[rrtype],
                host=name,
                reason=failure.getErrorMessage() or failure.type.__name__,
            )
            return []

        d.addCallbacks(extract, failed)
        return d


def _dns_name(domain: str) -> str:
    """The A-label, lower-case, dot-free-at-the-end form DNS and our keys use.

    Raises ValueError for names IDNA2008 rejects.
    """
    name = domain[:-1] if domain.endswith(".") else domain
    name = name.lower()
    if not name:
        raise ValueError("empty domain")
    if name.isascii():
        return name
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise ValueError(str(exc)) from None


def _srv_answer(result, qname: str, direct_tls: bool) -> _SrvAnswer:
    """Reduce a (answers, authority, additional) SRV response to an _SrvAnswer."""
    srvs = [rr.payload for rr in result[0] if rr.type == dns.SRV]
    usable = [srv for srv in srvs if srv.target.name not in (b"", b".")]
    if len(srvs) == 1 and not usable:
        return _SrvAnswer(declined=True)
    if len(usable) != len(srvs):
        log.debug("Ignoring '.' SRV target among other records at {qname}", qname=qname)
    records = []
    for srv in usable:
        host = srv.target.name.decode("ascii", "replace").rstrip(".").lower()
        records.append(_Srv(srv.priority, srv.weight, Target(host, srv.port, direct_tls)))
    return _SrvAnswer(records=tuple(records))


def _order(records: list[_Srv], rng: random.Random) -> list[Target]:
    """RFC 2782 order: by priority; direct TLS first, then weighted, within one."""
    ordered: list[Target] = []
    by_priority = sorted(records, key=lambda srv: srv.priority)
    for _, group in groupby(by_priority, key=lambda srv: srv.priority):
        same_priority = list(group)
        for direct_tls in (True, False):
            subset = [srv for srv in same_priority if srv.target.direct_tls is direct_tls]
            ordered.extend(_weighted(subset, rng))
    return ordered


def _weighted(records: list[_Srv], rng: random.Random) -> list[Target]:
    """The weighted random selection of RFC 2782 over one priority.

    Records are first put in a canonical order (zero weights first, as the RFC
    requires, then by host and port) so that a seeded ``rng`` gives the same
    order whatever order the DNS answer happened to list them in.
    """
    remaining = sorted(records, key=lambda srv: (srv.weight != 0, srv.target.host, srv.target.port))
    ordered = []
    while remaining:
        pick = rng.randint(0, sum(srv.weight for srv in remaining))
        running = 0
        for index, srv in enumerate(remaining):
            running += srv.weight
            if running >= pick:
                ordered.append(remaining.pop(index).target)
                break
    return ordered


def _unwrap_first_error(failure: Failure) -> Failure:
    """gatherResults wraps errors in FirstError; hand callers the real one."""
    failure.trap(defer.FirstError)
    return failure.value.subFailure
