"""The DNS check: for each hosted and component domain, the
``_xmpp-server._tcp`` SRV records and the addresses they point to, and
``_xmpps-server._tcp`` (XEP-0368) where Direct TLS is configured.

SRV records are optional (RFC 6120 3.2: without them a peer connects to
the domain itself on 5269), and NAT, load balancers or a cluster make
"points at this host" the wrong test: so what is found here is reported,
and only a domain that resolves to nothing at all, neither through SRV nor
by its own A/AAAA records, is an error.  A SRV target of "." (RFC 2782:
the service is decidedly not offered) is a warning.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.names import dns, error

from fedgate.check import ERROR, INFO, OK, WARNING, Finding

STARTTLS_SERVICE, DIRECT_TLS_SERVICE = "_xmpp-server._tcp", "_xmpps-server._tcp"
_ABSENT = (error.DNSNameError, error.DNSServerError, error.DomainError, error.AuthoritativeDomainError)


async def _srv(resolver, name: str):
    """[(priority, weight, port, target)] or None when there are none; a
    timeout or server failure raises."""
    try:
        answers, _, _ = await resolver.lookupService(name)
    except (error.DNSNameError, error.DomainError, error.AuthoritativeDomainError):
        return None
    records = [(rr.payload.priority, rr.payload.weight, rr.payload.port,
                rr.payload.target.name.decode("ascii").rstrip("."))
               for rr in answers if rr.type == dns.SRV]
    return sorted(records) or None


_NO_ANSWER = (error.DNSQueryTimeoutError, defer.TimeoutError)


class NoAnswer(Exception):
    """DNS did not answer: nothing can be said about the name."""


async def _addresses(resolver, host: str) -> list[str]:
    found = []
    for lookup, kind in ((resolver.lookupAddress, dns.A), (resolver.lookupIPV6Address, dns.AAAA)):
        try:
            answers, _, _ = await lookup(host)
        except _ABSENT:
            continue
        except _NO_ANSWER as exc:
            raise NoAnswer(f"no answer from DNS for {host} ({exc.__class__.__name__})") from None
        found += [rr.payload.dottedQuad() if kind == dns.A else _ipv6(rr.payload)
                  for rr in answers if rr.type == kind]
    return found


def _ipv6(payload) -> str:
    import socket
    return socket.inet_ntop(socket.AF_INET6, payload.address)


async def check_domain(resolver, domain: str, direct_tls: bool) -> list[Finding]:
    try:
        return await _check_domain(resolver, domain, direct_tls)
    except NoAnswer as exc:
        return [Finding("dns", WARNING, domain, f"{exc}: is --dns-server right?")]


async def _check_domain(resolver, domain: str, direct_tls: bool) -> list[Finding]:
    def finding(level, message, **facts):
        return Finding("dns", level, domain, message, facts)

    out, reachable = [], False
    services = [STARTTLS_SERVICE] + ([DIRECT_TLS_SERVICE] if direct_tls else [])
    for service in services:
        name = f"{service}.{domain}"
        try:
            records = await _srv(resolver, name)
        except _NO_ANSWER + (error.DNSServerError,) as exc:
            out.append(finding(WARNING, f"{name}: no answer from DNS ({exc.__class__.__name__})"))
            continue
        if records is None:
            out.append(finding(INFO if service == STARTTLS_SERVICE else WARNING,
                               f"no {name} SRV records" + (
                                   f" (peers fall back to {domain} on port 5269)"
                                   if service == STARTTLS_SERVICE else
                                   ": Direct TLS is configured, but peers cannot find it")))
            continue
        if records == [(records[0][0], records[0][1], records[0][2], "")]:
            out.append(finding(WARNING, f"{name} says the service is not offered (target '.')"))
            continue
        for priority, weight, port, target in records:
            addresses = await _addresses(resolver, target)
            facts = {"service": service, "priority": priority, "weight": weight, "port": port,
                     "target": target, "addresses": addresses}
            if addresses:
                reachable = True
                out.append(finding(OK, f"{name} -> {target}:{port} (priority {priority}, weight "
                                       f"{weight}) = {', '.join(addresses)}", **facts))
            else:
                out.append(finding(WARNING, f"{name} -> {target}:{port}: {target} has no A or "
                                            "AAAA record", **facts))
    if not reachable:
        addresses = await _addresses(resolver, domain)
        if addresses:
            out.append(finding(OK, f"{domain} itself = {', '.join(addresses)} (port 5269 "
                                   "without SRV records)", addresses=addresses))
        else:
            out.append(finding(ERROR, "resolves to nothing: no usable SRV record and no A or AAAA "
                                      "record, so no peer can reach it"))
    return out


async def check_dns(config, resolver) -> list[Finding]:
    direct_tls = bool(config.s2s.direct_tls_listen)
    out = []
    for domain in sorted(set(config.domains) | set(config.components.domains)):
        out += await check_domain(resolver, domain, direct_tls)
    return out


def make_resolver(server: str | None, timeout: float = 3.0):
    """A twisted.names resolver: ``host:port`` (or ``host``) when given,
    else the system's (/etc/resolv.conf)."""
    from twisted.names import client
    if server is None:
        return client.createResolver()
    host, sep, port = server.rpartition(":")
    if not sep or not port.isdigit():
        host, port = server, "53"
    return client.Resolver(servers=[(host.strip("[]"), int(port))], timeout=(timeout,))
