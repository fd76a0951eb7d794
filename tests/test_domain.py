"""fedgate.domain: the normalisation cache keeps short names only."""

from __future__ import annotations

from twisted.trial import unittest

from fedgate import domain
from fedgate.domain import normalize_domain


class CacheTests(unittest.SynchronousTestCase):
    def test_long_domains_are_never_cached(self):
        before = domain._normalize_cached.cache_info().currsize
        label = "a" * 63
        long_domain = ".".join([label] * 15) + ".example"  # 968 characters, valid
        self.assertGreater(len(long_domain), domain._CACHED_LENGTH)
        self.assertEqual(normalize_domain(long_domain.upper()), long_domain)
        self.assertEqual(domain._normalize_cached.cache_info().currsize, before)
        self.assertEqual(normalize_domain("Short-And-New.Cache.Example"), "short-and-new.cache.example")
        self.assertEqual(domain._normalize_cached.cache_info().currsize, before + 1)
