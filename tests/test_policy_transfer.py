"""``fedgatectl policy export`` / ``import``: policy and credentials move
between the SQLite and Redis backends, and a running cluster node applies
an import into Redis at once."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from fedgate.policy import PeerPolicy
from fedgate.storage.interface import ComponentCredential
from fedgate.storage.redis import RedisStorage
from fedgate.storage.sqlite import SQLiteStorage
from fedgate.storage.transfer import TransferError, export_store, import_store, parse_document
from tests.support.federation import start_dns
from tests.support.gateway import gateway_config, start_gateway, temp_dir, write_config
from tests.support.redisserver import start_redis
from tests.support.s2speer import wait_until
from tests.support.twistd import REPO

PEERS = [PeerPolicy("blocked.example", allowed=False, note="abuse ✓"),
         PeerPolicy("static.example", encryption="optional", authentication="certificate",
                    addresses=(("192.0.2.7", 5269), ("2001:db8::7", 5270)), max_stanza_bytes=65536,
                    rate_limit=3.5)]
SETTINGS = {"federation": {"mode": "allowlist", "default": {"encryption": "required",
                                                            "authentication": "dialback",
                                                            "max_stanza_bytes": None, "rate_limit": None}}}
COMPONENTS = [ComponentCredential("chat.gw.example", "a-secret-of-16-chars", note="muc"),
              ComponentCredential("bots.gw.example", scram_sha256="c2FsdA==:4096:AAAA:BBBB",
                                  allowed=("weather.gw.example",), certificate_sha256=("ab" * 32,))]


@defer.inlineCallbacks
def fill(storage):
    for peer in PEERS:
        yield storage.put_peer(peer)
    for name, value in SETTINGS.items():
        yield storage.put_setting(name, value)
    for record in COMPONENTS:
        yield storage.put_component(record)


@defer.inlineCallbacks
def contents(storage):
    return ((yield storage.peers()), (yield storage.settings()), (yield storage.components()))


@defer.inlineCallbacks
def filled_sqlite(state: str):
    """The state directory's SQLite file, holding what :func:`fill` writes."""
    sqlite = SQLiteStorage.in_state_dir(state, reactor)
    yield sqlite.open()
    yield fill(sqlite)
    yield sqlite.close()


class TransferTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.redis = start_redis(self)
        self.dir = temp_dir(self)

    @defer.inlineCallbacks
    def open(self, storage):
        yield storage.open()
        self.addCleanup(storage.close)
        return storage

    @defer.inlineCallbacks
    def test_sqlite_to_redis_and_back(self):
        sqlite = yield self.open(SQLiteStorage(os.path.join(self.dir, "a.sqlite3"), reactor))
        yield fill(sqlite)
        document = yield export_store(sqlite)
        document = json.loads(json.dumps(document))  # through text, as the file goes
        redis = yield self.open(RedisStorage(reactor, self.redis.address))
        counts = yield import_store(redis, document)
        self.assertEqual(counts, {"peers": 2, "settings": 1, "components": 2, "removed": 0})
        self.assertEqual((yield contents(redis)), (yield contents(sqlite)))
        back = yield self.open(SQLiteStorage(os.path.join(self.dir, "b.sqlite3"), reactor))
        yield import_store(back, (yield export_store(redis)))
        self.assertEqual((yield contents(back)), (yield contents(sqlite)))

    @defer.inlineCallbacks
    def test_replace_removes_what_the_file_lacks(self):
        redis = yield self.open(RedisStorage(reactor, self.redis.address))
        yield fill(redis)
        yield redis.put_peer(PeerPolicy("extra.example"))
        yield redis.put_setting("other", 1)
        document = yield export_store(redis)
        document["peers"] = [p for p in document["peers"] if p["domain"] != "extra.example"]
        document["settings"].pop("other")
        document["components"] = document["components"][:1]
        counts = yield import_store(redis, document)
        self.assertEqual(counts["removed"], 0)
        self.assertEqual(len((yield redis.peers())), 3)
        counts = yield import_store(redis, document, replace=True)
        self.assertEqual(counts["removed"], 3)
        self.assertEqual([p.domain for p in (yield redis.peers())], ["blocked.example", "static.example"])
        self.assertEqual(list((yield redis.settings())), ["federation"])
        self.assertEqual(len((yield redis.components())), 1)

    def test_bad_documents_are_refused_naming_the_entry(self):
        good = {"format": "fedgate-policy", "version": 1}
        for document, words in [
            ({"peers": []}, "not a fedgate policy export"),
            (dict(good, version=2), "export version 2"),
            (dict(good, peers=[{"domain": "p.example", "encryption": "maybe"}]), "peers[0] (p.example)"),
            (dict(good, peers=[{"domain": "p.example", "colour": "red"}]), "unknown field 'colour'"),
            (dict(good, peers=["p.example"]), "peers[0]: expected an object"),
            (dict(good, components=[{"domain": "c.example", "pin": 1}]), "components[0]: unknown field"),
            (dict(good, settings=[1]), "settings: expected an object"),
        ]:
            with self.assertRaises(TransferError) as caught:
                parse_document(document)
            self.assertIn(words, str(caught.exception))


def fedgatectl(*args, stdin=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "fedgate.cli", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=60)


class CommandLineTests(unittest.TestCase):
    """The real fedgatectl, as a subprocess, against a real redis-server and
    a running cluster node in this reactor."""

    timeout = 90

    @defer.inlineCallbacks
    def test_export_over_a_world_readable_file_and_a_symlink(self):
        """L1: an existing 0644 file ends 0600; a symlink at the output path
        is replaced, its target (here another file) is left untouched."""
        state = temp_dir(self)
        config = gateway_config(state, ["gw.example"], {})
        path = write_config(os.path.join(state, "fedgate.toml"), config)
        yield filled_sqlite(state)
        export = os.path.join(state, "policy.json")
        with open(export, "w") as f:
            f.write("old")
        os.chmod(export, 0o644)
        done = yield threads.deferToThread(fedgatectl, "--config", str(path), "policy", "export", "-o", export)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(stat.S_IMODE(os.stat(export).st_mode), 0o600)
        self.assertIn("a-secret-of-16-chars", open(export, encoding="utf-8").read())
        victim = os.path.join(state, "victim.txt")
        with open(victim, "w") as f:
            f.write("untouched")
        os.chmod(victim, 0o644)
        link = os.path.join(state, "link.json")
        os.symlink(victim, link)
        done = yield threads.deferToThread(fedgatectl, "--config", str(path), "policy", "export", "-o", link)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(open(victim).read(), "untouched")
        self.assertFalse(os.path.islink(link))
        self.assertEqual(stat.S_IMODE(os.lstat(link).st_mode), 0o600)
        self.assertIn("a-secret-of-16-chars", open(link, encoding="utf-8").read())
        self.assertEqual([n for n in os.listdir(state) if n.startswith(".fedgate-export-")], [])

    @defer.inlineCallbacks
    def test_export_from_sqlite_import_into_a_running_cluster(self):
        redis = start_redis(self)
        _, dns_port = start_dns(self)
        state = temp_dir(self)
        config = gateway_config(state, ["gw.example"], {})
        config["cluster"] = {"enabled": False, "redis": redis.socket_path, "node_id": "n1"}
        path = write_config(os.path.join(state, "fedgate.toml"), config)
        yield filled_sqlite(state)  # the single node's state
        export = os.path.join(state, "policy.json")
        done = yield threads.deferToThread(fedgatectl, "--config", str(path), "policy", "export", "-o", export)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(stat.S_IMODE(os.stat(export).st_mode), 0o600)
        document = json.loads(open(export, encoding="utf-8").read())
        self.assertEqual([p["domain"] for p in document["peers"]], ["blocked.example", "static.example"])
        self.assertIn("a-secret-of-16-chars", open(export, encoding="utf-8").read())

        # A cluster node running on the (empty) Redis: the import reaches it.
        cluster = dict(config, cluster=dict(config["cluster"], enabled=True))
        node = yield start_gateway(reactor, cluster, dns_port, self)
        yield wait_until(lambda: node.admin.sync.connected, "the change feed")
        self.assertFalse(node.policy.is_blocked("blocked.example"))
        done = yield threads.deferToThread(fedgatectl, "--config", str(path), "policy", "import",
                                           export, "--backend", "redis")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("2 peers, 1 settings, 2 components", done.stdout)
        yield wait_until(lambda: node.policy.is_blocked("blocked.example") and node.policy.mode == "allowlist"
                         and node.admin.components.current("chat.gw.example") is not None,
                         "the import applied on the node", 2.0)
        # And back out of Redis: the same document.
        done = yield threads.deferToThread(fedgatectl, "--config", str(path), "policy", "export",
                                           "--backend", "redis")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(json.loads(done.stdout), document)

    @defer.inlineCallbacks
    def test_a_bad_file_exits_65_and_writes_nothing(self):
        state = temp_dir(self)
        config = gateway_config(state, ["gw.example"], {})
        path = write_config(os.path.join(state, "fedgate.toml"), config)
        bad = os.path.join(state, "bad.json")
        with open(bad, "w") as f:
            json.dump({"format": "fedgate-policy", "version": 1,
                       "peers": [{"domain": "ok.example"}, {"domain": "x", "allowed": "no", "encryption": "?"}]}, f)
        done = yield threads.deferToThread(fedgatectl, "--config", str(path), "policy", "import", bad)
        self.assertEqual(done.returncode, 65, done.stderr)
        self.assertIn("peers[1] (x)", done.stderr)
        sqlite = SQLiteStorage.in_state_dir(state, reactor)
        yield sqlite.open()
        self.addCleanup(sqlite.close)
        self.assertEqual((yield sqlite.peers()), [])
        done = yield threads.deferToThread(fedgatectl, "--config", str(path), "policy", "import", "-",
                                           stdin="not json")
        self.assertEqual(done.returncode, 65)
        self.assertIn("not JSON", done.stderr)
