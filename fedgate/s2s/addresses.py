"""Which IP addresses an outbound S2S connection may go to.

A remote server picks where we connect: an unauthenticated
``<db:result from='X'>`` makes us resolve X and dial whatever its SRV and
A/AAAA records say.  Without a check that is a way to make us open
connections inside our own network (loopback, RFC 1918, the cloud metadata
service at 169.254.169.254...) and learn from the outcome which ports
answer.  So every address is judged before we connect: only globally
routable unicast addresses pass, unless the operator names the private
ranges its own deployment federates over (``s2s.allow_private_ranges``).
Static peers (addresses configured by the operator) are exempt; that is
decided by the connector, which knows the peer policy.

IPv6 addresses that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``,
6to4 ``2002::/16``, the NAT64 well-known prefix ``64:ff9b::/96``) are judged
by the IPv4 address they lead to as well.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["RANGE_NAMES", "AddressPolicy", "allowed_networks", "is_ip_literal"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The names ``s2s.allow_private_ranges`` accepts, and what each allows.
RANGE_NAMES: dict[str, tuple[str, ...]] = {
    "loopback": ("127.0.0.0/8", "::1/128"),
    "private": ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"),  # RFC 1918, ULA
    "link-local": ("169.254.0.0/16", "fe80::/10"),
    "shared": ("100.64.0.0/10",),  # RFC 6598 carrier-grade NAT
}

_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def allowed_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """The networks named by ``values`` (range names or CIDR strings).

    Raises ValueError naming the first value that is neither."""
    networks: list[Network] = []
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"expected range names or CIDR strings, got {value!r}")
        if value in RANGE_NAMES:
            networks.extend(ipaddress.ip_network(cidr) for cidr in RANGE_NAMES[value])
            continue
        try:
            networks.append(ipaddress.ip_network(value, strict=True))
        except ValueError as exc:
            names = ", ".join(repr(name) for name in RANGE_NAMES)
            raise ValueError(f"{value!r} is neither a range name ({names}) nor a network "
                             f"in CIDR notation ({exc})") from None
    return tuple(networks)


def is_ip_literal(domain: str) -> bool:
    """Whether a domain is an IP address (``[::1]``, ``127.0.0.1``) rather
    than a DNS name."""
    text = domain[1:-1] if domain.startswith("[") and domain.endswith("]") else domain
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _category(address: Address) -> str | None:
    """Why ``address`` is not a global unicast address, or None if it is."""
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.version == 4 and address in _SHARED:
        return "shared (carrier-grade NAT)"
    if address.is_private:
        return "private"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "not globally routable"
    return None


class AddressPolicy:
    """Judges addresses; ``allowed`` are the operator's private ranges."""

    def __init__(self, allowed: Iterable[Network] = ()):
        self.allowed = tuple(allowed)

    @classmethod
    def from_config(cls, values: Iterable[str]) -> "AddressPolicy":
        return cls(allowed_networks(values))

    def _permitted(self, address: Address) -> bool:
        return any(address.version == net.version and address in net for net in self.allowed)

    def refusal(self, text: str) -> str | None:
        """Why we must not connect to the address ``text``, or None if we may."""
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return "not an IP address"
        via = ""
        if address.version == 6:
            if address.scope_id:
                address = ipaddress.IPv6Address(text.split("%", 1)[0])
            inner = _embedded_ipv4(address)
            if inner is not None:
                # It leads to that IPv4 address, so that is the one judged.
                via = f" (carried in {address.compressed})"
                address = inner
        if self._permitted(address):
            return None
        why = _category(address)
        return None if why is None else f"{why} address{via}"
