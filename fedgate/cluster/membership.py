"""Which node is alive, and which node holds what: leases, heartbeats and
the ownership cache.

Layout in Redis (``<p>`` is ``[cluster] key_prefix``, ``<n>`` a node id):

- ``<p>:alive:<n>``: the node's liveness key, its instance token, expiring
  after ``[cluster] lease`` seconds unless the heartbeat renews it;
- ``<p>:owns:<n>``: the node's ownership hash, fields ``c|<domain>`` (a
  component domain bound on the node, shared load-balanced domains
  included: several nodes may hold one) and ``s|<local>|<remote>`` (an
  authenticated S2S stream of the node that may carry ``local -> remote``);
  it expires with the lease too, so a dead node's entries vanish by
  themselves;
- ``<p>:info:<n>``: what the node published in its last heartbeat (time,
  components, streams, destinations, counters) for the admin API's cluster
  view; it outlives the lease (a day) so a dead node shows as ``down``;
- ``<p>:nodes``: the set of node ids ever seen (a member whose ``info`` key
  expired is dropped from it);
- channel ``<p>:owners``: announcements (``+``/``-`` an entry, ``down`` a
  node, ``sync`` a node's whole hash changed).

Every node rewrites its whole hash on each heartbeat (one MULTI/EXEC, so no
reader sees it empty), announces changes between heartbeats as they happen
(the local state is compared with what was announced every ``scan``
seconds, and at once after a component binds or unbinds), and reloads
every other node's entries after each heartbeat and after every
(re)subscription: announcements lost while disconnected are made up by the
reload, and a node whose lease expired (hung, SIGSTOP) drops out of the
cache at the next heartbeat after its lease.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable

from twisted.internet import defer
from twisted.logger import Logger

log = Logger(namespace="fedgate.cluster.membership")

COMPONENT = "c"
STREAM = "s"
#: seconds a dead node's last heartbeat stays visible in the cluster view
INFO_TTL = 86400
#: default seconds between two comparisons of the local state with what was announced
SCAN_INTERVAL = 0.25
#: most seconds between two looks at the other nodes' liveness keys
LIVENESS_CHECK = 0.5
#: most seconds before its own lease ends that a node stops taking relayed
#: stanzas (a quarter of the lease when that is shorter)
LEASE_MARGIN = 0.5


#: renew KEYS[1] (the liveness key) with ARGV[1] (this run's instance) for
#: ARGV[2] ms unless another run holds it: nil, or the other instance
CLAIM_SCRIPT = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
#: a clean leave: remove the liveness key and the hash and announce
#: ``down``, only if the liveness key is this run's (ARGV[1]) or gone
LEAVE_SCRIPT = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', KEYS[3], ARGV[2])
return 1
"""


def entry_field(kind: str, key: tuple[str, ...]) -> str:
    return "|".join((kind,) + tuple(key))


def parse_field(text: str) -> tuple[str, tuple[str, ...]] | None:
    parts = text.split("|")
    if parts[0] == COMPONENT and len(parts) == 2:
        return COMPONENT, (parts[1],)
    if parts[0] == STREAM and len(parts) == 3:
        return STREAM, (parts[1], parts[2])
    return None


class OwnershipCache:
    """Other nodes' entries: node -> set of (kind, key), with indexes by
    component domain and by S2S pair.  This node is never in it."""

    def __init__(self, me: str):
        self.me = me
        self.nodes: dict[str, set[tuple[str, tuple]]] = {}
        self._components: dict[str, list[str]] = {}
        self._pairs: dict[tuple[str, str], list[str]] = {}
        #: remote domain -> {node: how many of its pairs go to that domain}
        self._remotes: dict[str, dict[str, int]] = {}
        self._turn = 0

    def add(self, node: str, kind: str, key: tuple) -> None:
        if node == self.me:
            return
        entries = self.nodes.setdefault(node, set())
        if (kind, key) in entries:
            return
        entries.add((kind, key))
        index = self._components if kind == COMPONENT else self._pairs
        index.setdefault(key[0] if kind == COMPONENT else key, []).append(node)
        if kind == STREAM:
            counts = self._remotes.setdefault(key[1], {})
            counts[node] = counts.get(node, 0) + 1

    def remove(self, node: str, kind: str, key: tuple) -> None:
        entries = self.nodes.get(node)
        if not entries or (kind, key) not in entries:
            return
        entries.discard((kind, key))
        index = self._components if kind == COMPONENT else self._pairs
        name = key[0] if kind == COMPONENT else key
        holders = index.get(name)
        if holders is not None and node in holders:
            holders.remove(node)
            if not holders:
                del index[name]
        if kind == STREAM:
            counts = self._remotes.get(key[1], {})
            counts[node] = counts.get(node, 1) - 1
            if counts[node] <= 0:
                del counts[node]
            if not counts:
                self._remotes.pop(key[1], None)

    def drop_node(self, node: str) -> bool:
        entries = self.nodes.get(node)
        if entries is None:
            return False
        for kind, key in list(entries):
            self.remove(node, kind, key)
        self.nodes.pop(node, None)
        return True

    def replace_node(self, node: str, entries: Iterable[tuple[str, tuple]]) -> None:
        self.drop_node(node)
        for kind, key in entries:
            self.add(node, kind, key)

    def component_owner(self, domain: str) -> str | None:
        """A node holding ``domain``, taken in turn among several."""
        holders = self._components.get(domain)
        if not holders:
            return None
        self._turn += 1
        return holders[self._turn % len(holders)]

    def component_owners(self, domain: str) -> list[str]:
        return list(self._components.get(domain, ()))

    def pair_owner(self, local: str, remote: str) -> str | None:
        holders = self._pairs.get((local, remote))
        return holders[0] if holders else None

    def stream_owner(self, remote: str) -> str | None:
        """A node with an authenticated stream to ``remote`` for any local
        domain (it can authenticate one more pair on it), or None."""
        counts = self._remotes.get(remote)
        return min(counts) if counts else None


class Membership:
    """This node's lease and entries in Redis, and the cache of the others'.

    ``local_entries()`` returns this node's entries now (a set of (kind,
    key)); ``info()`` the heartbeat's JSON-able payload.  ``publisher`` is a
    :class:`~fedgate.cluster.redisclient.Publisher` (announcements ride the
    same batches as stanzas)."""

    def __init__(self, reactor, client, node_id: str, prefix: str, *, lease: float,
                 heartbeat: float, local_entries: Callable[[], set], info: Callable[[], dict],
                 scan: float = SCAN_INTERVAL):
        self.reactor = reactor
        self.client = client
        self.node_id = node_id
        self.prefix = prefix
        self.lease = lease
        self.heartbeat_interval = heartbeat
        self.local_entries = local_entries
        self.info = info
        self.scan = scan
        self.cache = OwnershipCache(node_id)
        #: called with a node id when that node is found dead or gone
        self.on_gone: Callable[[str], None] = lambda node: None
        self.instance = ""
        #: what the other nodes were last told this node holds
        self.announced: set = set()
        self.alive_nodes: set[str] = set()
        #: nodes a PUBLISH found without a subscriber whose lease has not
        #: been seen expired yet (see :meth:`suspect`)
        self.suspects: set[str] = set()
        #: when the Redis subscription last came (back) up, None while it
        #: is down; a missing lease key is evidence of a dead node only a
        #: lease after that (a Redis restarted without persistence has lost
        #: every node's keys, and the others rewrite theirs as they reconnect)
        self.connected_since: float | None = None
        #: until when this node's own liveness key is known to live, by this
        #: node's clock: the reactor time just *before* the last heartbeat
        #: that renewed it was sent, plus the lease (Redis started the
        #: key's expiry later than that, so the key outlives this); 0 before
        #: the first renewal
        self.lease_until = 0.0
        #: called (no arguments) when a heartbeat is about to start and the
        #: previous renewal has run out (less than :attr:`lease_margin` left
        #: of it): the node was hung or cut off long enough that the others
        #: may take it for dead
        self.on_lapse: Callable[[], None] = lambda: None
        #: called with the other instance when another running fedgate
        #: holds this node's id (see :meth:`beat`)
        self.on_collision: Callable[[str], None] = lambda other: None
        self.collided = False
        self._claim_failing_since: float | None = None
        #: called (no arguments) when another node announced this one
        #: ``down``; by default it rejoins
        self.on_declared_dead: Callable[[], None] = self.rejoin
        self._timers: list = []
        self._announcing = False
        self._again = False
        self._stopped = True
        #: counts, for tests and the log
        self.heartbeats = 0
        self.reloads = 0
        self.failures = 0

    # -- keys -------------------------------------------------------------------
    def key(self, *parts: str) -> str:
        return ":".join((self.prefix,) + parts)

    @property
    def owners_channel(self) -> str:
        return self.key("owners")

    # -- lifecycle ----------------------------------------------------------------
    def start(self, instance: str) -> None:
        self.instance = instance
        self._stopped = False
        self._schedule("heartbeat", 0)
        self._schedule("scan", self.scan)
        self._schedule("liveness", self.liveness_interval)

    def stop(self) -> None:
        self._stopped = True
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()

    def leave(self) -> defer.Deferred:
        """Remove this node's lease and entries and tell the others (a clean stop)."""
        self.stop()
        self.lease_until = 0.0
        if self.collided:
            return defer.succeed(0)  # the id is another run's
        return self.client.execute("EVAL", LEAVE_SCRIPT, 3, self.key("alive", self.node_id),
                                   self.key("owns", self.node_id), self.owners_channel,
                                   self.instance, f"down {self.node_id}")

    def _schedule(self, what: str, delay: float) -> None:
        self._timers = [t for t in self._timers if t.active()]
        if self._stopped:
            return
        method = {"heartbeat": self.beat, "scan": self.changed, "liveness": self.check_alive}[what]
        self._timers.append(self.reactor.callLater(delay, self._tick, what, method))

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def lease_margin(self) -> float:
        """How long before :attr:`lease_until` this node stops taking
        relayed stanzas: time for an acknowledgement sent just before to
        reach Redis while the liveness key still exists."""
        return min(LEASE_MARGIN, self.lease / 4)

    def lease_valid(self) -> bool:
        """Whether this node's own lease holds, with :attr:`lease_margin` to spare."""
        return self.reactor.seconds() < self.lease_until - self.lease_margin

    @property
    def liveness_interval(self) -> float:
        return min(LIVENESS_CHECK, self.heartbeat_interval)

    def _tick(self, what: str, method) -> None:
        d = defer.maybeDeferred(method)
        d.addErrback(lambda f: None)
        self._schedule(what, {"heartbeat": self.heartbeat_interval, "scan": self.scan,
                              "liveness": self.liveness_interval}[what])

    # -- this node's entries ---------------------------------------------------------
    @defer.inlineCallbacks
    def beat(self):
        """Renew the lease, rewrite every entry, publish the info; then
        reload the others' entries."""
        started = self.reactor.seconds()
        if self.lease_until and not self.lease_valid():
            self.on_lapse()
        lease_ms = int(self.lease * 1000)
        # The liveness key holds this run's instance: renewed only if it is
        # ours (or gone), so two nodes given one node_id are found out.
        try:
            holder = yield self.client.execute("EVAL", CLAIM_SCRIPT, 1,
                                               self.key("alive", self.node_id), self.instance,
                                               lease_ms)
        except Exception as e:
            self.failures += 1
            log.debug("Cluster heartbeat failed: {error}", error=str(e))
            raise
        if holder:
            self._claim_failed(holder.decode() if isinstance(holder, bytes) else str(holder))
            return
        self._claim_failing_since = None
        entries = self.local_entries()
        owns = self.key("owns", self.node_id)
        commands = [("DEL", owns)]
        if entries:
            flat = []
            for kind, key in entries:
                flat += [entry_field(kind, key), "1"]
            commands.append(("HSET", owns, *flat))
            commands.append(("PEXPIRE", owns, lease_ms))
        commands += [("SET", self.key("info", self.node_id), json.dumps(self.info()), "EX", INFO_TTL),
                     ("SADD", self.key("nodes"), self.node_id)]
        try:
            yield self.client.pipeline(commands, transaction=True)
        except Exception as e:
            self.failures += 1
            log.debug("Cluster heartbeat failed: {error}", error=str(e))
            raise
        self.heartbeats += 1
        self.lease_until = max(self.lease_until, started + self.lease)
        self.announced = set(entries)
        yield self.reload()

    def _claim_failed(self, other: str) -> None:
        """Another instance holds this node's liveness key.  Before this run
        ever held it, that may be the previous run of this node (killed,
        its lease not yet run out): wait a lease and a heartbeat for it to
        expire.  Past that, or once this run had held it, another running
        fedgate has this node_id."""
        now = self.reactor.seconds()
        if self._claim_failing_since is None:
            self._claim_failing_since = now
        if self.heartbeats == 0 and now - self._claim_failing_since < self.lease + self.heartbeat_interval:
            log.info("Cluster: node id {node} is still held by instance {other} (an earlier run?); "
                     "waiting for its lease to run out", node=self.node_id, other=other)
            return
        self.collided = True
        self.stop()
        self.on_collision(other)

    def changed(self) -> defer.Deferred | None:
        """Compare the local entries with what was announced; write and
        announce the difference (one pipeline).  One at a time."""
        if self._announcing:
            self._again = True
            return None
        entries = self.local_entries()
        added, removed = entries - self.announced, self.announced - entries
        if not added and not removed:
            return None
        owns = self.key("owns", self.node_id)
        commands = []
        if added:
            flat = []
            for kind, key in added:
                flat += [entry_field(kind, key), "1"]
            commands += [("HSET", owns, *flat), ("PEXPIRE", owns, int(self.lease * 1000))]
        if removed:
            commands.append(("HDEL", owns, *[entry_field(k, key) for k, key in removed]))
        lines = [f"+ {self.node_id} {entry_field(k, key)}" for k, key in added]
        lines += [f"- {self.node_id} {entry_field(k, key)}" for k, key in removed]
        commands.append(("PUBLISH", self.owners_channel, "\n".join(lines)))
        self._announcing = True

        def done(_):
            self.announced = entries
        def over(result):
            self._announcing = False
            if self._again:
                self._again = False
                self.reactor.callLater(0, self.changed)
            return result
        d = self.client.pipeline(commands, transaction=True)
        d.addCallbacks(done, lambda f: log.debug("Cluster announcement failed: {e}", e=str(f.value)))
        d.addBoth(over)
        return d

    def soon(self) -> None:
        """Something this node holds changed: announce it in this reactor turn."""
        if not self._stopped:
            self.reactor.callLater(0, self.changed)

    # -- the others --------------------------------------------------------------------
    @defer.inlineCallbacks
    def reload(self):
        """Every other live node's entries, read afresh."""
        nodes = yield self.client.execute("SMEMBERS", self.key("nodes"))
        nodes = sorted(n.decode() if isinstance(n, bytes) else n for n in nodes)
        commands = []
        for node in nodes:
            commands += [("EXISTS", self.key("alive", node)), ("HKEYS", self.key("owns", node))]
        replies = (yield self.client.pipeline(commands)) if commands else []
        alive = set()
        trusted = self._absence_is_evidence()
        for i, node in enumerate(nodes):
            if node == self.node_id:
                continue
            if not replies[2 * i]:
                if trusted:
                    self._drop(node)
                continue
            alive.add(node)
            self.suspects.discard(node)
            entries = []
            for raw in replies[2 * i + 1]:
                parsed = parse_field(raw.decode() if isinstance(raw, bytes) else raw)
                if parsed is not None:
                    entries.append(parsed)
            self.cache.replace_node(node, entries)
        if trusted:
            for gone in set(self.cache.nodes) - alive:
                self._drop(gone)
        self.alive_nodes = alive
        self.reloads += 1

    def rejoin(self) -> None:
        """Rewrite this node's entries and have every node re-read them."""
        d = self.beat()
        d.addCallback(lambda _: self.client.execute("PUBLISH", self.owners_channel,
                                                    f"sync {self.node_id}"))
        d.addErrback(lambda f: None)

    @defer.inlineCallbacks
    def check_alive(self):
        """Drop the nodes whose lease ran out (hung, or cut off from Redis)
        between two heartbeats: one EXISTS per known node, in one pipeline."""
        nodes = sorted(set(self.cache.nodes) | self.suspects)
        if not nodes or not self._absence_is_evidence():
            return
        replies = yield self.client.pipeline([("EXISTS", self.key("alive", n)) for n in nodes])
        for node, alive in zip(nodes, replies):
            if not alive and (node in self.cache.nodes or node in self.suspects):
                log.warn("Cluster: node {node}'s lease ran out", node=node)
                self._drop(node)

    def _drop(self, node: str) -> bool:
        """Forget ``node``'s entries and tell the listener; whether it was known."""
        known = self.cache.drop_node(node)
        self.alive_nodes.discard(node)
        self.suspects.discard(node)
        self.on_gone(node)
        return known

    def _absence_is_evidence(self) -> bool:
        since = self.connected_since
        return since is not None and self.reactor.seconds() - since >= self.lease

    def announcement(self, data: bytes) -> None:
        """A message on the owners channel."""
        for line in data.decode("utf-8", "replace").split("\n"):
            parts = line.split(" ")
            if len(parts) == 2 and parts[0] == "down":
                if parts[1] != self.node_id:
                    self._drop(parts[1])
                elif not self._stopped:
                    # Another node took us for dead (our subscriber was
                    # away, or an older fedgate): its senders may bounce
                    # what they sent us, so take nothing more until we
                    # have rejoined (the lapse path: rewrite our entries,
                    # have them re-read, refuse what comes before).
                    self.reactor.callLater(0, self.on_declared_dead)
            elif len(parts) == 2 and parts[0] == "sync" and parts[1] != self.node_id:
                self.reload().addErrback(lambda f: None)
            elif len(parts) == 3 and parts[0] in "+-" and parts[1] != self.node_id:
                parsed = parse_field(parts[2])
                if parsed is None:
                    continue
                if parts[0] == "+":
                    self.alive_nodes.add(parts[1])
                    self.cache.add(parts[1], *parsed)
                else:
                    self.cache.remove(parts[1], *parsed)

    def suspect(self, node: str) -> None:
        """A PUBLISH to ``node`` reached nobody: it is dead (kill -9) or
        only reconnecting its subscriber (Redis cut it off as a lagging
        subscriber, or a network blip).  Its entries leave this node's
        cache at once, so nothing more is routed to it; but its liveness
        key stays, it is not announced ``down``, and what it was sent and
        got is not bounced here: a live node still acknowledges that.  The
        lease decides: :meth:`check_alive` looks at its liveness key every
        :attr:`liveness_interval` and drops it (:attr:`on_gone`) once the
        key has expired; while the key lives, the next reload puts its
        entries back."""
        if node == self.node_id:
            return
        self.suspects.add(node)
        if self.cache.drop_node(node):
            self.alive_nodes.discard(node)
            log.warn("Cluster: a message to node {node} reached no subscriber; routing around "
                     "it until its lease shows whether it is alive", node=node)

    # -- the cluster view ------------------------------------------------------------------
    @defer.inlineCallbacks
    def view(self):
        """Every known node's last heartbeat and health, read from Redis."""
        nodes = yield self.client.execute("SMEMBERS", self.key("nodes"))
        nodes = sorted(n.decode() if isinstance(n, bytes) else n for n in nodes)
        commands = []
        for node in nodes:
            commands += [("PTTL", self.key("alive", node)), ("GET", self.key("info", node))]
        replies = (yield self.client.pipeline(commands)) if commands else []
        out, forgotten = [], []
        for i, node in enumerate(nodes):
            ttl, info = replies[2 * i], replies[2 * i + 1]
            if info is None:
                forgotten.append(node)
                continue
            record = json.loads(info)
            record["node"] = node
            record["health"] = "up" if ttl is not None and ttl > 0 else "down"
            record["lease_remaining_seconds"] = round(ttl / 1000, 3) if ttl and ttl > 0 else 0.0
            out.append(record)
        if forgotten:
            self.client.execute("SREM", self.key("nodes"), *forgotten).addErrback(lambda f: None)
        return out
