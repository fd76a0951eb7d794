"""
Smoke tests for tests/support/prosody.py: a real Prosody starts from the
generated configuration, accepts components, registers users, and resolves
a remote domain through our test DNS server.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import time

import pytest
from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from tests.support.component_client import connect_component
from tests.support.federation import start_dns
from tests.support.prosody import KEEP_ENV, ProsodyError, ProsodyServer, prosody_available

if not prosody_available():
    pytest.skip(
        "prosody is not installed (scripts/bootstrap --test installs it)",
        allow_module_level=True,
    )

WAIT = 15.0


class _RecordingPeer(protocol.Protocol):
    """
    Plays a remote XMPP server just far enough: records what Prosody sends,
    answers its stream header with ours and empty features.
    """

    def connectionMade(self) -> None:
        self.data = b""
        self.answered = False
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.factory.peers.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.answered and re.search(rb"<stream:stream[^>]*>", self.data):
            self.answered = True
            self.transport.write(
                b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                b"xmlns:stream='http://etherx.jabber.org/streams' "
                b"xmlns:db='jabber:server:dialback' from='gw.example' "
                b"to='svc.prosody.example' id='peer-1' version='1.0'>"
                b"<stream:features/>"
            )
        if b"</stream:stream>" in self.data:
            self.transport.loseConnection()
        self.factory.changed()

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


class _RecordingFactory(protocol.Factory):
    protocol = _RecordingPeer

    def __init__(self) -> None:
        self.peers: list[_RecordingPeer] = []
        self._waiters: list[tuple[bytes, defer.Deferred[bytes]]] = []

    def wait_for(self, pattern: bytes, timeout: float) -> defer.Deferred[bytes]:
        """
        Fires with everything the first peer sent, once it matches pattern.
        """
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiters.append((pattern, d))
        self.changed()
        return d.addTimeout(timeout, reactor)

    def changed(self) -> None:
        data = self.peers[0].data if self.peers else b""
        for pattern, d in list(self._waiters):
            if d.called:
                self._waiters.remove((pattern, d))
            elif re.search(pattern, data):
                self._waiters.remove((pattern, d))
                d.callback(data)

    def close_all(self) -> defer.Deferred:
        waits = []
        for peer in self.peers:
            if not peer.lost.called:
                peer.transport.abortConnection()
                waits.append(peer.lost)
        return defer.gatherResults(waits)


class ProsodyComponentTests(unittest.TestCase):
    timeout = 60

    def start_prosody(self, **kwargs) -> ProsodyServer:
        prosody = ProsodyServer("prosody.example", **kwargs)
        self.addCleanup(prosody.cleanup)
        try:
            prosody.start()
        except ProsodyError as e:
            self.fail(str(e))
        return prosody

    @defer.inlineCallbacks
    def connect(self, prosody: ProsodyServer, domain: str, secret: str):
        client = yield connect_component(
            reactor, "127.0.0.1", prosody.component_port, domain, secret, timeout=WAIT
        )
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def test_two_components_exchange_a_message(self):
        """
        Two XEP-0114 components handshake with Prosody, and a message from
        one reaches the other through it.
        """
        prosody = self.start_prosody(
            components={"a.prosody.example": "secret-a", "b.prosody.example": "secret-b"}
        )
        a = yield self.connect(prosody, "a.prosody.example", "secret-a")
        b = yield self.connect(prosody, "b.prosody.example", "secret-b")

        a.send(
            "<message from='alice@a.prosody.example' to='bob@b.prosody.example' "
            "id='m1' type='chat'><body>hello through prosody</body></message>"
        )
        try:
            element = yield b.next_element(WAIT)
        except defer.TimeoutError:
            self.fail("no message reached b\n" + prosody.log_tail())
        self.assertEqual(element.name, "message")
        self.assertEqual(element["from"], "alice@a.prosody.example")
        self.assertEqual(element["to"], "bob@b.prosody.example")
        self.assertEqual(element.getAttribute("id"), "m1")
        self.assertEqual(str(element.body), "hello through prosody")

    @defer.inlineCallbacks
    def test_wrong_secret_is_refused(self):
        """
        Prosody closes the stream on a bad handshake, and connect_component
        fails with ConnectionError at once, not with a timeout.
        """
        prosody = self.start_prosody(components={"a.prosody.example": "secret-a"})
        started = time.monotonic()
        with self.assertRaises(ConnectionError):
            yield connect_component(
                reactor, "127.0.0.1", prosody.component_port,
                "a.prosody.example", "not-the-secret", timeout=WAIT,
            )
        self.assertLess(time.monotonic() - started, WAIT / 2)

    @defer.inlineCallbacks
    def test_remote_domain_resolved_through_test_dns(self):
        """
        Prosody resolves gw.example with the SRV and A records of our DNS
        server, connects to the port they name and opens a jabber:server
        stream with dialback to gw.example.
        """
        peer = _RecordingFactory()
        listening = reactor.listenTCP(0, peer, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.addCleanup(peer.close_all)

        dns_server, dns_port = start_dns(self)
        dns_server.add_srv(
            "_xmpp-server._tcp.gw.example", 0, 0, listening.getHost().port, "xmpp.gw.example"
        )
        dns_server.add_a("xmpp.gw.example", "127.0.0.1")

        prosody = self.start_prosody(
            components={"svc.prosody.example": "secret"}, dns_port=dns_port
        )
        svc = yield self.connect(prosody, "svc.prosody.example", "secret")
        svc.send(
            "<message from='bot@svc.prosody.example' to='someone@gw.example' "
            "id='out1'><body>to the gateway</body></message>"
        )
        try:
            header = yield peer.wait_for(rb"<stream:stream[^>]*>", WAIT)
        except defer.TimeoutError:
            self.fail(
                f"prosody never connected; DNS queries {dns_server.queries}\n"
                + prosody.log_tail()
            )
        opening = re.search(rb"<stream:stream[^>]*>", header).group(0).decode()
        self.assertRegex(opening, r"""\bxmlns=['"]jabber:server['"]""")
        self.assertRegex(opening, r"""\bto=['"]gw\.example['"]""")
        self.assertRegex(opening, r"""\bfrom=['"]svc\.prosody\.example['"]""")
        self.assertRegex(opening, r"""\bxmlns:db=['"]jabber:server:dialback['"]""")
        self.assertIn(("_xmpp-server._tcp.gw.example", "SRV"), dns_server.queries)
        self.assertIn(("xmpp.gw.example", "A"), dns_server.queries)
        self.assertNotIn("Using legacy DNS API", prosody.log_text())

        # Without TLS on offer, Prosody goes straight to dialback.
        try:
            sent = yield peer.wait_for(rb"<db:result[^>]*>[^<]+</db:result>", WAIT)
        except defer.TimeoutError:
            self.fail("no dialback request\n" + prosody.log_tail())
        result = re.search(rb"<db:result[^>]*>", sent).group(0).decode()
        self.assertRegex(result, r"""\bto=['"]gw\.example['"]""")
        self.assertRegex(result, r"""\bfrom=['"]svc\.prosody\.example['"]""")

    @defer.inlineCallbacks
    def test_without_dns_remote_domains_bounce_at_once(self):
        """
        With no dns_port libunbound refuses every name locally, so a stanza
        to a remote domain bounces quickly and no query leaves the machine.
        """
        prosody = self.start_prosody(components={"svc.prosody.example": "secret"})
        svc = yield self.connect(prosody, "svc.prosody.example", "secret")
        started = time.monotonic()
        svc.send(
            "<message from='bot@svc.prosody.example' to='someone@nowhere.example' "
            "id='lost1'><body>nobody home</body></message>"
        )
        try:
            bounce = yield svc.next_element(WAIT)
        except defer.TimeoutError:
            self.fail("no bounce\n" + prosody.log_tail())
        self.assertEqual(bounce.getAttribute("type"), "error")
        self.assertEqual(bounce.getAttribute("id"), "lost1")
        self.assertEqual(bounce.getAttribute("from"), "someone@nowhere.example")
        self.assertIn("remote-server-not-found", bounce.toXml())
        self.assertLess(time.monotonic() - started, 5)
        self.assertIn("Refused in A lookup", prosody.log_text())


def _recv_until(sock: socket.socket, pattern: bytes, deadline: float) -> bytes:
    data = b""
    while not re.search(pattern, data):
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _c2s_login(port: int, user: str, password: str) -> bytes:
    """
    Log in over plaintext c2s with SASL PLAIN; returns Prosody's answer.
    """
    deadline = time.monotonic() + WAIT
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(
            b"<?xml version='1.0'?><stream:stream to='prosody.example' "
            b"xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
            b"version='1.0'>"
        )
        features = _recv_until(sock, rb"</stream:features>", deadline)
        assert b"PLAIN" in features, features
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
        sock.sendall(
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
            + token + b"</auth>"
        )
        return _recv_until(sock, rb"<(success|failure)\b", deadline)


def test_registered_user_logs_in():
    """
    add_user works before and after start, and the account logs in on c2s.
    """
    with ProsodyServer("prosody.example") as prosody:
        assert prosody.add_user("alice", "wonderland") == "alice@prosody.example"
        assert b"<success" in _c2s_login(prosody.c2s_port, "alice", "wonderland"), prosody.log_tail()
        assert b"<failure" in _c2s_login(prosody.c2s_port, "alice", "wrong")
    prosody = ProsodyServer("prosody.example")
    try:
        prosody.add_user("bob", "builder")
        prosody.start()
        assert b"<success" in _c2s_login(prosody.c2s_port, "bob", "builder"), prosody.log_tail()
    finally:
        prosody.cleanup()


def test_listens_on_loopback_only_and_stops():
    prosody = ProsodyServer("prosody.example")
    try:
        prosody.start()
        pid = prosody.pid
        assert prosody.running
        config = prosody.config_path.read_text()
        assert "run_as_root = true" in config
        assert '"dialback"' in config
        assert "/etc/" not in config and "/var/" not in config
        assert "Activated service 's2s' on [127.0.0.1]:%d" % prosody.s2s_port in prosody.log_text()
        for line in prosody.log_text().splitlines():
            if "Activated service" in line:
                assert "[127.0.0.1]" in line or "on no ports" in line, line
        prosody.stop()
        assert not prosody.running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        prosody.cleanup()
    if not os.environ.get(KEEP_ENV):
        assert not prosody.workdir.exists()


def test_start_failure_reports_log_tail():
    prosody = ProsodyServer("prosody.example", extra_config="this is not lua (")
    try:
        with pytest.raises(ProsodyError) as caught:
            prosody.start()
        assert str(prosody.config_path) in str(caught.value)
        assert not prosody.running
    finally:
        prosody.cleanup()


def test_port_in_use_is_reported():
    """
    Another process on the s2s port is not taken for Prosody.
    """
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        prosody = ProsodyServer("prosody.example", s2s_port=busy.getsockname()[1])
        try:
            with pytest.raises(ProsodyError, match="could not listen"):
                prosody.start()
            assert not prosody.running
        finally:
            prosody.cleanup()
