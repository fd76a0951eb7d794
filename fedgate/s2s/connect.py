"""Open a TCP connection to a remote XMPP domain (RFC 6120 section 3.2).

Targets come from the resolver (static addresses, SRV, or the domain itself
on 5269); each target's addresses are tried in order until one answers.

Every outbound S2S connection goes through :class:`DomainConnector` (our own
streams, dialback verifications) or asks it first (``/diagnose``), so the
address rule lives here once: for a domain that is not a static peer, IP
literal domains and addresses that are not globally routable are refused
unless ``s2s.allow_private_ranges`` names them (see
:mod:`fedgate.s2s.addresses`).  What was tried, and why it was refused, is
logged and kept on the error for operators; the text that may reach a
remote server names no address.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.internet import protocol as _protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectingCancelledError
from twisted.logger import Logger

from fedgate.s2s.addresses import AddressPolicy, is_ip_literal

log = Logger(namespace="fedgate.s2s.connect")


class ConnectError(Exception):
    """No connection could be made; ``condition`` is the bounce condition.

    ``text`` is safe to send anywhere (it names the domain, never an address
    or an internal error); ``detail`` is for logs and diagnostics only."""

    def __init__(self, condition: str, text: str, detail: str | None = None):
        super().__init__(f"{condition}: {text}")
        self.condition = condition
        self.text = text
        self.detail = detail


class ConnectObserver:
    """Hears every step of one :meth:`DomainConnector.connect` (``/diagnose``
    records them); every method is optional to override."""

    def targets(self, targets) -> None: ...
    def addresses(self, target, addresses, error=None) -> None: ...
    def address_refused(self, target, address: str, why: str) -> None: ...
    def attempt(self, target, address: str) -> None: ...
    def attempt_failed(self, target, address: str, error: Exception) -> None: ...
    def attempt_made(self, target, address: str) -> None: ...


_SILENT = ConnectObserver()


class _OneProtocol(_protocol.Factory):
    """Hands out one prebuilt protocol, without start/stop log lines."""

    noisy = False

    def __init__(self, built):
        self.built = built

    def buildProtocol(self, addr):
        return self.built


class DomainConnector:
    """Connects to remote domains, only where the address rule allows.

    ``addresses`` judges each resolved address; ``is_static(domain)`` says
    whether the operator configured the domain's addresses (static peers
    are exempt from the rule)."""

    def __init__(self, reactor, resolver, timeout: float = 20.0,
                 addresses: AddressPolicy | None = None,
                 is_static: Callable[[str], bool] | None = None):
        self.reactor = reactor
        self.resolver = resolver
        self.timeout = timeout
        self.addresses = addresses if addresses is not None else AddressPolicy()
        self.is_static = is_static if is_static is not None else (lambda domain: False)

    def domain_refusal(self, domain: str) -> str | None:
        """Why no connection may be made for ``domain`` at all, or None."""
        if is_ip_literal(domain) and not self.is_static(domain):
            return "the domain is an IP address and not a static peer"
        return None

    def refusal(self, domain: str, address: str) -> str | None:
        """Why we must not connect to ``address`` for ``domain``, or None."""
        if self.is_static(domain):
            return None
        return self.domain_refusal(domain) or self.addresses.refusal(address)

    @defer.inlineCallbacks
    def connect(self, domain: str, protocol_factory: Callable,
                observer: ConnectObserver | None = None):
        """Connect to ``domain``; fires with the connected protocol.

        ``protocol_factory(target)`` builds the protocol for one attempt, so a
        Direct TLS target (XEP-0368) can start TLS at once.  Cancelling the
        returned Deferred stops the attempt, wherever it is.  ``observer``
        hears each step (the targets, their addresses, every attempt)."""
        observer = observer if observer is not None else _SILENT
        public = f"could not connect to the servers of {domain}"
        why = self.domain_refusal(domain)
        if why is not None:
            log.warn("Not connecting to {domain}: {why}", domain=domain, why=why)
            raise ConnectError("remote-server-not-found", public, why)
        targets = yield self.resolver.resolve(domain)
        observer.targets(targets)
        if not targets:
            raise ConnectError("remote-server-not-found", f"{domain} offers no XMPP server service")
        tried, outcomes = [], []
        for target in targets:
            try:
                addresses = yield self.resolver.resolve_host(target.host)
            except defer.CancelledError:
                raise
            except Exception as exc:
                observer.addresses(target, [], exc)
                tried.append(f"{target.host}: {exc}")
                outcomes.append("its DNS lookup failed")
                continue
            observer.addresses(target, addresses)
            if not addresses:
                tried.append(f"{target.host}: no address")
                outcomes.append("has no address in DNS")
            failures = []
            for address in addresses:
                why = self.refusal(domain, address)
                if why is not None:
                    log.warn("Not connecting to {domain} at {address}:{port} ({host}): {why}",
                             domain=domain, address=address, port=target.port, host=target.host,
                             why=why)
                    tried.append(f"{address}:{target.port} refused: {why}")
                    failures.append("has only addresses we may not connect to")
                    observer.address_refused(target, address, why)
                    continue
                kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
                endpoint = kind(self.reactor, address, target.port, timeout=self.timeout)
                observer.attempt(target, address)
                try:
                    protocol = yield endpoint.connect(_OneProtocol(protocol_factory(target)))
                except (defer.CancelledError, ConnectingCancelledError):
                    raise defer.CancelledError() from None  # stopped: no next address
                except Exception as exc:
                    log.info("Connecting to {domain} at {address}:{port} failed: {error}",
                             domain=domain, address=address, port=target.port, error=exc)
                    tried.append(f"{address}:{target.port}: {exc}")
                    failures.append(_why_public(exc))
                    observer.attempt_failed(target, address, exc)
                    continue
                observer.attempt_made(target, address)
                return protocol
            if failures:
                outcomes.append(_worst(failures))
        detail = f"tried {'; '.join(tried) or 'nothing'}"
        log.info("Could not connect to {domain}: {detail}", domain=domain, detail=detail)
        raise ConnectError("remote-server-not-found", public_text(domain, targets, outcomes), detail)


def _why_public(exc: Exception) -> str:
    """Why one attempt failed, in words that name no address."""
    from twisted.internet import error
    if isinstance(exc, (error.ConnectionRefusedError,)):
        return "refused the connection"
    if isinstance(exc, (error.TCPTimedOutError, error.TimeoutError)):
        return "did not answer in time"
    if isinstance(exc, (error.NoRouteError,)):
        return "cannot be reached (no route)"
    return "could not be reached"


def _worst(failures: list[str]) -> str:
    """One outcome for a server with several addresses: the last attempt's
    (the one that decided), unless every address was one we may not use."""
    tried = [f for f in failures if f != "has only addresses we may not connect to"]
    return tried[-1] if tried else failures[-1]


def public_text(domain: str, targets, outcomes: list[str]) -> str:
    """What a bounce may say: the domain, what was tried (servers from DNS
    SRV records, or the domain itself on 5269) and why each failed, never an
    address or a server's host name."""
    base = f"could not connect to the servers of {domain}"
    if not outcomes:
        return base
    if len(targets) == 1 and targets[0].host == domain:
        return f"{base}: {domain} itself (port {targets[0].port}, no SRV records) {outcomes[0]}"
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    if len(outcomes) == 1:
        return f"{base}: the server its SRV records name {outcomes[0]}"
    parts = [f"{n} {outcome}" for outcome, n in counts.items()]
    return f"{base}: of the {len(outcomes)} servers its SRV records name, " + ", ".join(parts)
