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

What one entry may hold is bounded too, not only the number of names: an
answer with more than ``MAX_RECORDS_PER_ENTRY`` records (answer, authority
and additional sections together) is passed on but not kept, and the cache
holds at most ``max_records`` records in all (``DEFAULT_MAX_RECORDS``;
past it the least recently used entries go).  A zone under a peer's control
(a wildcard with hundreds of A records per name) thus costs at most that
many records, not ``max_entries`` times whatever it answers.  Only SRV, A
and AAAA records are kept, each at most a few hundred bytes parsed.
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
#: an answer with more records than this is not kept (XMPP domains publish
#: a handful of SRV targets and addresses)
MAX_RECORDS_PER_ENTRY = 32
#: the default bound on records kept in all entries together
DEFAULT_MAX_RECORDS = 8192


class CachingResolver:
    """``lookupService``, ``lookupAddress`` and ``lookupIPV6Address`` of
    ``resolver``, answered from memory while the records' TTL lasts.
    Everything else is passed through.  ``clock`` gives ``seconds()``."""

    def __init__(self, resolver, clock, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_records: int = DEFAULT_MAX_RECORDS):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        self.resolver = resolver
        self.clock = clock
        self.max_entries = max_entries
        self.max_records = max_records
        #: (kind, name) -> (expires, result, record count)
        self._entries: OrderedDict = OrderedDict()
        #: records held in all entries
        self.records = 0
        #: answers too large to keep
        self.too_large = 0
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
            expires, result, _ = entry
            if self.clock.seconds() < expires:
                self._entries.move_to_end(key)
                self.hits += 1
                return defer.succeed(result)
            self._drop(key)
        self.misses += 1
        d = defer.maybeDeferred(lookup, name, timeout)
        d.addCallback(self._store, key)
        return d

    def _store(self, result, key):
        if not isinstance(result, tuple) or len(result) != 3:
            return result
        answers, authority, additional = result
        count = len(answers) + len(authority) + len(additional)
        if count > min(MAX_RECORDS_PER_ENTRY, self.max_records):
            self.too_large += 1
            return result  # used once, never kept
        if answers:
            ttl = min(min(record.ttl for record in answers), MAX_TTL)
        else:
            ttl = min([NEGATIVE_TTL, *(record.ttl for record in authority)])
        if ttl > 0:
            self._drop(key)  # a concurrent lookup of the same name may have stored it
            self._entries[key] = (self.clock.seconds() + ttl, result, count)
            self.records += count
            while len(self._entries) > self.max_entries or self.records > self.max_records:
                _, (_, _, dropped) = self._entries.popitem(last=False)
                self.records -= dropped
        return result

    def _drop(self, key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.records -= entry[2]
