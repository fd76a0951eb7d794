"""Over a real loopback TCP connection, the answer to a read goes to the
socket directly when Twisted holds nothing for it: no registering the
socket for writing (an epoll_ctl) and unregistering it (another) around a
send the kernel takes whole.  What the kernel does not take is handed to
Twisted and arrives complete and in order."""

from __future__ import annotations

import socket

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import serverFromString
from twisted.trial import unittest

from fedgate.stream.protocol import XmppStream
from tests.test_protocol import HEADER, FakeHandler


class Served:
    def __init__(self, case, handler, endpoint: str = "tcp:0:interface=127.0.0.1"):
        self.streams = []

        def build(addr):
            stream = XmppStream(handler, reactor)
            self.streams.append(stream)
            return stream
        factory = protocol.Factory()
        factory.buildProtocol = build
        self.factory = factory
        self.endpoint = endpoint

    @defer.inlineCallbacks
    def listen(self, case):
        self.port = yield serverFromString(reactor, self.endpoint).listen(self.factory)
        case.addCleanup(self.port.stopListening)


class DirectSendTests(unittest.TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        self.handler = FakeHandler()
        self.served = Served(self, self.handler)
        yield self.served.listen(self)
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
                except ConnectionResetError:  # an abort
                    return got
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
        self.handler.on_element = lambda element: self.handler.io.write(big.decode())
        self.client.sendall(HEADER)
        yield self.receive(b">")
        self.client.sendall(b"<question/>")
        got = yield self.receive(big, seconds=10.0)
        self.assertEqual(got, big)
        partial = [(size, n) for size, n in first_sends if size == len(big)]
        self.assertEqual(len(partial), 1, "one direct send of the answer")
        self.assertTrue(0 < partial[0][1] < len(big), partial)
        self.assertNotEqual(self.own_writers(), [], "Twisted sent the rest when the socket could take it")

    @defer.inlineCallbacks
    def test_nothing_written_after_an_abort_in_the_same_read_reaches_the_peer(self):
        """abortConnection drops what follows it; a direct send must not
        slip it out before the reset."""
        def abort_then_write(element):
            self.handler.io.abort()
            self.handler.io.send("<after-abort/>")
        self.handler.on_element = abort_then_write
        self.client.sendall(HEADER)
        yield self.receive(b">")
        self.client.sendall(b"<question/>")
        got = yield self.receive(b"<after-abort/>", seconds=1.0)
        self.assertNotIn(b"after-abort", got)
        self.assertFalse(self.served.streams[0].transport.connected, "aborted")


class TLSWrappedListenerTests(unittest.TestCase):
    """A listener from an ``ssl:`` endpoint wraps each connection in
    Twisted's TLS protocol, which passes attribute lookups through to the
    TCP connection under it: a direct send there would put plaintext on a
    TLS socket."""

    @defer.inlineCallbacks
    def test_answers_on_a_tls_wrapped_connection_are_encrypted(self):
        import ssl
        import tempfile
        from pathlib import Path

        from tests.support.pki import TestCA
        where = Path(tempfile.mkdtemp(prefix="fedgate-direct-send-"))
        cert, key = TestCA("direct send").issue(dns=("gw.example",)).write(where, "gw.example")
        handler = FakeHandler()
        handler.on_element = lambda element: handler.io.send("<answer/>")
        served = Served(self, handler, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
        yield served.listen(self)
        port = served.port.getHost().port
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.addCleanup(lambda: [s.transport.abortConnection() for s in served.streams
                                 if s.transport is not None and not s.closed])

        def converse():  # a blocking TLS client, off the reactor thread
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw) as tls:
                    tls.sendall(HEADER)
                    got = b""
                    while not got.endswith(b">"):
                        got += tls.recv(65536)
                    tls.sendall(b"<question/>")
                    while not got.endswith(b"<answer/>"):
                        got += tls.recv(65536)
                    return got
        from twisted.internet.threads import deferToThread
        got = yield deferToThread(converse)
        self.assertIn(b"<stream:stream", got)
        self.assertTrue(got.endswith(b"<answer/>"))
