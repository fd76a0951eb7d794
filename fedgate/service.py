"""The gateway as one Twisted service: builds the object graph and runs the
listeners.

Start order: the admin side first (storage opened, stored peer policy and
component credentials loaded, admin API listening; see fedgate.admin), then
the XMPP listeners, so stored blocks apply before the first peer connects.
Stop order (graceful shutdown; :meth:`Gateway.stopService`): stop accepting
new work (listeners closed, every stream a listener accepted, from peers and
components, no longer read, the sender makes no new connection); flush
what is queued on streams that are open or connecting for ``[s2s]
shutdown_flush`` seconds; bounce the rest while the components' streams are
still open to take the bounces; then end every stream with
``system-shutdown``, give them ``shutdown_grace`` seconds, cut what is left,
close storage last.  The outcome (flushed, bounced) is logged.
:meth:`Gateway.reload` re-reads the peer policy and the certificates from
the configuration file without touching a stream (fedgate.tap calls it on
SIGHUP).

Wiring: every object gets what it needs when it is constructed; nothing is
patched in afterwards.  :class:`Gateway` takes the reactor, the DNS resolver
and the storage backend from its caller (:mod:`fedgate.tap` chooses the real
ones; tests pass their own).  The graph has one cycle, the router handing
remote stanzas to the sender whose streams route what they receive through
the router; the router gets :class:`_SenderLink`, which finds the sender
when a stanza goes out.  Dialback verification streams get the S2S context
without a verifier (they never verify), and the full context is that one
plus the verifier.
"""

from __future__ import annotations

import random
import weakref
from dataclasses import fields, is_dataclass, replace

from OpenSSL import SSL
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from fedgate.admin.service import make_admin_service
from fedgate.component.accept import ComponentAccept
from fedgate.component.credentials import CredentialRegistry
from fedgate.component.listener import ComponentListenerStream
from fedgate.component.throttle import AuthThrottle, PasswordPool, ThrottleSettings
from fedgate.component.xep0225 import Xep0225Settings, Xep0225Stream
from fedgate.config import Config, ConfigError, load_config
from fedgate.config import dialback_secret as secret_for
from fedgate.listen import listen
from fedgate.policy import PolicyTable
from fedgate.router import Router
from fedgate.s2s.addresses import AddressPolicy
from fedgate.s2s.connect import DomainConnector
from fedgate.s2s.context import S2SContext, VerificationBudget
from fedgate.s2s.inbound import InboundS2S
from fedgate.s2s.pairs import ConnectionTable
from fedgate.s2s.resolver import S2SResolver
from fedgate.s2s.sender import S2SSender, SenderSettings
from fedgate.s2s.sm import ResumeStore, SMSettings
from fedgate.s2s.verifier import DialbackVerifier
from fedgate.stream import namespaces as ns
from fedgate.stream.admission import Admission, AdmittingFactory, Caps, fit_to_fd_limit
from fedgate.stream.interfaces import SHUTDOWN
from fedgate.logsafe import LineRate, set_line_rate
from fedgate.stream.liveness import ComponentWatch, LivenessSettings, PingRegistry
from fedgate.stream.parser import Limits
from fedgate.stream.protocol import XmppStream
from fedgate.tls.certs import CertificateError, CertificateStore
from fedgate.tls.contexts import ALPN_S2S, DEFAULT_CIPHERS, TLSContexts, TLSSettings

log = Logger(namespace="fedgate.service")

#: how often a graceful shutdown looks whether the queues are empty
FLUSH_POLL = 0.05


def _stream_factory(gateway: "Gateway", make_handler, stream_ns: str, admission: Admission,
                    direct_tls: bool = False) -> AdmittingFactory:
    """A listener's factory: admitted connections get a stream with a fresh
    handler and their admission ticket; refused ones neither."""
    def build(ticket):
        return gateway.make_stream(make_handler(), stream_ns, admission=ticket)
    return AdmittingFactory(admission, build, stream_ns, direct_tls=direct_tls)


class _SenderLink:
    """The router's way to the S2S sender, which is built after the router
    (its streams need the router): looks the sender up on each send."""

    __slots__ = ("_gateway",)

    def __init__(self, gateway: "Gateway"):
        self._gateway = gateway

    def send(self, local: str, remote: str, stanza) -> None:
        self._gateway.sender.send(local, remote, stanza)


class Gateway(service.Service):
    """All of fedgate: S2S in and out, components, the router.  ``storage``
    is the admin side's backend (see :func:`fedgate.tap.choose_storage`);
    ``fd_limit`` the soft limit on open files (fedgate.tap raises and passes
    it), which the caps on unauthenticated connections must fit;
    ``dialback_secret`` overrides the configured (or state_dir's) one."""

    def __init__(self, config: Config, reactor, dns_resolver, storage,
                 rng: random.Random | None = None, fd_limit: int | None = None,
                 dialback_secret: str | None = None):
        self.config = config
        self.reactor = reactor
        if dialback_secret and hasattr(storage, "dialback_secret_in_use"):
            # from Redis (fedgate.tap.cluster_dialback_secret): kept there
            # after every reconnection, with a warning if it changed
            storage.dialback_secret_in_use = dialback_secret
        self.rng = rng or random.Random()
        s2s = config.s2s
        self.limits = Limits.from_config(config.limits)
        set_line_rate(LineRate(config.logging.peer_lines_burst, config.logging.peer_lines_per_second))
        self.streams: weakref.WeakSet = weakref.WeakSet()
        self.admission = _admission(config, fd_limit)
        self.table = ConnectionTable()
        self.pings = PingRegistry()
        self.router = Router(config.domains, config.local_domains - frozenset(config.domains),
                             sender=_SenderLink(self), pings=self.pings)
        self.policy = PolicyTable(s2s.default_policy, dict(s2s.peers), s2s.mode)
        self.tls = self._tls_contexts(config)
        self.resolver = S2SResolver(dns_resolver, static_addresses=self.policy.static_addresses,
                                    rng=self.rng, include_direct_tls=True)
        self.connector = DomainConnector(
            reactor, self.resolver, timeout=s2s.connect_timeout,
            addresses=AddressPolicy.from_config(s2s.allow_private_ranges),
            is_static=lambda domain: bool(self.policy.static_addresses(domain)))
        verifying = S2SContext(
            clock=reactor,
            local_domains=self.router.live_local_domains,
            # A cluster's nodes share one (fedgate.tap.cluster_dialback_secret).
            secret=dialback_secret or secret_for(config),
            table=self.table,
            router=self.router,
            verifier=None,
            budget=VerificationBudget(s2s.max_pending_verifications),
            limits=self.limits,
            auth_timeout=s2s.auth_timeout,
            max_pending_per_stream=s2s.max_pending_verifications_per_stream,
            max_pairs_per_connection=s2s.max_pairs_per_connection,
            policy=self.policy,
            tls=self.tls,
            bidi=s2s.bidi,
            reverse_dialback=s2s.reverse_dialback,
            tls_failure=self._tls_failure,
            liveness=LivenessSettings(s2s.ping_idle, s2s.ping_timeout, s2s.idle_close),
            pings=self.pings,
            sm=ResumeStore(reactor, SMSettings(
                s2s.stream_management, s2s.sm_ack_every, s2s.sm_ack_interval,
                s2s.sm_resume_timeout, s2s.sm_max_unacked, s2s.sm_close_wait))
            if s2s.stream_management else None,
            log_traffic=config.logging.xml_traffic,
            log_bodies=config.logging.xml_bodies,
        )
        self.verifier = DialbackVerifier(self.connector, reactor, self.make_stream,
                                         timeout=s2s.connect_timeout + s2s.auth_timeout, ctx=verifying,
                                         idle_timeout=s2s.verification_idle_timeout,
                                         pipeline=s2s.verifications_per_connection,
                                         max_idle=s2s.max_pending_verifications,
                                         outbound=lambda remote: self.sender.streams_to(remote))
        self.ctx = replace(verifying, verifier=self.verifier)
        self.sender = S2SSender(self.ctx, self.connector, self.make_stream, SenderSettings(
            max_stanzas=s2s.queue_max_stanzas, max_bytes=s2s.queue_max_bytes,
            max_wait=s2s.queue_max_wait, backoff_initial=s2s.backoff_initial,
            backoff_max=s2s.backoff_max, pair_timeout=s2s.pair_timeout,
            idle_timeout=s2s.destination_idle_timeout, max_destinations=s2s.max_destinations),
            rng=self.rng)
        comp = config.components
        self.component_liveness = ComponentWatch(
            LivenessSettings(comp.ping_idle, comp.ping_timeout, comp.idle_close), self.pings,
            config.domains[0])
        self.component_secrets = {d: c.secret for d, c in config.components.domains.items()}
        self.component_credentials = CredentialRegistry(
            config.components.credentials, own_domains=config.domains, xep0114=self.component_secrets,
            hosted=self.router.live_local_domains)
        c = config.components
        self.component_throttle = AuthThrottle(reactor, ThrottleSettings(
            free_failures=c.throttle_free_failures, base_delay=c.throttle_base_delay,
            max_delay=c.throttle_max_delay, forget_after=c.throttle_forget_after,
            address_free_failures=c.throttle_address_free_failures,
            max_entries=c.throttle_max_entries), on_event=self._component_auth_event)
        self.component_passwords = PasswordPool(reactor, c.password_threads, c.password_queue)
        self.ports: dict[str, list] = {"s2s": [], "s2s_direct_tls": [], "components": []}
        #: flushed and bounced stanzas of the last graceful shutdown
        self.shutdown_outcome: dict[str, int] | None = None
        #: routing across cluster nodes (fedgate.cluster.relay), started
        #: with the service in cluster mode
        self.cluster = None
        self.admin = make_admin_service(self, config, reactor, storage)

    @staticmethod
    def _tls_contexts(config: Config) -> TLSContexts:
        """Certificates for every hosted domain, checked now: a hosted domain
        without a usable one stops the start with its name."""
        store = CertificateStore(config.tls.certificates, config.tls.domains)
        store.check_hosted(config.local_domains)
        return TLSContexts(store, _tls_settings(config))

    def reload(self) -> bool:
        """Re-read the configuration file (SIGHUP, ``systemctl reload``) and
        apply what can change under live streams: the file's peer policy
        layer (``[s2s.policy]``, ``[s2s.peers]``; stored admin API entries
        keep winning) and ``[tls]`` (certificates for new connections).
        Everything is read and checked before anything is applied: on an
        error, one log line and the running settings stay.  Other changed
        settings are named as needing a restart.  Returns whether it applied."""
        path = str(self.config.path)
        try:
            new = load_config(path)
            tls = _checked_tls(new, self.config.local_domains)
        except ConfigError as exc:
            log.error("Reload failed, running settings kept: configuration error: {error}",
                      error=str(exc))
            return False
        except (CertificateError, OSError, ValueError, SSL.Error) as exc:
            log.error("Reload failed, running settings kept: certificate error: {path}: {error}",
                      path=path, error=str(exc) or repr(exc))
            return False
        old_store = self.tls.store
        self.tls.replace_store(tls.store, tls.settings)
        peers = self.admin.peers.replace_config_layer(new.s2s.peers, new.s2s.mode,
                                                      new.s2s.default_policy)
        applied = replace(self.config, tls=new.tls, s2s=replace(
            self.config.s2s, peers=new.s2s.peers, mode=new.s2s.mode,
            default_policy=new.s2s.default_policy))
        restart = _differences(applied, new)
        self.config = applied
        renewed = [d for d in sorted(self.config.local_domains)
                   if old_store.pair_for(d) is None or tls.store.pair_for(d) is None
                   or old_store.pair_for(d).chain != tls.store.pair_for(d).chain]
        log.info("Reloaded {path}: {peers}; certificates {certificates}", path=path,
                 peers=peers.describe() or "peer policy unchanged",
                 certificates=f"replaced for {', '.join(renewed)}" if renewed else "unchanged")
        if restart:
            log.warn("Reload: changes to {keys} in {path} apply only after a restart",
                     keys=", ".join(restart), path=path)
        return True

    def _tls_failure(self, reason: str) -> None:
        # No stream exists before the admin side (and its metrics) does.
        self.admin.tls_failure(reason)

    def _component_auth_event(self, event: str, protocol: str) -> None:
        self.admin.component_auth(event, protocol)

    def make_stream(self, handler, stream_ns: str = ns.SERVER, admission=None) -> XmppStream:
        stream = XmppStream(handler, self.reactor, self.limits,
                            log_traffic=self.config.logging.xml_traffic,
                            log_bodies=self.config.logging.xml_bodies, stream_ns=stream_ns,
                            on_tls_failure=self._tls_failure, admission=admission,
                            output_high_water=(self.config.s2s.output_high_water if stream_ns == ns.SERVER
                                               else self.config.components.output_high_water))
        self.streams.add(stream)
        return stream

    def _inbound(self) -> InboundS2S:
        return InboundS2S(self.ctx)

    def _inbound_direct_tls(self) -> InboundS2S:
        return InboundS2S(self.ctx, direct_tls=True)

    def _component(self) -> ComponentListenerStream:
        return ComponentListenerStream(self._component_0114, self._component_0225,
                                       self.config.components.header_timeout,
                                       keepalive=self.component_liveness.settings)

    def _component_0114(self, connected_at: float | None = None) -> ComponentAccept:
        return ComponentAccept(self.component_secrets, self.router, self.reactor,
                               self.config.components.auth_timeout, throttle=self.component_throttle,
                               connected_at=connected_at, liveness=self.component_liveness,
                               queue_max_stanzas=self.config.components.queue_max_stanzas,
                               queue_max_bytes=self.config.components.queue_max_bytes)

    def _component_0225(self, connected_at: float | None = None) -> Xep0225Stream:
        c = self.config.components
        return Xep0225Stream(self.component_credentials, self.router, self.tls, Xep0225Settings(
            require_tls=c.require_tls, auth_timeout=c.auth_timeout, max_hostnames=c.max_hostnames,
            stamp_from=c.stamp_from, load_balanced=c.load_balanced, liveness=self.component_liveness,
            queue_max_stanzas=c.queue_max_stanzas, queue_max_bytes=c.queue_max_bytes),
            self.ctx.local_domains, throttle=self.component_throttle, passwords=self.component_passwords,
            connected_at=connected_at)

    @defer.inlineCallbacks
    def startService(self):
        super().startService()
        self.component_passwords.start()
        yield self.admin.start()
        if self.config.cluster.enabled:
            self._start_cluster()
        s2s, components = self.admission["s2s"], self.admission["components"]
        listeners = [("s2s", d, _stream_factory(self, self._inbound, ns.SERVER, s2s))
                     for d in self.config.s2s.listen]
        listeners += [("s2s_direct_tls", d, _stream_factory(self, self._inbound_direct_tls, ns.SERVER,
                                                            s2s, direct_tls=True))
                      for d in self.config.s2s.direct_tls_listen]
        listeners += [("components", d, _stream_factory(self, self._component, ns.COMPONENT_ACCEPT,
                                                        components))
                      for d in self.config.components.listen]
        for kind, description, factory in listeners:
            port = yield listen(self.reactor, kind, description, factory)  # or ListenFailed
            self.ports[kind].append(port)
            address = port.getHost()
            log.info("Listening for {kind} on {host}:{port} ({description})", kind=kind,
                     host=address.host, port=address.port, description=description)
        log.info("fedgate serving {domains}; components {components}",
                 domains=", ".join(self.config.domains),
                 components=", ".join(sorted(self.config.components.domains)) or "none")

    def listeners(self) -> list[dict]:
        """The XMPP listeners: kind, host and port of each."""
        out = []
        for kind, ports in self.ports.items():
            for port in ports:
                address = port.getHost()
                out.append({"kind": kind, "host": address.host, "port": address.port})
        return out

    def components_authenticated_as(self, identity: str) -> list:
        """Live XEP-0225 sessions authenticated as ``identity``, bound or not."""
        return [stream.handler for stream in list(self.streams)
                if isinstance(stream.handler, Xep0225Stream) and stream.handler.identity == identity
                and not stream.closed]

    def port_of(self, kind: str, index: int = 0) -> int:
        return self.ports[kind][index].getHost().port

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        yield self.admin.stop_listening()
        ports = [p for group in self.ports.values() for p in group]
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
        for group in self.ports.values():
            group.clear()
        # No new work: streams from peers and components are no longer read
        # (our own outbound streams still are: they finish what is queued).
        for stream in self._live_streams():
            if stream.admission is not None:
                stream.pause_reading(SHUTDOWN)
        before = self.sender.outcomes()
        self.sender.drain()
        yield self._flush(self.config.s2s.shutdown_flush)
        flushed = self.sender.outcomes()
        # Bounce the rest now, while the streams (to components, and to
        # remote senders) are still open to carry the bounces.
        self.sender.stop()
        yield self._stop_cluster()
        after = self.sender.outcomes()
        self.shutdown_outcome = {
            "flushed": flushed["delivered"] - before["delivered"],
            "bounced": after["bounced"] - before["bounced"],
            "bounced_after_flush": after["bounced"] - flushed["bounced"]}
        log.info("Shutting down: {flushed} queued stanzas flushed, {bounced} bounced "
                 "({bounced_after_flush} after the flush time of {flush} s)",
                 flush=self.config.s2s.shutdown_flush, **self.shutdown_outcome)
        streams = self._live_streams()
        for stream in streams:
            stream.fail("system-shutdown", "the gateway is stopping")
            # Read again, so that the closing handshake (the peer's stream
            # end, TLS close_notify) completes; nothing read is parsed now.
            stream.resume_reading(SHUTDOWN)
        # Give peers a moment to read the error; then cut what is left.
        waiting = defer.DeferredList([s.wait_closed() for s in streams])
        # (plus the time a stream with stanzas unacknowledged waits for
        # the peer's last XEP-0198 ack before its error goes out)
        grace = self.config.s2s.shutdown_grace
        if self.config.s2s.stream_management:
            grace += self.config.s2s.sm_close_wait
        waiting.addTimeout(grace, self.reactor)
        try:
            yield waiting
        except defer.TimeoutError:
            for stream in streams:
                if not stream.closed:
                    stream.transport.abortConnection()
        self.component_passwords.stop()
        yield self.admin.stop()

    def _start_cluster(self) -> None:
        """Join the cluster's routing: a Redis client of its own (the
        store's stays free for admin writes), leases, the node channel."""
        from fedgate.cluster.redisclient import RedisClient
        from fedgate.cluster.relay import ClusterRelay, RelaySettings
        from fedgate.config import redis_address
        c = self.config.cluster
        client = RedisClient(self.reactor, redis_address(c), threads=c.threads,
                             max_pending=c.max_pending, name=f"fedgate-cluster-{c.node_id}")
        client.start()
        self.cluster = ClusterRelay(self.reactor, client, c.node_id, c.key_prefix, self.router,
                                    self.sender, self.table, RelaySettings.from_config(c))
        self.router.cluster = self.cluster
        self.cluster.start()

    @defer.inlineCallbacks
    def _stop_cluster(self):
        """Leave the cluster: what waits for another node's acknowledgement
        gets a bounded wait, then bounces; this node's entries are removed
        so the others route around it.  The Redis client stops last (its
        own shutdown trigger is in the "during" phase, after this)."""
        cluster = self.cluster
        if cluster is None:
            return
        self.router.cluster = None
        from fedgate.cluster.relay import STOP_ACK_WAIT
        d = cluster.stop()  # waits up to STOP_ACK_WAIT for acks, then leaves
        d.addTimeout(STOP_ACK_WAIT + self.config.cluster.heartbeat, self.reactor)
        try:
            yield d
        except defer.TimeoutError:
            pass
        cluster.client.stop()

    def _live_streams(self) -> list:
        return [s for s in list(self.streams) if s.transport is not None and not s.closed]

    @defer.inlineCallbacks
    def _flush(self, seconds: float):
        """Wait until nothing is queued for a remote domain, or ``seconds``."""
        deadline = self.reactor.seconds() + seconds
        while self.sender.pending_stanza_count() and self.reactor.seconds() < deadline:
            yield task.deferLater(self.reactor, min(FLUSH_POLL, deadline - self.reactor.seconds()),
                                  lambda: None)


def _admission(config: Config, fd_limit: int | None) -> dict[str, Admission]:
    """The two pools of unauthenticated connections, S2S (plain and Direct
    TLS) and components, with totals that leave ``[limits] fd_reserve``
    descriptors of ``fd_limit`` free (logged when lowered)."""
    wanted = {"s2s": Caps(config.s2s.max_unauthenticated_per_address, config.s2s.max_unauthenticated),
              "components": Caps(config.components.max_unauthenticated_per_address,
                                 config.components.max_unauthenticated)}
    reserve = config.limits.fd_reserve
    caps = fit_to_fd_limit(wanted, fd_limit, reserve)
    if caps != wanted:
        log.warn("Caps on unauthenticated connections lowered to fit {limit} open files less a "
                 "reserve of {reserve}: s2s {s2s_total} (configured {s2s_wanted}), components "
                 "{components_total} (configured {components_wanted})", limit=fd_limit,
                 reserve=reserve, s2s_total=caps["s2s"].total, s2s_wanted=wanted["s2s"].total,
                 components_total=caps["components"].total,
                 components_wanted=wanted["components"].total)
    log.info("Unauthenticated connections: s2s at most {s2s_per_address} per address and "
             "{s2s_total} in all, components {components_per_address} and {components_total} "
             "(open file limit {limit}, reserve {reserve})",
             s2s_per_address=caps["s2s"].per_address, s2s_total=caps["s2s"].total,
             components_per_address=caps["components"].per_address,
             components_total=caps["components"].total,
             limit="unknown" if fd_limit is None else fd_limit, reserve=reserve)
    return {name: Admission(name, c) for name, c in caps.items()}


def _tls_settings(config: Config) -> TLSSettings:
    return TLSSettings(min_version=config.tls.min_version,
                       ciphers=config.tls.ciphers or DEFAULT_CIPHERS,
                       trust_roots=config.tls.trust_roots)


def _checked_tls(config: Config, hosted) -> TLSContexts:
    """``config``'s certificates and TLS settings, tried out: every hosted
    domain has a usable certificate and its context builds (key, ciphers,
    trust roots), so a reload never leaves the next handshake to find out."""
    contexts = TLSContexts(CertificateStore(config.tls.certificates, config.tls.domains),
                           _tls_settings(config))
    contexts.store.check_hosted(hosted)
    for domain in sorted(hosted):
        contexts.server_context(domain)
        contexts.client_context(domain)
    return contexts


def _differences(running: Config, new: Config) -> list[str]:
    """Keys (``section.key``) whose new value differs from the running one."""
    keys = []
    for name in (f.name for f in fields(running)):
        before, after = getattr(running, name), getattr(new, name)
        if before == after:
            continue
        if is_dataclass(before):
            keys += [f"{name}.{f.name}" for f in fields(before)
                     if getattr(before, f.name) != getattr(after, f.name)]
        else:
            keys.append(name)
    return keys
