"""Over a real loopback TCP connection, the answer to a read goes to the
socket directly when Twisted holds nothing for it: no registering the
socket for writing (an epoll_ctl) and unregistering it (another) around a
send the kernel takes whole.  What the kernel does not take is handed to
Twisted and arrives complete and in order."""

from __future__ import annotations

import socket

from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from fedgate.stream.protocol import XmppStream
from tests.test_protocol import HEADER, FakeHandler


class Served:
    def __init__(self, case, handler):
        self.streams = []

        def build(addr):
            stream = XmppStream(handler, reactor)
            self.streams.append(stream)
            return stream
        factory = protocol.Factory()
        factory.buildProtocol = build
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        case.addCleanup(self.port.stopListening)


class DirectSendTests(unittest.TestCase):

    def setUp(self):
        self.handler = FakeHandler()
        self.served = Served(self, self.handler)
        self.client = socket.create_connection(("127.0.0.1", self.served.port.getHost().port))
        self.client.setblocking(False)
        self.addCleanup(self.client.close)
        self.addCleanup(lambda: [s.transport.abortConnection() for s in self.served.streams
                                 if s.transport is not None and s.transport.connected])
        self.writers = []
        add_writer = reactor.addWriter

        def counting(selectable):
            self.writers.append(selectable)
            return add_writer(selectable)
        reactor.addWriter = counting
        self.addCleanup(setattr, reactor, "addWriter", add_writer)

    @defer.inlineCallbacks
    def receive(self, until: bytes, seconds: float = 5.0) -> bytes:
        got = b""
        for _ in range(int(seconds / 0.01)):
            while True:
                try:
                    chunk = self.client.recv(65536)
                except BlockingIOError:
                    break
                if not chunk:
                    return got
                got += chunk
            if got.endswith(until):
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        return got

    def own_writers(self):
        stream = self.served.streams[0]
        return [w for w in self.writers if w is stream.transport]

    @defer.inlineCallbacks
    def test_a_handshake_step_is_sent_without_registering_for_writing(self):
        self.handler.on_element = lambda element: self.handler.io.send("<answer/>")
        self.client.sendall(HEADER)
        header = yield self.receive(b">")
        self.assertIn(b"<stream:stream", header)
        self.client.sendall(b"<question/>")
        self.assertEqual((yield self.receive(b"<answer/>")), b"<answer/>")
        self.assertEqual(self.own_writers(), [], "the kernel took every answer at once")

    @defer.inlineCallbacks
    def test_what_the_kernel_does_not_take_follows_in_order(self):
        first_sends = []

        def small_buffers():
            transport = self.handler.io.transport
            transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            write_some = transport.writeSomeData

            def recording(data):
                result = write_some(data)
                first_sends.append((len(data), result))
                return result
            transport.writeSomeData = recording
        self.handler.on_connected = small_buffers
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        big = b"<big>%s</big>" % (b"x" * 60_000)  # one write, under COALESCE_MAX
        sent = []

        def answer(element):
            sent.append(self.handler.io.transport.getHandle().getsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF))
            self.handler.io.write(big.decode())
        self.handler.on_element = answer
        self.client.sendall(HEADER)
        yield self.receive(b">")
        self.client.sendall(b"<question/>")
        got = yield self.receive(big, seconds=10.0)
        self.assertLess(sent[0], len(big), "the kernel could not take it whole")
        self.assertEqual(got, big)
        partial = [(size, n) for size, n in first_sends if size == len(big)]
        self.assertEqual(len(partial), 1, "one direct send of the answer")
        self.assertTrue(0 < partial[0][1] < len(big), partial)
        self.assertNotEqual(self.own_writers(), [], "Twisted sent the rest when the socket could take it")
