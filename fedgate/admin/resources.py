"""The admin API's routes under /api/v1/, one handler per operation.

One resource per concept, as Synapse's federation admin does: status, the
global federation policy, peers, connections, destinations, components and
diagnose.  Handlers validate through :mod:`fedgate.admin.views`, change
state through :mod:`fedgate.admin.registry` (storage first, then the live
tables), and return JSON-able values or :class:`Reply` objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from twisted.internet import defer

from fedgate.admin.diagnose import Diagnosis
from fedgate.admin.registry import OPERATOR_TEXT
from fedgate.admin.views import (component_json, connection_json, connection_state, default_json,
                                 destination_json, invalid, parse_component, parse_global,
                                 parse_peer, path_domain, peer_json)
from fedgate.admin.web import API_PREFIX, ApiError, ApiRequest, Reply, Route, not_found
from fedgate.policy import PeerPolicy
from fedgate.s2s.pairs import INBOUND, OUTBOUND
from fedgate.storage.interface import ComponentCredential

CLOSE_TEXT = "closed by an operator through the admin API"
DIAGNOSE_METHODS = ("auto", "dialback", "sasl-external")


@dataclass(frozen=True)
class ApiViews:
    """What the routes may ask of the running gateway, and through what:
    each part answers narrow questions and takes narrow commands (the
    sender's ``pending_stanza_count`` and ``reset_destination``, the
    router's ``serves``, the table's ``close``).  ``diagnosis`` is what
    :class:`~fedgate.admin.diagnose.Diagnosis` drives."""

    config: object
    policy: object
    table: object
    sender: object
    router: object
    tls: object
    #: listeners() -> [{"kind", "host", "port"}] of the XMPP listeners
    listeners: Callable[[], list]
    diagnosis: object
    #: () -> the cluster relay (fedgate.cluster.relay.ClusterRelay), or None
    #: on a single node
    cluster: Callable[[], object] = lambda: None


class AdminApi:
    def __init__(self, views: ApiViews, peers, components, metrics, enforcer, reactor, version: str):
        self.views = views
        self.peers = peers
        self.components = components
        self.metrics = metrics
        self.enforcer = enforcer
        self.reactor = reactor
        self.version = version
        self.started_at = reactor.seconds()
        self.listeners: list[dict] = []

    def routes(self) -> list[Route]:
        p = API_PREFIX
        return [
            Route("GET", f"{p}/status", self.status),
            Route("GET", f"{p}/policy", self.get_policy),
            Route("PUT", f"{p}/policy", self.put_policy, body="required"),
            Route("PATCH", f"{p}/policy", self.put_policy, body="required"),
            Route("DELETE", f"{p}/policy", self.delete_policy),
            Route("GET", f"{p}/peers", self.list_peers),
            Route("GET", f"{p}/peers/{{domain}}", self.get_peer),
            Route("PUT", f"{p}/peers/{{domain}}", self.put_peer, body="required"),
            Route("PATCH", f"{p}/peers/{{domain}}", self.patch_peer, body="required"),
            Route("DELETE", f"{p}/peers/{{domain}}", self.delete_peer),
            Route("GET", f"{p}/connections", self.list_connections),
            Route("GET", f"{p}/connections/{{id}}", self.get_connection),
            Route("DELETE", f"{p}/connections/{{id}}", self.close_connection),
            Route("GET", f"{p}/destinations", self.list_destinations),
            Route("GET", f"{p}/destinations/{{domain}}", self.get_destination),
            Route("POST", f"{p}/destinations/{{domain}}/reset", self.reset_destination, body="optional"),
            Route("GET", f"{p}/components", self.list_components),
            Route("GET", f"{p}/components/{{domain}}", self.get_component),
            Route("PUT", f"{p}/components/{{domain}}", self.put_component, body="required"),
            Route("PATCH", f"{p}/components/{{domain}}", self.put_component, body="required"),
            Route("DELETE", f"{p}/components/{{domain}}", self.disconnect_component),
            Route("DELETE", f"{p}/components/{{domain}}/credentials", self.delete_component),
            Route("POST", f"{p}/diagnose/{{domain}}", self.diagnose, body="optional"),
            Route("GET", f"{p}/cluster", self.cluster),
            Route("GET", f"{p}/openapi.json", self.openapi),
            Route("GET", "/metrics", self.prometheus),
        ]

    def now(self) -> float:
        return self.reactor.seconds()

    # -- status ---------------------------------------------------------------
    def status(self, request: ApiRequest) -> dict:
        gw = self.views
        records = list(gw.table)
        listeners = gw.listeners()
        return {
            "version": self.version,
            "started_at": self.started_at,
            "uptime_seconds": round(self.now() - self.started_at, 3),
            "listeners": listeners + self.listeners,
            "domains": list(gw.config.domains),
            "components": {"configured": self.components.domains(),
                           "connected": gw.router.connected_components()},
            "federation": {"mode": gw.policy.mode, "source": self.peers.global_source},
            "counts": {
                "connections": {d: sum(1 for r in records if r.direction == d) for d in (INBOUND, OUTBOUND)},
                "authenticated_connections": sum(1 for r in records if r.authenticated),
                "valid_domain_pairs": sum(len(r.valid_pairs()) for r in records),
                "destinations": gw.sender.destination_count(),
                "queued_stanzas": gw.sender.pending_stanza_count(),
                "peers": len(gw.policy.peers),
                "blocked_peers": sum(1 for p in gw.policy.peers.values() if not p.allowed),
                "stanzas": gw.sender.outcomes(),
            },
        }

    # -- the cluster ------------------------------------------------------------------
    @defer.inlineCallbacks
    def cluster(self, request: ApiRequest):
        """Every node of the cluster, as each published itself in its last
        heartbeat (read from Redis, so any node answers for all); 404 on a
        single node, 503 while Redis cannot be read."""
        relay = self.views.cluster()
        if relay is None:
            raise ApiError(404, "cluster mode is off ([cluster] enabled = false)")
        try:
            nodes = yield relay.membership.view()
        except Exception as e:
            raise ApiError(503, f"the cluster's Redis cannot be read: {e}") from None
        now = self.now()
        for node in nodes:
            at = node.get("heartbeat_at")
            node["heartbeat_age_seconds"] = round(max(0.0, now - at), 3) if at else None
        return {"node": relay.node_id, "redis_connected": relay.connected,
                "lease_seconds": relay.settings.lease, "heartbeat_seconds": relay.settings.heartbeat,
                "in_flight": len(relay.inflight), "relay": relay.counters.as_dict(), "nodes": nodes}

    # -- global policy ------------------------------------------------------------
    def get_policy(self, request: ApiRequest) -> dict:
        table = self.views.policy
        return {"mode": table.mode, "default": default_json(table.default),
                "source": self.peers.global_source}

    @defer.inlineCallbacks
    def put_policy(self, request: ApiRequest):
        table = self.views.policy
        base = table.default
        if request.method == "PUT":
            if isinstance(request.body, dict):
                for name in ("mode", "default"):
                    if name not in request.body:
                        raise invalid(name, "required in a PUT (PATCH changes single fields)")
            base = PeerPolicy()
        mode, default = parse_global(request.body, table.mode, base)
        yield self.peers.set_global(mode, default)
        return self.get_policy(request)

    @defer.inlineCallbacks
    def delete_policy(self, request: ApiRequest):
        yield self.peers.reset_global()
        return self.get_policy(request)

    # -- peers ------------------------------------------------------------------------
    def _peer_json(self, domain: str, live: bool = False) -> dict:
        policy = self.peers.get(domain)
        out = peer_json(policy, self.peers.source(domain))
        if live:
            gw = self.views
            out["live"] = {"blocked": gw.policy.is_blocked(domain),
                           "connections": [r.id for r in gw.table.connections_of(domain)],
                           "queued_stanzas": gw.sender.pending_stanza_count(domain)}
        return out

    def list_peers(self, request: ApiRequest) -> dict:
        table = self.views.policy
        return {"mode": table.mode, "peers": [self._peer_json(d) for d in sorted(table.peers)]}

    def get_peer(self, request: ApiRequest) -> dict:
        domain = path_domain(request.params["domain"])
        if self.peers.get(domain) is None:
            raise not_found("peer")
        return self._peer_json(domain, live=True)

    def _peer_domain(self, request: ApiRequest) -> str:
        domain = path_domain(request.params["domain"])
        if self.views.router.serves(domain):
            raise invalid("domain", f"{domain} is served by this gateway, not a peer")
        return domain

    @defer.inlineCallbacks
    def put_peer(self, request: ApiRequest):
        domain = self._peer_domain(request)
        peer = parse_peer(domain, request.body, self.views.policy.default)
        created = yield self.peers.put(peer)
        return Reply(self._peer_json(domain, live=True), 201 if created else 200)

    @defer.inlineCallbacks
    def patch_peer(self, request: ApiRequest):
        """Change the fields given; a peer not known yet is created from the
        default policy with them (201), so a first write is one request
        (RFC 5789 lets PATCH create)."""
        domain = self._peer_domain(request)
        current = self.peers.get(domain)
        yield self.peers.put(parse_peer(domain, request.body,
                                        current if current is not None else self.views.policy.default))
        return Reply(self._peer_json(domain, live=True), 200 if current is not None else 201)

    @defer.inlineCallbacks
    def delete_peer(self, request: ApiRequest):
        domain = path_domain(request.params["domain"])
        source = yield self.peers.delete(domain)
        if source is None:
            return Reply(None, 204)
        return self._peer_json(domain, live=True)

    # -- connections ------------------------------------------------------------------
    def list_connections(self, request: ApiRequest) -> dict:
        remote = request.arg("remote")
        direction = request.arg("direction")
        state = request.arg("state")
        if remote is not None:
            remote = path_domain(remote)
        if direction not in (None, INBOUND, OUTBOUND):
            raise invalid("direction", f"must be {INBOUND} or {OUTBOUND}")
        if state not in (None, "authenticating", "authenticated"):
            raise invalid("state", "must be authenticating or authenticated")
        table = self.views.table
        records = table.connections_of(remote) if remote is not None else list(table)
        now = self.now()
        return {"connections": [connection_json(r, now) for r in sorted(records, key=lambda r: r.id)
                                if (direction is None or r.direction == direction)
                                and (state is None or connection_state(r) == state)]}

    def _record(self, request: ApiRequest):
        text = request.params["id"]
        record = self.views.table.get(int(text)) if text.isdigit() else None
        if record is None:
            raise not_found("connection")
        return record

    def get_connection(self, request: ApiRequest) -> dict:
        return connection_json(self._record(request), self.now(), detail=True)

    def close_connection(self, request: ApiRequest) -> Reply:
        record = self._record(request)
        self.views.sender.keep_queue_on_close(record)
        if not self.views.table.close(record.id, "policy-violation", CLOSE_TEXT):
            raise not_found("connection")
        return Reply({"id": record.id, "closed": True, "condition": "policy-violation",
                      "text": CLOSE_TEXT}, 202)

    # -- destinations ---------------------------------------------------------------
    def _destination_json(self, status) -> dict:
        if status is None:
            raise not_found("destination")
        return destination_json(status, self.now(), self.views.policy.is_blocked(status.domain))

    def list_destinations(self, request: ApiRequest) -> dict:
        return {"destinations": [self._destination_json(s) for s in self.views.sender.statuses()]}

    def get_destination(self, request: ApiRequest) -> dict:
        domain = path_domain(request.params["domain"])
        return self._destination_json(self.views.sender.status(domain))

    def reset_destination(self, request: ApiRequest) -> dict:
        domain = path_domain(request.params["domain"])
        return self._destination_json(self.views.sender.reset_destination(domain))

    # -- components ---------------------------------------------------------------------
    def _component_domain(self, request: ApiRequest) -> str:
        domain = path_domain(request.params["domain"])
        if not self.components.knows(domain):
            raise not_found("component")
        return domain

    def list_components(self, request: ApiRequest) -> dict:
        return {"components": [component_json(d, self.components) for d in self.components.domains()]}

    def get_component(self, request: ApiRequest) -> dict:
        return component_json(self._component_domain(request), self.components)

    @defer.inlineCallbacks
    def put_component(self, request: ApiRequest):
        domain = path_domain(request.params["domain"])
        if request.method == "PATCH":
            base = self.components.current(self._component_domain(request))
        else:
            base = ComponentCredential(domain)
        credential = parse_component(domain, request.body, base)
        tls = self.views.tls
        for hostname in {domain} | set(credential.allowed or ()):
            if tls.store.pair_for(hostname) is None:
                # Remote servers could not validate us for it over TLS.
                raise ApiError(422, f"no certificate for {hostname}: add one to the certificate "
                                    "directory (or [tls.domains]) and reload the gateway first")
        created = yield self.components.put(credential)
        return Reply(component_json(domain, self.components), 201 if created else 200)

    def disconnect_component(self, request: ApiRequest) -> Reply:
        domain = self._component_domain(request)
        if not self.components.disconnect(domain, OPERATOR_TEXT):
            raise ApiError(409, f"{domain} is not connected")
        return Reply({"domain": domain, "disconnected": True}, 202)

    @defer.inlineCallbacks
    def delete_component(self, request: ApiRequest):
        domain = path_domain(request.params["domain"])
        source = yield self.components.delete(domain)
        if source is None:
            return Reply(None, 204)
        return component_json(domain, self.components)

    # -- diagnose, documents ---------------------------------------------------------------
    def diagnose(self, request: ApiRequest):
        remote = path_domain(request.params["domain"])
        body = request.body if request.body is not None else {}
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        for name in body:
            if name not in ("from", "method"):
                raise invalid(name, "unknown field (expected from, method)")
        method = body.get("method", "auto")
        if method not in DIAGNOSE_METHODS:
            raise invalid("method", f"must be one of {', '.join(DIAGNOSE_METHODS)}")
        local = body.get("from", self.views.config.domains[0])
        local = path_domain(local) if isinstance(local, str) else None
        if local is None or not self.views.router.serves(local):
            raise invalid("from", "must be one of the gateway's domains")
        if self.views.router.serves(remote):
            raise invalid("domain", "is served by this gateway")
        return Diagnosis(self.views.diagnosis, self.reactor, remote, local, method).run()

    def openapi(self, request: ApiRequest) -> dict:
        from fedgate.admin.openapi import document
        return document(self.version)

    def prometheus(self, request: ApiRequest) -> Reply:
        return Reply(self.metrics.render(), content_type=self.metrics.content_type)
