"""What fedgate keeps across restarts, and the interface every backend offers.

Three kinds of records: per-peer federation policy (a :class:`PeerPolicy`
for each remote domain an operator configured), a few named settings (the
federation mode and the default policy, as JSON values), and component
credentials (XEP-0114 and XEP-0225).  Every method returns a Deferred, and a write's
Deferred fires only once the write is durable: the admin API acknowledges a
change only after that, so an acknowledged change survives a crash.

Domains are keys, so every backend passes them through
:func:`fedgate.domain.normalize_domain` (two spellings of a domain are one
record) and raises :class:`~fedgate.domain.InvalidDomain` for bad ones.
``tests/test_storage_contract.py`` is the contract: a new backend (say, a
shared one for a cluster) is done when it passes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from fedgate.domain import normalize_domain
from fedgate.policy import PeerPolicy


class StorageError(Exception):
    """The store cannot be used (unreadable, newer schema, closed...)."""


@dataclass(frozen=True)
class ComponentCredential:
    """A component domain the gateway accepts and how it may authenticate:
    a XEP-0114 handshake ``secret``, and/or XEP-0225 SASL keys (salted SCRAM
    keys in their ``salt:iterations:storedkey:serverkey`` text form, never a
    password) with the extra hostnames the identity may bind, and/or its
    certificate pins for SASL EXTERNAL: SHA-256 fingerprints (lower case hex,
    no colons), or a PEM trust anchor together with the exact name the
    certificate must carry."""

    domain: str
    secret: str | None = field(default=None, repr=False)
    scram_sha1: str | None = field(default=None, repr=False)
    scram_sha256: str | None = field(default=None, repr=False)
    allowed: tuple[str, ...] = ()
    note: str = ""
    certificate_sha256: tuple[str, ...] = ()
    trust_anchor_pem: str | None = field(default=None, repr=False)
    certificate_name: str | None = None

    @property
    def certificate_auth(self) -> bool:
        return bool(self.certificate_sha256 or self.trust_anchor_pem)


class Storage(Protocol):
    """The interface of every backend; see the module docstring."""

    def open(self) -> Deferred[None]:
        """Create or upgrade the store; fires when it is ready."""

    def close(self) -> Deferred[None]:
        """Finish pending writes and release the store."""

    def peers(self) -> Deferred[list[PeerPolicy]]:
        """Every stored peer policy, ordered by domain."""

    def get_peer(self, domain: str) -> Deferred[PeerPolicy | None]: ...

    def put_peer(self, policy: PeerPolicy) -> Deferred[bool]:
        """Insert or replace ``policy``; fires with True if it was new."""

    def delete_peer(self, domain: str) -> Deferred[bool]:
        """Fires with False if there was nothing to delete."""

    def settings(self) -> Deferred[dict[str, Any]]:
        """Every stored setting: name -> JSON value."""

    def put_setting(self, name: str, value: Any) -> Deferred[None]: ...

    def delete_setting(self, name: str) -> Deferred[bool]: ...

    def components(self) -> Deferred[list[ComponentCredential]]: ...

    def get_component(self, domain: str) -> Deferred[ComponentCredential | None]: ...

    def put_component(self, credential: ComponentCredential) -> Deferred[bool]: ...

    def delete_component(self, domain: str) -> Deferred[bool]: ...


# -- the one way records become rows and back ------------------------------

def normalized_component(credential: ComponentCredential) -> ComponentCredential:
    """``credential`` as every backend keeps it: domains normalised
    (:class:`~fedgate.domain.InvalidDomain` for a bad one), hostnames and
    fingerprints sorted and without duplicates."""
    return replace(
        credential, domain=normalize_domain(credential.domain),
        allowed=tuple(sorted({normalize_domain(h) for h in credential.allowed})),
        certificate_sha256=tuple(sorted({f.lower() for f in credential.certificate_sha256})),
        certificate_name=(normalize_domain(credential.certificate_name)
                          if credential.certificate_name else None))


def peer_to_row(policy: PeerPolicy) -> dict:
    """A PeerPolicy as plain JSON-able values (addresses as [host, port])."""
    return {
        "domain": policy.domain,
        "allowed": policy.allowed,
        "encryption": policy.encryption,
        "authentication": policy.authentication,
        "addresses": json.dumps([[host, int(port)] for host, port in policy.addresses]),
        "max_stanza_bytes": policy.max_stanza_bytes,
        "rate_limit": policy.rate_limit,
        "note": policy.note,
    }


def peer_from_row(row: dict) -> PeerPolicy:
    return PeerPolicy(
        domain=row["domain"],
        allowed=bool(row["allowed"]),
        encryption=row["encryption"],
        authentication=row["authentication"],
        addresses=tuple((host, int(port)) for host, port in json.loads(row["addresses"] or "[]")),
        max_stanza_bytes=row["max_stanza_bytes"],
        rate_limit=row["rate_limit"],
        note=row["note"] or "",
    )
