"""Open a TCP connection to a remote XMPP domain (RFC 6120 section 3.2).

Targets come from the resolver (static addresses, SRV, or the domain itself
on 5269); each target's addresses are tried in order until one answers.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.internet import protocol as _protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.logger import Logger

log = Logger(namespace="fedgate.s2s.connect")


class ConnectError(Exception):
    """No connection could be made; ``condition`` is the bounce condition."""

    def __init__(self, condition: str, text: str):
        super().__init__(f"{condition}: {text}")
        self.condition = condition
        self.text = text


class _OneProtocol(_protocol.Factory):
    """Hands out one prebuilt protocol, without start/stop log lines."""

    noisy = False

    def __init__(self, built):
        self.built = built

    def buildProtocol(self, addr):
        return self.built


class DomainConnector:
    def __init__(self, reactor, resolver, timeout: float = 20.0):
        self.reactor = reactor
        self.resolver = resolver
        self.timeout = timeout

    @defer.inlineCallbacks
    def connect(self, domain: str, protocol_factory: Callable):
        """Connect to ``domain``; fires with the connected protocol.

        ``protocol_factory(target)`` builds the protocol for one attempt, so a
        Direct TLS target (XEP-0368) can start TLS at once."""
        targets = yield self.resolver.resolve(domain)
        if not targets:
            raise ConnectError("remote-server-not-found", f"{domain} offers no XMPP server service")
        tried = []
        for target in targets:
            try:
                addresses = yield self.resolver.resolve_host(target.host)
            except Exception as exc:
                tried.append(f"{target.host}: {exc}")
                continue
            for address in addresses:
                kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
                endpoint = kind(self.reactor, address, target.port, timeout=self.timeout)
                try:
                    protocol = yield endpoint.connect(_OneProtocol(protocol_factory(target)))
                except Exception as exc:
                    log.info("Connecting to {domain} at {address}:{port} failed: {error}",
                             domain=domain, address=address, port=target.port, error=exc)
                    tried.append(f"{address}:{target.port}")
                    continue
                return protocol
        raise ConnectError("remote-server-not-found",
                           f"could not connect to {domain} (tried {', '.join(tried) or 'nothing'})")
