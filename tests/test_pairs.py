"""The domain-pair table."""

from __future__ import annotations

import random

from twisted.trial import unittest

from fedgate.s2s.pairs import (INBOUND, INVALID, OUTBOUND, PENDING, VALID, ConnectionRecord,
                               ConnectionTable)


class RecordTests(unittest.TestCase):
    def test_pair_states(self):
        record = ConnectionRecord(INBOUND, "192.0.2.1:5269", 100.0)
        self.assertFalse(record.authenticated)
        record.set_pair("gw.example", "remote.example", PENDING, "dialback", 101.0)
        self.assertEqual(record.state_of("gw.example", "remote.example"), PENDING)
        self.assertFalse(record.is_valid("gw.example", "remote.example"))
        self.assertFalse(record.authenticated)
        pair = record.set_pair("gw.example", "remote.example", VALID, "dialback", 102.0)
        self.assertTrue(record.is_valid("gw.example", "remote.example"))
        self.assertTrue(record.has_valid_remote("remote.example"))
        self.assertFalse(record.has_valid_remote("gw.example"))
        self.assertEqual((pair.method, pair.since), ("dialback", 102.0))
        # Direction matters: (local, remote) is not (remote, local).
        self.assertFalse(record.is_valid("remote.example", "gw.example"))
        record.set_pair("gw.example", "remote.example", INVALID, "dialback", 103.0)
        self.assertFalse(record.authenticated)
        self.assertEqual(record.valid_pairs(), [])

    def test_ids_are_unique(self):
        ids = {ConnectionRecord(OUTBOUND, "x", 0.0).id for _ in range(100)}
        self.assertEqual(len(ids), 100)


class TableTests(unittest.TestCase):
    def test_queries(self):
        table = ConnectionTable()
        a = table.add(ConnectionRecord(OUTBOUND, "a", 0.0, remote_domain="r.example"))
        b = table.add(ConnectionRecord(INBOUND, "b", 0.0))
        a.set_pair("gw.example", "r.example", VALID, "dialback", 1.0)
        b.set_pair("gw.example", "r.example", PENDING, "dialback", 1.0)
        b.set_pair("chat.gw.example", "s.example", VALID, "dialback", 1.0)
        self.assertEqual({(r.id, p.state) for r, p in table.pairs_for_remote("r.example")},
                         {(a.id, VALID), (b.id, PENDING)})
        self.assertEqual({r.id for r in table.connections_of("s.example")}, {b.id})
        self.assertIs(table.get(a.id), a)
        closed = []
        table.add(b, closer=lambda condition, text: closed.append((condition, text)))
        self.assertTrue(table.close(b.id, "policy-violation", "operator"))
        self.assertEqual(closed, [("policy-violation", "operator")])
        self.assertFalse(table.close(a.id, "policy-violation"), "no closer registered")
        table.remove(a)
        self.assertIsNone(table.get(a.id))
        self.assertEqual([r.id for r, _ in table.pairs_for_remote("r.example")], [b.id])

    def test_random_open_close_leaves_no_stale_pairs(self):
        rng = random.Random(99)
        table = ConnectionTable()
        live: dict[int, ConnectionRecord] = {}
        domains = [f"d{i}.example" for i in range(5)]
        for _ in range(2000):
            roll = rng.random()
            if roll < 0.3 or not live:
                record = table.add(ConnectionRecord(rng.choice([INBOUND, OUTBOUND]), "p", 0.0))
                live[record.id] = record
            elif roll < 0.7:
                record = rng.choice(list(live.values()))
                record.set_pair(rng.choice(domains), rng.choice(domains),
                                rng.choice([PENDING, VALID, INVALID]), "dialback", 0.0)
            else:
                record = live.pop(rng.choice(list(live)))
                table.remove(record)
            self.assertEqual({r.id for r in table}, set(live))
        for domain in domains:
            expected = {(r.id, p.local) for r in live.values() for p in r.pairs.values() if p.remote == domain}
            self.assertEqual({(r.id, p.local) for r, p in table.pairs_for_remote(domain)}, expected)
            for record, _ in table.pairs_for_remote(domain):
                self.assertIn(record.id, live)
