"""The admin side of a gateway: storage, policy layers, metrics, HTTP listener.

:func:`make_admin_service` builds it; the Gateway calls :meth:`start` before
its own listeners open (so stored blocks apply before the first peer
connects) and :meth:`stop` after they close (so storage closes last).

The storage backend is an argument (:func:`fedgate.tap.choose_storage`
picks it).  Registries, enforcer, metrics and routes each get the narrow
views they need (the sender's counts and commands, the router's component
queries, the connection table, the component registry), not the gateway;
only the diagnosis still drives the gateway itself (see fedgate.admin.diagnose).

The HTTP side (twisted.web, the routes, the diagnosis) and the metrics
(prometheus_client) are built, and their modules imported, only when
``[admin] listen`` names a listener: about 5 MB of a process that has no
API to serve them (storage and the stored policy load either way).  Asked
for anyway (:attr:`AdminService.api`, :attr:`AdminService.metrics`, as
tests do), they are built then; events before that are not counted.
"""

from __future__ import annotations

import functools

from twisted.internet import defer
from twisted.logger import Logger

import fedgate
from fedgate.admin.enforce import PolicyEnforcer
from fedgate.admin.registry import ComponentRegistry, PeerRegistry
from fedgate.config import Config
from fedgate.listen import listen

log = Logger(namespace="fedgate.admin")


class AdminService:
    """Built from the gateway's parts; keeps none of the gateway itself."""

    def __init__(self, gateway, config: Config, reactor, storage):
        self.config = config
        self.reactor = reactor
        self.storage = storage
        # Each part gets the narrow views it needs, never the gateway itself
        # (the diagnosis alone still drives the gateway's own parts).
        self.peers = PeerRegistry(gateway.policy, config.s2s.peers, self.storage)
        self.components = ComponentRegistry(
            gateway.component_credentials, gateway.router, config.domains, config.components,
            self.storage, authenticated_as=gateway.components_authenticated_as)
        self.enforcer = PolicyEnforcer(gateway.policy, gateway.table, gateway.sender)

        def make_metrics():
            from fedgate.metrics import GatewayMetrics
            return GatewayMetrics(
                reactor, gateway.table, gateway.sender, gateway.router, gateway.component_credentials,
                gateway.policy, config.admin.metrics_domains, admission=gateway.admission,
                certificate_expiry=lambda: certificate_expiry(gateway.tls.store, config.domains),
                cluster=lambda: gateway.cluster)

        def make_api():
            from fedgate.admin.resources import AdminApi, ApiViews
            return AdminApi(
                ApiViews(config=config, policy=gateway.policy, table=gateway.table, sender=gateway.sender,
                         router=gateway.router, tls=gateway.tls, listeners=gateway.listeners,
                         diagnosis=gateway, cluster=lambda: gateway.cluster),
                self.peers, self.components, self.metrics, self.enforcer, reactor, fedgate.__version__)
        self._make_metrics, self._make_api = make_metrics, make_api
        if config.admin.listen:
            self.api  # noqa: B018 (built now, with the metrics, as it will serve them)
        self.ports: list = []
        self.token_file = None
        self._storage_open = False
        #: a shared store's change feed (cluster mode), see fedgate.cluster.sync
        self.sync = None

    @defer.inlineCallbacks
    def start(self):
        yield self.storage.open()
        self._storage_open = True
        yield self.peers.load()
        yield self.components.load()
        self.enforcer.attach()
        if hasattr(self.storage, "watch"):
            # A shared store: follow the other nodes' writes from now on.
            from fedgate.cluster.sync import ClusterSync
            self.sync = ClusterSync(self.storage, self.peers, self.components,
                                    health_check=self.config.cluster.heartbeat)
            self.sync.start()
        admin = self.config.admin
        if not admin.listen:
            return
        from fedgate.admin.auth import BearerCheck, load_or_create_token
        from fedgate.admin.channel import AdminSite
        from fedgate.admin.web import AdminResource

        token, self.token_file, generated = load_or_create_token(self.config)
        if generated:
            log.info("Generated the admin API token in {path}", path=str(self.token_file))
        check = BearerCheck(token)
        site = AdminSite(AdminResource(self.api.routes(), check, admin.metrics_open, admin.max_body_bytes),
                         check, admin, self.reactor)
        for description in admin.listen:
            port = yield listen(self.reactor, "admin", description, site)  # or ListenFailed
            self.ports.append(port)
            address = port.getHost()
            self.api.listeners.append({"kind": "admin", "host": address.host, "port": address.port})
            log.info("Listening for admin on {host}:{port} ({description}); token in {where}",
                     host=address.host, port=address.port, description=description,
                     where=str(self.token_file) if self.token_file else "the configuration")

    @functools.cached_property
    def metrics(self):
        """The Prometheus collectors (fedgate.metrics.GatewayMetrics)."""
        return self._make_metrics()

    @functools.cached_property
    def api(self):
        """The REST API's routes (fedgate.admin.resources.AdminApi)."""
        return self._make_api()

    def tls_failure(self, reason: str) -> None:
        """Count a TLS failure, where metrics exist to count it in."""
        if "metrics" in self.__dict__:
            self.metrics.tls_failure(reason)

    def component_auth(self, event: str, protocol: str) -> None:
        """Count a component authentication failure or throttling, where
        metrics exist to count it in."""
        if "metrics" in self.__dict__:
            self.metrics.component_auth(event, protocol)

    def port(self, index: int = 0) -> int:
        return self.ports[index].getHost().port

    @defer.inlineCallbacks
    def stop_listening(self):
        ports, self.ports = self.ports, []
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])

    @defer.inlineCallbacks
    def stop(self):
        yield self.stop_listening()
        if self.sync is not None:
            self.sync.stop()
            self.sync = None
        if self._storage_open:
            self._storage_open = False
            yield self.storage.close()


def certificate_expiry(store, domains) -> dict:
    """{hosted domain: notAfter as Unix time} of the certificates in use
    (the store is replaced on reload, so this is asked at each scrape)."""
    from fedgate.tls.certs import _not_after
    out = {}
    for domain in domains:
        pair = store.pair_for(domain)
        if pair is not None:
            out[domain] = _not_after(pair.leaf).timestamp()
    return out


def make_admin_service(gateway, config: Config, reactor, storage) -> AdminService:
    return AdminService(gateway, config, reactor, storage)
