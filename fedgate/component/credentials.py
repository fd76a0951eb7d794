"""XEP-0225 component credentials: how each component identity authenticates,
and the hostnames it may bind.

The SASL identity of a component is a bare domain (XEP-0225 section 3), so
credentials are keyed by domain.  A credential authenticates with salted
SCRAM keys (SHA-1 and SHA-256 separately, never a password), with a pinned
certificate (:mod:`fedgate.component.certauth`, for SASL EXTERNAL), or both.
A credential may bind the hostnames it lists (by default just its own
domain), and never a hostname that belongs to someone else: a gateway
domain, an XEP-0114 component's domain, another identity's hostname, or a
domain the gateway does not host.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedgate.component.certauth import CertificateAuth
from fedgate.component.scram import ScramKeys, check_password
from fedgate.domain import InvalidDomain, normalize_domain


@dataclass(frozen=True)
class Credential:
    domain: str
    scram_sha1: ScramKeys | None = None
    scram_sha256: ScramKeys | None = None
    allowed: frozenset = frozenset()
    #: None: no SASL EXTERNAL for this identity
    certificate: CertificateAuth | None = None

    @property
    def hostnames(self) -> frozenset:
        """Every hostname this identity is configured for."""
        return frozenset(self.allowed) | {self.domain}

    def may_bind(self, hostname: str) -> bool:
        return hostname in self.hostnames


def claim_conflicts(domain: str, hostnames, own_domains, xep0114_domains, others) -> list[tuple[str, str]]:
    """(hostname, why) for each of ``hostnames`` (of the identity ``domain``)
    that belongs to someone else; ``others`` are the other credentials."""
    found = []
    for hostname in sorted(hostnames):
        if hostname in own_domains:
            found.append((hostname, "is one of the gateway's own domains"))
        elif hostname != domain and hostname in xep0114_domains:
            found.append((hostname, "is an XEP-0114 component's domain"))
        else:
            owner = next((o.domain for o in others if o.domain != domain and hostname in o.hostnames), None)
            if owner is not None:
                found.append((hostname, f"is configured for the component identity {owner}"))
    return found


class CredentialRegistry:
    """The live XEP-0225 credentials.  ``own_domains`` are the gateway's
    domains; ``xep0114`` is the live mapping of XEP-0114 component domains
    (shared with the admin API); ``hosted`` tells whether the gateway hosts
    a domain at all."""

    def __init__(self, credentials: dict | None = None, own_domains=frozenset(), xep0114=None,
                 hosted=None):
        self._by_domain: dict[str, Credential] = dict(credentials or {})
        self.own_domains = frozenset(own_domains)
        self.xep0114 = xep0114 if xep0114 is not None else {}
        self.hosted = hosted

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

    # -- SASL EXTERNAL ----------------------------------------------------------
    def certificate_auth_enabled(self, identity: str | None = None) -> bool:
        """Does ``identity`` (or, without one, any identity) authenticate by certificate?"""
        if identity is not None:
            credential = self.get(identity)
            return credential is not None and credential.certificate is not None
        return any(c.certificate is not None for c in self._by_domain.values())

    def certificate_identifies(self, leaf, chain=(), identity: str | None = None) -> bool:
        """Does ``leaf`` authenticate ``identity`` (or, without one, any
        identity with certificate authentication)?  Decides whether EXTERNAL
        is offered at all."""
        if identity is not None:
            return self.external_refusal(identity, leaf, chain) is None
        return any(c.certificate.refusal(leaf, chain) is None
                   for c in self._by_domain.values() if c.certificate is not None)

    def external_refusal(self, identity: str, leaf, chain=()) -> str | None:
        """None if the client certificate ``leaf`` authenticates ``identity``,
        else why not.  The gateway's trust roots play no part."""
        credential = self.get(identity)
        if credential is None:
            return f"no component credential for {identity}"
        if credential.certificate is None:
            return f"certificate authentication is not enabled for {identity}"
        return credential.certificate.refusal(leaf, chain)

    # -- binding ------------------------------------------------------------------
    def bind_refusal(self, identity: str, hostname: str) -> str | None:
        """None if a component authenticated as ``identity`` may bind
        ``hostname``, else why not (answered with not-allowed)."""
        credential = self.get(identity)
        if credential is None:
            return f"no component credential for {identity}"
        if not credential.may_bind(hostname):
            return f"{hostname} is not configured for {identity}"
        others = [c for c in self._by_domain.values() if c.domain != credential.domain]
        conflicts = claim_conflicts(credential.domain, {hostname}, self.own_domains, self.xep0114, others)
        if conflicts:
            return f"{hostname} {conflicts[0][1]}"
        if self.hosted is not None and hostname not in self.hosted:
            return f"{hostname} is not hosted by this gateway"
        return None

    def may_bind(self, identity: str, hostname: str) -> bool:
        """May a component authenticated as ``identity`` bind ``hostname``?"""
        return self.bind_refusal(identity, hostname) is None

    def conflicts(self, credential: Credential) -> list[tuple[str, str]]:
        """What ``credential`` would claim that belongs to someone else."""
        others = [c for c in self._by_domain.values() if c.domain != credential.domain]
        return claim_conflicts(credential.domain, credential.hostnames, self.own_domains, self.xep0114,
                               others)

    def hostnames(self) -> set[str]:
        """Every hostname some credential may bind (hosted by the gateway)."""
        names: set[str] = set()
        for credential in self._by_domain.values():
            names |= credential.hostnames
        return names

    # -- XEP-0114 secrets: the live mapping the accept handlers read --------
    def secret_domains(self) -> set[str]:
        """Component domains with an XEP-0114 secret."""
        return set(self.xep0114)

    def set_secret(self, domain: str, secret: str) -> None:
        self.xep0114[domain] = secret

    def remove_secret(self, domain: str) -> None:
        self.xep0114.pop(domain, None)

    def component_hostnames(self) -> set[str]:
        """Every hostname a component may use: XEP-0114 domains, XEP-0225
        identities and the hostnames they may bind."""
        names = set(self.xep0114)
        for credential in self._by_domain.values():
            names.add(credential.domain)
            names |= credential.hostnames
        return names

    def set(self, credential: Credential) -> None:
        self._by_domain[credential.domain] = credential

    def remove(self, domain: str) -> bool:
        return self._by_domain.pop(domain, None) is not None

    def __iter__(self):
        return iter(list(self._by_domain.values()))
