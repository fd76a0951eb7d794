"""The Gateway service's lifecycle over real sockets."""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from tests.support.federation import start_dns
from tests.support.gateway import gateway_config, start_gateway, temp_dir
from tests.support.rawpeer import RawPeer, Reply

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
          b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
          b"to='gw.example' from='peer.example' version='1.0'>")


class ShutdownTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_stop_closes_streams_with_system_shutdown(self):
        dns, dns_port = start_dns(self)
        gateway = yield start_gateway(reactor, gateway_config(
            temp_dir(self), ["gw.example"], {"chat.gw.example": "s"}), dns_port)
        peer = RawPeer()
        port = gateway.port_of("s2s")
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), peer)
        peer.transport.write(HEADER)
        for _ in range(50):
            if b"</stream:features>" in peer.data:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield gateway.stopService()
        yield peer.lost.addTimeout(10, reactor)
        reply = Reply(bytes(peer.data))
        self.assertEqual([e.name for e in reply.elements], ["features", "error"])
        self.assertEqual(reply.error_condition(), "system-shutdown")
        self.assertTrue(reply.ended)
        # The listener is gone too.
        failed = yield self.assertFailure(
            connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2), RawPeer()),
            Exception)
        self.assertIn("refused", str(failed).lower())
