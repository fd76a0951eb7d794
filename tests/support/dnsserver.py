"""A real authoritative DNS server on loopback for tests.

Tests of address resolution talk to this over real UDP and TCP sockets, so
they exercise the same ``twisted.names`` client code paths as production.
Records live in memory and may be added while the server runs; every query is
recorded so a test can assert that DNS was, or was not, consulted.

Names are compared case-insensitively without the final dot.  A name that has
no records of the asked type but exists (or has names below it) answers
NOERROR with no data; any other name answers an authoritative NXDOMAIN.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.names import common, dns, error, server
from twisted.names.client import Resolver

__all__ = ["TestDNSServer", "make_client_resolver"]

_TTL = 60


def _key(name: str | bytes) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii")
    return name.rstrip(".").lower()


def _wire_name(name: str) -> str:
    # dns.Name("x.") and dns.Name("x") encode alike, but dns.Name(".") encodes
    # a one-byte label containing a dot; the root must be the empty name.
    return "" if name in ("", ".") else name.rstrip(".")


class _MemoryAuthority(common.ResolverBase):
    """An in-memory zone: answers what it holds, NXDOMAIN for anything else."""

    def __init__(self) -> None:
        common.ResolverBase.__init__(self)
        self.records: dict[str, list[dns.RRHeader]] = {}
        self.silent: set[str] = set()
        self.queries: list[tuple[str, str]] = []

    def add(self, name: str, payload) -> None:
        key = _key(name)
        header = dns.RRHeader(name=key, type=payload.TYPE, cls=dns.IN, ttl=_TTL, payload=payload, auth=True)
        self.records.setdefault(key, []).append(header)

    def _exists(self, key: str) -> bool:
        return key in self.records or any(other.endswith("." + key) for other in self.records)

    def _lookup(self, name, cls, type, timeout):
        key = _key(name)
        self.queries.append((key, dns.QUERY_TYPES.get(type, str(type))))
        if key in self.silent:
            return defer.Deferred()  # never answers: the client times out
        if not self._exists(key):
            return defer.fail(error.AuthoritativeDomainError(key))
        answers = [rr for rr in self.records.get(key, []) if type in (rr.type, dns.ALL_RECORDS)]
        return defer.succeed((answers, [], []))


class _AuthoritativeServerFactory(server.DNSServerFactory):
    """DNSServerFactory that marks NXDOMAIN and empty answers authoritative.

    Stock twisted.names sets the AA bit only when some answer record carries
    it, so its negative answers look like they came from a cache.
    """

    def __init__(self, authority: _MemoryAuthority) -> None:
        server.DNSServerFactory.__init__(self, authorities=[authority])
        self._closed: list[defer.Deferred] = []

    def _reply(self, protocol, message, address, rcode, answers) -> None:
        response = dns.Message(
            id=message.id,
            answer=1,
            opCode=message.opCode,
            recDes=message.recDes,
            recAv=0,
            auth=1,
            rCode=rcode,
        )
        response.queries = message.queries
        response.answers = answers
        response.maxSize = message.maxSize
        response.timeReceived = getattr(message, "timeReceived", None)
        self.sendReply(protocol, response, address)

    def gotResolverResponse(self, response, protocol, message, address):
        self._reply(protocol, message, address, dns.OK, response[0])

    def gotResolverError(self, failure, protocol, message, address):
        if failure.check(error.AuthoritativeDomainError):
            self._reply(protocol, message, address, dns.ENAME, [])
        else:
            server.DNSServerFactory.gotResolverError(self, failure, protocol, message, address)

    def connectionLost(self, protocol):
        server.DNSServerFactory.connectionLost(self, protocol)
        if not self.connections:
            waiting, self._closed = self._closed, []
            for d in waiting:
                d.callback(None)

    def all_closed(self) -> defer.Deferred:
        """Fire once every TCP connection from a client has gone."""
        if not self.connections:
            return defer.succeed(None)
        d = defer.Deferred()
        self._closed.append(d)
        return d


class TestDNSServer:
    """An authoritative DNS server on 127.0.0.1, UDP and TCP on one port."""

    __test__ = False  # a helper, not a pytest test class

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._authority = _MemoryAuthority()
        self._factory = _AuthoritativeServerFactory(self._authority)
        self._factory.noisy = False
        self._ports: list = []
        self._stopping: list[defer.Deferred] = []
        self.port: int | None = None

    def add_srv(self, name: str, priority: int, weight: int, port: int, target: str) -> None:
        """Add an SRV record; a target of ``.`` means 'service not offered'."""
        self._authority.add(name, dns.Record_SRV(priority, weight, port, _wire_name(target), ttl=_TTL))

    def add_a(self, name: str, address: str) -> None:
        self._authority.add(name, dns.Record_A(address, ttl=_TTL))

    def add_aaaa(self, name: str, address: str) -> None:
        self._authority.add(name, dns.Record_AAAA(address, ttl=_TTL))

    def add_silent(self, name: str) -> None:
        """Never answer queries for ``name``, so that clients time out."""
        self._authority.silent.add(_key(name))

    @property
    def queries(self) -> list[tuple[str, str]]:
        """Every query received so far, as (name, type name) e.g. ('x.org', 'SRV')."""
        return list(self._authority.queries)

    def clear_queries(self) -> None:
        del self._authority.queries[:]

    def start(self, port: int = 0) -> int:
        """Listen on UDP and TCP and return the port number both are bound to."""
        if self._ports:
            raise RuntimeError("already started")
        attempts = 1 if port else 20
        for _ in range(attempts):
            udp = self._reactor.listenUDP(
                port, dns.DNSDatagramProtocol(self._factory, reactor=self._reactor), interface="127.0.0.1"
            )
            bound = udp.getHost().port
            try:
                tcp = self._reactor.listenTCP(bound, self._factory, interface="127.0.0.1")
            except CannotListenError:
                # Someone else holds this number for TCP; try another.  The
                # UDP socket closes in a moment; stop() waits for it.
                self._stopping.append(defer.maybeDeferred(udp.stopListening))
                if port:
                    raise
                continue
            self._ports = [udp, tcp]
            self.port = bound
            return bound
        raise CannotListenError("127.0.0.1", port, socket.error("no port free for both UDP and TCP"))

    def stop(self) -> defer.Deferred:
        """Stop listening and drop client TCP connections; fire when all are gone."""
        waits = [defer.maybeDeferred(p.stopListening) for p in self._ports] + self._stopping
        self._ports, self._stopping = [], []
        for protocol in list(self._factory.connections):
            protocol.transport.loseConnection()
        waits.append(self._factory.all_closed())
        self.port = None
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)


def make_client_resolver(reactor, port: int, timeout: Sequence[float] = (1.0, 2.0)) -> Resolver:
    """A twisted.names client that asks only 127.0.0.1:port.

    Not ``client.createResolver``: that one also reads /etc/resolv.conf (and
    would retry there on timeout), /etc/hosts, adds a cache, and schedules
    re-reads of resolv.conf on the global reactor.
    """
    return Resolver(servers=[("127.0.0.1", port)], timeout=tuple(timeout), reactor=reactor)
