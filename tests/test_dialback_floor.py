"""benchmarks.dialback_floor, the zero-work dialback server that
benchmarks.vs_prosody's ``--server floor`` runs: it must make the same
round trips as a real Receiving Server, or its figure bounds nothing."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString
from twisted.trial import unittest

from benchmarks.dialback_floor import Floor
from benchmarks.xmpp import InboundStream, RemoteServer, connect

REMOTE = "remote.example"


class FloorTests(unittest.TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        self.remote = RemoteServer(REMOTE, "the remote's secret")
        accepted = []
        build = self.remote.buildProtocol
        self.remote.buildProtocol = lambda addr: accepted.append(addr) or build(addr)
        self.accepted = accepted
        remote_port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self.remote)
        self.addCleanup(remote_port.stopListening)
        self.floor = Floor(reactor, remote_port.getHost().port)
        floor_port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self.floor)
        self.addCleanup(floor_port.stopListening)
        self.port = floor_port.getHost().port
        self.addCleanup(self._close_verification)

    def _close_verification(self):
        verification = self.floor.verification
        if verification is not None and verification.transport is not None:
            verification.transport.loseConnection()

    @defer.inlineCallbacks
    def session(self, keys_from: RemoteServer):
        peer = InboundStream(keys_from, "gw.example")
        yield connect(reactor, self.port, peer)
        answer = yield peer.authenticated
        yield peer.close_stream()
        return answer

    @defer.inlineCallbacks
    def test_sessions_are_verified_by_the_authoritative_server_over_one_connection(self):
        answers = []
        for _ in range(3):
            answers.append((yield self.session(self.remote)))
        self.assertEqual(answers, ["valid"] * 3)
        self.assertEqual(self.remote.verifications, {True: 3, False: 0})
        self.assertEqual(len(self.accepted), 1, "one kept verification connection")

    @defer.inlineCallbacks
    def test_a_wrong_key_is_answered_invalid(self):
        impostor = RemoteServer(REMOTE, "not the remote's secret")
        self.assertEqual((yield self.session(impostor)), "invalid")
        self.assertEqual(self.remote.verifications, {True: 0, False: 1})


class FloorTLSTests(FloorTests):
    """The same over STARTTLS, and with SASL EXTERNAL instead of dialback."""

    @defer.inlineCallbacks
    def setUp(self):
        import tempfile
        from pathlib import Path

        from OpenSSL import crypto
        from twisted.internet import ssl

        from benchmarks.dialback_floor import ServerTLS
        from tests.support.pki import TestCA
        yield super().setUp()
        where = Path(tempfile.mkdtemp(prefix="fedgate-floor-"))
        ca = TestCA("floor test")
        cert, key = ca.issue(dns=("gw.example",)).write(where, "gw.example")
        self.floor.tls = ServerTLS(str(cert), str(key), str(ca.write_root(where / "ca.pem")))
        client = ca.issue(dns=(REMOTE,))
        self.plain_tls = ssl.optionsForClientTLS("gw.example", trustRoot=ssl.Certificate.loadPEM(ca.root_pem()))
        self.external_tls = ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(client.key),
            certificate=crypto.X509.from_cryptography(client.cert),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in client.chain])
        self.tls, self.external = self.plain_tls, False

    @defer.inlineCallbacks
    def session(self, keys_from: RemoteServer):
        peer = InboundStream(keys_from, "gw.example", tls=self.tls, external=self.external)
        yield connect(reactor, self.port, peer)
        answer = yield peer.authenticated
        self.assertIsNotNone(peer.transport.getPeerCertificate(), "the stream was secured")
        yield peer.close_stream()
        return answer

    @defer.inlineCallbacks
    def test_sasl_external(self):
        self.tls, self.external = self.external_tls, True
        answers = []
        for _ in range(3):
            answers.append((yield self.session(self.remote)))
        self.assertEqual(answers, ["valid"] * 3)
        self.assertEqual(self.remote.verifications, {True: 0, False: 0}, "no dialback")
