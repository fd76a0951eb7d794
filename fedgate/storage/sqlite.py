"""The embedded default store: one SQLite file in the state directory.

Durability: WAL journal with ``synchronous=FULL``, so a COMMIT returns only
after the write-ahead log is on disk; every write is its own transaction and
its Deferred fires after COMMIT, so whatever the admin API acknowledged
survives a crash (kill -9, power loss) and the file opens cleanly after it.

The reactor never waits on the disk: one dedicated thread owns the
connection and runs every statement, in order, so writes are serialised
without locks of our own, and results come back to the reactor thread.

The schema is versioned with ``PRAGMA user_version``; :data:`MIGRATIONS`
lists the steps from each version to the next, and each step runs in one
transaction together with the version bump.  A file written by a newer
fedgate is refused rather than guessed at.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from fedgate.domain import normalize_domain
from fedgate.policy import PeerPolicy
from fedgate.storage.interface import (ComponentCredential, StorageError, normalized_component,
                                       peer_from_row, peer_to_row)

log = Logger(namespace="fedgate.storage.sqlite")

FILENAME = "fedgate.sqlite3"

#: MIGRATIONS[n] takes a database from version n to n + 1.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE peers (
            domain TEXT PRIMARY KEY NOT NULL,
            allowed INTEGER NOT NULL,
            encryption TEXT NOT NULL,
            authentication TEXT NOT NULL,
            addresses TEXT NOT NULL DEFAULT '[]',
            max_stanza_bytes INTEGER,
            rate_limit REAL,
            note TEXT NOT NULL DEFAULT '',
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE settings (
            name TEXT PRIMARY KEY NOT NULL,
            value TEXT NOT NULL,
            updated_at REAL NOT NULL
        )""",
    ],
    [
        """CREATE TABLE components (
            domain TEXT PRIMARY KEY NOT NULL,
            secret TEXT NOT NULL,
            note TEXT NOT NULL DEFAULT '',
            updated_at REAL NOT NULL
        )""",
    ],
    [
        # XEP-0225 credentials beside XEP-0114 secrets: SQLite cannot drop a
        # NOT NULL constraint, so the table is rebuilt.
        """CREATE TABLE components_v3 (
            domain TEXT PRIMARY KEY NOT NULL,
            secret TEXT,
            scram_sha1 TEXT,
            scram_sha256 TEXT,
            allowed TEXT NOT NULL DEFAULT '[]',
            note TEXT NOT NULL DEFAULT '',
            updated_at REAL NOT NULL
        )""",
        """INSERT INTO components_v3 (domain, secret, note, updated_at)
           SELECT domain, secret, note, updated_at FROM components""",
        "DROP TABLE components",
        "ALTER TABLE components_v3 RENAME TO components",
    ],
    [
        # XEP-0225 certificate authentication (SASL EXTERNAL).
        "ALTER TABLE components ADD COLUMN certificate_sha256 TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE components ADD COLUMN trust_anchor_pem TEXT",
        "ALTER TABLE components ADD COLUMN certificate_name TEXT",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)

_COMPONENT_COLUMNS = ("domain, secret, scram_sha1, scram_sha256, allowed, note, certificate_sha256, "
                      "trust_anchor_pem, certificate_name")


def _component(row) -> ComponentCredential:
    return ComponentCredential(row["domain"], row["secret"], row["scram_sha1"], row["scram_sha256"],
                               tuple(json.loads(row["allowed"] or "[]")), row["note"],
                               tuple(json.loads(row["certificate_sha256"] or "[]")),
                               row["trust_anchor_pem"], row["certificate_name"])


_PEER_COLUMNS = ("domain", "allowed", "encryption", "authentication", "addresses",
                 "max_stanza_bytes", "rate_limit", "note")


def _deferred(method):
    """Report a bad argument (an invalid domain) as a failed Deferred, as the
    interface promises, rather than raising in the caller."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except Exception:
            return defer.fail()
    return wrapper


class SQLiteStorage:
    """The :class:`~fedgate.storage.interface.Storage` backend on SQLite."""

    def __init__(self, path: str | os.PathLike, reactor, clock: Callable[[], float] | None = None):
        self.path = Path(path)
        self.reactor = reactor
        self._now = clock or reactor.seconds
        self._pool: ThreadPool | None = None
        self._db: sqlite3.Connection | None = None

    @classmethod
    def in_state_dir(cls, state_dir: str | os.PathLike, reactor) -> "SQLiteStorage":
        return cls(Path(state_dir) / FILENAME, reactor)

    # -- plumbing -----------------------------------------------------------
    def _run(self, fn: Callable, *args) -> defer.Deferred:
        if self._pool is None:
            return defer.fail(StorageError("the store is closed"))
        return threads.deferToThreadPool(self.reactor, self._pool, fn, *args)

    def _write(self, fn: Callable, *args) -> defer.Deferred:
        """Run ``fn(db, *args)`` in one IMMEDIATE transaction; fires after COMMIT."""
        def transaction():
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db, *args)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result
        return self._run(transaction)

    def _read(self, fn: Callable, *args) -> defer.Deferred:
        return self._run(lambda: fn(self._db, *args))

    # -- lifecycle ----------------------------------------------------------
    def open(self) -> defer.Deferred:
        if self._pool is not None:
            return defer.succeed(None)
        self._pool = ThreadPool(1, 1, name=f"fedgate-sqlite:{self.path.name}")
        self._pool.start()
        d = self._run(self._open_in_thread)
        d.addErrback(self._open_failed)
        return d

    def _open_failed(self, failure):
        self._stop_pool()
        if failure.check(sqlite3.Error, OSError):
            raise StorageError(f"cannot open {self.path}: {failure.getErrorMessage()}")
        return failure

    def _open_in_thread(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            db.row_factory = sqlite3.Row
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StorageError(f"{self.path}: cannot use WAL journal mode (got {mode})")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=5000")
            if fresh:
                os.chmod(self.path, 0o600)
            self._migrate(db)
        except BaseException:
            db.close()
            raise
        self._db = db

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StorageError(f"{self.path} has schema version {version}, newer than this "
                               f"fedgate knows ({SCHEMA_VERSION}); upgrade fedgate")
        for step in range(version, SCHEMA_VERSION):
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[step]:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {step + 1}")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            log.info("Storage {path} migrated to schema version {version}",
                     path=str(self.path), version=step + 1)

    def close(self) -> defer.Deferred:
        if self._pool is None:
            return defer.succeed(None)

        def close_db():
            if self._db is not None:
                self._db.close()
                self._db = None
        d = self._run(close_db)
        d.addBoth(lambda result: (self._stop_pool(), result)[1])
        return d

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    def schema_version(self) -> defer.Deferred:
        return self._read(lambda db: db.execute("PRAGMA user_version").fetchone()[0])

    # -- peers ----------------------------------------------------------------
    def peers(self) -> defer.Deferred:
        return self._read(lambda db: [peer_from_row(dict(row)) for row in db.execute(
            f"SELECT {', '.join(_PEER_COLUMNS)} FROM peers ORDER BY domain")])

    @_deferred
    def get_peer(self, domain: str) -> defer.Deferred:
        key = normalize_domain(domain)

        def get(db):
            row = db.execute(f"SELECT {', '.join(_PEER_COLUMNS)} FROM peers WHERE domain = ?",
                             (key,)).fetchone()
            return peer_from_row(dict(row)) if row is not None else None
        return self._read(get)

    @_deferred
    def put_peer(self, policy: PeerPolicy) -> defer.Deferred:
        row = peer_to_row(policy)
        row["domain"] = normalize_domain(policy.domain)
        row["allowed"] = int(row["allowed"])
        row["updated_at"] = self._now()

        def put(db):
            new = db.execute("SELECT 1 FROM peers WHERE domain = ?", (row["domain"],)).fetchone() is None
            names = ", ".join(row)
            marks = ", ".join(f":{name}" for name in row)
            db.execute(f"INSERT OR REPLACE INTO peers ({names}) VALUES ({marks})", row)
            return new
        return self._write(put)

    @_deferred
    def delete_peer(self, domain: str) -> defer.Deferred:
        key = normalize_domain(domain)
        return self._write(lambda db: db.execute("DELETE FROM peers WHERE domain = ?",
                                                 (key,)).rowcount > 0)

    # -- settings ---------------------------------------------------------------
    def settings(self) -> defer.Deferred:
        return self._read(lambda db: {row["name"]: json.loads(row["value"]) for row in db.execute(
            "SELECT name, value FROM settings ORDER BY name")})

    @_deferred
    def put_setting(self, name: str, value: Any) -> defer.Deferred:
        text = json.dumps(value)
        now = self._now()
        return self._write(lambda db: db.execute(
            "INSERT OR REPLACE INTO settings (name, value, updated_at) VALUES (?, ?, ?)",
            (name, text, now)) and None)

    def delete_setting(self, name: str) -> defer.Deferred:
        return self._write(lambda db: db.execute("DELETE FROM settings WHERE name = ?",
                                                 (name,)).rowcount > 0)

    # -- components ---------------------------------------------------------------
    def components(self) -> defer.Deferred:
        return self._read(lambda db: [_component(r) for r in db.execute(
            f"SELECT {_COMPONENT_COLUMNS} FROM components ORDER BY domain")])

    @_deferred
    def get_component(self, domain: str) -> defer.Deferred:
        key = normalize_domain(domain)

        def get(db):
            r = db.execute(f"SELECT {_COMPONENT_COLUMNS} FROM components WHERE domain = ?",
                           (key,)).fetchone()
            return _component(r) if r else None
        return self._read(get)

    @_deferred
    def put_component(self, credential: ComponentCredential) -> defer.Deferred:
        record = normalized_component(credential)
        row = (record.domain, record.secret, record.scram_sha1, record.scram_sha256,
               json.dumps(list(record.allowed)), record.note, json.dumps(list(record.certificate_sha256)),
               record.trust_anchor_pem, record.certificate_name, self._now())

        def put(db):
            new = db.execute("SELECT 1 FROM components WHERE domain = ?", (row[0],)).fetchone() is None
            db.execute(f"INSERT OR REPLACE INTO components ({_COMPONENT_COLUMNS}, updated_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            return new
        return self._write(put)

    @_deferred
    def delete_component(self, domain: str) -> defer.Deferred:
        key = normalize_domain(domain)
        return self._write(lambda db: db.execute("DELETE FROM components WHERE domain = ?",
                                                 (key,)).rowcount > 0)
