"""TOML configuration -> frozen dataclasses.

Every error names the file and the key, and unknown keys are errors rather
than silently ignored: a typo in a security setting must not pass unnoticed.

:func:`parse_config` reads the top-level keys and hands each section to its
own reader (``_s2s`` with ``_s2s_policy`` and ``_s2s_peers``, ``_components``
with ``_component_domains`` and ``_component_credentials``, ``_tls``,
``_limits``, ``_logging``, ``_admin``, ``_cluster``); each reader gets a :class:`_Reader`
whose prefix puts the section's name into every error.
"""

from __future__ import annotations

import difflib
import os
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet.endpoints import _parseServer  # validation only
from twisted.logger import Logger

from fedgate.component.certauth import MAX_FINGERPRINTS, CertificateAuth, normalize_fingerprint
from fedgate.component.credentials import Credential, claim_conflicts
from fedgate.component.scram import ScramKeys
from fedgate.domain import InvalidDomain, normalize_domain
from fedgate.policy import AUTHENTICATIONS, ENCRYPTIONS, MODES, MODE_OPEN, PeerPolicy
from fedgate.s2s.addresses import allowed_networks

log = Logger(namespace="fedgate.config")


class ConfigError(Exception):
    """A configuration problem, phrased for the operator."""

    def __init__(self, path, key: str | None, message: str):
        where = f"{path}" if key is None else f"{path}: {key}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.key = key


@dataclass(frozen=True)
class ComponentConfig:
    domain: str
    secret: str = field(repr=False)


@dataclass(frozen=True)
class S2SConfig:
    listen: tuple[str, ...] = ("tcp:5269:interface=127.0.0.1",)
    direct_tls_listen: tuple[str, ...] = ()
    bidi: bool = True
    reverse_dialback: bool = False
    dialback_secret: str | None = field(default=None, repr=False)
    dns_servers: tuple[tuple[str, int], ...] = ()
    #: names whose DNS answers are kept (while their TTL lasts); 0: no cache
    dns_cache_entries: int = 1024
    connect_timeout: float = 20.0
    auth_timeout: float = 90.0
    queue_max_stanzas: int = 1000
    queue_max_bytes: int = 4 * 1024 * 1024
    queue_max_wait: float = 60.0
    #: bytes a stream's output may hold past the transport's own buffer
    #: before the destination stops writing and holds stanzas in its queue
    output_high_water: int = 1024 * 1024
    backoff_initial: float = 2.0
    backoff_max: float = 600.0
    #: seconds a domain pair we asked for may stay pending (below queue_max_wait)
    pair_timeout: float = 30.0
    #: idle destinations (no queue, stream or backoff) are forgotten after this
    destination_idle_timeout: float = 300.0
    max_destinations: int = 10000
    #: graceful shutdown: seconds queued stanzas get to go out on streams
    #: that are open or connecting (0: bounce at once), then seconds every
    #: stream gets to close after its system-shutdown error
    shutdown_flush: float = 5.0
    shutdown_grace: float = 2.0
    max_pending_verifications_per_stream: int = 10
    max_pending_verifications: int = 1000
    #: seconds a dialback verification connection stays open after its last
    #: answer for the next verification (0: closed after its last answer)
    verification_idle_timeout: float = 30.0
    #: verifications one connection (or outbound stream) carries at once
    verifications_per_connection: int = 10
    #: domain pairs one S2S connection may carry (XEP-0220 multiplexing)
    max_pairs_per_connection: int = 1000
    #: unauthenticated connections (plain and Direct TLS together) from one
    #: IPv4 address or IPv6 /64, and in all (fedgate.stream.admission)
    max_unauthenticated_per_address: int = 32
    max_unauthenticated: int = 512
    #: liveness: seconds without a byte from the peer before a ping (or a
    #: whitespace keepalive), seconds for its answer, seconds without a
    #: stanza before a clean close (0: never)
    ping_idle: float = 60.0
    ping_timeout: float = 30.0
    idle_close: float = 600.0
    #: XEP-0198 on S2S: on/off, an ack request every sm_ack_every stanzas or
    #: sm_ack_interval seconds, dropped streams resumable for
    #: sm_resume_timeout seconds (0: no resumption), at most sm_max_unacked
    #: unacknowledged stanzas per stream (the rest waits in the queue)
    stream_management: bool = True
    sm_ack_every: int = 10
    sm_ack_interval: float = 5.0
    sm_resume_timeout: float = 60.0
    sm_max_unacked: int = 5000
    #: a clean close of ours waits this long for the peer's last <a/>
    sm_close_wait: float = 1.0
    #: non-global address ranges outbound S2S may reach for peers that are
    #: not static: names from fedgate.s2s.addresses.RANGE_NAMES or CIDR
    allow_private_ranges: tuple[str, ...] = ()
    #: "open" federation or "allowlist" only
    mode: str = MODE_OPEN
    #: the policy for peers without an override
    default_policy: PeerPolicy = PeerPolicy()
    #: per-peer overrides: domain -> PeerPolicy
    peers: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ComponentsConfig:
    listen: tuple[str, ...] = ("tcp:5347:interface=127.0.0.1",)
    auth_timeout: float = 30.0
    #: XEP-0114: domain -> ComponentConfig (a shared secret each)
    domains: dict = field(default_factory=dict)
    #: XEP-0225: identity domain -> Credential (SCRAM keys and/or a pinned
    #: certificate, allowed hostnames)
    credentials: dict = field(default_factory=dict)
    require_tls: bool = True
    max_hostnames: int = 32
    stamp_from: bool = True
    load_balanced: frozenset = frozenset()
    #: unauthenticated component connections from one address, and in all
    max_unauthenticated_per_address: int = 16
    max_unauthenticated: int = 64
    #: seconds from connection to the stream header
    header_timeout: float = 10.0
    #: failed authentications throttling (fedgate.component.throttle)
    throttle_free_failures: int = 3
    throttle_base_delay: float = 1.0
    throttle_max_delay: float = 60.0
    throttle_forget_after: float = 600.0
    throttle_address_free_failures: int = 100
    throttle_max_entries: int = 10000
    #: threads for PLAIN's password derivation, and most checks waiting or running
    password_threads: int = 2
    password_queue: int = 32
    #: liveness of bound components, as for S2S; no idle close by default
    ping_idle: float = 60.0
    ping_timeout: float = 30.0
    idle_close: float = 0.0
    #: output flow control: the high-water mark of a component stream's
    #: output, and the bounded queue that holds stanzas while it is past it
    output_high_water: int = 1024 * 1024
    queue_max_stanzas: int = 1000
    queue_max_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class TLSConfig:
    #: directory of certificates and keys for the hosted domains
    certificates: str | None = None
    #: per-domain (certificate path, key path) overrides
    domains: dict = field(default_factory=dict)
    #: None for the system's trust store, else a PEM bundle of CA certificates
    trust_roots: str | None = None
    min_version: str = "TLSv1.2"
    ciphers: str | None = None


@dataclass(frozen=True)
class LimitsConfig:
    max_stanza_bytes: int = 512 * 1024
    max_depth: int = 32
    max_elements: int = 2000
    max_attributes: int = 64
    max_namespace_declarations: int = 32
    max_name_bytes: int = 256
    max_attribute_bytes: int = 64 * 1024
    #: open files kept free of unauthenticated connections (for authenticated
    #: streams, outbound connects, storage, logs): the totals of
    #: s2s/components.max_unauthenticated are lowered to fit the soft limit
    fd_reserve: int = 256


@dataclass(frozen=True)
class LoggingConfig:
    #: the lowest level written; events below it are dropped before any
    #: observer formats them (see fedgate.tap.filter_log_level)
    level: str = "info"
    xml_traffic: bool = False
    xml_bodies: bool = False
    #: lines of one kind one connection may log at once, then per second
    peer_lines_burst: int = 20
    peer_lines_per_second: float = 1.0


#: ``logging.level``'s choices, lowest first (twisted.logger's level names)
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")

MAX_ADMIN_BODY = 16 * 1024 * 1024  # admin.max_body_bytes' ceiling: bodies stay in memory


@dataclass(frozen=True)
class AdminConfig:
    """The admin REST API listener and its bearer token (see fedgate.admin)."""

    listen: tuple[str, ...] = ("tcp:8269:interface=127.0.0.1",)
    token: str | None = field(default=None, repr=False)
    #: where the token is read from (and generated into on first start);
    #: None means state_dir/admin.token
    token_file: str | None = None
    #: GET /metrics without the token, for a scraper on loopback only
    metrics_open: bool = False
    #: remote domains that get their own metrics labels (opt-in, bounded)
    metrics_domains: tuple[str, ...] = ()
    #: connections open at once; one more is answered 503 and closed
    max_connections: int = 64
    #: seconds from connect (or the previous response) to the end of the headers
    header_timeout: float = 10.0
    #: seconds from the end of the headers to the end of the body
    body_timeout: float = 30.0
    #: largest request body; over it, 413 before the body is read
    max_body_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: several nodes sharing state through Redis (fedgate.cluster).
    Off by default: one node keeps its state in SQLite."""

    enabled: bool = False
    #: "host:port", "[v6]:port", or a unix socket path ("/run/redis/redis.sock")
    redis: str = "127.0.0.1:6379"
    password: str | None = field(default=None, repr=False)
    #: where the password was read from, if from a file
    password_file: str | None = None
    tls: bool = False
    #: CA bundle to verify Redis's certificate with (None: the system's)
    tls_ca_file: str | None = None
    #: this node's name in the cluster (channel names, ownership records)
    node_id: str = ""
    #: prefix of every Redis key and channel (several clusters on one Redis)
    key_prefix: str = "fedgate"
    #: seconds a node's records live without a heartbeat; heartbeat interval
    lease: float = 6.0
    heartbeat: float = 2.0
    #: threads (and connections) for Redis commands; commands waiting at most
    threads: int = 4
    max_pending: int = 10000
    #: cross-node stanzas (fedgate.cluster.relay): seconds to wait for the
    #: receiving node's acknowledgement before bouncing; most stanzas and
    #: bytes waiting for one (past either: resource-constraint)
    ack_timeout: float = 6.0
    max_in_flight: int = 10000
    max_in_flight_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class Config:
    path: str
    state_dir: str
    domains: tuple[str, ...]
    s2s: S2SConfig
    components: ComponentsConfig
    tls: TLSConfig
    limits: LimitsConfig
    logging: LoggingConfig
    admin: AdminConfig = AdminConfig()
    cluster: ClusterConfig = ClusterConfig()

    @property
    def local_domains(self) -> frozenset:
        """Every domain this gateway answers for: its own and its components'."""
        hostnames = set()
        for credential in self.components.credentials.values():
            hostnames.add(credential.domain)
            hostnames |= credential.allowed
        return frozenset(self.domains) | frozenset(self.components.domains) | frozenset(hostnames)


class _Reader:
    """Reads one TOML table, tracking which keys were used."""

    def __init__(self, path, table: dict, prefix: str):
        self.path, self.table, self.prefix = path, table, prefix
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), message)

    def get(self, name: str, kind, default):
        self.used.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if kind is float:
            kinds = (int, float)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(name, f"expected {kind.__name__ if not isinstance(kind, tuple) else kind[0].__name__}, got a boolean")
        if not isinstance(value, kinds):
            raise self.error(name, f"expected {'a number' if kind is float else kinds[0].__name__}, got {type(value).__name__}")
        return float(value) if kind is float else value

    def positive(self, name: str, kind, default):
        value = self.get(name, kind, default)
        if value <= 0:
            raise self.error(name, "must be greater than zero")
        return value

    def not_negative(self, name: str, kind, default):
        value = self.get(name, kind, default)
        if value < 0:
            raise self.error(name, "must not be negative (0 turns it off)")
        return value

    def table_of(self, name: str) -> dict:
        return self.get(name, dict, {})

    def section(self, name: str) -> "_Reader":
        """A reader for the table ``name`` in this one (empty if absent)."""
        return _Reader(self.path, self.table_of(name), f"{self.key(name)}.")

    def done(self, known=None) -> None:
        """Refuse keys nobody read (or, with ``known``, keys not in it),
        suggesting the nearest known key for a typo."""
        known = set(known) if known is not None else self.used
        unknown = sorted(set(self.table) - known)
        if unknown:
            raise self.error(unknown[0], unknown_key_message(unknown[0], known))


def unknown_key_message(name: str, known) -> str:
    """'unknown key', with a "did you mean" for a near miss."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"unknown key (did you mean {close[0]!r}?)" if close else "unknown key"


#: the top-level keys; checked before anything else, so that a misspelt
#: ``domainz`` is reported as such and not as a missing ``domains``
TOP_KEYS = ("state_dir", "domains", "s2s", "components", "tls", "limits", "logging", "admin", "cluster")


def _domain(reader: _Reader, name: str, value) -> str:
    try:
        return normalize_domain(value)
    except (InvalidDomain, TypeError) as exc:
        raise reader.error(name, str(exc)) from None


def _certificate_auth(kr: _Reader, domain: str) -> CertificateAuth | None:
    """A credential's certificate settings (SASL EXTERNAL), or None."""
    pins = kr.get("certificate_sha256", list, [])
    if len(pins) > MAX_FINGERPRINTS:
        raise kr.error("certificate_sha256", f"at most {MAX_FINGERPRINTS} fingerprints")
    try:
        fingerprints = frozenset(normalize_fingerprint(p) for p in pins)
    except ValueError as exc:
        raise kr.error("certificate_sha256", str(exc)) from None
    anchor_path = kr.get("trust_anchor", str, None)
    name = kr.get("certificate_name", str, None)
    if name is not None:
        if not anchor_path:
            raise kr.error("certificate_name", "only counts together with trust_anchor")
        name = _domain(kr, "certificate_name", name)
    anchor_pem = None
    if anchor_path:
        try:
            anchor_pem = Path(anchor_path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise kr.error("trust_anchor", f"cannot read {anchor_path}: "
                                           f"{getattr(exc, 'strerror', None) or exc}") from None
    if not fingerprints and not anchor_pem:
        return None
    try:
        return CertificateAuth(fingerprints, anchor_pem, (name or domain) if anchor_pem else None)
    except ValueError as exc:
        raise kr.error("trust_anchor", str(exc)) from None


def _endpoints(reader: _Reader, name: str, default: tuple) -> tuple[str, ...]:
    value = reader.get(name, list, list(default))
    for item in value:
        if not isinstance(item, str):
            raise reader.error(name, "expected a list of endpoint strings")
        try:
            _parseServer(item, None)
        except Exception as exc:
            raise reader.error(name, f"bad endpoint {item!r}: {exc}") from None
    return tuple(value)


def _ranges(reader: _Reader, name: str) -> tuple[str, ...]:
    values = tuple(reader.get(name, list, []))
    try:
        allowed_networks(values)
    except ValueError as exc:
        raise reader.error(name, str(exc)) from None
    return values


def _choice(reader: _Reader, name: str, choices, default: str) -> str:
    value = reader.get(name, str, default)
    if value not in choices:
        raise reader.error(name, f"must be one of {', '.join(repr(c) for c in choices)}")
    return value


def _hostport(reader: _Reader, name: str, item, default_port: int) -> tuple[str, int]:
    if not isinstance(item, str) or not item:
        raise reader.error(name, "expected 'host:port' strings")
    host, sep, port = item.rpartition(":")
    if not sep:
        host, port = item, str(default_port)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise reader.error(name, f"bad address {item!r}, expected 'host:port'")
    return host, int(port)


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a configuration file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(path, None, "file not found") from None
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, None, f"not valid TOML: {exc}") from None
    config = parse_config(data, path)
    for key in deprecated_keys(data):
        log.warn("{path}: {key} is deprecated: write {instead}", path=str(path), key=key,
                 instead=DEPRECATED_KEYS[key.rsplit(".", 1)[1]])
    return config


def parse_config(data: dict, path="<config>") -> Config:
    """The whole file: top-level keys here, each section by its own reader
    (in the order the file's sections are documented)."""
    top = _Reader(path, data, "")
    top.done(TOP_KEYS)
    state_dir = top.get("state_dir", str, None)
    if not state_dir:
        raise top.error("state_dir", "required")
    domains = tuple(_domain(top, "domains", d) for d in top.get("domains", list, []))
    if not domains:
        raise top.error("domains", "at least one domain is required")
    s2s = _s2s(top.section("s2s"))
    components = _components(top.section("components"), domains)
    tls = _tls(top.section("tls"))
    limits = _limits(top.section("limits"))
    logging = _logging(top.section("logging"))
    admin = _admin(top.section("admin"))
    cluster = _cluster(top.section("cluster"))
    top.done()
    return Config(path=str(path), state_dir=state_dir, domains=domains, s2s=s2s,
                  components=components, tls=tls, limits=limits, logging=logging, admin=admin,
                  cluster=cluster)


def _s2s_policy(pol: _Reader) -> tuple[str, PeerPolicy]:
    """``[s2s.policy]``: the federation mode and the default peer policy."""
    mode = _choice(pol, "mode", MODES, MODE_OPEN)
    default_policy = PeerPolicy(
        encryption=_choice(pol, "encryption", ENCRYPTIONS, PeerPolicy.encryption),
        authentication=_choice(pol, "authentication", AUTHENTICATIONS, PeerPolicy.authentication))
    pol.done()
    return mode, default_policy


def _s2s_peers(s: _Reader, default_policy: PeerPolicy) -> dict[str, PeerPolicy]:
    """``[s2s.peers."domain"]``: one policy per peer, the default's terms
    where it says nothing."""
    peers = {}
    for raw, table in s.table_of("peers").items():
        if not isinstance(table, dict):
            raise s.error(f"peers.{raw}", "expected a table")
        pr = _Reader(s.path, table, f"s2s.peers.{raw}.")
        domain = _domain(s, f"peers.{raw}", raw)
        addresses = tuple(_hostport(pr, "addresses", a, 5269) for a in pr.get("addresses", list, []))
        peers[domain] = PeerPolicy(
            domain=domain,
            allowed=_peer_allowed(pr),
            encryption=_choice(pr, "encryption", ENCRYPTIONS, default_policy.encryption),
            authentication=_choice(pr, "authentication", AUTHENTICATIONS, default_policy.authentication),
            addresses=addresses,
            note=pr.get("note", str, ""),
        )
        pr.done()
    return peers


def _unauthenticated_caps(reader: _Reader, defaults) -> tuple[int, int]:
    """A listener pool's caps on unauthenticated connections: per address
    and in all (the first no larger than the second)."""
    per_address = reader.positive("max_unauthenticated_per_address", int,
                                  defaults.max_unauthenticated_per_address)
    total = reader.positive("max_unauthenticated", int, defaults.max_unauthenticated)
    if per_address > total:
        raise reader.error("max_unauthenticated_per_address",
                           f"must not exceed {reader.key('max_unauthenticated')} ({total})")
    return per_address, total


def _peer_allowed(pr: _Reader) -> bool:
    """``allowed`` (the admin API's and fedgatectl's word); the older
    ``blocked = true`` still works, as its opposite, and is reported as
    deprecated (:data:`DEPRECATED_KEYS`)."""
    allowed = pr.get("allowed", bool, None)
    blocked = pr.get("blocked", bool, None)
    if allowed is not None and blocked is not None:
        if allowed == blocked:
            raise pr.error("blocked", "contradicts allowed; write only allowed (blocked is deprecated)")
        raise pr.error("blocked", "deprecated: write only allowed")
    if blocked is not None:
        return not blocked
    return True if allowed is None else allowed


#: key (its last part) -> what to write instead; still read, named by
#: fedgatectl check and logged at load
DEPRECATED_KEYS = {"blocked": "allowed = false (or true)"}


def deprecated_keys(data: dict) -> list[str]:
    """The dotted names of deprecated keys used in a parsed TOML file."""
    found = []
    peers = data.get("s2s", {}).get("peers", {}) if isinstance(data.get("s2s"), dict) else {}
    for raw, table in (peers.items() if isinstance(peers, dict) else ()):
        if isinstance(table, dict) and "blocked" in table:
            found.append(f"s2s.peers.{raw}.blocked")
    return found


def _s2s(s: _Reader) -> S2SConfig:
    """``[s2s]`` with its ``policy`` and ``peers`` tables."""
    mode, default_policy = _s2s_policy(s.section("policy"))
    peers = _s2s_peers(s, default_policy)
    queue_max_wait = s.positive("queue_max_wait", float, S2SConfig.queue_max_wait)
    pair_timeout = s.positive("pair_timeout", float, S2SConfig.pair_timeout)
    if pair_timeout >= queue_max_wait:
        raise s.error("pair_timeout", "must be less than s2s.queue_max_wait, so that stanzas "
                                      "waiting on a stuck pair bounce with remote-server-timeout")
    per_address, unauthenticated = _unauthenticated_caps(s, S2SConfig)
    s2s = S2SConfig(
        listen=_endpoints(s, "listen", S2SConfig.listen),
        direct_tls_listen=_endpoints(s, "direct_tls_listen", S2SConfig.direct_tls_listen),
        bidi=s.get("bidi", bool, True),
        reverse_dialback=s.get("reverse_dialback", bool, False),
        dialback_secret=s.get("dialback_secret", str, None) or None,
        dns_servers=tuple(_hostport(s, "dns_servers", a, 53) for a in s.get("dns_servers", list, [])),
        dns_cache_entries=s.not_negative("dns_cache_entries", int, S2SConfig.dns_cache_entries),
        connect_timeout=s.positive("connect_timeout", float, S2SConfig.connect_timeout),
        auth_timeout=s.positive("auth_timeout", float, S2SConfig.auth_timeout),
        queue_max_stanzas=s.positive("queue_max_stanzas", int, S2SConfig.queue_max_stanzas),
        queue_max_bytes=s.positive("queue_max_bytes", int, S2SConfig.queue_max_bytes),
        queue_max_wait=queue_max_wait,
        output_high_water=s.positive("output_high_water", int, S2SConfig.output_high_water),
        backoff_initial=s.positive("backoff_initial", float, S2SConfig.backoff_initial),
        backoff_max=s.positive("backoff_max", float, S2SConfig.backoff_max),
        pair_timeout=pair_timeout,
        destination_idle_timeout=s.positive("destination_idle_timeout", float,
                                            S2SConfig.destination_idle_timeout),
        max_destinations=s.positive("max_destinations", int, S2SConfig.max_destinations),
        shutdown_flush=s.not_negative("shutdown_flush", float, S2SConfig.shutdown_flush),
        shutdown_grace=s.positive("shutdown_grace", float, S2SConfig.shutdown_grace),
        max_pending_verifications_per_stream=s.positive(
            "max_pending_verifications_per_stream", int, S2SConfig.max_pending_verifications_per_stream),
        max_pending_verifications=s.positive(
            "max_pending_verifications", int, S2SConfig.max_pending_verifications),
        verification_idle_timeout=s.not_negative(
            "verification_idle_timeout", float, S2SConfig.verification_idle_timeout),
        verifications_per_connection=s.positive(
            "verifications_per_connection", int, S2SConfig.verifications_per_connection),
        max_pairs_per_connection=s.positive(
            "max_pairs_per_connection", int, S2SConfig.max_pairs_per_connection),
        max_unauthenticated_per_address=per_address,
        max_unauthenticated=unauthenticated,
        ping_idle=s.positive("ping_idle", float, S2SConfig.ping_idle),
        ping_timeout=s.positive("ping_timeout", float, S2SConfig.ping_timeout),
        idle_close=s.not_negative("idle_close", float, S2SConfig.idle_close),
        stream_management=s.get("stream_management", bool, S2SConfig.stream_management),
        sm_ack_every=s.positive("sm_ack_every", int, S2SConfig.sm_ack_every),
        sm_ack_interval=s.positive("sm_ack_interval", float, S2SConfig.sm_ack_interval),
        sm_resume_timeout=s.not_negative("sm_resume_timeout", float, S2SConfig.sm_resume_timeout),
        sm_max_unacked=s.positive("sm_max_unacked", int, S2SConfig.sm_max_unacked),
        sm_close_wait=s.not_negative("sm_close_wait", float, S2SConfig.sm_close_wait),
        allow_private_ranges=_ranges(s, "allow_private_ranges"),
        mode=mode,
        default_policy=default_policy,
        peers=peers,
    )
    s.done()
    return s2s


def _component_domains(c: _Reader, domains: tuple) -> dict[str, ComponentConfig]:
    """``[components.domains."domain"]``: XEP-0114 components and their secrets."""
    comps = {}
    for raw, table in c.table_of("domains").items():
        if not isinstance(table, dict):
            raise c.error(f"domains.{raw}", "expected a table")
        cr = _Reader(c.path, table, f"components.domains.{raw}.")
        domain = _domain(c, f"domains.{raw}", raw)
        secret = cr.get("secret", str, None)
        if not secret:
            raise cr.error("secret", "required")
        cr.done()
        if domain in domains:
            raise c.error(f"domains.{raw}", "is also one of the gateway's own domains")
        comps[domain] = ComponentConfig(domain, secret)
    return comps


def _component_credentials(c: _Reader, domains: tuple, comps: dict) -> dict[str, Credential]:
    """``[components.credentials."identity"]``: XEP-0225 identities; none
    may claim a hostname that belongs to someone else."""
    credentials, raw_names = {}, {}
    for raw, table in c.table_of("credentials").items():
        if not isinstance(table, dict):
            raise c.error(f"credentials.{raw}", "expected a table")
        kr = _Reader(c.path, table, f"components.credentials.{raw}.")
        domain = _domain(c, f"credentials.{raw}", raw)
        keys = {}
        for name in ("scram_sha1", "scram_sha256"):
            text = kr.get(name, str, None)
            if text:
                try:
                    keys[name] = ScramKeys.decode(text)
                except ValueError as exc:
                    raise kr.error(name, str(exc)) from None
        certificate = _certificate_auth(kr, domain)
        if not keys and certificate is None:
            raise kr.error("scram_sha256", "a credential needs a way to authenticate: scram_sha256 "
                                           "and/or scram_sha1 (python3 -m fedgate.component.scram "
                                           "makes them), or certificate_sha256 or trust_anchor")
        allowed = frozenset(_domain(kr, "allowed", d) for d in kr.get("allowed", list, []))
        kr.done()
        credentials[domain] = Credential(domain, keys.get("scram_sha1"), keys.get("scram_sha256"),
                                         allowed, certificate)
        raw_names[domain] = raw
    for domain, credential in credentials.items():
        others = [o for o in credentials.values() if o.domain != domain]
        for hostname, why in claim_conflicts(domain, credential.hostnames, domains, comps, others):
            key = f"credentials.{raw_names[domain]}" + ("" if hostname == domain else ".allowed")
            raise c.error(key, f"{hostname} {why}; a component identity may claim only "
                               "hostnames nobody else has")
    return credentials


def _components(c: _Reader, domains: tuple) -> ComponentsConfig:
    """``[components]`` with its ``domains`` and ``credentials`` tables."""
    comps = _component_domains(c, domains)
    credentials = _component_credentials(c, domains, comps)
    per_address, unauthenticated = _unauthenticated_caps(c, ComponentsConfig)
    components = ComponentsConfig(
        listen=_endpoints(c, "listen", ComponentsConfig.listen),
        auth_timeout=c.positive("auth_timeout", float, ComponentsConfig.auth_timeout),
        domains=comps,
        credentials=credentials,
        require_tls=c.get("require_tls", bool, True),
        max_hostnames=c.positive("max_hostnames", int, ComponentsConfig.max_hostnames),
        stamp_from=c.get("stamp_from", bool, True),
        load_balanced=frozenset(_domain(c, "load_balanced", d) for d in c.get("load_balanced", list, [])),
        max_unauthenticated_per_address=per_address,
        max_unauthenticated=unauthenticated,
        **_component_bounds(c),
        ping_idle=c.positive("ping_idle", float, ComponentsConfig.ping_idle),
        ping_timeout=c.positive("ping_timeout", float, ComponentsConfig.ping_timeout),
        idle_close=c.not_negative("idle_close", float, ComponentsConfig.idle_close),
    )
    c.done()
    return components


def _component_bounds(c: _Reader) -> dict:
    """``[components]`` timeouts, authentication throttle and password pool."""
    d = ComponentsConfig
    bounds = {
        "header_timeout": c.positive("header_timeout", float, d.header_timeout),
        "throttle_base_delay": c.positive("throttle_base_delay", float, d.throttle_base_delay),
        "throttle_max_delay": c.positive("throttle_max_delay", float, d.throttle_max_delay),
        "throttle_forget_after": c.positive("throttle_forget_after", float, d.throttle_forget_after),
        "throttle_max_entries": c.positive("throttle_max_entries", int, d.throttle_max_entries),
        "password_threads": c.positive("password_threads", int, d.password_threads),
        "password_queue": c.positive("password_queue", int, d.password_queue),
        "output_high_water": c.positive("output_high_water", int, d.output_high_water),
        "queue_max_stanzas": c.positive("queue_max_stanzas", int, d.queue_max_stanzas),
        "queue_max_bytes": c.positive("queue_max_bytes", int, d.queue_max_bytes),
    }
    for name in ("throttle_free_failures", "throttle_address_free_failures"):
        bounds[name] = c.get(name, int, getattr(d, name))
        if bounds[name] < 0:
            raise c.error(name, "must be zero or more")
    if bounds["throttle_max_delay"] < bounds["throttle_base_delay"]:
        raise c.error("throttle_max_delay", "must be at least throttle_base_delay")
    return bounds


def _tls(tr: _Reader) -> TLSConfig:
    """``[tls]`` with its per-domain certificate overrides."""
    overrides = {}
    for raw, table in tr.table_of("domains").items():
        if not isinstance(table, dict):
            raise tr.error(f"domains.{raw}", "expected a table")
        dr = _Reader(tr.path, table, f"tls.domains.{raw}.")
        cert_path = dr.get("certificate", str, None)
        if not cert_path:
            raise dr.error("certificate", "required")
        overrides[_domain(tr, f"domains.{raw}", raw)] = (cert_path, dr.get("key", str, None))
        dr.done()
    trust = tr.get("trust_roots", str, "system")
    tls = TLSConfig(
        certificates=tr.get("certificates", str, None) or None,
        domains=overrides,
        trust_roots=None if trust == "system" else trust,
        min_version=_choice(tr, "min_version", ("TLSv1.2", "TLSv1.3"), "TLSv1.2"),
        ciphers=tr.get("ciphers", str, None) or None,
    )
    tr.done()
    return tls


def _limits(lr: _Reader) -> LimitsConfig:
    """``[limits]``: the parser's bounds."""
    limits = LimitsConfig(
        max_stanza_bytes=lr.positive("max_stanza_bytes", int, LimitsConfig.max_stanza_bytes),
        max_depth=lr.positive("max_depth", int, LimitsConfig.max_depth),
        max_elements=lr.positive("max_elements", int, LimitsConfig.max_elements),
        max_attributes=lr.positive("max_attributes", int, LimitsConfig.max_attributes),
        max_namespace_declarations=lr.positive("max_namespace_declarations", int,
                                               LimitsConfig.max_namespace_declarations),
        max_name_bytes=lr.positive("max_name_bytes", int, LimitsConfig.max_name_bytes),
        max_attribute_bytes=lr.positive("max_attribute_bytes", int, LimitsConfig.max_attribute_bytes),
        fd_reserve=lr.positive("fd_reserve", int, LimitsConfig.fd_reserve),
    )
    lr.done()
    return limits


def _logging(gr: _Reader) -> LoggingConfig:
    """``[logging]``: what of the XML traffic goes to the log."""
    logging = LoggingConfig(
        level=_choice(gr, "level", LOG_LEVELS, LoggingConfig.level),
        xml_traffic=gr.get("xml_traffic", bool, False),
        xml_bodies=gr.get("xml_bodies", bool, False),
        peer_lines_burst=gr.positive("peer_lines_burst", int, LoggingConfig.peer_lines_burst),
        peer_lines_per_second=gr.positive("peer_lines_per_second", float,
                                          LoggingConfig.peer_lines_per_second),
    )
    gr.done()
    return logging


def _admin(ar: _Reader) -> AdminConfig:
    """``[admin]``: the REST API's listeners, token and metrics."""
    token = ar.get("token", str, None)
    token_file = ar.get("token_file", str, None)
    if token is not None and len(token) < 16:
        raise ar.error("token", "must be at least 16 characters")
    if token is not None and token_file is not None:
        raise ar.error("token_file", "set either token or token_file, not both")
    max_body = ar.positive("max_body_bytes", int, AdminConfig.max_body_bytes)
    if max_body > MAX_ADMIN_BODY:
        raise ar.error("max_body_bytes", f"must be at most {MAX_ADMIN_BODY} (bodies are kept in memory)")
    admin = AdminConfig(
        listen=_endpoints(ar, "listen", AdminConfig.listen),
        token=token, token_file=token_file or None,
        metrics_open=ar.get("metrics_open", bool, False),
        metrics_domains=tuple(_domain(ar, "metrics_domains", d)
                              for d in ar.get("metrics_domains", list, [])),
        max_connections=ar.positive("max_connections", int, AdminConfig.max_connections),
        header_timeout=ar.positive("header_timeout", float, AdminConfig.header_timeout),
        body_timeout=ar.positive("body_timeout", float, AdminConfig.body_timeout),
        max_body_bytes=max_body,
    )
    ar.done()
    return admin


_NODE_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def _node_name(reader: _Reader, name: str, value: str) -> str:
    if not value or len(value) > 64 or not set(value) <= _NODE_ID_CHARS:
        raise reader.error(name, f"{value!r}: use 1 to 64 letters, digits, '.', '-' or '_'")
    return value


def _cluster(cr: _Reader) -> ClusterConfig:
    """``[cluster]``: the Redis server, this node's id, leases."""
    from fedgate.cluster.address import RedisAddress  # neither redis-py nor the client needed
    enabled = cr.get("enabled", bool, False)
    address = cr.get("redis", str, ClusterConfig.redis)
    tls = cr.get("tls", bool, False)
    try:
        parsed = RedisAddress.parse(address)
    except ValueError as exc:
        raise cr.error("redis", str(exc)) from None
    if tls and parsed.path:
        raise cr.error("tls", "TLS needs a TCP address in redis, not a unix socket")
    password = cr.get("password", str, None)
    password_file = cr.get("password_file", str, None)
    if password is not None and password_file is not None:
        raise cr.error("password_file", "set either password or password_file, not both")
    if password is not None and not password:
        raise cr.error("password", "must not be empty (leave it out for no password)")
    if password_file is not None:
        try:
            password = Path(password_file).read_text().strip()
        except OSError as exc:
            raise cr.error("password_file", f"cannot read {password_file}: {exc.strerror}") from None
        if not password:
            raise cr.error("password_file", f"{password_file} is empty")
    tls_ca_file = cr.get("tls_ca_file", str, None)
    if tls_ca_file is not None and not os.path.isfile(tls_ca_file):
        raise cr.error("tls_ca_file", f"{tls_ca_file}: no such file")
    node_id = cr.get("node_id", str, None)
    node_id = _node_name(cr, "node_id", node_id if node_id is not None else _hostname())
    key_prefix = _node_name(cr, "key_prefix", cr.get("key_prefix", str, ClusterConfig.key_prefix))
    lease = cr.positive("lease", float, ClusterConfig.lease)
    heartbeat = cr.positive("heartbeat", float, ClusterConfig.heartbeat)
    if heartbeat >= lease:
        raise cr.error("heartbeat", f"must be shorter than lease ({lease:g} s), or leases expire "
                                    "between heartbeats")
    cluster = ClusterConfig(
        enabled=enabled, redis=address, password=password, password_file=password_file, tls=tls,
        tls_ca_file=tls_ca_file, node_id=node_id, key_prefix=key_prefix, lease=lease,
        heartbeat=heartbeat, threads=cr.positive("threads", int, ClusterConfig.threads),
        max_pending=cr.positive("max_pending", int, ClusterConfig.max_pending),
        ack_timeout=cr.positive("ack_timeout", float, ClusterConfig.ack_timeout),
        max_in_flight=cr.positive("max_in_flight", int, ClusterConfig.max_in_flight),
        max_in_flight_bytes=cr.positive("max_in_flight_bytes", int, ClusterConfig.max_in_flight_bytes))
    cr.done()
    return cluster


def _hostname() -> str:
    """The default node id: the host's short name, in the allowed characters."""
    import socket
    name = socket.gethostname().split(".")[0]
    return "".join(c if c in _NODE_ID_CHARS else "-" for c in name)[:64] or "node"


def redis_address(cluster: ClusterConfig):
    """The :class:`~fedgate.cluster.redisclient.RedisAddress` ``cluster`` names."""
    from fedgate.cluster.address import RedisAddress
    return RedisAddress.parse(cluster.redis, password=cluster.password, tls=cluster.tls,
                              tls_ca_file=cluster.tls_ca_file)


def dialback_secret(config: Config) -> str:
    """The configured dialback secret, or one generated once and kept in the
    state directory (mode 0600) so keys stay valid across restarts."""
    if config.s2s.dialback_secret:
        return config.s2s.dialback_secret
    state = Path(config.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    secret_path = state / "dialback.secret"
    try:
        existing = secret_path.read_text().strip()
        if existing:
            return existing
    except FileNotFoundError:
        pass
    secret = secrets.token_hex(32)
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    return secret
