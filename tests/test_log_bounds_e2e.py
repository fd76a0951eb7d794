"""How much log a hostile peer can make a real gateway write, over loopback.

The figure of the issue: 1,250 ``unsupported-stanza-type`` elements with
400 KiB names once wrote 512 MB of log.  Every line fedgate logs is captured
with a twisted.logger observer and its formatted size summed.
"""

from __future__ import annotations

import time

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from tests.support.dnsserver import TestDNSServer
from tests.support.gateway import gateway_config, start_gateway, temp_dir
from tests.support.rawpeer import RawPeer, Reply

DOMAIN = "a.example"
HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server'"
          b" xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback'"
          b" to='a.example' from='b.example' version='1.0'>")
MAX_NAME = 256  # the default [limits] max_name_bytes
LOG_BOUND = 1024 * 1024


class LogVolumeTests(unittest.TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def setUp(self):
        self.dns = TestDNSServer(reactor)
        dns_port = self.dns.start()
        self.addCleanup(self.dns.stop)
        self.gateway = yield start_gateway(reactor, gateway_config(temp_dir(self), [DOMAIN], {}),
                                           dns_port, self)
        self.logged = [0, 0]  # lines, characters

        def observe(event):
            if event.get("log_namespace", "").startswith("fedgate"):
                self.logged[0] += 1
                self.logged[1] += len(formatEvent(event) or "")
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    @defer.inlineCallbacks
    def exchange(self, payload: bytes, close: bool = False) -> bytes:
        peer = RawPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.gateway.port_of("s2s")), peer)
        peer.transport.write(payload)
        if close:
            peer.transport.write(b"</stream:stream>")
        peer.lost.addTimeout(60, reactor)
        yield peer.lost
        return bytes(peer.data)

    @defer.inlineCallbacks
    def flood(self, payloads, concurrency: int = 16) -> list:
        replies: list = []
        pending = iter(payloads)

        @defer.inlineCallbacks
        def worker():
            for payload in pending:
                replies.append((yield self.exchange(payload)))
        yield defer.gatherResults([worker() for _ in range(concurrency)], consumeErrors=True)
        return replies

    @defer.inlineCallbacks
    def test_1250_huge_element_names(self):
        started = time.monotonic()
        names = (b"n%05d" % i + b"x" * (400 * 1024 - 6) for i in range(1250))
        replies = yield self.flood(HEADER + b"<" + name + b"/>" for name in names)
        print(f"\n1,250 streams with 400 KiB element names: {self.logged[0]} lines, "
              f"{self.logged[1]} characters of log ({self.logged[1] / (1250 * 400 * 1024):.5f} of the "
              f"names' size), {time.monotonic() - started:.1f} s")
        self.assertLess(self.logged[1], LOG_BOUND)
        self.assertEqual(len(replies), 1250)
        self.assertEqual({Reply(r).error_condition() for r in replies}, {"policy-violation"})

    @defer.inlineCallbacks
    def test_1250_unsupported_elements_with_names_at_the_limit(self):
        names = (b"n%05d" % i + b"x" * (MAX_NAME - 6) for i in range(1250))
        replies = yield self.flood(HEADER + b"<" + name + b" xmlns='urn:x'/>" for name in names)
        print(f"\n1,250 unsupported-stanza-type elements with {MAX_NAME}-byte names: "
              f"{self.logged[0]} lines, {self.logged[1]} characters of log")
        self.assertLess(self.logged[1], LOG_BOUND)
        self.assertEqual({Reply(r).error_condition() for r in replies}, {"unsupported-stanza-type"})
        for reply in replies[:5]:
            text = Reply(reply).elements[-1].children[-1]
            self.assertLessEqual(len(str(text)), 300, "the error text quotes the name cut short")

    @defer.inlineCallbacks
    def test_repeated_line_on_one_connection_is_rate_limited(self):
        verify = (b"<db:verify from='b.example' to='a.example' id='i' type='valid'>"
                  + b"t" * 100 + b"</db:verify>")
        reply = yield self.exchange(HEADER + verify * 1000, close=True)
        self.assertIn(b"</stream:stream>", reply)
        print(f"\n1,000 ignored db:verify on one connection: {self.logged[0]} lines")
        self.assertLess(self.logged[0], 40)
