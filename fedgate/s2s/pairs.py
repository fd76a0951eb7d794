"""Authenticated domain pairs, per connection, in one table for the gateway.

Every S2S connection carries a set of (local domain, remote domain) pairs,
each pending, valid or invalid, and authenticated by some method, by one of
the two sides: the remote side proved its domain to us (``origin`` REMOTE:
we may accept stanzas remote -> local) or we proved ours (LOCAL: we may send
local -> remote).  On a bidirectional stream (XEP-0288) a valid pair carries
stanzas both ways, whichever side authenticated it.  A stanza travels only
over a pair that allows its direction on that connection.  The records are
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

#: who authenticated a pair: the remote side (to us) or we (to them)
REMOTE = "remote"
LOCAL = "local"

_ids = itertools.count(1)


@dataclass(slots=True)
class DomainPair:
    local: str
    remote: str
    state: str = PENDING
    method: str | None = None
    since: float = 0.0
    stanzas_in: int = 0
    stanzas_out: int = 0
    origin: str = REMOTE


@dataclass(slots=True)
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
    #: the stream's XEP-0198 state (fedgate.s2s.sm), if it has any
    _sm: object = field(default=None, repr=False, compare=False)

    def stream_management(self) -> dict:
        """XEP-0198 on this connection: enabled, unacked, resumable, h_in, h_out."""
        if self._sm is None:
            return {"enabled": False, "unacked": 0, "resumable": False, "h_in": 0, "h_out": 0}
        return self._sm.describe()

    def set_pair(self, local: str, remote: str, state: str, method: str | None, now: float,
                 origin: str | None = None) -> DomainPair:
        """Record a pair's state; ``origin`` defaults to the side that opened
        the connection authenticating (the remote side on inbound ones)."""
        key = (local, remote)
        pair = self.pairs.get(key)
        if pair is None:
            pair = self.pairs[key] = DomainPair(local, remote)
        pair.state, pair.method, pair.since = state, method, now
        pair.origin = origin or (REMOTE if self.direction == INBOUND else LOCAL)
        if state == VALID:
            self._valid.add(key)
        else:
            self._valid.discard(key)
        return pair

    def forget_pairs(self, keep: tuple[str, str] | None = None) -> None:
        """Drop every pair but ``keep`` (a (local, remote) key): after a
        stream restart nothing the old stream established counts."""
        for key in [k for k in self.pairs if k != keep]:
            del self.pairs[key]
            self._valid.discard(key)

    def state_of(self, local: str, remote: str) -> str | None:
        pair = self.pairs.get((local, remote))
        return pair.state if pair else None

    def is_valid(self, local: str, remote: str) -> bool:
        return (local, remote) in self._valid

    def can_receive(self, local: str, remote: str) -> bool:
        """May a stanza from ``remote`` to ``local`` arrive on this stream?"""
        pair = self.pairs.get((local, remote))
        return pair is not None and pair.state == VALID and (pair.origin == REMOTE or self.bidi)

    def can_send(self, local: str, remote: str) -> bool:
        """May we send a stanza from ``local`` to ``remote`` on this stream?"""
        pair = self.pairs.get((local, remote))
        return pair is not None and pair.state == VALID and (pair.origin == LOCAL or self.bidi)

    def has_valid_remote(self, remote: str) -> bool:
        """Has ``remote`` a valid pair here that lets it send to us?"""
        return any(r == remote and self.can_receive(l, r) for l, r in self._valid)

    def proven_remote(self, remote: str) -> bool:
        """Has the remote side proved ``remote`` as its own on this stream?"""
        return any(r == remote and self.pairs[(l, r)].origin == REMOTE for l, r in self._valid)

    def proven_local(self, local: str) -> bool:
        """Have we proved ``local`` to the remote side on this stream?"""
        return any(l == local and self.pairs[(l, r)].origin == LOCAL for l, r in self._valid)

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
        self._routes: dict[int, object] = {}
        self._pair_listeners: list = []
        self._removed_listeners: list = []

    def add(self, record: ConnectionRecord, closer=None, route=None) -> ConnectionRecord:
        """Track ``record``; ``closer(condition, text)`` ends its stream with a
        stream error; ``route`` (an inbound stream's handler) can carry our
        stanzas once bidi allows (both kept beside the record, which stays
        plain data)."""
        self._connections[record.id] = record
        if closer is not None:
            self._closers[record.id] = closer
        if route is not None:
            self._routes[record.id] = route
        return record

    def route_for(self, local: str, remote: str):
        """(record, route) of a connection that may carry local -> remote now
        (an inbound bidi stream, say), or None.  ``route`` has
        ``write_stanza(local, remote, stanza)``, True when the stream took it."""
        for conn_id, route in self._routes.items():
            record = self._connections[conn_id]
            if record.can_send(local, remote):
                return record, route
        return None

    def reverse_route(self, remote: str):
        """(record, route) of a bidi connection on which ``remote`` is proven,
        where we can authenticate a further local domain in the reverse
        direction (XEP-0288), or None."""
        for conn_id, route in self._routes.items():
            record = self._connections[conn_id]
            if record.bidi and record.proven_remote(remote):
                return record, route
        return None

    def on_pair_changed(self, listener) -> None:
        """Call ``listener(local, remote, usable)`` when a pair we asked for
        in the reverse direction, or one a bidi peer proved, becomes usable
        for sending (True) or failed (False)."""
        self._pair_listeners.append(listener)

    def on_removed(self, listener) -> None:
        """Call ``listener(record)`` as each record leaves the table (the
        metrics keep totals across closed connections)."""
        self._removed_listeners.append(listener)

    def pair_changed(self, local: str, remote: str, usable: bool) -> None:
        for listener in list(self._pair_listeners):
            listener(local, remote, usable)

    def remove(self, record: ConnectionRecord) -> None:
        gone = self._connections.pop(record.id, None)
        self._closers.pop(record.id, None)
        self._routes.pop(record.id, None)
        if gone is not None:
            for listener in self._removed_listeners:
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
