"""XEP-0225 component credentials: SCRAM keys and the hostnames each may bind.

The SASL identity of a component is a bare domain (XEP-0225 section 3), so
credentials are keyed by domain.  Keys are stored salted (SHA-1 and SHA-256
separately), never as passwords.  A credential may bind the hostnames it
lists (by default just its own domain).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedgate.component.scram import ScramKeys, check_password
from fedgate.domain import InvalidDomain, normalize_domain


@dataclass(frozen=True)
class Credential:
    domain: str
    scram_sha1: ScramKeys | None = None
    scram_sha256: ScramKeys | None = None
    allowed: frozenset = frozenset()

    def may_bind(self, hostname: str) -> bool:
        return hostname == self.domain or hostname in self.allowed


class CredentialRegistry:
    def __init__(self, credentials: dict | None = None):
        self._by_domain: dict[str, Credential] = dict(credentials or {})

    def get(self, username: str) -> Credential | None:
        try:
            return self._by_domain.get(normalize_domain(username))
        except InvalidDomain:
            return None

    def keys(self, mechanism: str):
        """A lookup username -> ScramKeys for one SCRAM mechanism."""
        attribute = {"SCRAM-SHA-1": "scram_sha1", "SCRAM-SHA-256": "scram_sha256"}[mechanism]

        def lookup(username: str):
            credential = self.get(username)
            return getattr(credential, attribute) if credential else None
        return lookup

    def check_plain(self, username: str, password: str) -> bool:
        credential = self.get(username)
        if credential is None:
            return False
        if credential.scram_sha256 is not None:
            return check_password(credential.scram_sha256, "sha256", password)
        if credential.scram_sha1 is not None:
            return check_password(credential.scram_sha1, "sha1", password)
        return False

    def may_bind(self, identity: str, hostname: str) -> bool:
        """May a component authenticated as ``identity`` bind ``hostname``?"""
        credential = self.get(identity)
        if credential is None:
            return hostname == identity  # EXTERNAL without a stored credential
        return credential.may_bind(hostname)

    def hostnames(self) -> set[str]:
        """Every hostname some credential may bind (hosted by the gateway)."""
        names: set[str] = set()
        for credential in self._by_domain.values():
            names.add(credential.domain)
            names |= credential.allowed
        return names

    def set(self, credential: Credential) -> None:
        self._by_domain[credential.domain] = credential

    def remove(self, domain: str) -> bool:
        return self._by_domain.pop(domain, None) is not None

    def __iter__(self):
        return iter(list(self._by_domain.values()))
