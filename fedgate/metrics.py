"""Prometheus metrics for one gateway (served at GET /metrics by the admin API).

Most values are read from the live tables at scrape time (connections,
domain pairs, queues, components, the sender's and router's counters), so
the hot path pays nothing for them.  Two things need events: stanza counts
of connections that have closed (folded into totals when a record leaves the
connection table) and handshake durations (observed once per connection,
at the first scrape after it authenticated or when it leaves the table,
whichever comes first).

Label sets are bounded: directions, states, auth methods and stanza error
conditions come from fixed lists (anything else is ``other``), and remote
domains appear as labels only for the domains listed in
``admin.metrics_domains``; certificate expiry is labelled by the gateway's
own (configured) domains only.  Each gateway has its own registry, never the
process-global one.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fedgate.s2s.pairs import INBOUND, INVALID, OUTBOUND, PENDING, VALID
from fedgate.stream.errors import STANZA_CONDITIONS

DIRECTIONS = (INBOUND, OUTBOUND)
CONNECTION_STATES = ("authenticating", "authenticated")
PAIR_STATES = (PENDING, VALID, INVALID)
AUTH_METHODS = ("dialback", "dialback-with-valid-cert", "sasl-external")
DESTINATION_STATES = ("idle", "connecting", "open", "backoff", "reverse", "closing")
TLS_FAILURE_REASONS = ("handshake", "untrusted-certificate", "name-mismatch", "expired-certificate",
                       "no-certificate", "refused", "required-but-unavailable", "timeout")
COMPONENT_PROTOCOLS = ("xep0114", "xep0225")
HANDSHAKE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 90.0)
OTHER = "other"


def _bounded(value: str | None, allowed) -> str:
    return value if value in allowed else OTHER


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, clock, table, sender, router, components, policy, domains=(), admission=None,
                 certificate_expiry=None, cluster=None):
        """Reads only narrow views: the connection ``table`` (records, and
        its removal events), the ``sender``'s counts, the ``router``'s
        bounce counts and bound components, the component registry's
        XEP-0114 domains (``components``), the ``policy`` table's peers, the
        listener pools' counts of unauthenticated connections (``admission``:
        name -> fedgate.stream.admission.Admission)."""
        self.table = table
        self.sender = sender
        self.router = router
        self.components = components
        self.policy = policy
        self.domains = tuple(sorted(set(domains)))
        #: () -> {hosted domain: its certificate's notAfter (Unix time)}
        self.certificate_expiry = certificate_expiry
        #: () -> the cluster relay, or None on a single node
        self.cluster = cluster
        self.clock = clock
        self.started_at = self.clock.seconds()
        self.registry = CollectorRegistry(auto_describe=False)
        # First, so that each scrape's handshake observations are made
        # before the histogram below is collected.
        self.registry.register(_LiveCollector(self))
        if admission:
            self.registry.register(_AdmissionCollector(admission))
        self.handshake = Histogram(
            "fedgate_s2s_handshake_seconds",
            "Time from connection to its first authenticated domain pair", ["direction"],
            buckets=HANDSHAKE_BUCKETS, registry=self.registry)
        self.tls_failures = Counter("fedgate_tls_failures", "TLS failures by reason", ["reason"],
                                    registry=self.registry)
        self.component_auth_failures = Counter(
            "fedgate_component_auth_failures", "Failed component authentications (wrong XEP-0114 "
            "handshakes, wrong XEP-0225 credentials)", ["protocol"], registry=self.registry)
        self.component_auth_throttled = Counter(
            "fedgate_component_auth_throttled", "Component authentication attempts refused or "
            "answered late by the throttle", ["protocol"], registry=self.registry)
        self.closed_stanzas = {"in": 0, "out": 0}
        self._observed: set[int] = set()
        table.on_removed(self._removed)

    # -- events -----------------------------------------------------------------
    def tls_failure(self, reason: str) -> None:
        """Count a TLS failure; ``reason`` is one of :data:`TLS_FAILURE_REASONS`."""
        self.tls_failures.labels(_bounded(reason, TLS_FAILURE_REASONS)).inc()

    def component_auth(self, event: str, protocol: str) -> None:
        """Count a component authentication ``event`` ("failure" or
        "throttled") for ``protocol`` (xep0114 or xep0225)."""
        counter = self.component_auth_failures if event == "failure" else self.component_auth_throttled
        counter.labels(_bounded(protocol, COMPONENT_PROTOCOLS)).inc()

    def _removed(self, record) -> None:
        for pair in record.pairs.values():
            self.closed_stanzas["in"] += pair.stanzas_in
            self.closed_stanzas["out"] += pair.stanzas_out
        self._observe(record)
        self._observed.discard(record.id)

    def _observe(self, record) -> None:
        if record.id in self._observed:
            return
        valid = [pair.since for pair in record.pairs.values() if pair.state == VALID]
        if valid:
            self._observed.add(record.id)
            self.handshake.labels(_bounded(record.direction, DIRECTIONS)).observe(
                max(0.0, min(valid) - record.opened_at))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _AdmissionCollector:
    """Unauthenticated connections per listener pool, refusals and evictions."""

    def __init__(self, pools: dict):
        self.pools = pools

    def describe(self):
        return []

    def collect(self):
        held = GaugeMetricFamily("fedgate_unauthenticated_connections",
                                 "Connections whose peer has not authenticated yet", labels=["pool"])
        refused = CounterMetricFamily("fedgate_connections_refused",
                                      "Connections refused at a cap on unauthenticated ones",
                                      labels=["pool", "cap"])
        evicted = CounterMetricFamily("fedgate_connections_evicted",
                                      "Unauthenticated connections closed at the total cap "
                                      "for one from a lighter source", labels=["pool"])
        for name, pool in sorted(self.pools.items()):
            held.add_metric([name], pool.unauthenticated)
            for cap, count in sorted(pool.refused.items()):
                refused.add_metric([name, cap], count)
            evicted.add_metric([name], pool.evicted)
        yield held
        yield refused
        yield evicted


class _LiveCollector:
    """Reads the gateway's tables at each scrape."""

    def __init__(self, metrics: GatewayMetrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        metrics = self.metrics
        records = list(metrics.table)
        for record in records:
            metrics._observe(record)

        connections = GaugeMetricFamily("fedgate_s2s_connections", "Live S2S connections",
                                        labels=["direction", "state"])
        pairs = GaugeMetricFamily("fedgate_s2s_domain_pairs", "Domain pairs on live connections",
                                  labels=["method", "state"])
        conn_counts = {(d, s): 0 for d in DIRECTIONS for s in CONNECTION_STATES}
        pair_counts = {(m, s): 0 for m in AUTH_METHODS for s in PAIR_STATES}
        stanzas = dict(metrics.closed_stanzas)
        per_domain_conns = {d: 0 for d in metrics.domains}
        for record in records:
            state = "authenticated" if record.authenticated else "authenticating"
            key = (_bounded(record.direction, DIRECTIONS), state)
            conn_counts[key] = conn_counts.get(key, 0) + 1
            remotes = set()
            for pair in record.pairs.values():
                key = (_bounded(pair.method, AUTH_METHODS), _bounded(pair.state, PAIR_STATES))
                pair_counts[key] = pair_counts.get(key, 0) + 1
                stanzas["in"] += pair.stanzas_in
                stanzas["out"] += pair.stanzas_out
                remotes.add(pair.remote)
            if record.remote_domain:
                remotes.add(record.remote_domain)
            for remote in remotes & per_domain_conns.keys():
                per_domain_conns[remote] += 1
        for (direction, state), value in sorted(conn_counts.items()):
            connections.add_metric([direction, state], value)
        for (method, state), value in sorted(pair_counts.items()):
            pairs.add_metric([method, state], value)
        yield connections
        yield pairs

        s2s = CounterMetricFamily("fedgate_s2s_stanzas", "Stanzas received from and sent to remote "
                                  "servers over authenticated pairs", labels=["direction"])
        for direction in ("in", "out"):
            s2s.add_metric([direction], stanzas[direction])
        yield s2s

        sender = metrics.sender
        outcomes = CounterMetricFamily("fedgate_sender_stanzas", "Stanzas for remote domains by "
                                       "outcome", labels=["outcome"])
        counts = sender.outcomes()
        for outcome in ("accepted", "delivered", "bounced", "in_flight"):
            outcomes.add_metric([outcome], counts.get(outcome, 0))
        yield outcomes

        bounces = CounterMetricFamily("fedgate_bounces", "Stanzas bounced with an error, by "
                                      "condition", labels=["condition"])
        by_condition: dict[str, int] = {}
        for condition, value in metrics.router.bounce_counts().items():
            label = _bounded(condition, STANZA_CONDITIONS)
            by_condition[label] = by_condition.get(label, 0) + value
        for condition, value in sorted(by_condition.items()):
            bounces.add_metric([condition], value)
        yield bounces

        states = GaugeMetricFamily("fedgate_destinations", "Remote domains with a sender, by state",
                                   labels=["state"])
        state_counts = {s: 0 for s in DESTINATION_STATES}
        for state, count in sender.state_counts().items():
            label = _bounded(state, DESTINATION_STATES)
            state_counts[label] = state_counts.get(label, 0) + count
        for state, value in sorted(state_counts.items()):
            states.add_metric([state], value)
        yield states
        yield GaugeMetricFamily("fedgate_queue_stanzas", "Stanzas queued for all remote domains",
                                value=sender.pending_stanza_count())
        yield GaugeMetricFamily("fedgate_queue_bytes", "Bytes queued for all remote domains",
                                value=sender.pending_bytes())
        if metrics.domains:
            queue = GaugeMetricFamily("fedgate_peer_queue_stanzas", "Stanzas queued, for the "
                                      "domains in admin.metrics_domains", labels=["domain"])
            conns = GaugeMetricFamily("fedgate_peer_connections", "Live connections, for the "
                                      "domains in admin.metrics_domains", labels=["domain"])
            for domain in metrics.domains:
                queue.add_metric([domain], sender.pending_stanza_count(domain))
                conns.add_metric([domain], per_domain_conns[domain])
            yield queue
            yield conns

        components = GaugeMetricFamily("fedgate_components", "Component domains", labels=["state"])
        components.add_metric(["configured"], len(metrics.components.secret_domains()))
        components.add_metric(["connected"], len(metrics.router.connected_components()))
        yield components
        peers = GaugeMetricFamily("fedgate_peer_policies", "Per-peer policy entries",
                                  labels=["allowed"])
        peer_table = metrics.policy.peers
        allowed = sum(1 for p in peer_table.values() if p.allowed)
        peers.add_metric(["true"], allowed)
        peers.add_metric(["false"], len(peer_table) - allowed)
        yield peers
        if metrics.certificate_expiry is not None:
            expiry = GaugeMetricFamily("fedgate_certificate_expiry_timestamp_seconds", "When the "
                                       "certificate of a hosted domain expires (Unix time)",
                                       labels=["domain"])
            for domain, not_after in sorted(metrics.certificate_expiry().items()):
                expiry.add_metric([domain], not_after)
            yield expiry
        relay = metrics.cluster() if metrics.cluster is not None else None
        if relay is not None:
            yield from _cluster_metrics(relay)
        yield GaugeMetricFamily("fedgate_start_time_seconds", "When the gateway started (Unix time)",
                                value=metrics.started_at)


def _cluster_metrics(relay):
    """Cross-node routing (fedgate.cluster.relay); labels from fixed sets."""
    counts = relay.counters
    stanzas = CounterMetricFamily("fedgate_cluster_stanzas", "Stanzas routed across cluster "
                                  "nodes, by outcome", labels=["outcome"])
    for outcome in ("forwarded", "received", "acked", "rerouted"):
        stanzas.add_metric([outcome], getattr(counts, outcome))
    yield stanzas
    bounced = CounterMetricFamily("fedgate_cluster_bounces", "Cross-node stanzas bounced by the "
                                  "origin node, by reason", labels=["reason"])
    for reason, value in sorted(counts.bounced.items()):
        bounced.add_metric([reason], value)
    yield bounced
    yield GaugeMetricFamily("fedgate_cluster_in_flight", "Cross-node stanzas waiting for an "
                            "acknowledgement", value=len(relay.inflight))
    yield GaugeMetricFamily("fedgate_cluster_redis_connected", "Whether the node's Redis "
                            "subscription is up", value=1 if relay.connected else 0)
    yield GaugeMetricFamily("fedgate_cluster_nodes", "Live cluster nodes this node knows of, "
                            "itself included", value=len(relay.membership.alive_nodes) + 1)
