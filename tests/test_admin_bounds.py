"""Bounds on admin API clients (fedgate.admin.channel): the token and the
body's length are checked before the body is read, bodies never reach a
temporary file, headers and bodies have fixed deadlines, and connections
are capped.  In memory with a Clock, then over real loopback sockets
against a real gateway, with blocking clients in a thread so that they can
stream lazily and watch for the answer while the reactor serves."""

from __future__ import annotations

import itertools
import os
import select
import socket
import tempfile
import time

from twisted.internet import defer, reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from fedgate.admin.auth import BearerCheck
from fedgate.admin.channel import AdminSite
from fedgate.admin.web import AdminResource, Route
from fedgate.config import AdminConfig
from tests.support.admin import token_of
from tests.support.dnsserver import TestDNSServer
from tests.support.gateway import gateway_config, start_gateway, temp_dir

MiB = 1024 * 1024
TOKEN = "t0ken-long-enough-for-the-check"
CHUNK = b"x" * 65536


# -- in memory -----------------------------------------------------------------

class ChannelInMemoryTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.handled = []
        routes = [Route("GET", "/api/v1/status", lambda r: {"ok": True}),
                  Route("PUT", "/api/v1/thing", lambda r: self.handled.append(r.body) or {"ok": True},
                        body="required")]
        config = AdminConfig(max_connections=2, header_timeout=10.0, body_timeout=30.0)
        check = BearerCheck(TOKEN)
        self.site = AdminSite(AdminResource(routes, check, max_body=config.max_body_bytes), check,
                              config, self.clock)

    def connect(self):
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        channel.makeConnection(transport)
        return channel, transport

    def test_a_request_with_the_token_is_served(self):
        channel, transport = self.connect()
        channel.dataReceived(b"PUT /api/v1/thing HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                             + TOKEN.encode() + b"\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 11\r\n\r\n{\"a\": [1]}\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value())
        self.assertEqual(self.handled, [{"a": [1]}])
        self.assertIsInstance(channel.requests, list)

    def test_no_token_is_refused_before_the_body(self):
        channel, transport = self.connect()
        channel.dataReceived(b"PUT /api/v1/thing HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 268435456\r\n\r\n" + CHUNK)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 401 "), transport.value())
        self.assertIn(b'WWW-Authenticate: Bearer realm="fedgate"', transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(channel.requests[-1].content)  # no body store was even made
        before = len(transport.value())
        channel.dataReceived(CHUNK)
        self.assertEqual(len(transport.value()), before)
        self.assertEqual(self.handled, [])
        self.assertEqual(self.site.refused_requests, {401: 1})

    def test_content_length_over_the_bound_is_refused_before_the_body(self):
        channel, transport = self.connect()
        channel.dataReceived(b"PUT /api/v1/thing HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                             + TOKEN.encode() + b"\r\nContent-Length: %d\r\n\r\n" % (MiB + 1))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "), transport.value())
        self.assertTrue(transport.disconnecting)

    def test_chunked_body_is_cut_once_its_total_passes_the_bound(self):
        channel, transport = self.connect()
        channel.dataReceived(b"PUT /api/v1/thing HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                             + TOKEN.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % len(CHUNK) + CHUNK + b"\r\n"
        for _ in range(16):  # exactly 1 MiB: still accepted
            channel.dataReceived(chunk)
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(chunk)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "), transport.value())
        channel.dataReceived(b"0\r\n\r\n")
        self.assertEqual(self.handled, [])

    def test_headers_have_a_deadline_that_bytes_do_not_extend(self):
        channel, transport = self.connect()
        for byte in b"GET /api/v1/status HTTP/1.1\r\nX-Pad: " + b"a" * 30:
            channel.dataReceived(bytes([byte]))
            self.clock.advance(0.3)  # 38 bytes x 0.3 s: past 10 s
            if transport.value():
                break
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "), transport.value())
        self.assertAlmostEqual(self.clock.seconds(), 10.2, delta=0.31)
        self.assertTrue(transport.disconnecting)

    def test_the_body_has_a_deadline_from_the_end_of_the_headers(self):
        channel, transport = self.connect()
        channel.dataReceived(b"PUT /api/v1/thing HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                             + TOKEN.encode() + b"\r\nContent-Length: 100\r\n\r\n")
        for _ in range(29):
            channel.dataReceived(b" ")
            self.clock.advance(1)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "), transport.value())

    def test_the_next_request_on_a_kept_connection_gets_its_own_header_deadline(self):
        channel, transport = self.connect()
        self.clock.advance(9)
        channel.dataReceived(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                             + TOKEN.encode() + b"\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        transport.clear()
        self.clock.advance(9.9)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.2)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "), transport.value())

    def test_connections_past_the_cap_get_503_and_hold_nothing(self):
        first, _ = self.connect()
        second, _ = self.connect()
        self.assertEqual(self.site.open_connections, 2)
        busy, transport = self.connect()
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 503 "), transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.site.refused_connections, 1)
        self.assertEqual(self.site.open_connections, 2)
        first.connectionLost(None)
        third, transport = self.connect()
        self.assertEqual(transport.value(), b"")  # taken, not refused
        self.assertEqual(self.site.open_connections, 2)


# -- over loopback -------------------------------------------------------------

def _temp_files(directory: str) -> list[str]:
    """This process's open files inside ``directory`` (unnamed ones too:
    /proc shows an O_TMPFILE as 'directory/#inode (deleted)')."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(directory + "/"):
            found.append(target)
    return found


def _read_answer(sock: socket.socket, wait: float) -> bytes:
    """Whatever arrives until the server closes, ``wait`` seconds at most."""
    data = b""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def stream_body(port: int, head: bytes, chunks, *, stop_after: int, temp_dir_: str,
                finish: bytes = b"", wait: float = 3.0) -> dict:
    """Send ``head``, then ``chunks`` one by one (lazily) for as long as no
    answer is readable and less than ``stop_after`` bytes went out; then
    ``finish`` if nothing came back yet, and read the answer.  Runs in a
    thread with a blocking socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sent, send_error, answered_early, temp_files = 0, None, False, []
    try:
        sock.sendall(head)
        for n, chunk in enumerate(chunks):
            if select.select([sock], [], [], 0)[0]:
                answered_early = True
                break
            if sent >= stop_after:
                break
            try:
                sock.sendall(chunk)
            except OSError as exc:  # the server closed: EPIPE or ECONNRESET
                send_error = exc.__class__.__name__
                break
            sent += len(chunk)
            if n % 8 == 0:
                temp_files += [f for f in _temp_files(temp_dir_) if f not in temp_files]
        else:
            answered_early = bool(select.select([sock], [], [], 0)[0])
        if not answered_early and send_error is None and finish:
            sock.sendall(finish)
        answer = _read_answer(sock, wait)
    finally:
        sock.close()
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    return {"sent": sent, "status": status, "answer": answer, "answered_early": answered_early,
            "send_error": send_error, "temp_files": temp_files}


def drip(port: int, data: bytes, interval: float, limit: float) -> dict:
    """Send ``data`` a byte every ``interval`` seconds until the server
    closes or ``limit`` seconds pass; when (after connect) it closed, and
    what it said."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    started = time.monotonic()
    answer, closed_after = b"", None
    try:
        for byte in itertools.cycle(data):
            if time.monotonic() - started > limit:
                break
            try:
                sock.send(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - started
                break
            ready, _, _ = select.select([sock], [], [], interval)
            if ready:
                answer += _read_answer(sock, 2.0)
                closed_after = time.monotonic() - started
                break
    finally:
        sock.close()
    return {"answer": answer, "closed_after": closed_after}


def plain_request(port: int, token: str, target: str = "/api/v1/status") -> int:
    """One ordinary request on its own connection; its status."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     f"Authorization: Bearer {token}\r\n\r\n".encode())
        answer = _read_answer(sock, 5.0)
    return int(answer.split(b" ", 2)[1])


class AdminBoundsCase(unittest.TestCase):
    timeout = 60
    admin: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.dns = TestDNSServer(reactor)
        dns_port = self.dns.start()
        self.addCleanup(self.dns.stop)
        config = gateway_config(temp_dir(self), ["a.example"], {})
        config["admin"].update(self.admin)
        self.gw = yield start_gateway(reactor, config, dns_port, self)
        self.port = self.gw.admin.port()
        self.site = self.gw.admin.ports[0].factory
        self.token = token_of(self.gw)
        # Where a spooled body would go: twisted.web's temporary files.
        self.spool = temp_dir(self)
        saved, tempfile.tempdir = tempfile.tempdir, self.spool
        self.addCleanup(setattr, tempfile, "tempdir", saved)

    def control(self):
        return threads.deferToThread(plain_request, self.port, self.token)

    def head(self, extra: str, token: bool) -> bytes:
        auth = f"Authorization: Bearer {self.token}\r\n" if token else ""
        return (f"PUT /api/v1/peers/big.example HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
                f"Content-Type: application/json\r\n{extra}\r\n").encode()


class AdminBodyTests(AdminBoundsCase):
    @defer.inlineCallbacks
    def test_256_mib_without_token_is_refused_before_the_body(self):
        before = self.site.bytes_received
        got = yield threads.deferToThread(
            stream_body, self.port, self.head(f"Content-Length: {256 * MiB}\r\n", token=False),
            itertools.repeat(CHUNK, 256 * MiB // len(CHUNK)), stop_after=32 * MiB,
            temp_dir_=self.spool)
        # The answer came while the body was still going out (or the
        # server's close cut the send), long before 256 MiB.
        self.assertTrue(got["answered_early"] or got["send_error"], got)
        self.assertLess(got["sent"], 8 * MiB, got)
        if got["status"] is not None:
            self.assertEqual(got["status"], 401, got["answer"][:200])
        self.assertEqual(got["temp_files"], [])
        self.assertEqual(os.listdir(self.spool), [])
        read = self.site.bytes_received - before
        self.assertLess(read, 128 * 1024, f"the server read {read} bytes")
        self.assertEqual(self.site.refused_requests.get(401), 1)
        self.assertEqual((yield self.control()), 200)
        self.measured("256 MiB without token", got, read)

    @defer.inlineCallbacks
    def test_content_length_over_1_mib_is_refused_before_any_body(self):
        got = yield threads.deferToThread(
            stream_body, self.port, self.head(f"Content-Length: {MiB + 1}\r\n", token=True),
            [], stop_after=0, temp_dir_=self.spool, wait=3.0)
        self.assertEqual(got["sent"], 0)
        self.assertEqual(got["status"], 413, got["answer"][:200])
        self.assertIn(b"Connection: close", got["answer"])
        self.assertEqual((yield self.control()), 200)

    @defer.inlineCallbacks
    def test_chunked_body_over_1_mib_is_refused_as_it_passes(self):
        before = self.site.bytes_received
        chunk = b"%x\r\n" % len(CHUNK) + CHUNK + b"\r\n"
        got = yield threads.deferToThread(
            stream_body, self.port, self.head("Transfer-Encoding: chunked\r\n", token=True),
            itertools.repeat(chunk, 256), stop_after=16 * MiB, temp_dir_=self.spool,
            finish=b"0\r\n\r\n")
        self.assertTrue(got["answered_early"] or got["send_error"], got)
        if got["status"] is not None:
            self.assertEqual(got["status"], 413, got["answer"][:200])
        self.assertEqual(got["temp_files"], [])
        read = self.site.bytes_received - before
        self.assertLess(read, MiB + 256 * 1024, f"the server read {read} bytes")
        self.assertEqual(self.site.refused_requests.get(413), 1)
        self.assertEqual((yield self.control()), 200)
        self.measured("chunked past 1 MiB", got, read)

    @defer.inlineCallbacks
    def test_a_body_under_the_bound_is_served_from_memory(self):
        # Over twisted.web's 100 KB mark for a temporary file: JSON padded with spaces.
        body = b'{"note": "big but fine"}' + b" " * 200_000
        head = self.head(f"Content-Length: {len(body)}\r\n", token=True)

        def send_in_two():
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                sock.sendall(head + body[:150_000])
                time.sleep(0.3)  # the server holds part of the body now
                spooled = _temp_files(self.spool)
                sock.sendall(body[150_000:])
                return _read_answer(sock, 5.0), spooled

        answer, spooled = yield threads.deferToThread(send_in_two)
        self.assertEqual(spooled, [])
        self.assertTrue(answer.startswith(b"HTTP/1.1 201 "), answer[:300])
        self.assertEqual(self.gw.policy.peers["big.example"].note, "big but fine")

    def measured(self, what: str, got: dict, read: int) -> None:
        print(f"\n{what}: client sent {got['sent']} body bytes before the answer "
              f"({got['sent'] / (256 * MiB):.4f} of 256 MiB), server read {read} bytes, "
              f"status {got['status']}, send error {got['send_error']}")


class AdminDeadlineTests(AdminBoundsCase):
    admin = {"header_timeout": 1.0, "body_timeout": 1.5}

    @defer.inlineCallbacks
    def test_slow_headers_are_cut_at_the_header_deadline(self):
        dripping = threads.deferToThread(
            drip, self.port, b"GET /api/v1/status HTTP/1.1\r\nX-Pad: " + b"a" * 200, 0.2, 6.0)
        # Others are served meanwhile.
        self.assertEqual((yield self.control()), 200)
        got = yield dripping
        self.assertIsNotNone(got["closed_after"], "still open after 6 s")
        self.assertTrue(0.8 <= got["closed_after"] <= 2.5, got)
        self.assertTrue(got["answer"].startswith(b"HTTP/1.1 408 "), got["answer"][:200])

    @defer.inlineCallbacks
    def test_a_slow_body_is_cut_at_the_body_deadline(self):
        head = self.head("Content-Length: 400\r\n", token=True)

        def slow_body():
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            try:
                sock.sendall(head)
                headers_sent = time.monotonic()
                for _ in range(40):  # a byte each 0.15 s: 6 s, never the whole body
                    try:
                        sock.send(b" ")
                    except OSError:
                        break
                    if select.select([sock], [], [], 0.15)[0]:
                        break
                answer = _read_answer(sock, 2.0)
                return answer, time.monotonic() - headers_sent
            finally:
                sock.close()

        sending = threads.deferToThread(slow_body)
        self.assertEqual((yield self.control()), 200)
        answer, after = yield sending
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer[:200])
        self.assertTrue(1.3 <= after <= 3.0, after)

    @defer.inlineCallbacks
    def test_an_idle_connection_is_closed_at_the_header_deadline(self):
        def idle():
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            started = time.monotonic()
            try:
                answer = _read_answer(sock, 5.0)
                return answer, time.monotonic() - started
            finally:
                sock.close()

        answer, after = yield threads.deferToThread(idle)
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer[:200])
        self.assertTrue(0.8 <= after <= 2.5, after)


class AdminConnectionCapTests(AdminBoundsCase):
    admin = {"max_connections": 3}

    @defer.inlineCallbacks
    def test_one_connection_past_the_cap_is_refused(self):
        held = [socket.create_connection(("127.0.0.1", self.port), timeout=10) for _ in range(3)]
        yield task.deferLater(reactor, 0.3, lambda: None)  # all three accepted

        def extra():
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                started = time.monotonic()
                answer = _read_answer(sock, 3.0)
                return answer, time.monotonic() - started
        try:
            answer, after = yield threads.deferToThread(extra)
            self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer[:200])
            self.assertLess(after, 1.0)
            self.assertEqual(self.site.refused_connections, 1)
            self.assertEqual(self.site.open_connections, 3)
            held.pop().close()
            yield task.deferLater(reactor, 0.3, lambda: None)
            self.assertEqual(self.site.open_connections, 2)
            self.assertEqual((yield self.control()), 200)
        finally:
            for sock in held:
                sock.close()
