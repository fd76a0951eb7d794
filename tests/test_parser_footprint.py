"""What an idle stream's parser holds, measured with tracemalloc.

Every open stream keeps one expat parser for its whole life.  After a
dialback handshake a parser (expat's own structures included: pyexpat
allocates them through Python's allocator) held about 25 KB: 8 KB of it
expat's text buffer, then a per-parser dictionary of every name seen,
per-parser handler closures and fresh copies of the namespace names.  Now
about 14 KB, 11 KB of it expat's own state.  The bound (18 KiB) leaves
room for other expat versions and fails if the text buffer alone comes back.
"""

from __future__ import annotations

import gc
import tracemalloc

from twisted.trial import unittest

from fedgate.stream.parser import StreamParser

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


class ParserFootprintTests(unittest.SynchronousTestCase):
    def test_an_idle_parser_after_a_handshake_holds_little(self):
        kept = []

        def parse_one():
            received = []  # counted, not kept: only the parser is measured
            parser = StreamParser(lambda header: received.append("header"),
                                  lambda element: received.append(element.name), lambda: None)
            for chunk in HANDSHAKE:
                parser.feed(chunk)
            kept.append((parser, received))

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
        self.assertTrue(all(received == ["header", "result", "verify", "message"]
                            for _, received in kept))
        print(f"\nidle parser after a handshake: {per_stream:.0f} bytes (bound {BOUND})")
        self.assertLess(per_stream, BOUND)
