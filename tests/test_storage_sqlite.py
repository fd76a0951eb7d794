"""What is particular to the SQLite backend: pragmas, migrations, threads.

(The behaviour every backend shares is in test_storage_contract.py; the
crash test, SIGKILL during a stream of PUTs, is in test_admin_durability.py.)
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading

from twisted.internet import defer, reactor
from twisted.trial import unittest

from fedgate.policy import PeerPolicy
from fedgate.storage.interface import StorageError
from fedgate.storage.sqlite import FILENAME, MIGRATIONS, SCHEMA_VERSION, SQLiteStorage
from tests.support.gateway import temp_dir


class SQLiteTests(unittest.TestCase):
    def setUp(self):
        self.dir = temp_dir(self)
        self.path = os.path.join(self.dir, FILENAME)

    @defer.inlineCallbacks
    def open(self):
        storage = SQLiteStorage.in_state_dir(self.dir, reactor)
        yield storage.open()
        self.addCleanup(storage.close)
        return storage

    @defer.inlineCallbacks
    def test_wal_full_sync_private_file(self):
        storage = yield self.open()
        mode = yield storage._read(lambda db: db.execute("PRAGMA journal_mode").fetchone()[0])
        sync = yield storage._read(lambda db: db.execute("PRAGMA synchronous").fetchone()[0])
        self.assertEqual((mode, sync), ("wal", 2))  # 2 is FULL
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual((yield storage.schema_version()), SCHEMA_VERSION)

    @defer.inlineCallbacks
    def test_statements_run_off_the_reactor_thread(self):
        storage = yield self.open()
        where = yield storage._read(lambda db: threading.get_ident())
        self.assertNotEqual(where, threading.get_ident())

    @defer.inlineCallbacks
    def test_migrates_an_old_file_and_keeps_its_rows(self):
        db = sqlite3.connect(self.path, isolation_level=None)
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO peers (domain, allowed, encryption, authentication, addresses, "
                   "note, updated_at) VALUES ('old.example', 0, 'required', 'dialback', "
                   "'[[\"192.0.2.1\", 5269]]', 'from v1', 0)")
        db.close()
        storage = yield self.open()
        self.assertEqual((yield storage.schema_version()), SCHEMA_VERSION)
        old = yield storage.get_peer("old.example")
        self.assertEqual((old.allowed, old.addresses, old.note), (False, (("192.0.2.1", 5269),), "from v1"))
        self.assertEqual((yield storage.components()), [])

    @defer.inlineCallbacks
    def test_migrates_version_2_components(self):
        db = sqlite3.connect(self.path, isolation_level=None)
        for step in MIGRATIONS[:2]:
            for statement in step:
                db.execute(statement)
        db.execute("PRAGMA user_version = 2")
        db.execute("INSERT INTO components (domain, secret, note, updated_at) "
                   "VALUES ('chat.example', 'kept-secret', 'v2', 0)")
        db.close()
        storage = yield self.open()
        got = yield storage.get_component("chat.example")
        self.assertEqual((got.secret, got.scram_sha256, got.allowed, got.note), ("kept-secret", None, (), "v2"))

    @defer.inlineCallbacks
    def test_migrates_version_3_components(self):
        db = sqlite3.connect(self.path, isolation_level=None)
        for step in MIGRATIONS[:3]:
            for statement in step:
                db.execute(statement)
        db.execute("PRAGMA user_version = 3")
        db.execute("INSERT INTO components (domain, scram_sha256, allowed, note, updated_at) "
                   "VALUES ('bots.example', 'a:1:b:c', '[\"w.example\"]', 'v3', 0)")
        db.close()
        storage = yield self.open()
        got = yield storage.get_component("bots.example")
        self.assertEqual((got.scram_sha256, got.allowed, got.certificate_sha256, got.trust_anchor_pem,
                          got.certificate_name), ("a:1:b:c", ("w.example",), (), None, None))

    @defer.inlineCallbacks
    def test_refuses_a_newer_schema(self):
        db = sqlite3.connect(self.path)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        db.commit()
        db.close()
        storage = SQLiteStorage(self.path, reactor)
        failure = yield self.assertFailure(storage.open(), StorageError)
        self.assertIn("newer", str(failure))
        yield self.assertFailure(storage.peers(), StorageError)

    @defer.inlineCallbacks
    def test_refuses_a_file_that_is_not_a_database(self):
        with open(self.path, "wb") as handle:
            handle.write(b"this is not sqlite" * 100)
        failure = yield self.assertFailure(SQLiteStorage(self.path, reactor).open(), StorageError)
        self.assertIn(self.path, str(failure))

    @defer.inlineCallbacks
    def test_acknowledged_write_is_visible_to_another_connection(self):
        storage = yield self.open()
        yield storage.put_peer(PeerPolicy("seen.example", note="durable"))
        # Another process's view: a fresh connection reads the committed row.
        db = sqlite3.connect(self.path)
        try:
            self.assertEqual(db.execute("SELECT note FROM peers").fetchall(), [("durable",)])
        finally:
            db.close()
