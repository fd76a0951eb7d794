"""The stanzas a node has handed to other nodes and not yet seen acknowledged.

Redis pub/sub delivers at most once: a subscriber that Redis cuts off (its
``client-output-buffer-limit pubsub``), a node that hangs, a connection that
breaks with messages in its buffer all lose messages without a word.  So
every stanza forwarded to another node gets a sequence number and waits
here until the receiving node acknowledges it (acknowledgements come back
in batches on the origin's channel, see :mod:`fedgate.cluster.relay`).

What can happen to a waiting stanza:

- acknowledged: forgotten (counted ``acked``);
- the PUBLISH reached no subscriber (the target node is dead) or failed
  (Redis is down): taken back at once so the caller re-routes or bounces it;
- no acknowledgement within ``timeout`` seconds: taken back by :meth:`expire`
  and bounced with ``remote-server-timeout``.  The stanza may still have been
  delivered (the acknowledgement was lost or late): the one window in which
  a stanza is both delivered and bounced, documented in the README;
- refused by its node (whose own lease had run out): taken back by
  :meth:`take_range` and bounced, never delivered.

Acknowledgements come as ranges (:meth:`ack_range`); a range wider than the
table walks the table, not the range.

The table is bounded by count and by bytes; :meth:`add` refuses past either
bound (the caller bounces with ``resource-constraint``).  Everything here is
plain bookkeeping on an injected clock, so it is tested without Redis.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class InFlight:
    seq: int
    node: str
    stanza: Any
    size: int
    sent_at: float
    #: Redis reported a subscriber got it (the PUBLISH reply came back > 0)
    confirmed: bool = False


class InFlightTable:
    """Sequence-numbered stanzas waiting for an acknowledgement, oldest first."""

    def __init__(self, clock: Callable[[], float], *, timeout: float, max_stanzas: int,
                 max_bytes: int):
        self.clock = clock
        self.timeout = timeout
        self.max_stanzas = max_stanzas
        self.max_bytes = max_bytes
        self._waiting: OrderedDict[int, InFlight] = OrderedDict()
        self._next = 1
        self.bytes = 0
        #: totals, for metrics and tests
        self.acked = 0
        self.expired = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, seq: int) -> bool:
        return seq in self._waiting

    def add(self, node: str, stanza, size: int) -> int | None:
        """The sequence number ``stanza`` (``size`` bytes) travels under to
        ``node``, or None when the table is full (count or bytes)."""
        if len(self._waiting) >= self.max_stanzas or self.bytes + size > self.max_bytes:
            self.refused += 1
            return None
        seq = self._next
        self._next += 1
        self._waiting[seq] = InFlight(seq, node, stanza, size, self.clock())
        self.bytes += size
        return seq

    def _take(self, seq: int) -> InFlight | None:
        entry = self._waiting.pop(seq, None)
        if entry is not None:
            self.bytes -= entry.size
        return entry

    def ack(self, seqs, node: str | None = None) -> int:
        """Forget the acknowledged ``seqs`` (only those sent to ``node``, when
        given: another node cannot acknowledge what it never got); how many
        were waiting."""
        done = 0
        for seq in seqs:
            entry = self._waiting.get(seq)
            if entry is None or (node is not None and entry.node != node):
                continue
            self._take(seq)
            done += 1
        self.acked += done
        return done

    def _range(self, first: int, last: int, node: str | None):
        """The waiting sequence numbers in ``first..last`` sent to ``node``
        (any node when None), without walking a range wider than the table."""
        if last - first + 1 <= len(self._waiting):
            seqs = (s for s in range(first, last + 1) if s in self._waiting)
        else:
            seqs = [s for s in self._waiting if first <= s <= last]
        return [s for s in seqs if node is None or self._waiting[s].node == node]

    def ack_range(self, first: int, last: int, node: str | None = None) -> int:
        """:meth:`ack` for ``first..last`` (both included)."""
        seqs = self._range(first, last, node)
        for seq in seqs:
            self._take(seq)
        self.acked += len(seqs)
        return len(seqs)

    def take_range(self, first: int, last: int, node: str | None = None) -> list[InFlight]:
        """The entries in ``first..last`` sent to ``node``, removed (its
        node refused them unhandled), oldest first."""
        return [self._take(seq) for seq in self._range(first, last, node)]

    def take_back(self, seq: int) -> InFlight | None:
        """Remove ``seq`` without an acknowledgement (its PUBLISH reached
        nobody or failed): the entry, or None if it was acknowledged already."""
        return self._take(seq)

    def confirm(self, seq: int) -> None:
        """The PUBLISH of ``seq`` reached a subscriber."""
        entry = self._waiting.get(seq)
        if entry is not None:
            entry.confirmed = True

    def waits_for(self, node: str) -> bool:
        """Whether any entry waits for ``node``."""
        return any(entry.node == node for entry in self._waiting.values())

    def take_node(self, node: str, confirmed_only: bool = False) -> list[InFlight]:
        """Every entry waiting for ``node`` (it is gone), oldest first; with
        ``confirmed_only``, only those a subscriber is known to have got
        (the others' PUBLISH replies are still to come)."""
        seqs = [seq for seq, entry in self._waiting.items()
                if entry.node == node and (entry.confirmed or not confirmed_only)]
        return [self._take(seq) for seq in seqs]

    def take_all(self) -> list[InFlight]:
        entries = list(self._waiting.values())
        self._waiting.clear()
        self.bytes = 0
        return entries

    def expire(self, sent_by: float | None = None) -> list[InFlight]:
        """The entries older than ``timeout`` (sent at ``sent_by`` or
        before, when given), oldest first, removed."""
        deadline = self.clock() - self.timeout if sent_by is None else sent_by
        out = []
        while self._waiting:
            seq, entry = next(iter(self._waiting.items()))
            if entry.sent_at > deadline:
                break
            self._take(seq)
            out.append(entry)
        self.expired += len(out)
        return out

    def next_deadline(self) -> float | None:
        """When the oldest entry times out, or None if nothing waits."""
        if not self._waiting:
            return None
        return next(iter(self._waiting.values())).sent_at + self.timeout

    def by_node(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self._waiting.values():
            counts[entry.node] = counts.get(entry.node, 0) + 1
        return counts
