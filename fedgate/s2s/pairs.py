"""Authenticated domain pairs, per connection, in one table for the gateway.

Every S2S connection carries a set of (local domain, remote domain) pairs,
each pending, valid or invalid, and authenticated by some method.  A stanza
travels only over a pair that is valid on that connection.  The records are
plain data so the admin API can show them as they are.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator

PENDING = "pending"
VALID = "valid"
INVALID = "invalid"

INBOUND = "inbound"
OUTBOUND = "outbound"

_ids = itertools.count(1)


@dataclass
class DomainPair:
    local: str
    remote: str
    state: str = PENDING
    method: str | None = None
    since: float = 0.0
    stanzas_in: int = 0
    stanzas_out: int = 0


@dataclass
class ConnectionRecord:
    """One S2S connection and the domain pairs it carries."""

    direction: str
    remote_address: str
    opened_at: float
    remote_domain: str | None = None
    tls: dict | None = None  # TLSInfo.describe() once encrypted
    bidi: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    pairs: dict = field(default_factory=dict)
    _valid: set = field(default_factory=set, repr=False)

    def set_pair(self, local: str, remote: str, state: str, method: str | None, now: float) -> DomainPair:
        key = (local, remote)
        pair = self.pairs.get(key)
        if pair is None:
            pair = self.pairs[key] = DomainPair(local, remote)
        pair.state, pair.method, pair.since = state, method, now
        if state == VALID:
            self._valid.add(key)
        else:
            self._valid.discard(key)
        return pair

    def state_of(self, local: str, remote: str) -> str | None:
        pair = self.pairs.get((local, remote))
        return pair.state if pair else None

    def is_valid(self, local: str, remote: str) -> bool:
        return (local, remote) in self._valid

    def has_valid_remote(self, remote: str) -> bool:
        return any(r == remote for _, r in self._valid)

    @property
    def authenticated(self) -> bool:
        return bool(self._valid)

    def valid_pairs(self) -> list[DomainPair]:
        return [self.pairs[k] for k in self._valid]


class ConnectionTable:
    """Every live S2S connection, by id; closing a connection removes it and
    so all its pairs, which keeps the table free of stale pairs."""

    def __init__(self):
        self._connections: dict[int, ConnectionRecord] = {}
        self._closers: dict[int, object] = {}
        #: called with each record as it leaves the table (metrics keep totals)
        self.removed_listeners: list = []

    def add(self, record: ConnectionRecord, closer=None) -> ConnectionRecord:
        """Track ``record``; ``closer(condition, text)`` ends its stream with a
        stream error (kept beside the record, which stays plain data)."""
        self._connections[record.id] = record
        if closer is not None:
            self._closers[record.id] = closer
        return record

    def remove(self, record: ConnectionRecord) -> None:
        gone = self._connections.pop(record.id, None)
        self._closers.pop(record.id, None)
        if gone is not None:
            for listener in self.removed_listeners:
                listener(gone)

    def close(self, conn_id: int, condition: str, text: str | None = None) -> bool:
        """End connection ``conn_id`` with a stream error; False if unknown."""
        closer = self._closers.get(conn_id)
        if closer is None:
            return False
        closer(condition, text)
        return True

    def get(self, conn_id: int) -> ConnectionRecord | None:
        return self._connections.get(conn_id)

    def __iter__(self) -> Iterator[ConnectionRecord]:
        return iter(list(self._connections.values()))

    def __len__(self) -> int:
        return len(self._connections)

    def pairs_for_remote(self, remote: str) -> list[tuple[ConnectionRecord, DomainPair]]:
        return [(rec, pair) for rec in self._connections.values()
                for pair in rec.pairs.values() if pair.remote == remote]

    def connections_of(self, remote: str) -> list[ConnectionRecord]:
        return [rec for rec in self._connections.values()
                if rec.remote_domain == remote or any(p.remote == remote for p in rec.pairs.values())]
