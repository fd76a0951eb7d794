"""TCP_NODELAY (Nagle off) on every stream's socket, over real loopback
sockets: inbound S2S, the outbound connection the gateway opens to an
Authoritative Server to verify dialback, and an XEP-0114 component."""

from __future__ import annotations

import gc
import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet import tcp
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from fedgate.stream.liveness import tcp_no_delay
from tests.support.federation import start_dns
from tests.support.gateway import gateway_config, start_gateway, temp_dir
from tests.support.rawpeer import RawPeer
from tests.support.s2speer import wait_until

GW, COMPONENT, REMOTE = "gw.example", "chat.gw.example", "remote.example"


class TcpNoDelayUnit(unittest.TestCase):
    def test_sets_the_option_on_a_real_socket_under_a_wrapper(self):
        sock = socket.socket()
        self.addCleanup(sock.close)

        class Transport:
            def getHandle(self):
                return sock

        class Wrapper:  # a TLS wrapping protocol over the TCP transport
            transport = Transport()

        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)
        self.assertTrue(tcp_no_delay(Wrapper()))
        self.assertNotEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)

    def test_no_socket(self):
        self.assertFalse(tcp_no_delay(object()))


class Authority(protocol.Factory):
    """Accepts the gateway's verification connection and says nothing."""

    noisy = False

    def __init__(self):
        self.accepted = 0

    def buildProtocol(self, addr):
        self.accepted += 1
        return protocol.Protocol()


def gateway_socket(peer_port: int | None = None, remote_port: int | None = None) -> socket.socket:
    """The gateway's own socket of the connection whose other end is at
    ``peer_port`` (a connection we opened), or whose remote end listens on
    ``remote_port`` (one the gateway opened)."""
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, tcp.Connection) and obj.connected:
            peer = obj.getPeer()
            if peer_port is not None and isinstance(obj, tcp.Server) and peer.port == peer_port:
                found.append(obj.socket)
            if remote_port is not None and isinstance(obj, tcp.Client) and peer.port == remote_port:
                found.append(obj.socket)
    assert len(found) == 1, found
    return found[0]


def nodelay(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


class NoDelayE2E(unittest.TestCase):
    timeout = 30

    async def _scenario(self):
        dns, dns_port = start_dns(self)
        authority = Authority()
        listening = reactor.listenTCP(0, authority, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        dns.add_a("xmpp.remote.example", "127.0.0.1")
        dns.add_srv(f"_xmpp-server._tcp.{REMOTE}", 0, 0, listening.getHost().port, "xmpp.remote.example")
        config = gateway_config(temp_dir(self), [GW], {COMPONENT: "secret"},
                                policy={"encryption": "optional"})
        gateway = await start_gateway(reactor, config, dns_port, self)

        inbound = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", gateway.port_of("s2s")), RawPeer())
        self.addCleanup(inbound.transport.abortConnection)
        inbound.transport.write(
            f"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
            f"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
            f"from='{REMOTE}' to='{GW}' version='1.0'>"
            f"<db:result from='{REMOTE}' to='{GW}'>abcdef</db:result>".encode())
        component = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", gateway.port_of("components")), RawPeer())
        self.addCleanup(component.transport.abortConnection)
        component.transport.write(
            f"<stream:stream xmlns='jabber:component:accept' "
            f"xmlns:stream='http://etherx.jabber.org/streams' to='{COMPONENT}'>".encode())
        await wait_until(lambda: authority.accepted == 1 and inbound.data and component.data,
                         "the verification connection and both stream headers")

        self.assertNotEqual(nodelay(gateway_socket(peer_port=inbound.transport.getHost().port)), 0)
        self.assertNotEqual(nodelay(gateway_socket(peer_port=component.transport.getHost().port)), 0)
        self.assertNotEqual(nodelay(gateway_socket(remote_port=listening.getHost().port)), 0)

    def test_inbound_outbound_and_component_sockets(self):
        return defer.ensureDeferred(self._scenario())
