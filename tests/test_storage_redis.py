"""What RedisStorage adds to the storage contract (tests/test_storage_contract.py
runs the contract itself against it): the change feed, the shared dialback
secret, the durability report, Redis trouble as StorageError."""

from __future__ import annotations

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from fedgate.policy import PeerPolicy
from fedgate.storage.interface import ComponentCredential, StorageError
from fedgate.storage.redis import RedisStorage, durability_level, shared_dialback_secret
from tests.support.redisserver import start_redis
from tests.test_cluster_redisclient import wait_for


class DurabilityWords(unittest.TestCase):
    def test_levels(self):
        self.assertTrue(durability_level("yes", "always").startswith("full"))
        self.assertIn("up to a second", durability_level("yes", "everysec"))
        self.assertTrue(durability_level("yes", "no").startswith("weak"))
        self.assertIn("last snapshot", durability_level("no", "always"))


class RedisStorageTests(unittest.TestCase):
    redis_options: dict = {}

    def setUp(self):
        self.redis = start_redis(self, options=self.redis_options)

    @defer.inlineCallbacks
    def store(self, **kwargs):
        storage = RedisStorage(reactor, self.redis.address, **kwargs)
        yield storage.open()
        self.addCleanup(storage.close)
        return storage

    @defer.inlineCallbacks
    def test_durability_reported_from_the_server(self):
        storage = yield self.store()
        self.assertTrue(storage.durability.startswith("weak"), storage.durability)

    @defer.inlineCallbacks
    def test_dialback_secret_generated_once(self):
        one, two = yield defer.gatherResults([
            (yield self.store(node_id="one")).dialback_secret(),
            (yield self.store(node_id="two")).dialback_secret()])
        self.assertEqual(one, two)
        self.assertEqual(len(one), 64)
        blocking = yield threads.deferToThread(shared_dialback_secret, self.redis.address, "fedgate")
        self.assertEqual(blocking, one)
        other_cluster = yield threads.deferToThread(shared_dialback_secret, self.redis.address, "other")
        self.assertNotEqual(other_cluster, one)

    def test_a_missing_dialback_secret_is_an_error_not_none(self):
        from fedgate.storage.redis import _secret
        for value in (None, b""):
            with self.assertRaises(StorageError):
                _secret(value)
        self.assertEqual(_secret(b"ab12"), "ab12")

    @defer.inlineCallbacks
    def test_dialback_secret_kept_after_reconnect_and_a_different_one_warned(self):
        """L2: after a Redis restart the node writes its secret back (SET
        NX); if Redis holds another, it says so."""
        from twisted.logger import globalLogPublisher
        storage = yield self.store(node_id="one")
        secret = yield storage.dialback_secret()
        storage.dialback_secret_in_use = secret
        warnings = []

        def observe(event):
            if "another dialback secret" in (event.get("log_format") or ""):
                warnings.append(event)
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        resyncs = []
        sub = storage.watch(lambda *a: None, lambda: resyncs.append(1))
        self.addCleanup(sub.stop)
        yield wait_for(lambda: resyncs)
        key = storage.key("dialback-secret")
        yield storage.client.execute("DEL", key)  # as a restart without persistence leaves it
        yield storage.client.execute("CLIENT", "KILL", "TYPE", "pubsub")
        yield wait_for(lambda: len(resyncs) >= 2)
        from twisted.internet import task
        for _ in range(100):  # the SET NX went out just before the resync
            if (yield storage.client.execute("GET", key)) is not None:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual((yield storage.client.execute("GET", key)), secret.encode())
        self.assertEqual(warnings, [])
        yield storage.client.execute("SET", key, "someone-elses")
        yield storage.client.execute("CLIENT", "KILL", "TYPE", "pubsub")
        yield wait_for(lambda: warnings)
        self.assertEqual((yield storage.client.execute("GET", key)), b"someone-elses")

    @defer.inlineCallbacks
    def test_key_prefixes_keep_clusters_apart(self):
        first = yield self.store(key_prefix="first")
        second = yield self.store(key_prefix="second")
        yield first.put_peer(PeerPolicy("p.example", allowed=False))
        self.assertEqual((yield second.peers()), [])
        self.assertEqual([p.domain for p in (yield first.peers())], ["p.example"])

    @defer.inlineCallbacks
    def test_change_notices_reach_other_processes_only(self):
        writer = yield self.store(node_id="w")
        reader = yield self.store(node_id="r")
        heard, own, resyncs = [], [], []
        reader.watch(lambda *notice: heard.append(notice), lambda: resyncs.append(1))
        writer.watch(lambda *notice: own.append(notice), lambda: None)
        yield wait_for(lambda: resyncs)
        # Give the writer's own subscription time to settle, then write.
        yield wait_for(lambda: reader.client._subscribers[0].connected
                       and writer.client._subscribers[0].connected)
        yield writer.put_peer(PeerPolicy("Blocked.Example", allowed=False))
        yield writer.delete_peer("blocked.example")
        yield writer.put_setting("federation", {"mode": "allowlist"})
        yield writer.put_component(ComponentCredential("c.example", "secret-0123456789"))
        yield wait_for(lambda: len(heard) == 4)
        self.assertEqual(heard, [("peer", "blocked.example", "put"), ("peer", "blocked.example", "delete"),
                                 ("setting", "federation", "put"), ("component", "c.example", "put")])
        self.assertEqual(own, [])

    @defer.inlineCallbacks
    def test_redis_down_is_a_storage_error_and_recovers(self):
        storage = yield self.store()
        self.redis.stop()
        yield self.assertFailure(storage.put_peer(PeerPolicy("p.example")), StorageError)
        yield self.assertFailure(storage.peers(), StorageError)
        self.redis.start()
        self.assertTrue((yield storage.put_peer(PeerPolicy("p.example"))))

    @defer.inlineCallbacks
    def test_open_fails_without_redis(self):
        self.redis.stop()
        storage = RedisStorage(reactor, self.redis.address)
        yield self.assertFailure(storage.open(), StorageError)
        self.assertFalse(storage.client.running)


class DurableRedisStorageTests(RedisStorageTests):
    """The documented configuration: appendonly yes, appendfsync always."""

    redis_options = {"appendonly": "yes", "appendfsync": "always"}

    @defer.inlineCallbacks
    def test_durability_reported_from_the_server(self):
        storage = yield self.store()
        self.assertTrue(storage.durability.startswith("full"), storage.durability)

    @defer.inlineCallbacks
    def test_acknowledged_write_survives_kill_9(self):
        storage = yield self.store()
        yield storage.put_peer(PeerPolicy("kept.example", allowed=False))
        self.redis.kill()  # SIGKILL: nothing is flushed at exit
        self.redis.start()
        self.assertFalse((yield storage.get_peer("kept.example")).allowed)
