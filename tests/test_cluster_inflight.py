"""The cross-node bookkeeping without Redis: the in-flight table on a fake
clock, and the ownership cache."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from fedgate.cluster.inflight import InFlightTable
from fedgate.cluster.membership import (COMPONENT, STREAM, OwnershipCache, entry_field,
                                        parse_field)


class InFlightTableTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.table = InFlightTable(self.clock.seconds, timeout=6.0, max_stanzas=3, max_bytes=100)

    def test_sequence_numbers_and_acks(self):
        s1 = self.table.add("node-a", "x", 10)
        s2 = self.table.add("node-b", "y", 20)
        self.assertEqual((s1, s2), (1, 2))
        self.assertEqual((len(self.table), self.table.bytes), (2, 30))
        # Only the node a stanza was sent to can acknowledge it.
        self.assertEqual(self.table.ack([1, 2], node="node-a"), 1)
        self.assertEqual((len(self.table), self.table.bytes, self.table.acked), (1, 20, 1))
        self.assertIn(2, self.table)
        # An acknowledgement repeated or for an unknown number counts nothing.
        self.assertEqual(self.table.ack([1, 99], node="node-a"), 0)
        self.assertEqual(self.table.by_node(), {"node-b": 1})

    def test_count_bound(self):
        for i in range(3):
            self.assertIsNotNone(self.table.add("node-a", i, 1))
        self.assertIsNone(self.table.add("node-a", "past", 1))
        self.assertEqual(self.table.refused, 1)
        self.table.ack([1])
        self.assertIsNotNone(self.table.add("node-a", "room again", 1))

    def test_byte_bound(self):
        self.assertIsNotNone(self.table.add("node-a", "big", 90))
        self.assertIsNone(self.table.add("node-a", "too big", 11))
        self.assertIsNotNone(self.table.add("node-a", "fits", 10))
        self.assertEqual(self.table.bytes, 100)

    def test_expiry_on_the_fake_clock(self):
        self.table.add("node-a", "first", 1)
        self.clock.advance(2)
        self.table.add("node-a", "second", 1)
        self.assertEqual(self.table.next_deadline(), 6.0)
        self.clock.advance(3.9)
        self.assertEqual(self.table.expire(), [])
        self.clock.advance(0.1)  # t = 6: the first is due
        self.assertEqual([e.stanza for e in self.table.expire()], ["first"])
        self.assertEqual(self.table.next_deadline(), 8.0)
        self.clock.advance(2)
        self.assertEqual([e.stanza for e in self.table.expire()], ["second"])
        self.assertIsNone(self.table.next_deadline())
        self.assertEqual((self.table.expired, self.table.bytes), (2, 0))

    def test_take_back_and_take_node(self):
        self.table.add("node-a", "a1", 1)
        self.table.add("node-b", "b1", 1)
        self.table.add("node-a", "a2", 1)
        self.assertEqual(self.table.take_back(2).stanza, "b1")
        self.assertIsNone(self.table.take_back(2))  # already taken
        self.assertEqual([e.stanza for e in self.table.take_node("node-a")], ["a1", "a2"])
        self.assertEqual((len(self.table), self.table.bytes), (0, 0))

    def test_take_node_confirmed_only(self):
        s1 = self.table.add("node-a", "got there", 1)
        self.table.add("node-a", "reply pending", 1)
        self.table.confirm(s1)
        self.assertEqual([e.stanza for e in self.table.take_node("node-a", confirmed_only=True)],
                         ["got there"])
        self.assertEqual([e.stanza for e in self.table.take_node("node-a")], ["reply pending"])

    def test_an_acknowledged_stanza_never_expires(self):
        seq = self.table.add("node-a", "x", 1)
        self.table.ack([seq])
        self.clock.advance(60)
        self.assertEqual(self.table.expire(), [])


class OwnershipCacheTests(unittest.TestCase):
    def test_fields_round_trip(self):
        for kind, key in ((COMPONENT, ("chat.a.example",)), (STREAM, ("a.example", "b.example"))):
            self.assertEqual(parse_field(entry_field(kind, key)), (kind, key))
        self.assertIsNone(parse_field("x|y"))
        self.assertIsNone(parse_field("s|only-one"))

    def test_holders_in_turn_and_drop(self):
        cache = OwnershipCache("me")
        cache.add("me", COMPONENT, ("chat",))  # this node is never in it
        self.assertIsNone(cache.component_owner("chat"))
        cache.add("n1", COMPONENT, ("chat",))
        cache.add("n2", COMPONENT, ("chat",))
        cache.add("n2", STREAM, ("a", "b"))
        picks = {cache.component_owner("chat") for _ in range(4)}
        self.assertEqual(picks, {"n1", "n2"})
        self.assertEqual(cache.pair_owner("a", "b"), "n2")
        self.assertTrue(cache.drop_node("n2"))
        self.assertEqual(cache.component_owners("chat"), ["n1"])
        self.assertIsNone(cache.pair_owner("a", "b"))
        self.assertFalse(cache.drop_node("n2"))
        cache.replace_node("n1", [(STREAM, ("a", "c"))])
        self.assertIsNone(cache.component_owner("chat"))
        self.assertEqual(cache.pair_owner("a", "c"), "n1")
        cache.remove("n1", STREAM, ("a", "c"))
        self.assertEqual(cache.nodes["n1"], set())

    def test_stream_owner_by_remote_domain(self):
        cache = OwnershipCache("me")
        cache.add("n2", STREAM, ("a", "r"))
        cache.add("n2", STREAM, ("b", "r"))
        cache.add("n1", STREAM, ("c", "r"))
        self.assertEqual(cache.stream_owner("r"), "n1")
        cache.remove("n1", STREAM, ("c", "r"))
        self.assertEqual(cache.stream_owner("r"), "n2")
        cache.remove("n2", STREAM, ("a", "r"))
        self.assertEqual(cache.stream_owner("r"), "n2")  # it still has b -> r
        cache.drop_node("n2")
        self.assertIsNone(cache.stream_owner("r"))


class WaitsForTests(unittest.TestCase):
    def test_waits_for_names_only_nodes_with_entries(self):
        table = InFlightTable(lambda: 0.0, timeout=5, max_stanzas=10, max_bytes=1000)
        self.assertFalse(table.waits_for("a"))
        seq = table.add("a", object(), 1)
        self.assertTrue(table.waits_for("a"))
        self.assertFalse(table.waits_for("b"))
        table.ack([seq])
        self.assertFalse(table.waits_for("a"))
