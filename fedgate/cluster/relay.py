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

On the wire, the stanzas for one node gathered while the previous Redis
pipeline was out (at least those of one reactor turn) travel as one PUBLISH
to ``<p>:node:<target>``: ``B``, the origin node and its run (instance) on
one line, then one record per stanza: an ASCII header line of decimal
numbers (sequence number, kind, and the byte length of each field: the
stanza's name and to/from/type/id, the from and to domains, ``-`` for an
absent one, and of the stanza's bytes), then those fields and the stanza's
bytes (the original ones where :meth:`~fedgate.stream.stanza.Stanza.encode`
allows) back to back.  Everything is length-delimited, so no byte of a
stanza can pass for a header (at most MAX_BATCH_STANZAS stanzas and
MAX_BATCH_BYTES per message).  The receiving node delivers each locally
and never forwards it again (loop free): to a local component session
(else a bounce), or to its own S2S sender.  It acknowledges what it
handled, per stanza, as ranges of sequence numbers: ``R``, its node id, the
origin's instance and ``1-500,502``, one message per origin per pipeline,
on the origin's channel.

The origin keeps every forwarded stanza in a bounded
:class:`~fedgate.cluster.inflight.InFlightTable` until acknowledged.  A
PUBLISH that reached no subscriber means the target's subscriber is away
(dead, or alive and reconnecting): that message's stanzas are re-routed at
once (another holder, the local path) or bounced, and the target leaves
this node's cache; what it got waits for its lease.  A node found dead or gone (its lease ran out) has its
unacknowledged stanzas bounced after a fence: a message the origin
publishes to its own channel, which comes back after every
acknowledgement Redis received before it; so exactly what was not
acknowledged bounces.  No acknowledgement within ``ack_timeout``: bounced
with ``remote-server-timeout`` (it may have been delivered all the same),
after a fence on this node's own channel, so acknowledgements already
waiting for it count first.
With Redis unreachable, cross-node stanzas bounce with
``remote-server-timeout`` at once; local delivery goes on, and after the
reconnection the ownership cache is reloaded in full.

A node whose own lease has run out by its own clock (a heartbeat found it
expired, or a relayed stanza arrives after it: the node was hung, stopped
with SIGSTOP, or cut off from Redis) may have been taken for dead, and its
senders may have bounced what they sent it.  So from then until it has
rejoined (renewed its lease, then seen a fence come back on its own
channel, after everything Redis held for it) it neither delivers nor
acknowledges relayed stanzas: it discards them (counted ``discarded``) and
refuses them to their senders (``N`` and ranges), who bounce them.  It
stops taking them a little before the lease ends (``lease_margin``), so an
acknowledgement sent just before reaches Redis while its liveness key
still exists.  What remains is the stanzas it delivered in the last
moments before it was stopped, whose acknowledgement left only after it
was continued: delivering and acknowledging are two writes to two
systems (README, Cluster).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from twisted.internet import defer, task
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
#: most (local, remote) pairs listed per stream in a heartbeat (with the
#: stream's ``pair_count``): a remote peer may authenticate up to
#: ``max_pairs_per_connection`` pairs on each stream
MAX_PAIRS_LISTED = 4
#: most S2S pairs this node announces in its ownership hash, and most per
#: stream: pairs past them are not announced (the other nodes still find a
#: stream to the same remote domain, or open their own)
MAX_ANNOUNCED_PAIRS = 4096
MAX_ANNOUNCED_PER_STREAM = 64
#: most stanzas, and most bytes (unless one stanza is larger), in one
#: PUBLISH to one node
MAX_BATCH_STANZAS = 500
MAX_BATCH_BYTES = 1024 * 1024
#: How long a clean stop (:meth:`ClusterRelay.stop`) waits, subscriber up,
#: for the acknowledgements of what this node forwarded before it bounces
#: the rest and leaves; and how often it looks.
STOP_ACK_WAIT = 1.0
STOP_POLL = 0.02
#: fields of a record header: seq, kind, then the lengths of name, to,
#: from, type, id, the from and to domains, and the stanza's bytes
_HEAD_FIELDS = 10


class BadMessage(ValueError):
    """A relay message that does not parse (never from a fedgate node)."""


def _len(value: bytes | None) -> bytes:
    return b"-" if value is None else b"%d" % len(value)


def encode_record(seq: int, kind: str, name: str, attrs: tuple, from_domain, to_domain: str,
                  data: bytes) -> bytes:
    """One stanza in a batch: an ASCII header line of decimal numbers (the
    sequence number, the kind, then the byte length of each text field,
    ``-`` for an absent one, and of the stanza's bytes), then those fields
    and bytes back to back.  Every part is length-delimited, so nothing in
    a field or in the stanza (a newline, a space, anything) can be taken
    for a header."""
    fields = [name.encode()] + [None if v is None else v.encode() for v in attrs]
    fields += [None if from_domain is None else from_domain.encode(), to_domain.encode()]
    head = b" ".join([b"%d" % seq, kind.encode()] + [_len(f) for f in fields] + [b"%d" % len(data)])
    return b"".join([head, b"\n"] + [f for f in fields if f] + [data])


def decode_records(data: bytes, pos: int):
    """The records of a batch from ``pos`` on: (seq, kind, name, (to, from,
    type, id), from_domain, to_domain, raw) each.  :class:`BadMessage` at
    the first one that does not parse (those before it are yielded)."""
    end = len(data)
    while pos < end:
        line_end = data.find(b"\n", pos, pos + 256)
        if line_end < 0:
            raise BadMessage("no record header")
        head = data[pos:line_end].split(b" ")
        if len(head) != _HEAD_FIELDS or not head[0].isdigit():
            raise BadMessage("bad record header")
        pos = line_end + 1
        values = []
        for size in head[2:]:
            if size == b"-":
                values.append(None)
                continue
            if not size.isdigit():
                raise BadMessage("bad length")
            n = int(size)
            if pos + n > end:
                raise BadMessage("truncated record")
            values.append(data[pos:pos + n])
            pos += n
        name, to, sender, type_, id_, from_domain, to_domain, raw = values
        if name is None or to_domain is None or raw is None:
            raise BadMessage("a required field is absent")
        text = [None if v is None else v.decode() for v in (name, to, sender, type_, id_,
                                                             from_domain, to_domain)]
        yield (int(head[0]), head[1].decode(), text[0], tuple(text[1:5]), text[5], text[6], raw)


def encode_ranges(seqs) -> bytes:
    """``1-5,7,9-10`` for the sequence numbers ``seqs``."""
    out = []
    start = prev = None
    for seq in sorted(seqs):
        if prev is not None and seq == prev + 1:
            prev = seq
            continue
        if start is not None:
            out.append(b"%d" % start if start == prev else b"%d-%d" % (start, prev))
        start = prev = seq
    if start is not None:
        out.append(b"%d" % start if start == prev else b"%d-%d" % (start, prev))
    return b",".join(out)


def decode_ranges(text: bytes) -> list[tuple[int, int]]:
    out = []
    for part in text.split(b","):
        first, dash, last = part.partition(b"-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise BadMessage("bad range")
        a, b = int(first), int(last or first)
        if b < a:
            raise BadMessage("bad range")
        out.append((a, b))
    return out


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
        #: relayed stanzas this node received while its own lease had run
        #: out, discarded unhandled and refused to their senders
        self.discarded = 0
        #: reason -> stanzas bounced by the origin (timeout, redis, full;
        #: lapsed: refused by a node whose own lease had run out)
        self.bounced = {"timeout": 0, "redis": 0, "full": 0, "lapsed": 0}

    def as_dict(self) -> dict:
        return {"forwarded": self.forwarded, "received": self.received, "acked": self.acked,
                "rerouted": self.rerouted, "discarded": self.discarded,
                "bounced": dict(self.bounced)}


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
        self.membership.on_lapse = self._lapsed
        self.membership.on_collision = self._collided
        self.membership.on_declared_dead = lambda: self._lapsed("another node announced it down")
        self.publisher = None
        self.subscriber = None
        #: node -> [(seq, record)] waiting for the next pipeline
        self._outgoing: dict[str, list[tuple[int, bytes]]] = {}
        #: (origin, its instance) -> sequence numbers to acknowledge / refuse
        self._acks: dict[tuple[str, str], list[int]] = {}
        self._nacks: dict[tuple[str, str], list[int]] = {}
        #: fence token -> the node whose unacknowledged stanzas bounce when
        #: the fence comes back (see _node_gone), or ("expire", t): the
        #: stanzas sent by reactor time t still unacknowledged then bounce
        #: (see _expire)
        self._fences: dict[int, object] = {}
        #: the token of the expiry fence out, and when it was published
        self._expiry_fence: int | None = None
        self._expiry_fence_at = 0.0
        self._fence_seq = 0
        #: set while this node rejoins after its own lease ran out: the
        #: token of the fence that ends it
        self._rejoin: int | None = None
        self._rejoin_seq = 0
        self._lapsed_at = 0.0
        self._discarded_since = 0
        self._expiry = None
        #: after a resubscription (Redis restarted or cut off), the other
        #: nodes' subscribers come back one by one: until a lease has passed,
        #: a PUBLISH that reached nobody is no evidence that its node died
        self._subscribed_before = False
        self._settling_until = 0.0
        #: another running fedgate has this node's id (see _collided)
        self.collided = False

    # -- keys -------------------------------------------------------------------------
    def channel(self, node: str) -> str:
        return f"{self.prefix}:node:{node}"

    @property
    def connected(self) -> bool:
        return self.subscriber is not None and self.subscriber.connected

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self.publisher = self.client.publisher()
        self.publisher.before_flush += [self._gather, self._flush_acks]
        self.subscriber = self.client.subscriber(
            channels=[self.channel(self.node_id), self.membership.owners_channel],
            on_messages=self.messages, on_connected=self.connected_again,
            on_disconnected=self.lost, health_check=min(1.0, self.settings.heartbeat),
            name=f"fedgate-cluster-{self.node_id}")
        self.subscriber.start()
        self.membership.start(self.instance)

    def stop(self, ack_wait: float = STOP_ACK_WAIT) -> defer.Deferred:
        """Leave the cluster cleanly; returns a Deferred.

        In order: take no new forwards (the router routes locally again);
        send what is already gathered and every pending acknowledgement;
        wait, with the subscriber still up, until every stanza this node
        forwarded is acknowledged, at most ``ack_wait`` seconds (relayed
        stanzas arriving meanwhile are refused, and their senders bounce
        them); then stop listening, bounce what is still unacknowledged (it
        may or may not have been delivered), and leave (this node's entries
        removed at once, ``down`` announced)."""
        if getattr(self.router, "cluster", None) is self:
            self.router.cluster = None
        if self.subscriber is not None:
            self.subscriber.on_messages = self._messages_while_stopping
        d = self._wait_for_acks(ack_wait)
        d.addErrback(lambda f: log.failure("Cluster: waiting for acknowledgements failed", f))
        d.addCallback(lambda _: self._leave())
        return d

    def _stop_pending(self) -> bool:
        """Whether anything of ours is still on its way: stanzas unacknowledged
        or not yet published, acknowledgements not yet published."""
        return bool(len(self.inflight) or self._outgoing or self._acks or self._nacks
                    or (self.publisher is not None and self.publisher.queued))

    @defer.inlineCallbacks
    def _wait_for_acks(self, ack_wait: float):
        deadline = self.reactor.seconds() + ack_wait
        while (self.publisher is not None and self.connected and self._stop_pending()
               and self.reactor.seconds() < deadline):
            if self._outgoing or self._acks or self._nacks:
                self.publisher.wake()
            yield task.deferLater(self.reactor, min(STOP_POLL, max(0.0, deadline - self.reactor.seconds())),
                                  lambda: None)

    def _messages_while_stopping(self, batch) -> None:
        """The subscriber's handler while stopping: acknowledgements, refusals
        and fences as usual; relayed stanzas are refused (``N``) unhandled,
        since this node is leaving (their senders bounce them)."""
        mine = self.channel(self.node_id)
        rest = []
        for channel, data in batch:
            if channel == mine and data[:1] == b"B":
                try:
                    line_end = data.find(b"\n", 0, 256)
                    origin, _, instance = data[1:line_end].decode().partition(" ")
                    refused = [record[0] for record in decode_records(data, line_end + 1)]
                except Exception:
                    log.failure("Cluster: cannot read a relayed batch while stopping")
                    continue
                self.counters.discarded += len(refused)
                self._nacks.setdefault((origin, instance), []).extend(refused)
                if self.publisher is not None:
                    self.publisher.wake()
            else:
                rest.append((channel, data))
        if rest:
            self.messages(rest)

    def _leave(self) -> defer.Deferred:
        self.membership.stop()
        if self.publisher is not None:
            self._flush_acks()  # refusals of the last moments (best effort)
        subscriber, self.subscriber = self.subscriber, None
        if subscriber is not None:
            subscriber.stop()
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._outgoing.clear()
        self._fences.clear()
        for entry in self.inflight.take_all():
            self._bounce(entry.stanza, "timeout", "the gateway node is stopping")
        # Our last acknowledgements reach Redis before "down" is announced
        # (a pool thread could otherwise run the leave first): a sender
        # that hears "down" bounces whatever its fence finds unacknowledged,
        # and would bounce stanzas this node delivered.  Bounded, like the
        # wait for acknowledgements.
        if self.publisher is not None:
            published = self.publisher.drained()
            published.addTimeout(STOP_ACK_WAIT, self.reactor)
            published.addErrback(lambda f: None)
        else:
            published = defer.succeed(None)
        d = published.addCallback(lambda _: self.membership.leave())
        d.addErrback(lambda f: None)
        return d

    def kill(self) -> None:
        """Stop at once without a word to the others, as a node killed with
        ``kill -9`` would (tests)."""
        self.membership.stop()
        subscriber, self.subscriber = self.subscriber, None
        if subscriber is not None:
            subscriber.stop()

    def _collided(self, other: str) -> None:
        """Another running fedgate uses this node's id: both would deliver
        every stanza relayed to it and overwrite each other's entries.  This
        node leaves the cluster's routing (it stops listening on the node's
        channel; cross-node stanzas bounce as with Redis unreachable) and
        says so in one line; local delivery goes on."""
        log.critical("Cluster: node_id {node} is used by another running fedgate (instance "
                     "{other}, ours {ours}); this node leaves the cluster: give every node its "
                     "own [cluster] node_id and restart it", node=self.node_id, other=other,
                     ours=self.instance)
        self.collided = True
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
        if self._rejoin is not None:
            self._rejoin_attempt(self._rejoin)  # the fence may have been lost
        else:
            self.membership.rejoin()

    def lost(self, reason: str) -> None:
        self.membership.connected_since = None
        # Acknowledgements (and the fences) may be lost with the connection:
        # waiting for a fence is pointless now.
        for token in list(self._fences):
            self._fenced(token)
        log.warn("Cluster: lost Redis ({reason}); stanzas for other nodes bounce until it is back",
                 reason=reason)

    # -- what this node holds ------------------------------------------------------------
    def local_entries(self) -> set:
        """This node's component domains, and the S2S pairs its streams may
        carry: at most MAX_ANNOUNCED_PER_STREAM per stream and
        MAX_ANNOUNCED_PAIRS in all (what a remote peer can grow is bounded;
        the walk stops there too)."""
        entries = {(COMPONENT, (domain,)) for domain in self.router.components}
        pairs = 0
        for record in self.table:
            if pairs >= MAX_ANNOUNCED_PAIRS:
                break
            taken = 0
            for pair in record.valid_pairs():
                if taken >= MAX_ANNOUNCED_PER_STREAM or pairs >= MAX_ANNOUNCED_PAIRS:
                    break
                if record.can_send(pair.local, pair.remote):
                    key = (STREAM, (pair.local, pair.remote))
                    if key not in entries:
                        entries.add(key)
                        pairs += 1
                    taken += 1
        return entries

    def bound(self, domain: str) -> None:
        self.membership.soon()

    def info(self) -> dict:
        now = self.reactor.seconds()
        records = list(self.table)
        streams = []
        for r in records[:MAX_LISTED]:
            pairs = r.valid_pairs()
            streams.append({"id": r.id, "direction": r.direction, "remote": r.remote_domain,
                            "bidi": r.bidi, "pair_count": len(pairs),
                            "pairs": [[p.local, p.remote] for p in pairs[:MAX_PAIRS_LISTED]]})
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
        seq = self.inflight.add(node, stanza, len(data))
        if seq is None:
            self._bounce(stanza, "full", "too many stanzas waiting for other gateway nodes")
            return
        record = encode_record(seq, kind, stanza.name,
                               (stanza.to, stanza.sender, stanza.type, stanza.id),
                               from_domain, to_domain, data)
        self.counters.forwarded += 1
        waiting = self._outgoing.get(node)
        if waiting is None:
            waiting = self._outgoing[node] = []
        waiting.append((seq, record))
        self.publisher.wake()
        self._arm_expiry()

    def _gather(self) -> None:
        """The publisher is about to send a pipeline: one message per node
        with every stanza waiting for it (split past MAX_BATCH_STANZAS or
        MAX_BATCH_BYTES)."""
        if not self._outgoing:
            return
        outgoing, self._outgoing = self._outgoing, {}
        head = b"B%s %s\n" % (self.node_id.encode(), self.instance.encode())
        for node, records in outgoing.items():
            channel = self.channel(node)
            i = 0
            while i < len(records):
                seqs, parts, size = [], [head], 0
                while i < len(records) and len(seqs) < MAX_BATCH_STANZAS and (
                        not seqs or size + len(records[i][1]) <= MAX_BATCH_BYTES):
                    seq, record = records[i]
                    seqs.append(seq)
                    parts.append(record)
                    size += len(record)
                    i += 1
                d = self.publisher.publish(channel, b"".join(parts))
                d.addCallbacks(self._published, self._not_published, callbackArgs=(seqs, node),
                               errbackArgs=(seqs,))

    def _published(self, receivers: int, seqs: list[int], node: str) -> None:
        if receivers:
            for seq in seqs:
                self.inflight.confirm(seq)
            return
        entries = [e for e in (self.inflight.take_back(seq) for seq in seqs) if e is not None]
        if self.reactor.seconds() < self._settling_until:
            # Its subscriber may not be back yet: bounce as while Redis is
            # down, and leave its entries alone.
            for entry in entries:
                self._guarded(self._bounce, entry.stanza, "redis",
                              f"gateway node {node} is not listening yet")
            return
        # These stanzas provably reached nobody: route them again at once
        # (another holder, the local path, or a bounce).  The node may be
        # dead (kill -9) or only reconnecting its subscriber (cut off by
        # Redis, a blip): it leaves this node's cache only, and what it
        # was sent and got stays to the lease path (check_alive), where
        # its own lapse logic makes the fence exact.
        self.membership.suspect(node)
        for entry in entries:
            self.counters.rerouted += 1
            self._guarded(self.router.route, entry.stanza)

    def _node_gone(self, node: str) -> None:
        """``node`` is dead or its lease ran out: what it was sent and has
        not acknowledged bounces now rather than at ``ack_timeout``.  Not
        at once, though: acknowledgements it published before its lease
        ran out may still be on their way to this node's subscriber (the
        liveness check came back on another connection).  A fence message
        published to this node's own channel now comes back after all of
        them; what is still unacknowledged then bounces.  Stanzas whose
        PUBLISH reply is still to come wait for it: one that reached nobody
        is routed again."""
        if not self.inflight.waits_for(node):
            return  # (a node long dead is found so at every heartbeat)
        if self.subscriber is None or not self.connected:
            self._bounce_node(node)
            return
        self._fence_seq += 1
        token = self._fence_seq
        self._fences[token] = node
        d = self.publisher.publish(self.channel(self.node_id),
                                   b"F%s %d" % (self.instance.encode(), token))
        d.addErrback(lambda f: self._fenced(token))

    def _fenced(self, token: int) -> None:
        what = self._fences.pop(token, None)
        if isinstance(what, tuple):
            if token == self._expiry_fence:
                self._expiry_fence = None
                if self._expiry is not None and self._expiry.active():
                    self._expiry.cancel()  # the fallback: re-armed for the next deadline
                self._expiry = None
            self._expire_sent_by(what[1])
        elif what is not None:
            self._bounce_node(what)

    def _bounce_node(self, node: str) -> None:
        for entry in self.inflight.take_node(node, confirmed_only=True):
            self._guarded(self._bounce, entry.stanza, "timeout", f"gateway node {node} is gone")

    def _not_published(self, failure, seqs: list[int]) -> None:
        for seq in seqs:
            entry = self.inflight.take_back(seq)
            if entry is None:
                continue
            if failure.check(RedisBusy):
                self._guarded(self._bounce, entry.stanza, "full", "too many messages waiting for Redis")
            else:
                self._guarded(self._bounce, entry.stanza, "redis", "the cluster's Redis is unreachable")

    def _guarded(self, handle, *args) -> None:
        """``handle(*args)`` for one entry of a loop whose entries are
        already out of the table: an exception is logged and the loop goes
        on with the next one (none is lost to it)."""
        try:
            handle(*args)
        except Exception:
            log.failure("Cluster: cannot route or bounce a stanza taken back from another node")

    def _bounce(self, stanza: Stanza, reason: str, text: str) -> None:
        self.counters.bounced[reason] += 1
        condition = "resource-constraint" if reason == "full" else "remote-server-timeout"
        self.router.bounce(stanza, condition, text)

    def _arm_expiry(self) -> None:
        if self._expiry is not None and self._expiry.active():
            return
        if self._expiry_fence is not None:
            # Its return expires (and re-arms); this is the fallback should
            # it never come back.
            deadline = self._expiry_fence_at + self.settings.ack_timeout
        else:
            deadline = self.inflight.next_deadline()
        if deadline is not None:
            self._expiry = self.reactor.callLater(max(0.0, deadline - self.reactor.seconds()),
                                                  self._expire)

    def _expire(self) -> None:
        """Stanzas unacknowledged for ``ack_timeout`` bounce; but not before
        the acknowledgements already waiting for this node are counted (it
        may have been stalled, SIGSTOPped, or slow to read its subscriber:
        the timer fires before the subscriber hands them over).  So a fence
        goes to this node's own channel first; it comes back after every
        acknowledgement Redis received before it, and only what was sent by
        now and is still unacknowledged then bounces."""
        self._expiry = None
        try:
            now = self.reactor.seconds()
            if self._expiry_fence is not None:
                if now < self._expiry_fence_at + self.settings.ack_timeout:
                    return
                self._fenced(self._expiry_fence)  # it never came back
                return
            due = self.inflight.next_deadline()
            if due is None or due > now:
                return
            sent_by = now - self.settings.ack_timeout
            if not self.connected or self.publisher is None:
                self._expire_sent_by(sent_by)
                return
            self._fence_seq += 1
            token = self._expiry_fence = self._fence_seq
            self._expiry_fence_at = now
            self._fences[token] = ("expire", sent_by)
            d = self.publisher.publish(self.channel(self.node_id),
                                       b"F%s %d" % (self.instance.encode(), token))
            d.addCallbacks(lambda receivers: None if receivers else self._fenced(token),
                           lambda f: self._fenced(token))
        finally:
            self._arm_expiry()

    def _expire_sent_by(self, sent_by: float) -> None:
        for entry in self.inflight.expire(sent_by):
            self._guarded(self._bounce, entry.stanza, "timeout",
                          f"gateway node {entry.node} did not acknowledge in time")
        self._arm_expiry()

    # -- this node's own lease ------------------------------------------------------------
    def _lapsed(self, why: str = "its own lease ran out") -> None:
        """This node's own lease ran out by its own clock (it was hung,
        stopped, or cut off from Redis for longer than the lease allows):
        the others may have taken it for dead and bounced what they sent
        it.  Until it has rejoined (renewed the lease, then seen a fence
        message come back on its own channel, after everything Redis held
        for it), every relayed stanza it receives is discarded unhandled
        and refused to its sender, who bounces it."""
        if self._rejoin is not None or self.subscriber is None:
            return
        self._rejoin_seq += 1
        self._rejoin = self._rejoin_seq
        self._lapsed_at = self.reactor.seconds()
        self._discarded_since = self.counters.discarded
        log.warn("Cluster: this node lost its place ({why}; lease last renewed for until "
                 "{until:.3f}, now {now:.3f}); relayed stanzas are discarded until it has "
                 "rejoined", why=why, until=self.membership.lease_until, now=self._lapsed_at)
        self.reactor.callLater(0, self._rejoin_attempt, self._rejoin)

    def _rejoin_attempt(self, token: int) -> None:
        if token != self._rejoin or self.subscriber is None or self.membership.stopped:
            return
        d = self.membership.beat()

        def fence(_):
            return self.client.pipeline([
                ("PUBLISH", self.membership.owners_channel, f"sync {self.node_id}"),
                ("PUBLISH", self.channel(self.node_id),
                 b"J%s %d" % (self.instance.encode(), token))])

        def failed(failure):
            if token == self._rejoin and self.subscriber is not None:
                self.reactor.callLater(self.settings.heartbeat, self._rejoin_attempt, token)
        d.addCallback(fence).addErrback(failed)

    def _rejoined(self, token: int) -> None:
        if token != self._rejoin:
            return
        self._rejoin = None
        log.info("Cluster: rejoined after this node's lease ran out; {count} relayed stanzas "
                 "received meanwhile were discarded (their senders bounce them)",
                 count=self.counters.discarded - self._discarded_since)

    def _lease_ok(self) -> bool:
        if self._rejoin is not None:
            return False
        if self.membership.lease_valid():
            return True
        if self.membership.lease_until:
            self._lapsed()
        return False

    # -- receiving --------------------------------------------------------------------------
    def messages(self, batch) -> None:
        mine, owners = self.channel(self.node_id), self.membership.owners_channel
        for channel, data in batch:
            try:
                if channel == owners:
                    self.membership.announcement(data)
                elif channel == mine:
                    first = data[:1]
                    if first == b"B":
                        self._receive_batch(data)
                    elif first == b"R":
                        self._acked(data)
                    elif first == b"N":
                        self._refused(data)
                    elif first in (b"F", b"J"):
                        instance, _, token = data[1:].partition(b" ")
                        if instance.decode() == self.instance and token.isdigit():
                            (self._fenced if first == b"F" else self._rejoined)(int(token))
            except Exception:
                log.failure("Cluster: cannot handle a message on {channel}", channel=channel)

    def _receive_batch(self, data: bytes) -> None:
        line_end = data.find(b"\n", 0, 256)
        if line_end < 0:
            raise BadMessage("no batch header")
        origin, _, instance = data[1:line_end].decode().partition(" ")
        key = (origin, instance)
        records = decode_records(data, line_end + 1)
        if not self._lease_ok():
            refused = [record[0] for record in records]
            self.counters.discarded += len(refused)
            self._nacks.setdefault(key, []).extend(refused)
            self.publisher.wake()
            return
        acks = self._acks.get(key)
        if acks is None:
            acks = self._acks[key] = []
        self.publisher.wake()
        for seq, kind, name, attrs, from_domain, to_domain, raw in records:
            to, sender, type_, id_ = attrs
            attributes = {k: v for k, v in (("to", to), ("from", sender), ("type", type_),
                                            ("id", id_)) if v is not None}
            stanza = Stanza(name, ns.SERVER, attributes, raw=raw, context=_CONTEXT,
                            forwardable=True)
            self.counters.received += 1
            # Acknowledged as handled here; never forwarded again.
            acks.append(seq)
            try:
                if kind == KIND_COMPONENT:
                    self.router.deliver_here(stanza, to_domain)
                else:
                    self.sender.send(from_domain, to_domain, stanza)
            except Exception:
                log.failure("Cluster: cannot deliver a stanza relayed by {origin}", origin=origin)

    def _flush_acks(self) -> None:
        """Acknowledgements (``R``) and refusals (``N``), one message per
        origin each, as ranges of sequence numbers; run by the publisher
        just before each pipeline."""
        for letter, pending in ((b"R", self._acks), (b"N", self._nacks)):
            if not pending:
                continue
            for (origin, instance), seqs in pending.items():
                if not seqs:
                    continue
                message = b"%s%s %s %s" % (letter, self.node_id.encode(), instance.encode(),
                                           encode_ranges(seqs))
                self.publisher.publish(self.channel(origin), message).addErrback(lambda f: None)
        self._acks, self._nacks = {}, {}

    def _parse_ack(self, data: bytes):
        node, instance, ranges = data[1:].decode().split(" ")
        if instance != self.instance:
            return None, ()  # for an earlier run of this node
        return node, decode_ranges(ranges.encode())

    def _acked(self, data: bytes) -> None:
        node, ranges = self._parse_ack(data)
        for first, last in ranges:
            self.counters.acked += self.inflight.ack_range(first, last, node=node)

    def _refused(self, data: bytes) -> None:
        """``node`` discarded these unhandled (its own lease had run out)."""
        node, ranges = self._parse_ack(data)
        for first, last in ranges:
            for entry in self.inflight.take_range(first, last, node=node):
                self._guarded(self._bounce, entry.stanza, "lapsed",
                              f"gateway node {node} had lost its place in the cluster")
