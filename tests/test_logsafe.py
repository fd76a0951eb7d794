"""fedgate.logsafe: peer values cut short, repeated lines limited per connection."""

from __future__ import annotations

from twisted.logger import Logger, formatEvent
from twisted.trial import unittest

from fedgate import logsafe
from fedgate.logsafe import LineRate, set_line_rate, short, throttled


class ShortTests(unittest.SynchronousTestCase):
    def test_short_values_pass_unchanged(self):
        self.assertEqual(short("a.example"), "a.example")
        self.assertIsNone(short(None))
        self.assertEqual(short(42), "42")
        self.assertEqual(short("x" * 200), "x" * 200)

    def test_long_values_are_cut_with_their_length(self):
        value = "n" * (400 * 1024)
        cut = short(value)
        self.assertEqual(cut, "n" * 200 + "\N{HORIZONTAL ELLIPSIS}(409600 chars)")
        self.assertEqual(short("abcdef", limit=3), "abc\N{HORIZONTAL ELLIPSIS}(6 chars)")


class Connection:
    """Anything weakly referable stands for a connection."""


class ThrottleTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.now = 1000.0
        self.lines: list[str] = []
        self.log = Logger(namespace="test.logsafe", observer=lambda e: self.lines.append(formatEvent(e)))
        previous = logsafe.line_rate()
        set_line_rate(LineRate(burst=3, per_second=1.0))
        self.addCleanup(set_line_rate, previous)

    def limited(self, connection):
        return throttled(self.log, connection, clock=lambda: self.now)

    def test_burst_then_rate_then_a_count_of_the_suppressed(self):
        conn = Connection()
        for i in range(10):
            self.limited(conn).info("Ignoring {what} from {peer}", what=i, peer="p")
        self.assertEqual(self.lines, [f"Ignoring {i} from p" for i in range(3)])
        self.now += 2.0  # two tokens back
        for i in range(10, 13):
            self.limited(conn).info("Ignoring {what} from {peer}", what=i, peer="p")
        self.assertEqual(self.lines[3:], ["Suppressed 7 similar lines: Ignoring {what} from {peer}",
                                          "Ignoring 10 from p", "Ignoring 11 from p"])

    def test_connections_and_lines_are_limited_apart(self):
        first, second = Connection(), Connection()
        for _ in range(5):
            self.limited(first).warn("line A")
            self.limited(first).warn("line B")
            self.limited(second).warn("line A")
        self.assertEqual(self.lines.count("line A"), 6)
        self.assertEqual(self.lines.count("line B"), 3)

    def test_sustained_flood_stays_near_the_rate(self):
        conn = Connection()
        for i in range(10000):  # 10,000 lines over 100 seconds
            self.now += 0.01
            self.limited(conn).info("flood {i}", i=i)
        self.assertLessEqual(len(self.lines), 3 + 100 * 2)

    def test_state_goes_with_the_connection(self):
        conn = Connection()
        self.limited(conn).info("once")
        self.assertIn(conn, logsafe._buckets)
        del conn
        self.assertEqual(len([k for k in logsafe._buckets.keys() if isinstance(k, Connection)]), 0)
