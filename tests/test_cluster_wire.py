"""The relay's wire format (fedgate/cluster/relay.py): length-delimited
records, several stanzas per message, and acknowledgements as ranges."""

from __future__ import annotations

from twisted.trial import unittest

from fedgate.cluster.inflight import InFlightTable
from fedgate.cluster.relay import (BadMessage, decode_ranges, decode_records, encode_ranges,
                                   encode_record)


def records(*items) -> bytes:
    return b"Bnode-b 0123abcd\n" + b"".join(encode_record(*item) for item in items)


class RecordTests(unittest.TestCase):
    def test_round_trip_of_several_records(self):
        hostile = (b"<message to='x@a'>\n1 c 7 - - - - - 1 3\nabc 2 s 1 1 1 1 1 1 1 1\n"
                   b"\xff\x00</message>")
        data = records(
            (7, "c", "message", ("x@chat.a.example", "y@b.example", "chat", "m 1\n2"), None,
             "chat.a.example", hostile),
            (8, "s", "iq", (None, "", None, None), "a.example", "remote.example", b"<iq/>"))
        out = list(decode_records(data, data.index(b"\n") + 1))
        self.assertEqual(out, [
            (7, "c", "message", ("x@chat.a.example", "y@b.example", "chat", "m 1\n2"), None,
             "chat.a.example", hostile),
            (8, "s", "iq", (None, "", None, None), "a.example", "remote.example", b"<iq/>")])

    def test_a_stanza_cannot_forge_a_record(self):
        """Bytes in a stanza that look like a record header stay in the stanza."""
        forged = encode_record(99, "c", "message", ("evil@x", None, None, None), None, "x", b"<x/>")
        data = records((1, "c", "message", (None,) * 4, None, "chat.a.example", forged))
        out = list(decode_records(data, data.index(b"\n") + 1))
        self.assertEqual([(r[0], r[6]) for r in out], [(1, forged)])

    def test_malformed_records_are_refused(self):
        good = encode_record(1, "c", "message", (None,) * 4, None, "d", b"<message/>")
        for bad in (good[:-1],                      # truncated
                    b"1 c 7 - - - - - 1\nmessaged",  # a field short
                    b"1 c x - - - - - 1 3\n",        # not a number
                    b"1 c -7 - - - - - 1 3\n",       # negative length
                    b"1 c 7 - - - - - - 3\nmessage<a/>",  # no destination
                    b"1 c 7 - - - - - 1 3"):          # no end of header
            with self.assertRaises(BadMessage, msg=bad):
                list(decode_records(bad, 0))


class RangeTests(unittest.TestCase):
    def test_ranges_round_trip(self):
        seqs = [5, 1, 2, 3, 7, 9, 10, 11, 20]
        text = encode_ranges(seqs)
        self.assertEqual(text, b"1-3,5,7,9-11,20")
        expanded = [s for a, b in decode_ranges(text) for s in range(a, b + 1)]
        self.assertEqual(expanded, sorted(seqs))

    def test_bad_ranges_are_refused(self):
        for bad in (b"", b"3-1", b"1-", b"a", b"-1", b"1,,2"):
            with self.assertRaises(BadMessage, msg=bad):
                decode_ranges(bad)

    def test_a_huge_range_only_touches_what_waits(self):
        table = InFlightTable(lambda: 0.0, timeout=5, max_stanzas=10, max_bytes=1000)
        seqs = [table.add("a" if i % 2 else "b", object(), 1) for i in range(6)]
        self.assertEqual(table.ack_range(0, 10 ** 15, node="a"), 3)
        self.assertEqual(sorted(e.seq for e in table.take_range(seqs[0], seqs[-1], node="b")),
                         [seqs[0], seqs[2], seqs[4]])
        self.assertEqual(len(table), 0)
