"""ClusterSync and the registries' adopt_* in memory: what another node's
write changes here, and only that; notices folded while a read runs; a full
reload swallowing the notices behind it; a failed read retried as a reload.
(tests/test_cluster_policy_e2e.py runs the same over a real redis-server.)"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from fedgate.admin.registry import API, CONFIG, PeerRegistry
from fedgate.cluster.sync import ClusterSync
from fedgate.policy import MODE_ALLOWLIST, MODE_OPEN, PeerPolicy, PolicyTable
from fedgate.storage.memory import MemoryStorage


class WatchedMemoryStorage(MemoryStorage):
    """A memory store with a change feed the test drives: ``feed`` is what
    ``watch`` was given; reads of peers can be held (``hold``)."""

    def __init__(self):
        super().__init__()
        self.reactor = task.Clock()
        self.feed = None
        self.held: list[defer.Deferred] = []
        self.hold = False
        self.reads = 0
        self.fail_next = 0

    def watch(self, on_change, on_resync, on_lost=None, **options):

        class Feed:
            connected = True

            def stop(self):
                self.connected = False
        self.feed = (on_change, on_resync, Feed())
        return self.feed[2]

    def get_peer(self, domain):
        self.reads += 1
        if self.fail_next:
            self.fail_next -= 1
            return defer.fail(OSError("store unreachable"))
        d = super().get_peer(domain)
        if not self.hold:
            return d
        gate = defer.Deferred()
        self.held.append(gate)
        return gate.addCallback(lambda _: d)

    def release(self):
        held, self.held = self.held, []
        for gate in held:
            gate.callback(None)


class NoComponents:
    def reload(self):
        return defer.succeed(None)

    def refresh(self, domain):
        return defer.succeed(None)


class AdoptTests(unittest.TestCase):
    def setUp(self):
        self.table = PolicyTable(PeerPolicy(), {}, MODE_OPEN)
        self.changes = []
        self.table.subscribe(self.changes.append)
        self.file_peer = PeerPolicy("file.example", note="from the file")
        self.registry = PeerRegistry(self.table, {"file.example": self.file_peer}, MemoryStorage())
        self.table.set_peer(self.file_peer)
        self.changes.clear()

    def test_peer_added_changed_removed(self):
        blocked = PeerPolicy("p.example", allowed=False)
        self.registry.adopt_peer("p.example", blocked)
        self.assertTrue(self.table.is_blocked("p.example"))
        self.assertEqual(self.registry.source("p.example"), API)
        self.registry.adopt_peer("p.example", blocked)  # the same again: no enforcement pass
        self.assertEqual(self.changes, ["p.example"])
        self.registry.adopt_peer("p.example", None)
        self.assertNotIn("p.example", self.table.peers)
        self.assertEqual(self.changes, ["p.example", "p.example"])
        self.registry.adopt_peer("p.example", None)  # nothing stored: nothing to do
        self.assertEqual(len(self.changes), 2)

    def test_removed_override_falls_back_to_the_file(self):
        self.registry.adopt_peer("file.example", PeerPolicy("file.example", allowed=False))
        self.assertTrue(self.table.is_blocked("file.example"))
        self.registry.adopt_peer("file.example", None)
        self.assertEqual(self.table.peers["file.example"], self.file_peer)
        self.assertEqual(self.registry.source("file.example"), CONFIG)

    def test_global_setting(self):
        federation = {"mode": MODE_ALLOWLIST, "default": {"encryption": "optional"}}
        self.registry.adopt_global(federation)
        self.assertEqual((self.table.mode, self.table.default.encryption), (MODE_ALLOWLIST, "optional"))
        self.registry.adopt_global(dict(federation))
        self.assertEqual(self.changes, [None])
        self.registry.adopt_global(None)
        self.assertEqual((self.table.mode, self.table.default.encryption, self.registry.global_source),
                         (MODE_OPEN, "required", CONFIG))
        self.registry.adopt_global({"mode": "closed"})  # refused, logged; nothing changes
        self.assertEqual(self.table.mode, MODE_OPEN)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_reload_removes_what_the_store_no_longer_has(self):
        storage = self.registry.storage
        yield storage.open()
        self.registry.adopt_peer("gone.example", PeerPolicy("gone.example", allowed=False))
        yield storage.put_peer(PeerPolicy("kept.example", allowed=False))
        yield self.registry.reload()
        self.assertNotIn("gone.example", self.table.peers)
        self.assertTrue(self.table.is_blocked("kept.example"))
        self.assertEqual(self.registry.stored, {"kept.example"})


class SyncTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.storage = WatchedMemoryStorage()
        yield self.storage.open()
        self.table = PolicyTable(PeerPolicy(), {}, MODE_OPEN)
        self.registry = PeerRegistry(self.table, {}, self.storage)
        self.sync = ClusterSync(self.storage, self.registry, NoComponents(), retry_delay=1.0)
        self.sync.start()
        self.on_change, self.on_resync, _ = self.storage.feed

    @defer.inlineCallbacks
    def test_notices_for_one_record_fold_while_a_read_runs(self):
        yield self.storage.put_peer(PeerPolicy("p.example", allowed=False))
        self.storage.hold = True
        for _ in range(5):
            self.on_change("peer", "p.example", "put")
        self.on_change("peer", "q.example", "put")
        self.on_change("peer", "p.example", "put")
        # One read running (p), then q and p waiting once each: 3 reads, not 7.
        while self.storage.held:
            self.storage.release()
        yield self.sync.when_idle()
        self.assertEqual(self.storage.reads, 3)
        self.assertTrue(self.table.is_blocked("p.example"))

    @defer.inlineCallbacks
    def test_a_resync_swallows_the_notices_behind_it(self):
        self.storage.hold = True
        self.on_change("peer", "a.example", "put")  # running
        self.on_resync()
        self.on_change("peer", "b.example", "put")
        self.on_change("peer", "c.example", "put")
        self.storage.release()
        yield self.sync.when_idle()
        self.assertEqual((self.storage.reads, self.sync.reloads), (1, 1))

    @defer.inlineCallbacks
    def test_a_failed_read_becomes_a_full_reload_later(self):
        yield self.storage.put_peer(PeerPolicy("p.example", allowed=False))
        self.storage.fail_next = 1
        self.on_change("peer", "p.example", "put")
        yield self.sync.when_idle()
        self.assertFalse(self.table.is_blocked("p.example"))
        self.assertEqual(self.sync.failures, 1)
        self.flushLoggedErrors(OSError)
        self.storage.reactor.advance(1.0)
        yield self.sync.when_idle()
        self.assertEqual(self.sync.reloads, 1)
        self.assertTrue(self.table.is_blocked("p.example"))

    def test_stop_cancels_the_retry(self):
        self.storage.fail_next = 1
        self.on_change("peer", "p.example", "put")
        self.flushLoggedErrors(OSError)
        self.assertEqual(len(self.storage.reactor.getDelayedCalls()), 1)
        self.sync.stop()
        self.assertEqual(self.storage.reactor.getDelayedCalls(), [])
