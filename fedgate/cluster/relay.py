"""Routing across nodes: stanzas for a component or an S2S stream that
another node holds travel to it over Redis pub/sub, acknowledged.

Where a stanza goes (the router asks :class:`ClusterRelay` only for what it
cannot deliver itself, so the single-node path is unchanged):

- for a component domain no local session holds: to a node holding it
  (several in turn, for a load-balanced domain spanning nodes); a local
  session is always preferred, which keeps traffic on the node it landed on;
- for a remote domain: through this node's own destination if it has one
  (open, connecting or queueing: order is kept); else through a node that
  has an authenticated stream for the same (local, remote) pair, else one
  with a stream to that remote domain for another local domain (it
  authenticates the pair on it, as XEP-0220 allows); else this node opens
  one itself.

On the wire each stanza is one PUBLISH to ``<p>:node:<target>``: ``S``, a
JSON envelope (origin node, origin instance, sequence number, kind, the
stanza's name and addresses) on one line, then the stanza's bytes (the
original ones where :meth:`~fedgate.stream.stanza.Stanza.encode` allows).
The receiving node delivers it locally and never forwards it again (loop
free): to a local component session (else a bounce), or to its own S2S
sender.  It acknowledges what it handled, one PUBLISH per origin per
reactor turn (``A`` and a JSON list of sequence numbers) on the origin's
channel.

The origin keeps every forwarded stanza in a bounded
:class:`~fedgate.cluster.inflight.InFlightTable` until acknowledged.  A
PUBLISH that reached no subscriber means the target is dead: its entries
are dropped and the stanza re-routed at once (another holder, the local
path) or bounced.  No acknowledgement within ``ack_timeout``: bounced with
``remote-server-timeout`` (it may have been delivered all the same).  With
Redis unreachable, cross-node stanzas bounce with ``remote-server-timeout``
at once; local delivery goes on, and after the reconnection the ownership
cache is reloaded in full.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from twisted.logger import Logger

from fedgate.cluster.inflight import InFlightTable
from fedgate.cluster.membership import COMPONENT, STREAM, Membership
from fedgate.cluster.redisclient import RedisBusy
from fedgate.stream import namespaces as ns
from fedgate.stream.stanza import SourceContext, Stanza

log = Logger(namespace="fedgate.cluster.relay")

KIND_COMPONENT = "c"
KIND_S2S = "s"
_CONTEXT = SourceContext({None: ns.SERVER})
#: most streams and destinations listed per node in a heartbeat
MAX_LISTED = 1000


@dataclass(frozen=True)
class RelaySettings:
    lease: float = 6.0
    heartbeat: float = 2.0
    ack_timeout: float = 6.0
    max_in_flight: int = 10000
    max_in_flight_bytes: int = 16 * 1024 * 1024

    @classmethod
    def from_config(cls, cluster) -> "RelaySettings":
        return cls(lease=cluster.lease, heartbeat=cluster.heartbeat,
                   ack_timeout=cluster.ack_timeout, max_in_flight=cluster.max_in_flight,
                   max_in_flight_bytes=cluster.max_in_flight_bytes)


class RelayCounters:
    """Totals for the metrics (labels: a fixed set of outcomes)."""

    def __init__(self):
        self.forwarded = 0
        self.received = 0
        self.acked = 0
        self.rerouted = 0
        #: reason -> stanzas bounced by the origin (timeout, redis, full)
        self.bounced = {"timeout": 0, "redis": 0, "full": 0}

    def as_dict(self) -> dict:
        return {"forwarded": self.forwarded, "received": self.received, "acked": self.acked,
                "rerouted": self.rerouted, "bounced": dict(self.bounced)}


class ClusterRelay:
    """This node's part in the cluster's routing.  ``client`` is a started
    :class:`~fedgate.cluster.redisclient.RedisClient`; ``router``, ``sender``
    and ``table`` are the gateway's."""

    def __init__(self, reactor, client, node_id: str, prefix: str, router, sender, table,
                 settings: RelaySettings = RelaySettings()):
        self.reactor = reactor
        self.client = client
        self.node_id = node_id
        self.prefix = prefix
        self.router = router
        self.sender = sender
        self.table = table
        self.settings = settings
        self.instance = uuid.uuid4().hex[:16]
        self.started_at = reactor.seconds()
        self.counters = RelayCounters()
        self.inflight = InFlightTable(reactor.seconds, timeout=settings.ack_timeout,
                                      max_stanzas=settings.max_in_flight,
                                      max_bytes=settings.max_in_flight_bytes)
        self.membership = Membership(reactor, client, node_id, prefix, lease=settings.lease,
                                     heartbeat=settings.heartbeat, local_entries=self.local_entries,
                                     info=self.info)
        self.cache = self.membership.cache
        self.membership.on_gone = self._node_gone
        self.publisher = None
        self.subscriber = None
        self._acks: dict[tuple[str, str], list[int]] = {}
        self._ack_flush = None
        self._expiry = None
        #: after a resubscription (Redis restarted or cut off), the other
        #: nodes' subscribers come back one by one: until a lease has passed,
        #: a PUBLISH that reached nobody is no evidence that its node died
        self._subscribed_before = False
        self._settling_until = 0.0

    # -- keys -------------------------------------------------------------------------
    def channel(self, node: str) -> str:
        return f"{self.prefix}:node:{node}"

    @property
    def connected(self) -> bool:
        return self.subscriber is not None and self.subscriber.connected

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self.publisher = self.client.publisher()
        self.subscriber = self.client.subscriber(
            channels=[self.channel(self.node_id), self.membership.owners_channel],
            on_messages=self.messages, on_connected=self.connected_again,
            on_disconnected=self.lost, health_check=min(1.0, self.settings.heartbeat),
            name=f"fedgate-cluster-{self.node_id}")
        self.subscriber.start()
        self.membership.start(self.instance)

    def stop(self):
        """Stop listening, bounce what waits for an acknowledgement, and
        leave the cluster (this node's entries removed at once).  Returns a
        Deferred."""
        self.membership.stop()
        subscriber, self.subscriber = self.subscriber, None
        if subscriber is not None:
            subscriber.stop()
        for timer in (self._ack_flush, self._expiry):
            if timer is not None and timer.active():
                timer.cancel()
        for entry in self.inflight.take_all():
            self._bounce(entry.stanza, "timeout", "the gateway node is stopping")
        d = self.membership.leave()
        d.addErrback(lambda f: None)
        return d

    def kill(self) -> None:
        """Stop at once without a word to the others, as a node killed with
        ``kill -9`` would (tests)."""
        self.membership.stop()
        subscriber, self.subscriber = self.subscriber, None
        if subscriber is not None:
            subscriber.stop()

    def connected_again(self) -> None:
        """(Re)subscribed: whatever was announced meanwhile is lost, so
        rewrite our entries and reload everyone's."""
        now = self.reactor.seconds()
        self.membership.connected_since = now
        if self._subscribed_before:
            self._settling_until = now + self.settings.lease
        self._subscribed_before = True
        self.membership.rejoin()

    def lost(self, reason: str) -> None:
        self.membership.connected_since = None
        log.warn("Cluster: lost Redis ({reason}); stanzas for other nodes bounce until it is back",
                 reason=reason)

    # -- what this node holds ------------------------------------------------------------
    def local_entries(self) -> set:
        entries = {(COMPONENT, (domain,)) for domain in self.router.components}
        for record in self.table:
            for pair in record.valid_pairs():
                if record.can_send(pair.local, pair.remote):
                    entries.add((STREAM, (pair.local, pair.remote)))
        return entries

    def bound(self, domain: str) -> None:
        self.membership.soon()

    def info(self) -> dict:
        now = self.reactor.seconds()
        records = list(self.table)
        streams = [{"id": r.id, "direction": r.direction, "remote": r.remote_domain,
                    "bidi": r.bidi, "pairs": [[p.local, p.remote] for p in r.valid_pairs()]}
                   for r in records[:MAX_LISTED]]
        statuses = self.sender.statuses()
        return {
            "instance": self.instance,
            "heartbeat_at": now,
            "started_at": self.started_at,
            "components": self.router.connected_components(),
            "streams": streams,
            "streams_total": len(records),
            "destinations": [{"domain": s.domain, "state": s.state,
                              "queued_stanzas": s.queued_stanzas}
                             for s in statuses[:MAX_LISTED]],
            "destinations_total": len(statuses),
            "in_flight": len(self.inflight),
            "relay": self.counters.as_dict(),
        }

    # -- the router's questions ------------------------------------------------------------
    def route_component(self, stanza: Stanza, to_domain: str) -> bool:
        """``to_domain`` has no local session: forward to a holder if there
        is one (True), else False."""
        node = self.cache.component_owner(to_domain)
        if node is None:
            return False
        self.forward(node, KIND_COMPONENT, stanza, None, to_domain)
        return True

    def route_remote(self, stanza: Stanza, from_domain: str, to_domain: str) -> bool:
        """For a remote domain this node has no destination for: forward to
        a node with an authenticated stream for the pair (True), else False
        (this node opens one)."""
        destination = self.sender.destinations.get(to_domain)
        if destination is not None and not destination.is_idle():
            return False  # ours is open, connecting or queueing: keep the order
        node = self.cache.pair_owner(from_domain, to_domain) or self.cache.stream_owner(to_domain)
        if node is None:
            return False
        self.forward(node, KIND_S2S, stanza, from_domain, to_domain)
        return True

    # -- forwarding --------------------------------------------------------------------------
    def forward(self, node: str, kind: str, stanza: Stanza, from_domain, to_domain: str) -> None:
        if not self.connected:
            self._bounce(stanza, "redis", "the cluster's Redis is unreachable")
            return
        data = stanza.encode(ns.SERVER)
        envelope = {"o": self.node_id, "i": self.instance, "k": kind, "n": stanza.name,
                    "a": {k: v for k, v in (("to", stanza.to), ("from", stanza.sender),
                                            ("type", stanza.type), ("id", stanza.id)) if v is not None},
                    "f": from_domain, "d": to_domain}
        seq = self.inflight.add(node, stanza, len(data))
        if seq is None:
            self._bounce(stanza, "full", "too many stanzas waiting for other gateway nodes")
            return
        envelope["q"] = seq
        message = b"S" + json.dumps(envelope, separators=(",", ":")).encode() + b"\n" + data
        self.counters.forwarded += 1
        d = self.publisher.publish(self.channel(node), message)
        d.addCallbacks(self._published, self._not_published, callbackArgs=(seq, node),
                       errbackArgs=(seq,))
        self._arm_expiry()

    def _published(self, receivers: int, seq: int, node: str) -> None:
        if receivers:
            self.inflight.confirm(seq)
            return
        entry = self.inflight.take_back(seq)
        if self.reactor.seconds() < self._settling_until:
            # Its subscriber may not be back yet: bounce as while Redis is
            # down, and leave its entries alone.
            if entry is not None:
                self._bounce(entry.stanza, "redis", f"gateway node {node} is not listening yet")
            return
        self.membership.node_gone(node)  # what else waits for it bounces
        if entry is not None:
            self.counters.rerouted += 1
            self.router.route(entry.stanza)  # another holder, the local path, or a bounce

    def _node_gone(self, node: str) -> None:
        """``node`` is dead or its lease ran out: what it was sent and has
        not acknowledged bounces now rather than at ``ack_timeout`` (it may
        have been delivered just before: the documented window).  Stanzas
        whose PUBLISH reply is still to come wait for it: one that reached
        nobody is routed again."""
        for entry in self.inflight.take_node(node, confirmed_only=True):
            self._bounce(entry.stanza, "timeout", f"gateway node {node} is gone")

    def _not_published(self, failure, seq: int) -> None:
        entry = self.inflight.take_back(seq)
        if entry is None:
            return
        if failure.check(RedisBusy):
            self._bounce(entry.stanza, "full", "too many messages waiting for Redis")
        else:
            self._bounce(entry.stanza, "redis", "the cluster's Redis is unreachable")

    def _bounce(self, stanza: Stanza, reason: str, text: str) -> None:
        self.counters.bounced[reason] += 1
        condition = "resource-constraint" if reason == "full" else "remote-server-timeout"
        self.router.bounce(stanza, condition, text)

    def _arm_expiry(self) -> None:
        if self._expiry is not None and self._expiry.active():
            return
        deadline = self.inflight.next_deadline()
        if deadline is not None:
            self._expiry = self.reactor.callLater(max(0.0, deadline - self.reactor.seconds()),
                                                  self._expire)

    def _expire(self) -> None:
        self._expiry = None
        for entry in self.inflight.expire():
            self._bounce(entry.stanza, "timeout",
                         f"gateway node {entry.node} did not acknowledge in time")
        self._arm_expiry()

    # -- receiving --------------------------------------------------------------------------
    def messages(self, batch) -> None:
        mine, owners = self.channel(self.node_id), self.membership.owners_channel
        for channel, data in batch:
            try:
                if channel == owners:
                    self.membership.announcement(data)
                elif channel == mine:
                    if data[:1] == b"S":
                        self._receive(data)
                    elif data[:1] == b"A":
                        self._acked(data)
            except Exception:
                log.failure("Cluster: cannot handle a message on {channel}", channel=channel)

    def _receive(self, data: bytes) -> None:
        line_end = data.index(b"\n")
        envelope = json.loads(data[1:line_end])
        raw = data[line_end + 1:]
        stanza = Stanza(envelope["n"], ns.SERVER, dict(envelope["a"]), raw=raw, context=_CONTEXT,
                        forwardable=True)
        self.counters.received += 1
        # Acknowledged as handled here; never forwarded again.
        self._ack(envelope["o"], envelope["i"], envelope["q"])
        if envelope["k"] == KIND_COMPONENT:
            self.router.deliver_here(stanza, envelope["d"])
        else:
            self.sender.send(envelope["f"], envelope["d"], stanza)

    def _ack(self, origin: str, instance: str, seq: int) -> None:
        self._acks.setdefault((origin, instance), []).append(seq)
        if self._ack_flush is None:
            self._ack_flush = self.reactor.callLater(0, self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_flush = None
        acks, self._acks = self._acks, {}
        for (origin, instance), seqs in acks.items():
            message = b"A" + json.dumps({"n": self.node_id, "i": instance, "q": seqs},
                                        separators=(",", ":")).encode()
            self.publisher.publish(self.channel(origin), message).addErrback(lambda f: None)

    def _acked(self, data: bytes) -> None:
        ack = json.loads(data[1:])
        if ack["i"] != self.instance:
            return  # for an earlier run of this node
        self.counters.acked += self.inflight.ack(ack["q"], node=ack["n"])
