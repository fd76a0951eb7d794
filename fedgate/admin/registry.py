"""Peer policy and component credentials in layers: configuration file, then
storage.

The configuration file is the static layer: its ``[s2s.policy]`` and
``[s2s.peers.*]`` and ``[components.domains.*]`` entries apply when nothing
is stored.  What an operator sets through the admin API is stored and
*overrides* the file, entry by entry (a stored peer replaces the file's peer
of the same domain as a whole; a stored federation setting replaces the
file's mode and default policy).  Deleting a stored entry falls back to the
file's, if any; an entry that only the file defines cannot be deleted here
(409): edit the file, or store an override.

Every change is written to storage first and applied to the live tables
only once the write is durable, so what the API acknowledged is what a
restart brings back.  A reload (SIGHUP) swaps the file layer underneath:
stored entries keep winning.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

from fedgate.admin.errors import ApiError, not_found
from fedgate.component.certauth import CertificateAuth
from fedgate.component.credentials import Credential, claim_conflicts
from fedgate.component.scram import ScramKeys
from fedgate.policy import PeerPolicy
from fedgate.storage.interface import ComponentCredential

log = Logger(namespace="fedgate.admin.registry")

API, CONFIG = "api", "config"
FEDERATION_SETTING = "federation"
OPERATOR_TEXT = "disconnected by an operator through the admin API"


@dataclass(frozen=True)
class ConfigLayerChange:
    """What a new configuration file layer changed (domains sorted).
    ``shadowed``: peers whose file entry changed under a stored override,
    which stays in force.  ``federation``: "unchanged", "changed", or
    "shadowed" (a stored federation setting stays in force)."""

    added: tuple = ()
    changed: tuple = ()
    removed: tuple = ()
    shadowed: tuple = ()
    federation: str = "unchanged"

    def describe(self) -> str:
        parts = [f"{what} {', '.join(domains)}" for what, domains in (
            ("peers added:", self.added), ("peers changed:", self.changed),
            ("peers removed:", self.removed),
            ("peers kept as stored through the admin API:", self.shadowed)) if domains]
        if self.federation == "changed":
            parts.append("federation mode and default policy changed")
        elif self.federation == "shadowed":
            parts.append("federation setting kept as stored through the admin API")
        return "; ".join(parts)


class PeerRegistry:
    """``policy`` is the live :class:`~fedgate.policy.PolicyTable`;
    ``config_peers`` the file's ``[s2s.peers]``."""

    def __init__(self, policy, config_peers: dict, storage):
        self.policy = policy
        self.storage = storage
        self.config_peers: dict[str, PeerPolicy] = dict(config_peers)
        self.config_global = (self.policy.mode, self.policy.default)
        self.stored: set[str] = set()
        self.global_source = CONFIG

    @defer.inlineCallbacks
    def load(self):
        settings = yield self.storage.settings()
        federation = settings.get(FEDERATION_SETTING)
        if isinstance(federation, dict):
            try:
                default = PeerPolicy(**federation.get("default", {}))
                self.policy.set_default(default, federation.get("mode"))
                self.global_source = API
            except (TypeError, ValueError) as exc:
                log.error("Ignoring the stored federation setting: {error}", error=str(exc))
        for peer in (yield self.storage.peers()):
            self.policy.set_peer(peer)
            self.stored.add(peer.domain)
        log.info("Loaded {peers} stored peer policies (mode {mode})", peers=len(self.stored),
                 mode=self.policy.mode)

    def source(self, domain: str) -> str | None:
        if domain in self.stored:
            return API
        if domain in self.config_peers:
            return CONFIG
        return None

    def get(self, domain: str) -> PeerPolicy | None:
        return self.policy.peers.get(domain)

    @defer.inlineCallbacks
    def put(self, peer: PeerPolicy):
        """Store ``peer`` and apply it; fires with True if it was new."""
        new = self.get(peer.domain) is None
        yield self.storage.put_peer(peer)
        self.stored.add(peer.domain)
        self.policy.set_peer(peer)
        log.info("Peer policy for {domain} set by an operator: allowed={allowed}",
                 domain=peer.domain, allowed=peer.allowed)
        return new

    @defer.inlineCallbacks
    def delete(self, domain: str):
        """Remove the stored entry; fires with the source now in force (or None)."""
        if domain not in self.stored:
            if domain in self.config_peers:
                raise ApiError(409, f"{domain} is defined in the configuration file; edit it "
                                    "there, or PUT an override here")
            raise not_found("peer")
        yield self.storage.delete_peer(domain)
        self.stored.discard(domain)
        fallback = self.config_peers.get(domain)
        if fallback is not None:
            self.policy.set_peer(fallback)
            return CONFIG
        self.policy.remove_peer(domain)
        return None

    @defer.inlineCallbacks
    def set_global(self, mode: str, default: PeerPolicy):
        value = {"mode": mode, "default": {"encryption": default.encryption,
                                           "authentication": default.authentication,
                                           "max_stanza_bytes": default.max_stanza_bytes,
                                           "rate_limit": default.rate_limit}}
        yield self.storage.put_setting(FEDERATION_SETTING, value)
        self.global_source = API
        self.policy.set_default(default, mode)
        log.info("Federation mode {mode} set by an operator", mode=mode)

    @defer.inlineCallbacks
    def reset_global(self):
        yield self.storage.delete_setting(FEDERATION_SETTING)
        self.global_source = CONFIG
        mode, default = self.config_global
        self.policy.set_default(default, mode)

    # -- following the shared store (a cluster: fedgate.cluster.sync) ----------
    @defer.inlineCallbacks
    def refresh_peer(self, domain: str):
        """Another node changed ``domain``'s stored entry: apply what the
        store holds now, through the same policy table (and so the same
        enforcer) as a local write."""
        self.adopt_peer(domain, (yield self.storage.get_peer(domain)))

    @defer.inlineCallbacks
    def refresh_global(self):
        settings = yield self.storage.settings()
        self.adopt_global(settings.get(FEDERATION_SETTING))

    @defer.inlineCallbacks
    def reload(self):
        """Bring everything in line with the store (after a reconnect to a
        shared store, when change notices may have been missed)."""
        settings = yield self.storage.settings()
        peers = yield self.storage.peers()
        self.adopt_global(settings.get(FEDERATION_SETTING))
        found = {peer.domain for peer in peers}
        for peer in peers:
            self.adopt_peer(peer.domain, peer)
        for domain in sorted(self.stored - found):
            self.adopt_peer(domain, None)

    def adopt_peer(self, domain: str, peer: PeerPolicy | None) -> None:
        """Make the live table hold ``peer`` as the stored entry for
        ``domain`` (None: no stored entry, the file's applies); a no-op,
        and no enforcement pass, when nothing changes."""
        if peer is not None:
            if domain in self.stored and self.policy.peers.get(domain) == peer:
                return
            self.stored.add(domain)
            self.policy.set_peer(peer)
            log.info("Peer policy for {domain} changed on another node: allowed={allowed}",
                     domain=domain, allowed=peer.allowed)
            return
        if domain not in self.stored:
            return
        self.stored.discard(domain)
        fallback = self.config_peers.get(domain)
        if fallback is not None:
            self.policy.set_peer(fallback)
        else:
            self.policy.remove_peer(domain)
        log.info("Stored peer policy for {domain} removed on another node", domain=domain)

    def adopt_global(self, federation) -> None:
        """The stored federation setting (None: none stored, the file's applies)."""
        if isinstance(federation, dict):
            try:
                default = PeerPolicy(**federation.get("default", {}))
                mode = federation.get("mode")
                if (self.global_source == API and self.policy.mode == mode
                        and self.policy.default == default):
                    return
                self.policy.set_default(default, mode)
                self.global_source = API
            except (TypeError, ValueError) as exc:
                log.error("Ignoring the stored federation setting: {error}", error=str(exc))
            return
        if self.global_source == API:
            self.global_source = CONFIG
            mode, default = self.config_global
            self.policy.set_default(default, mode)

    def replace_config_layer(self, peers: dict, mode: str, default: PeerPolicy) -> ConfigLayerChange:
        """Swap in a re-read configuration file's peers and federation
        setting (a reload).  Stored entries keep winning: where one exists,
        only the fallback under it changes; elsewhere the live table follows
        the file, and the enforcer brings live connections in line."""
        old = self.config_peers
        self.config_peers = dict(peers)
        added, changed, removed, shadowed = [], [], [], []
        for domain in sorted(set(old) | set(peers)):
            before, after = old.get(domain), peers.get(domain)
            if before == after:
                continue
            if domain in self.stored:
                shadowed.append(domain)
            elif after is None:
                self.policy.remove_peer(domain)
                removed.append(domain)
            else:
                self.policy.set_peer(after)
                (added if before is None else changed).append(domain)
        federation = "unchanged"
        if (mode, default) != self.config_global:
            self.config_global = (mode, default)
            federation = "shadowed"
            if self.global_source == CONFIG:
                self.policy.set_default(default, mode)
                federation = "changed"
        return ConfigLayerChange(tuple(added), tuple(changed), tuple(removed), tuple(shadowed),
                                 federation)


class ComponentRegistry:
    """Component domains and how they authenticate: XEP-0114 secrets and
    XEP-0225 credentials (salted SCRAM keys, certificate pins, extra
    hostnames), in the same two layers as peers.  Secrets are write-only:
    nothing here hands them out.  No identity may claim a hostname that
    belongs to someone else (a gateway domain, an XEP-0114 component's
    domain, another identity's hostname).
    """

    def __init__(self, credentials, router, own_domains, config_components, storage,
                 authenticated_as=lambda identity: []):
        """``credentials`` is the live
        :class:`~fedgate.component.credentials.CredentialRegistry` (XEP-0225
        credentials and XEP-0114 secrets); ``router`` is asked which sessions
        are bound and told which component domains are hosted;
        ``authenticated_as(identity)`` lists the live XEP-0225 sessions
        authenticated as ``identity``, bound or not."""
        self.storage = storage
        self.credentials = credentials
        self.router = router
        self.own = frozenset(own_domains)
        self.authenticated_as = authenticated_as
        self.config_secrets = {d: c.secret for d, c in config_components.domains.items()}
        self.config_credentials = dict(config_components.credentials)
        self.stored: dict[str, ComponentCredential] = {}

    @defer.inlineCallbacks
    def load(self):
        for credential in (yield self.storage.components()):
            if credential.domain in self.own:
                log.error("Ignoring the stored component {domain}: it is one of the gateway's "
                          "own domains", domain=credential.domain)
                continue
            try:
                self._check_claims(credential)
                self.stored[credential.domain] = credential
                self._apply(credential.domain)
            except (ValueError, ApiError) as exc:
                self.stored.pop(credential.domain, None)
                self._apply(credential.domain)
                log.error("Ignoring the stored component {domain}: {error}",
                          domain=credential.domain, error=str(exc))

    # -- reading --------------------------------------------------------------
    def _xep0225(self, domain: str):
        return self.credentials.get(domain)

    def domains(self) -> list[str]:
        names = self.credentials.secret_domains()
        names |= {c.domain for c in self.credentials}
        return sorted(names)

    def knows(self, domain: str) -> bool:
        return domain in self.credentials.secret_domains() or self._xep0225(domain) is not None

    def source(self, domain: str) -> str | None:
        if domain in self.stored:
            return API
        if domain in self.config_secrets or domain in self.config_credentials:
            return CONFIG
        return None

    def current(self, domain: str) -> ComponentCredential | None:
        """What is in force for ``domain``, as a storage record."""
        if domain in self.stored:
            return self.stored[domain]
        secret = self.config_secrets.get(domain)
        cred = self.config_credentials.get(domain)
        if secret is None and cred is None:
            return None
        certificate = cred.certificate if cred is not None else None
        return ComponentCredential(
            domain, secret,
            cred.scram_sha1.encode() if cred is not None and cred.scram_sha1 else None,
            cred.scram_sha256.encode() if cred is not None and cred.scram_sha256 else None,
            tuple(sorted(cred.allowed)) if cred is not None else (),
            certificate_sha256=tuple(sorted(certificate.fingerprints)) if certificate else (),
            trust_anchor_pem=certificate.anchor_pem if certificate else None,
            certificate_name=certificate.name if certificate else None)

    def sessions(self, domain: str) -> list:
        """Live sessions bound to ``domain`` or to a hostname it may bind."""
        names = {domain}
        cred = self._xep0225(domain)
        if cred is not None:
            names |= set(cred.allowed)
        found = []
        for name in sorted(names):
            for member in self.router.sessions_for(name):
                if member not in found:
                    found.append(member)
        # XEP-0225 streams authenticated as this identity that bound nothing yet.
        for session in self.authenticated_as(domain):
            if session not in found:
                found.append(session)
        return found

    def bound_hostnames(self, domain: str) -> list[str]:
        return self.router.names_bound_by(self.sessions(domain))

    # -- changes --------------------------------------------------------------
    def _apply(self, domain: str) -> None:
        """Make the live tables match what is in force for ``domain``."""
        record = self.current(domain)
        if record is not None and record.secret:
            self.credentials.set_secret(domain, record.secret)
        else:
            self.credentials.remove_secret(domain)
        live = live_credential(record) if record is not None else None
        if live is not None:
            self.credentials.set(live)
        else:
            self.credentials.remove(domain)
        self.router.set_component_domains(self.credentials.component_hostnames() - self.own)

    def _check_claims(self, credential: ComponentCredential) -> None:
        """409 if the component's own domain belongs to someone else, 422
        naming the field if a hostname it lists does."""
        if credential.domain in self.own:
            raise ApiError(409, "a component cannot take one of the gateway's own domains")
        live = live_credential(credential)
        others = [c for c in self.credentials if c.domain != credential.domain]
        xep0114 = {d for d in self.credentials.secret_domains() if d != credential.domain}
        hostnames = live.hostnames if live is not None else {credential.domain}
        for hostname, why in claim_conflicts(credential.domain, hostnames, self.own, xep0114, others):
            if hostname == credential.domain:
                raise ApiError(409, f"{hostname} {why}")
            raise invalid("allowed_hostnames", f"{hostname} {why}")

    @defer.inlineCallbacks
    def put(self, credential: ComponentCredential):
        self._check_claims(credential)
        new = not self.knows(credential.domain)
        yield self.storage.put_component(credential)
        self.stored[credential.domain] = credential
        self._apply(credential.domain)
        log.info("Component credentials for {domain} set by an operator", domain=credential.domain)
        return new

    @defer.inlineCallbacks
    def delete(self, domain: str):
        """Forget the stored credentials; the file's, if any, apply again."""
        if domain not in self.stored:
            if self.source(domain) == CONFIG:
                raise ApiError(409, f"{domain} is defined in the configuration file; edit it there")
            raise not_found("component")
        sessions = self.sessions(domain)
        yield self.storage.delete_component(domain)
        del self.stored[domain]
        self._apply(domain)
        if not self.knows(domain):
            for session in sessions:
                _end(session, "its credentials were removed by an operator")
            return None
        return CONFIG

    # -- following the shared store (a cluster: fedgate.cluster.sync) ----------
    @defer.inlineCallbacks
    def refresh(self, domain: str):
        """Another node changed ``domain``'s stored credentials."""
        self.adopt(domain, (yield self.storage.get_component(domain)))

    @defer.inlineCallbacks
    def reload(self):
        """Bring everything in line with the store (after a reconnect)."""
        records = yield self.storage.components()
        found = {record.domain for record in records}
        for record in records:
            self.adopt(record.domain, record)
        for domain in sorted(set(self.stored) - found):
            self.adopt(domain, None)

    def adopt(self, domain: str, record: ComponentCredential | None) -> None:
        """Apply ``record`` as the stored credentials of ``domain`` (None: no
        stored ones), with the same checks and the same effect on live
        sessions as a local write or delete."""
        if record is not None:
            if self.stored.get(domain) == record:
                return
            try:
                self._check_claims(record)
            except (ValueError, ApiError) as exc:
                log.error("Ignoring the stored component {domain}: {error}", domain=domain,
                          error=str(exc))
                return
            self.stored[domain] = record
            self._apply(domain)
            log.info("Component credentials for {domain} changed on another node", domain=domain)
            return
        if domain not in self.stored:
            return
        sessions = self.sessions(domain)
        del self.stored[domain]
        self._apply(domain)
        if not self.knows(domain):
            for session in sessions:
                _end(session, "its credentials were removed by an operator")
        log.info("Stored component credentials for {domain} removed on another node", domain=domain)

    def disconnect(self, domain: str, text: str = OPERATOR_TEXT) -> bool:
        sessions = self.sessions(domain)
        for session in sessions:
            _end(session, text)
        return bool(sessions)


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, f"{field}: {message}", field=field)


def live_credential(record: ComponentCredential) -> Credential | None:
    """The XEP-0225 credential a stored record stands for, or None if it
    has no XEP-0225 part (ValueError for a record that cannot be used)."""
    if not (record.scram_sha1 or record.scram_sha256 or record.allowed or record.certificate_auth):
        return None
    certificate = None
    if record.certificate_auth:
        certificate = CertificateAuth(
            frozenset(record.certificate_sha256), record.trust_anchor_pem or None,
            (record.certificate_name or record.domain) if record.trust_anchor_pem else None)
    return Credential(record.domain,
                      ScramKeys.decode(record.scram_sha1) if record.scram_sha1 else None,
                      ScramKeys.decode(record.scram_sha256) if record.scram_sha256 else None,
                      frozenset(record.allowed), certificate)


def _end(session, text: str) -> None:
    session.disconnect("policy-violation", text)
