"""The storage contract: every backend must pass these tests.

A new backend adds one TestCase at the bottom that mixes in
:class:`StorageContract` and says how to make (and re-open) a store.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet import defer, reactor
from twisted.trial import unittest

from fedgate.domain import InvalidDomain
from fedgate.policy import PeerPolicy
from fedgate.storage.interface import ComponentCredential, StorageError
from fedgate.storage.memory import MemoryStorage
from fedgate.storage.sqlite import SQLiteStorage


class StorageContract:
    """Mixed into a trial TestCase; ``make_storage`` and ``reopen`` are the
    backend's part."""

    persistent = True

    def make_storage(self):
        raise NotImplementedError

    def reopen(self, storage):
        """A new store on the same data (a restart)."""
        raise NotImplementedError

    @defer.inlineCallbacks
    def setUp(self):
        self.storage = self.make_storage()
        yield self.storage.open()
        self.addCleanup(lambda: self.storage.close())

    @defer.inlineCallbacks
    def test_peer_round_trip(self):
        policy = PeerPolicy("partner.example", allowed=False, encryption="optional",
                            authentication="certificate",
                            addresses=(("192.0.2.1", 5269), ("2001:db8::1", 5270)),
                            max_stanza_bytes=65536, rate_limit=2.5, note="contract 12 ✓")
        created = yield self.storage.put_peer(policy)
        self.assertTrue(created)
        got = yield self.storage.get_peer("partner.example")
        self.assertEqual(got, policy)
        self.assertEqual((yield self.storage.peers()), [policy])

    @defer.inlineCallbacks
    def test_defaults_and_nulls(self):
        yield self.storage.put_peer(PeerPolicy("plain.example"))
        got = yield self.storage.get_peer("plain.example")
        self.assertEqual(got, PeerPolicy("plain.example"))
        self.assertIsNone(got.max_stanza_bytes)
        self.assertIsNone(got.rate_limit)

    @defer.inlineCallbacks
    def test_replace_and_delete(self):
        self.assertTrue((yield self.storage.put_peer(PeerPolicy("p.example", note="one"))))
        self.assertFalse((yield self.storage.put_peer(PeerPolicy("p.example", note="two"))))
        self.assertEqual((yield self.storage.get_peer("p.example")).note, "two")
        self.assertTrue((yield self.storage.delete_peer("p.example")))
        self.assertFalse((yield self.storage.delete_peer("p.example")))
        self.assertIsNone((yield self.storage.get_peer("p.example")))
        self.assertEqual((yield self.storage.peers()), [])

    @defer.inlineCallbacks
    def test_domains_are_normalised_keys(self):
        yield self.storage.put_peer(PeerPolicy("Partner.EXAMPLE.", note="upper"))
        got = yield self.storage.get_peer("partner.example")
        self.assertEqual(got.domain, "partner.example")
        # IDNA2008: the A-label and the U-label are one key.
        yield self.storage.put_peer(PeerPolicy("xn--bcher-kva.example", note="a-label"))
        got = yield self.storage.get_peer("BÜCHER.example")
        self.assertEqual((got.domain, got.note), ("bücher.example", "a-label"))
        self.assertEqual([p.domain for p in (yield self.storage.peers())],
                         ["bücher.example", "partner.example"])
        self.assertTrue((yield self.storage.delete_peer("PARTNER.example")))

    @defer.inlineCallbacks
    def test_invalid_domains_fail_the_deferred(self):
        for call in (lambda: self.storage.get_peer("bad..example"),
                     lambda: self.storage.put_peer(PeerPolicy("-bad-.example")),
                     lambda: self.storage.delete_peer(""),
                     lambda: self.storage.put_component(ComponentCredential("a b", "s")),
                     lambda: self.storage.put_component(ComponentCredential("ok.example", allowed=("x..y",)))):
            yield self.assertFailure(call(), InvalidDomain)

    @defer.inlineCallbacks
    def test_settings(self):
        self.assertEqual((yield self.storage.settings()), {})
        yield self.storage.put_setting("mode", "allowlist")
        yield self.storage.put_setting("default_policy", {"encryption": "optional", "n": [1, 2]})
        yield self.storage.put_setting("mode", "open")
        self.assertEqual((yield self.storage.settings()),
                         {"mode": "open", "default_policy": {"encryption": "optional", "n": [1, 2]}})
        self.assertTrue((yield self.storage.delete_setting("mode")))
        self.assertFalse((yield self.storage.delete_setting("mode")))
        self.assertEqual(list((yield self.storage.settings())), ["default_policy"])

    @defer.inlineCallbacks
    def test_components(self):
        self.assertTrue((yield self.storage.put_component(ComponentCredential("Chat.Example", "s1", note="n"))))
        self.assertFalse((yield self.storage.put_component(ComponentCredential("chat.example", "s2"))))
        got = yield self.storage.get_component("chat.example")
        self.assertEqual(got, ComponentCredential("chat.example", "s2"))
        self.assertNotIn("s2", repr(got))
        xep0225 = ComponentCredential("Bots.Example", scram_sha1="a:1:b:c", scram_sha256="d:2:e:f",
                                      allowed=("Weather.Example", "b\u00fccher.example"), note="bots")
        yield self.storage.put_component(xep0225)
        got = yield self.storage.get_component("bots.example")
        self.assertEqual(got, ComponentCredential("bots.example", None, "a:1:b:c", "d:2:e:f",
                                                  ("bücher.example", "weather.example"), "bots"))
        self.assertNotIn("a:1:b:c", repr(got))
        yield self.storage.delete_component("bots.example")
        self.assertEqual([c.domain for c in (yield self.storage.components())], ["chat.example"])
        self.assertTrue((yield self.storage.delete_component("chat.example")))
        self.assertIsNone((yield self.storage.get_component("chat.example")))

    @defer.inlineCallbacks
    def test_component_certificate_settings(self):
        pin = "3f" * 32
        record = ComponentCredential("Pinned.Example", certificate_sha256=(pin, "0a" * 32, pin),
                                     trust_anchor_pem="-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
                                     certificate_name="Bots.Example", note="cert")
        self.assertTrue((yield self.storage.put_component(record)))
        got = yield self.storage.get_component("pinned.example")
        self.assertEqual(got, ComponentCredential(
            "pinned.example", note="cert", certificate_sha256=("0a" * 32, pin),
            trust_anchor_pem=record.trust_anchor_pem, certificate_name="bots.example"))
        self.assertTrue(got.certificate_auth)
        self.assertNotIn("BEGIN", repr(got))
        yield self.assertFailure(self.storage.put_component(
            ComponentCredential("ok.example", certificate_name="a b")), InvalidDomain)
        if self.persistent:
            yield self.storage.close()
            self.storage = self.reopen(self.storage)
            yield self.storage.open()
        self.assertEqual((yield self.storage.components()), [got])

    @defer.inlineCallbacks
    def test_writes_apply_in_order(self):
        writes = [self.storage.put_peer(PeerPolicy("order.example", note=str(i))) for i in range(50)]
        results = yield defer.gatherResults(writes)
        self.assertEqual(results, [True] + [False] * 49)
        self.assertEqual((yield self.storage.get_peer("order.example")).note, "49")

    @defer.inlineCallbacks
    def test_survives_reopen(self):
        if not self.persistent:
            raise unittest.SkipTest("this backend keeps nothing across a restart")
        yield self.storage.put_peer(PeerPolicy("kept.example", allowed=False))
        yield self.storage.put_setting("mode", "allowlist")
        yield self.storage.put_component(ComponentCredential("c.example", "secret"))
        yield self.storage.close()
        self.storage = self.reopen(self.storage)
        yield self.storage.open()
        self.assertFalse((yield self.storage.get_peer("kept.example")).allowed)
        self.assertEqual((yield self.storage.settings()), {"mode": "allowlist"})
        self.assertEqual((yield self.storage.get_component("c.example")).secret, "secret")

    @defer.inlineCallbacks
    def test_closed_store_refuses(self):
        yield self.storage.close()
        yield self.assertFailure(self.storage.peers(), StorageError)
        yield self.assertFailure(self.storage.put_peer(PeerPolicy("x.example")), StorageError)
        yield self.storage.close()  # closing twice is harmless


class SQLiteContract(StorageContract, unittest.TestCase):
    def make_storage(self):
        self.dir = tempfile.mkdtemp(prefix="fedgate-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        return SQLiteStorage(os.path.join(self.dir, "state.sqlite3"), reactor)

    def reopen(self, storage):
        return SQLiteStorage(storage.path, reactor)


class MemoryContract(StorageContract, unittest.TestCase):
    persistent = False

    def make_storage(self):
        return MemoryStorage()


class RedisContract(StorageContract, unittest.TestCase):
    """The cluster's shared store, against a real redis-server (skipped
    without one, or without redis-py)."""

    def make_storage(self):
        from fedgate.storage.redis import RedisStorage
        from tests.support.redisserver import start_redis
        self.redis = start_redis(self)
        return RedisStorage(reactor, self.redis.address, node_id="contract")

    def reopen(self, storage):
        from fedgate.storage.redis import RedisStorage
        return RedisStorage(reactor, storage.address, node_id="contract")
