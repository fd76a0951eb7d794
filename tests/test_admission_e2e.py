"""The caps on unauthenticated connections over real loopback sockets: a
refused Direct TLS connection is closed before any TLS (no ServerHello); a
stream that authenticates (SASL EXTERNAL between two gateways, a XEP-0114
handshake) leaves the count, a closed one too, and the next connection past
the per-address cap gets a stream error in the listener's namespace."""

from __future__ import annotations

import socket
import ssl

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from fedgate.stream import namespaces as ns
from tests.support.federation import TwoGatewaysFixture, add_component, start_dns
from tests.support.gateway import gateway_config, start_gateway, temp_dir
from tests.support.rawpeer import Reply
from tests.support.s2speer import s2s_header, wait_until

COMPONENT_HEADER = (b"<stream:stream xmlns='jabber:component:accept' "
                    b"xmlns:stream='http://etherx.jabber.org/streams' to='chat.b.example'>")


def client_hello(server_name: str) -> bytes:
    """The first flight of a real TLS client."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def send_and_read(port: int, payload: bytes, until: bytes | None = None, wait: float = 5.0):
    """Connect, send ``payload``, read until ``until`` is seen or the other
    side closes; returns (the socket, or None once closed, what was read).
    A reset counts as a close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=wait)
    sock.sendall(payload)
    data = b""
    while until is None or until not in data:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            sock.close()
            return None, data
        data += chunk
    return sock, data


class S2SCaps(TwoGatewaysFixture, unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        yield self.start_two_gateways(
            gateway_config(temp_dir(self), ["a.example"], {"chat.a.example": "secret-a"}),
            gateway_config(temp_dir(self), ["b.example"], {"chat.b.example": "secret-b"},
                           max_unauthenticated_per_address=1, max_unauthenticated=4))
        self.sockets = []
        self.addCleanup(lambda: [s.close() for s in self.sockets if s is not None])

    def raw(self, payload: bytes, until: bytes | None):
        return threads.deferToThread(send_and_read, self.b.port_of("s2s"), payload, until)

    @defer.inlineCallbacks
    def test_an_authenticated_stream_leaves_the_count_and_a_closed_one_too(self):
        ca = yield self.add_component(self.a, "chat.a.example", "secret-a")
        cb = yield self.add_component(self.b, "chat.b.example", "secret-b")
        ca.send("<message from='x@chat.a.example' to='y@chat.b.example' id='m1'><body>hi</body></message>")
        got = yield cb.next_element(timeout=10)
        self.assertEqual(got["id"], "m1")
        pool = self.b.admission["s2s"]
        # A's stream (from 127.0.0.1, SASL EXTERNAL) no longer counts ...
        self.assertEqual(pool.count_for("127.0.0.1"), 0)
        header = s2s_header("c.example", "b.example")
        # ... so one more from 127.0.0.1 is admitted, and the next is refused.
        held, data = yield self.raw(header, b"</stream:features>")
        self.sockets.append(held)
        self.assertIsNotNone(held)
        self.assertEqual(Reply(data).stream_errors(), [])
        gone, refused = yield self.raw(header, None)
        self.assertIsNone(gone)
        reply = Reply(refused)
        self.assertEqual(reply.stream_errors(), ["policy-violation"])
        self.assertEqual(reply.root.defaultUri, ns.SERVER)
        self.assertEqual(pool.refused["per-address"], 1)
        # Closing the held one gives its place back.
        held.close()
        yield wait_until(lambda: pool.count_for("127.0.0.1") == 0, "the close to count")
        again, data = yield self.raw(header, b"</stream:features>")
        self.sockets.append(again)
        self.assertIsNotNone(again)
        self.assertEqual(Reply(data).stream_errors(), [])


class DirectTLSCaps(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        _, dns_port = start_dns(self)
        config = gateway_config(temp_dir(self), ["b.example"], {},
                                max_unauthenticated_per_address=1, max_unauthenticated=4,
                                direct_tls_listen=["tcp:0:interface=127.0.0.1"])
        self.gateway = yield start_gateway(reactor, config, dns_port, self)
        self.sockets = []
        self.addCleanup(lambda: [s.close() for s in self.sockets if s is not None])

    @defer.inlineCallbacks
    def test_a_refused_direct_tls_connection_is_closed_without_a_handshake(self):
        port = self.gateway.port_of("s2s_direct_tls")
        hello = client_hello("b.example")
        self.assertEqual(hello[:1], b"\x16")  # a TLS handshake record
        admitted, data = yield threads.deferToThread(send_and_read, port, hello, b"\x16\x03")
        self.sockets.append(admitted)
        self.assertIsNotNone(admitted)  # the first gets its ServerHello
        refused, data = yield threads.deferToThread(send_and_read, port, hello, b"\x16\x03")
        self.assertIsNone(refused)
        self.assertEqual(data, b"")  # a plain close: not one byte of TLS
        pool = self.gateway.admission["s2s"]
        self.assertEqual((pool.refused["per-address"], pool.count_for("127.0.0.1")), (1, 1))


class ComponentCaps(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        _, dns_port = start_dns(self)
        config = gateway_config(temp_dir(self), ["b.example"], {"chat.b.example": "secret-b"})
        config["components"].update(max_unauthenticated_per_address=1, max_unauthenticated=2)
        self.gateway = yield start_gateway(reactor, config, dns_port, self)
        self.sockets = []
        self.addCleanup(lambda: [s.close() for s in self.sockets if s is not None])

    @defer.inlineCallbacks
    def test_a_component_leaves_the_count_on_its_handshake(self):
        port = self.gateway.port_of("components")
        yield add_component(self, self.gateway, "chat.b.example", "secret-b")
        pool = self.gateway.admission["components"]
        self.assertEqual(pool.count_for("127.0.0.1"), 0)
        held, data = yield threads.deferToThread(send_and_read, port, COMPONENT_HEADER, b" id=")
        self.sockets.append(held)
        self.assertIsNotNone(held)
        gone, refused = yield threads.deferToThread(send_and_read, port, COMPONENT_HEADER, None)
        self.assertIsNone(gone)
        reply = Reply(refused)
        self.assertEqual(reply.stream_errors(), ["policy-violation"])
        self.assertEqual(reply.root.defaultUri, ns.COMPONENT_ACCEPT)
        # The S2S pool is another one: untouched.
        self.assertEqual(self.gateway.admission["s2s"].unauthenticated, 0)
