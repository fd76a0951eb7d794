"""What an idle stream's parser holds, measured with tracemalloc.

Every open stream keeps one expat parser for its whole life.  After a
dialback handshake a parser (expat's own structures included: pyexpat
allocates them through Python's allocator) held about 25 KB: 8 KB of it
expat's text buffer, then a per-parser dictionary of every name seen,
per-parser handler closures and fresh copies of the namespace names.  Now
about 14 KB, 11 KB of it expat's own state.  The bound (18 KiB) leaves
room for other expat versions and fails if the text buffer alone comes back.

expat also keeps a buffer as large as the largest chunk it was ever handed:
a parser that once got a 64 KiB read held about 114 KB for the rest of its
stream's life.  The parser now hands expat at most ``EXPAT_SLICE`` bytes
at a time, and the bound after such a read is the idle one plus two slices.
"""

from __future__ import annotations

import gc
import tracemalloc

from twisted.trial import unittest

from fedgate.stream.parser import EXPAT_SLICE, StreamParser

HANDSHAKE = [
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:stream="
    b"'http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' to='gw.example'"
    b" from='remote.example' version='1.0'>",
    b"<db:result from='remote.example' to='gw.example'>"
    b"7a3f0b1c2d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8</db:result>",
    b"<db:verify from='remote.example' to='gw.example' id='c0ffee' type='valid'/>",
    b"<message from='a@remote.example' to='b@gw.example' type='chat' id='m1'>"
    b"<body>hello</body></message>",
    b" ",
]
BOUND = 18 * 1024
STREAMS = 100


#: one read of a relay flood: up to 64 KiB of whole stanzas, as Twisted
#: reads a socket
FLOOD_STANZAS = 350
FLOOD_READ = b"".join(
    b"<message from='a@remote.example' to='b@gw.example' id='f%03d'><body>%s</body></message>"
    % (n, b"x" * 100) for n in range(FLOOD_STANZAS))


class ParserFootprintTests(unittest.SynchronousTestCase):
    def test_an_idle_parser_after_a_handshake_holds_little(self):
        self.assert_bounded(HANDSHAKE)

    def test_an_idle_parser_after_a_64_kib_read_holds_little(self):
        # expat keeps a buffer as large as the largest chunk it was handed,
        # for the stream's whole life: fed the read at once, each parser
        # held about 117 KB ever after; fed in EXPAT_SLICE pieces, it stays
        # within the same bound as after a handshake.
        self.assertGreater(len(FLOOD_READ), 60000)
        self.assertLessEqual(len(FLOOD_READ), 65536)
        # (expat's buffer: a slice and its context, rounded up to a power of 2)
        self.assert_bounded(HANDSHAKE + [FLOOD_READ], elements=3 + FLOOD_STANZAS,
                            bound=BOUND + 2 * EXPAT_SLICE)

    def assert_bounded(self, chunks, elements=3, bound=BOUND):
        kept = []

        def parse_one():
            received = []  # counted, not kept: only the parser is measured
            parser = StreamParser(lambda header: None, lambda element: received.append(None),
                                  lambda: None)
            for chunk in chunks:
                parser.feed(chunk)
            kept.append((parser, len(received)))

        parse_one()  # caches and first-use allocations out of the measure
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(STREAMS):
                parse_one()
            gc.collect()
            per_stream = (tracemalloc.get_traced_memory()[0] - before) / STREAMS
        finally:
            tracemalloc.stop()
        self.assertTrue(all(received == elements for _, received in kept), (kept[0][1], elements))
        print(f"\nidle parser after {len(chunks)} reads: {per_stream:.0f} bytes (bound {bound})")
        self.assertLess(per_stream, bound)
