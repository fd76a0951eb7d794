"""The cluster's shared store: peer policy, settings and component
credentials in Redis, and the dialback secret every node signs keys with.

Layout (``<p>`` is ``[cluster] key_prefix``): three hashes, ``<p>:peers``
(domain -> JSON row), ``<p>:settings`` (name -> JSON value) and
``<p>:components`` (domain -> JSON record); the string
``<p>:dialback-secret``; the channel ``<p>:changes``.

Every write is one MULTI/EXEC transaction holding the change and a PUBLISH
of it on the changes channel, so no node can see the change without the
notice being sent, nor the notice before the change.  A node that hears a
notice re-reads that record (the notice carries only its kind and key:
secrets never travel on the channel); see :meth:`RedisStorage.watch`.

Durability: a write's Deferred fires once Redis has answered EXEC.  With
``appendonly yes`` and ``appendfsync always`` Redis answers only after the
append-only file is fsynced, which is SQLite's ``synchronous=FULL``
guarantee; with weaker settings an acknowledged write can be lost in a
crash (up to a second with ``appendfsync everysec``, everything since the
last snapshot without an append-only file).  :meth:`RedisStorage.open`
logs which level the server gives.  A write whose connection broke before
the reply is reported as failed (503 from the admin API) but may have been
applied: every admin write is idempotent, so repeating it is safe.
"""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import asdict
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from fedgate.cluster.redisclient import (RedisAddress, RedisBusy, RedisClient, RedisUnavailable,
                                         connect_redis, load_redis)
from fedgate.domain import normalize_domain
from fedgate.policy import PeerPolicy
from fedgate.storage.interface import (ComponentCredential, StorageError, normalized_component,
                                       peer_from_row, peer_to_row)

log = Logger(namespace="fedgate.storage.redis")

PEER, SETTING, COMPONENT = "peer", "setting", "component"


def _component_to_json(record: ComponentCredential) -> str:
    data = asdict(record)
    data["allowed"] = list(record.allowed)
    data["certificate_sha256"] = list(record.certificate_sha256)
    return json.dumps(data)


def _component_from_json(text: bytes | str) -> ComponentCredential:
    data = json.loads(text)
    data["allowed"] = tuple(data.get("allowed") or ())
    data["certificate_sha256"] = tuple(data.get("certificate_sha256") or ())
    return ComponentCredential(**data)


def durability_level(appendonly: str, appendfsync: str) -> str:
    """What an acknowledged write survives, in words, for the log line."""
    if appendonly != "yes":
        return ("weak: no append-only file; a crash loses every write since the last "
                "snapshot (set appendonly yes and appendfsync always)")
    if appendfsync == "always":
        return "full: the append-only file is fsynced before each write is acknowledged"
    if appendfsync == "everysec":
        return ("reduced: appendfsync everysec; a crash of the Redis host can lose up to a "
                "second of acknowledged writes (set appendfsync always)")
    return (f"weak: appendfsync {appendfsync}; the operating system decides when writes reach "
            "the disk (set appendfsync always)")


class RedisStorage:
    """The :class:`~fedgate.storage.interface.Storage` backend on Redis.

    ``client`` may be a running :class:`RedisClient` to share (the caller
    stops it); otherwise the store makes, starts and stops its own.
    ``node_id`` names this node in change notices.
    """

    def __init__(self, reactor, address: RedisAddress, *, key_prefix: str = "fedgate",
                 node_id: str = "", client: RedisClient | None = None, threads: int = 4,
                 max_pending: int = 10_000):
        load_redis()  # RedisClientMissing now, not at the first write
        self.reactor = reactor
        self.address = address
        self.prefix = key_prefix
        self.node_id = node_id
        #: tells this process's notices from others', even with equal node ids
        self.instance = uuid.uuid4().hex
        self._own_client = client is None
        self.client = client or RedisClient(reactor, address, threads=threads, max_pending=max_pending,
                                            name=f"fedgate-redis-{key_prefix}")
        self._open = False
        self._writes = defer.DeferredLock()
        self.durability: str | None = None
        #: the dialback secret this node signs with, when it came from Redis
        #: (cluster mode): written back (SET NX) after every reconnection of
        #: :meth:`watch`, with a warning if Redis holds another one
        self.dialback_secret_in_use: str | None = None

    @classmethod
    def from_config(cls, config, reactor) -> "RedisStorage":
        from fedgate.config import redis_address
        c = config.cluster
        return cls(reactor, redis_address(c), key_prefix=c.key_prefix, node_id=c.node_id,
                   threads=c.threads, max_pending=c.max_pending)

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    @property
    def changes_channel(self) -> str:
        return self.key("changes")

    # -- plumbing -------------------------------------------------------------
    def _call(self, make: Callable[[], defer.Deferred]) -> defer.Deferred:
        """Run ``make()`` if open; Redis trouble becomes :class:`StorageError`
        (the admin API's 503), a bad argument a failed Deferred."""
        if not self._open:
            return defer.fail(StorageError("the store is closed"))
        try:
            d = make()
        except Exception:
            return defer.fail()

        def translate(failure):
            if failure.check(RedisUnavailable, RedisBusy):
                raise StorageError(f"Redis: {failure.getErrorMessage()}")
            redis = load_redis()
            if failure.check(redis.RedisError):
                raise StorageError(f"Redis refused: {failure.getErrorMessage()}")
            return failure
        return d.addErrback(translate)

    def _write(self, kind: str, key: str, op: str, command: tuple) -> defer.Deferred:
        """``command`` and the notice of it in one transaction; fires with
        the command's reply once Redis has both."""
        notice = json.dumps({"node": self.node_id, "instance": self.instance, "kind": kind,
                             "key": key, "op": op})
        # One write at a time, in the order they were made (the pool's
        # threads would otherwise race them): the last one made wins.
        d = self._writes.run(self.client.pipeline, [command, ("PUBLISH", self.changes_channel, notice)],
                             transaction=True)
        return d.addCallback(lambda replies: replies[0])

    # -- lifecycle ------------------------------------------------------------
    def open(self) -> defer.Deferred:
        if self._open:
            return defer.succeed(None)
        if self._own_client:
            self.client.start()
        self._open = True
        d = self._call(lambda: self.client.execute("PING"))

        def failed(failure):
            self._open = False
            if self._own_client:
                self.client.stop()
            return failure
        d.addCallbacks(lambda _: self._check_durability(), failed)
        return d

    @defer.inlineCallbacks
    def _check_durability(self):
        try:
            replies = yield self.client.pipeline([("CONFIG", "GET", "appendonly"),
                                                  ("CONFIG", "GET", "appendfsync")])
        except Exception as exc:  # CONFIG may be renamed away: say so, carry on
            self.durability = "unknown"
            log.warn("Redis at {address}: cannot read its persistence settings ({error}); "
                     "writes are acknowledged once Redis has them", address=self.address.describe(),
                     error=str(exc))
            return
        values = {}
        for reply in replies:
            items = list(reply.items()) if isinstance(reply, dict) else list(zip(reply[::2], reply[1::2]))
            for name, value in items:
                values[_text(name)] = _text(value)
        self.durability = durability_level(values.get("appendonly", ""), values.get("appendfsync", ""))
        emit = log.info if self.durability.startswith("full") else log.warn
        emit("Shared store in Redis at {address}, keys {prefix}:*; durability {durability}",
             address=self.address.describe(), prefix=self.prefix, durability=self.durability)

    def close(self) -> defer.Deferred:
        if self._open:
            self._open = False
            if self._own_client:
                self.client.stop()
        return defer.succeed(None)

    # -- peers ------------------------------------------------------------------
    def peers(self) -> defer.Deferred:
        def rows(mapping):
            return sorted((peer_from_row(json.loads(v)) for v in mapping.values()),
                          key=lambda p: p.domain)
        return self._call(lambda: self.client.execute("HGETALL", self.key("peers"))).addCallback(
            lambda reply: rows(_hash(reply)))

    def get_peer(self, domain: str) -> defer.Deferred:
        return self._call(lambda: self.client.execute(
            "HGET", self.key("peers"), normalize_domain(domain))).addCallback(
            lambda v: peer_from_row(json.loads(v)) if v is not None else None)

    def put_peer(self, policy: PeerPolicy) -> defer.Deferred:
        def write():
            row = peer_to_row(policy)
            row["domain"] = normalize_domain(policy.domain)
            return self._write(PEER, row["domain"], "put",
                               ("HSET", self.key("peers"), row["domain"], json.dumps(row)))
        return self._call(write).addCallback(lambda added: int(added) == 1)

    def delete_peer(self, domain: str) -> defer.Deferred:
        def write():
            key = normalize_domain(domain)
            return self._write(PEER, key, "delete", ("HDEL", self.key("peers"), key))
        return self._call(write).addCallback(lambda n: int(n) > 0)

    # -- settings -----------------------------------------------------------------
    def settings(self) -> defer.Deferred:
        return self._call(lambda: self.client.execute("HGETALL", self.key("settings"))).addCallback(
            lambda reply: {name: json.loads(value) for name, value in sorted(_hash(reply).items())})

    def put_setting(self, name: str, value: Any) -> defer.Deferred:
        return self._call(lambda: self._write(SETTING, name, "put", (
            "HSET", self.key("settings"), name, json.dumps(value)))).addCallback(lambda _: None)

    def delete_setting(self, name: str) -> defer.Deferred:
        return self._call(lambda: self._write(SETTING, name, "delete", (
            "HDEL", self.key("settings"), name))).addCallback(lambda n: int(n) > 0)

    # -- components -----------------------------------------------------------------
    def components(self) -> defer.Deferred:
        return self._call(lambda: self.client.execute("HGETALL", self.key("components"))).addCallback(
            lambda reply: sorted((_component_from_json(v) for v in _hash(reply).values()),
                                 key=lambda c: c.domain))

    def get_component(self, domain: str) -> defer.Deferred:
        return self._call(lambda: self.client.execute(
            "HGET", self.key("components"), normalize_domain(domain))).addCallback(
            lambda v: _component_from_json(v) if v is not None else None)

    def put_component(self, credential: ComponentCredential) -> defer.Deferred:
        def write():
            record = normalized_component(credential)
            return self._write(COMPONENT, record.domain, "put", (
                "HSET", self.key("components"), record.domain, _component_to_json(record)))
        return self._call(write).addCallback(lambda added: int(added) == 1)

    def delete_component(self, domain: str) -> defer.Deferred:
        def write():
            key = normalize_domain(domain)
            return self._write(COMPONENT, key, "delete", ("HDEL", self.key("components"), key))
        return self._call(write).addCallback(lambda n: int(n) > 0)

    # -- the cluster's part ---------------------------------------------------------
    def dialback_secret(self) -> defer.Deferred:
        """The cluster's dialback secret, generated by whichever node asks
        first (SET NX: one wins, every node reads the winner's)."""
        return self._call(lambda: self.client.pipeline([
            ("SET", self.key("dialback-secret"), secrets.token_hex(32), "NX"),
            ("GET", self.key("dialback-secret"))])).addCallback(lambda replies: _secret(replies[1]))

    def keep_dialback_secret(self, secret: str) -> defer.Deferred:
        """After a reconnection: store ``secret`` (the one this node signs
        with) unless Redis holds one (SET NX; a Redis restarted without
        persistence lost it), and warn if Redis holds another: nodes started
        since then sign with that one, and keys do not verify across the
        two groups until they are restarted.  Fires with True when Redis
        holds ``secret``, False otherwise, None when Redis failed."""
        d = self.client.pipeline([("SET", self.key("dialback-secret"), secret, "NX"),
                                  ("GET", self.key("dialback-secret"))])

        def check(replies):
            stored = replies[1]
            if stored is not None and _text(stored) == secret:
                return True
            log.warn("Cluster: Redis holds another dialback secret than the one this node signs "
                     "with (Redis restarted without persistence, and another node wrote a new "
                     "one?): dialback keys from nodes started since do not verify here and vice "
                     "versa; restart this node to pick up the shared one")
            return False

        def failed(failure):
            log.warn("Cluster: cannot check the dialback secret in Redis: {error}",
                     error=failure.getErrorMessage())
            return None
        return d.addCallbacks(check, failed)

    def watch(self, on_change: Callable[[str, str, str], Any], on_resync: Callable[[], Any],
              on_lost: Callable[[str], Any] | None = None, **subscriber_options):
        """Follow other nodes' writes: ``on_change(kind, key, op)`` for each
        notice from another process (kind "peer", "setting" or "component"),
        ``on_resync()`` after every (re)subscription, when the caller must
        reload everything (notices sent while unsubscribed are lost).
        Returns the started :class:`~fedgate.cluster.redisclient.Subscriber`."""
        def on_messages(batch):
            for _, data in batch:
                try:
                    notice = json.loads(data)
                    if notice.get("instance") == self.instance:
                        continue
                    kind, key, op = notice["kind"], notice["key"], notice.get("op", "put")
                except (ValueError, KeyError, TypeError, AttributeError):
                    log.warn("Ignoring a malformed change notice on {channel}", channel=self.changes_channel)
                    continue
                on_change(kind, key, op)
        def connected():
            if self.dialback_secret_in_use:
                self.keep_dialback_secret(self.dialback_secret_in_use)
            on_resync()
        subscriber = self.client.subscriber(channels=[self.changes_channel], on_messages=on_messages,
                                            on_connected=connected, on_disconnected=on_lost,
                                            name=f"fedgate-redis-changes-{self.prefix}",
                                            **subscriber_options)
        subscriber.start()
        return subscriber


def shared_dialback_secret(address: RedisAddress, key_prefix: str, timeout: float = 10.0) -> str:
    """Blocking: the cluster's dialback secret (generated with SET NX by the
    first node to ask).  For startup, before the reactor runs; redis errors
    propagate."""
    client = connect_redis(address, max_connections=1, socket_timeout=timeout)
    try:
        key = f"{key_prefix}:dialback-secret"
        client.set(key, secrets.token_hex(32), nx=True)
        return _secret(client.get(key))
    finally:
        client.connection_pool.disconnect()


def _secret(value) -> str:
    """The dialback secret read back from Redis: never None (``str(None)``
    would make "None" everyone's secret) or empty."""
    if value is None or not _text(value):
        raise StorageError("the cluster's dialback secret vanished from Redis between writing and "
                           "reading it (evicted, or Redis restarted meanwhile); try again")
    return _text(value)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _hash(reply) -> dict[str, bytes]:
    """HGETALL's reply (a dict from redis-py) with text keys."""
    if isinstance(reply, dict):
        return {_text(k): v for k, v in reply.items()}
    items = list(reply)
    return {_text(k): v for k, v in zip(items[::2], items[1::2])}
