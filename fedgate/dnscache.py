"""A bounded, TTL-respecting cache in front of the S2S DNS resolver.

Each outbound connection and each dialback verification asks for the same
SRV and address records again; ``twisted.names.client.Resolver`` (what
``s2s.dns_servers`` builds) keeps no answers, and the cache in
``client.createResolver``'s chain is only filled by a DNS server, never by
client lookups.  :class:`CachingResolver` keeps the answers of the three
lookups the S2S resolver makes (SRV, A, AAAA) until the smallest TTL among
their records runs out (at most ``MAX_TTL`` seconds), for at most
``max_entries`` names: past that the least recently used entry goes.

An answer without records (a host with no AAAA, say: the name exists, the
type does not) is kept for ``NEGATIVE_TTL`` seconds, or the SOA's TTL that
came with it when that is shorter.  An error or a timeout is never kept: the
next attempt asks again (it may find the server back).  A TTL of 0 is not
kept.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet import defer

#: the default bound on cached names (``s2s.dns_cache_entries``)
DEFAULT_MAX_ENTRIES = 1024
#: no answer is kept longer than this, whatever its TTL says
MAX_TTL = 3600
#: how long an answer without records is kept (at most)
NEGATIVE_TTL = 30


class CachingResolver:
    """``lookupService``, ``lookupAddress`` and ``lookupIPV6Address`` of
    ``resolver``, answered from memory while the records' TTL lasts.
    Everything else is passed through.  ``clock`` gives ``seconds()``."""

    def __init__(self, resolver, clock, max_entries: int = DEFAULT_MAX_ENTRIES):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.resolver = resolver
        self.clock = clock
        self.max_entries = max_entries
        #: (kind, name) -> (expires, result)
        self._entries: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __getattr__(self, name):
        return getattr(self.resolver, name)

    def lookupService(self, name, timeout=None):
        return self._lookup("SRV", self.resolver.lookupService, name, timeout)

    def lookupAddress(self, name, timeout=None):
        return self._lookup("A", self.resolver.lookupAddress, name, timeout)

    def lookupIPV6Address(self, name, timeout=None):
        return self._lookup("AAAA", self.resolver.lookupIPV6Address, name, timeout)

    def _lookup(self, kind: str, lookup, name, timeout) -> defer.Deferred:
        key = (kind, (name.decode("ascii", "replace") if isinstance(name, bytes) else name).lower())
        entry = self._entries.get(key)
        if entry is not None:
            expires, result = entry
            if self.clock.seconds() < expires:
                self._entries.move_to_end(key)
                self.hits += 1
                return defer.succeed(result)
            del self._entries[key]
        self.misses += 1
        d = defer.maybeDeferred(lookup, name, timeout)
        d.addCallback(self._store, key)
        return d

    def _store(self, result, key):
        if not isinstance(result, tuple) or len(result) != 3:
            return result
        answers, authority, _ = result
        if answers:
            ttl = min(min(record.ttl for record in answers), MAX_TTL)
        else:
            ttl = min([NEGATIVE_TTL, *(record.ttl for record in authority)])
        if ttl > 0:
            self._entries[key] = (self.clock.seconds() + ttl, result)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return result
