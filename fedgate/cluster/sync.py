"""Every node applies every node's admin writes to its live connections.

An admin write on any node goes to the shared store (fedgate.storage.redis)
together with a notice on the changes channel, in one transaction.  Each
node's :class:`ClusterSync` hears the notices of the other nodes, re-reads
the record named and hands it to the admin registries, which apply it the
way a local write is applied: the live policy table changes, and the
:class:`~fedgate.admin.enforce.PolicyEnforcer` listening to it bounces a
blocked peer's queue and closes its streams; a component's removed
credentials end its sessions.

Redis pub/sub delivers at most once: notices sent while a node was not
subscribed are lost.  So after every (re)subscription, the first included,
the node reloads policy and credentials in full; anything written after
the subscription is also announced to it.  Work runs one step at a time,
in the order notices arrive, and a notice for a record already waiting to
be re-read is folded into that read (a burst of writes to one peer costs
one read); a pending full reload swallows every notice behind it.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from fedgate.storage.redis import COMPONENT, PEER, SETTING

log = Logger(namespace="fedgate.cluster.sync")

FULL = ("*", "*")


class ClusterSync:
    """``storage`` offers ``watch`` (a :class:`~fedgate.storage.redis.RedisStorage`);
    ``peers`` and ``components`` are the admin registries."""

    def __init__(self, storage, peers, components, *, health_check: float = 1.0,
                 retry_delay: float = 1.0):
        self.storage = storage
        self.peers = peers
        self.components = components
        self.health_check = health_check
        self.retry_delay = retry_delay
        self._retry = None
        self.subscriber = None
        self._waiting: list[tuple[str, str]] = []
        self._busy = False
        #: counts, for tests and the log: notices applied, full reloads done
        self.applied = 0
        self.reloads = 0
        self.failures = 0
        self._idle: list[defer.Deferred] = []

    def start(self) -> None:
        self.subscriber = self.storage.watch(self.changed, self.resync, self.lost,
                                             health_check=self.health_check)

    def stop(self) -> None:
        subscriber, self.subscriber = self.subscriber, None
        if subscriber is not None:
            subscriber.stop()
        self._waiting.clear()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()

    @property
    def connected(self) -> bool:
        return self.subscriber is not None and self.subscriber.connected

    # -- what the subscriber reports ------------------------------------------
    def changed(self, kind: str, key: str, op: str) -> None:
        if kind == SETTING:
            key = "*"  # settings are read together
        self._queue((kind, key))

    def resync(self) -> None:
        self._waiting.clear()
        self._queue(FULL)

    def lost(self, reason: str) -> None:
        log.warn("Cluster: lost the change feed ({reason}); the full state is reloaded on "
                 "reconnection", reason=reason)

    def when_idle(self) -> defer.Deferred:
        """Fires once nothing is waiting or running (for tests)."""
        if not self._busy and not self._waiting:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._idle.append(d)
        return d

    # -- one step at a time ---------------------------------------------------
    def _queue(self, item: tuple[str, str]) -> None:
        if FULL in self._waiting or item in self._waiting:
            return
        self._waiting.append(item)
        if not self._busy:
            self._next()

    def _next(self) -> None:
        if not self._waiting or self.subscriber is None:
            self._busy = False
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
            return
        self._busy = True
        item = self._waiting.pop(0)
        d = defer.maybeDeferred(self._apply, *item)
        d.addErrback(self._failed, item)
        d.addBoth(lambda _: self._next())

    def _apply(self, kind: str, key: str) -> defer.Deferred:
        if (kind, key) == FULL:
            self.reloads += 1
            d = self.peers.reload()
            d.addCallback(lambda _: self.components.reload())
            d.addCallback(lambda _: log.info("Cluster: policy and credentials reloaded from the "
                                             "shared store"))
            return d
        self.applied += 1
        if kind == PEER:
            return self.peers.refresh_peer(key)
        if kind == SETTING:
            return self.peers.refresh_global()
        if kind == COMPONENT:
            return self.components.refresh(key)
        log.warn("Cluster: ignoring a change notice of unknown kind {kind}", kind=kind)
        return defer.succeed(None)

    def _failed(self, failure, item) -> None:
        """The store could not be read: the connection is likely going, and
        the reload on reconnection covers this change; if the subscription
        stays up, a full reload follows ``retry_delay`` seconds later so
        nothing is skipped."""
        self.failures += 1
        log.failure("Cluster: cannot apply a change ({kind} {key}); reloading in full in "
                    "{delay} s", failure, kind=item[0], key=item[1], delay=self.retry_delay)
        if self.subscriber is not None and (self._retry is None or not self._retry.active()):
            self._retry = self.storage.reactor.callLater(self.retry_delay, self._queue, FULL)
