"""Federation policy: who may federate with us, and on what terms.

One default policy plus per-peer overrides, and a mode: ``open`` federation
(anyone not blocked) or ``allowlist`` (only peers listed and allowed).  Every
check, inbound and outbound, asks this table, so a policy change made at run
time (by the admin API) takes effect at once; listeners registered with
:meth:`PolicyTable.subscribe` hear about each change so live connections can
be brought in line.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from fedgate.domain import InvalidDomain, normalize_domain

ENCRYPTION_REQUIRED = "required"
ENCRYPTION_OPTIONAL = "optional"
ENCRYPTIONS = (ENCRYPTION_REQUIRED, ENCRYPTION_OPTIONAL)

AUTH_CERTIFICATE = "certificate"
AUTH_DIALBACK = "dialback"
AUTHENTICATIONS = (AUTH_CERTIFICATE, AUTH_DIALBACK)

MODE_OPEN = "open"
MODE_ALLOWLIST = "allowlist"
MODES = (MODE_OPEN, MODE_ALLOWLIST)


@dataclass(frozen=True)
class PeerPolicy:
    """The terms for one remote domain (or the default, with domain None)."""

    domain: str | None = None
    allowed: bool = True
    encryption: str = ENCRYPTION_REQUIRED
    authentication: str = AUTH_DIALBACK
    addresses: tuple = ()
    max_stanza_bytes: int | None = None
    rate_limit: float | None = None
    note: str = ""

    def __post_init__(self):
        if self.encryption not in ENCRYPTIONS:
            raise ValueError(f"encryption must be one of {', '.join(ENCRYPTIONS)}")
        if self.authentication not in AUTHENTICATIONS:
            raise ValueError(f"authentication must be one of {', '.join(AUTHENTICATIONS)}")

    @property
    def requires_tls(self) -> bool:
        return self.encryption == ENCRYPTION_REQUIRED

    @property
    def requires_certificate(self) -> bool:
        return self.authentication == AUTH_CERTIFICATE


@dataclass
class PolicyTable:
    default: PeerPolicy = field(default_factory=PeerPolicy)
    peers: dict = field(default_factory=dict)
    mode: str = MODE_OPEN
    _listeners: list = field(default_factory=list, repr=False)

    def for_peer(self, domain: str) -> PeerPolicy:
        """The policy for ``domain``: its override, or the default (a copy
        naming ``domain``, equal to ``replace(default, domain=domain)``)."""
        peer = self.peers.get(domain)
        if peer is not None:
            return peer
        default = self.default
        if default.domain == domain:
            return default
        # Asked several times per handshake for most peers: a plain copy of
        # terms already checked, not dataclasses.replace (which checks them
        # again through __init__ each time).
        stamped = object.__new__(PeerPolicy)
        stamped.__dict__.update(default.__dict__, domain=domain)
        return stamped

    def rate_limit(self, domain: str) -> float | None:
        """The peer's stanza rate limit, without building a policy object
        (this runs for every inbound stanza)."""
        return (self.peers.get(domain) or self.default).rate_limit

    def is_blocked(self, domain: str) -> bool:
        peer = self.peers.get(domain)
        if peer is not None:
            return not peer.allowed
        return self.mode == MODE_ALLOWLIST

    def why_blocked(self, domain: str) -> str:
        peer = self.peers.get(domain)
        if peer is not None and not peer.allowed:
            return f"federation with {domain} is blocked by policy"
        return f"federation with {domain} is not on the allow-list"

    def static_addresses(self, domain: str):
        """Static (host, port) addresses for ``domain`` (any spelling), if any."""
        try:
            key = normalize_domain(domain)
        except InvalidDomain:
            return None
        peer = self.peers.get(key)
        return peer.addresses if peer is not None and peer.addresses else None

    # -- changes ------------------------------------------------------------
    def subscribe(self, listener: Callable[[str | None], None]) -> None:
        """Call ``listener(domain)`` after each change (None: default or mode)."""
        self._listeners.append(listener)

    def _changed(self, domain: str | None) -> None:
        for listener in list(self._listeners):
            listener(domain)

    def set_peer(self, policy: PeerPolicy) -> None:
        self.peers[policy.domain] = policy
        self._changed(policy.domain)

    def remove_peer(self, domain: str) -> bool:
        removed = self.peers.pop(domain, None) is not None
        if removed:
            self._changed(domain)
        return removed

    def set_default(self, default: PeerPolicy, mode: str | None = None) -> None:
        self.default = replace(default, domain=None)
        if mode is not None:
            if mode not in MODES:
                raise ValueError(f"mode must be one of {', '.join(MODES)}")
            self.mode = mode
        self._changed(None)
