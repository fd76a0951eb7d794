"""What a TLS session's set-up costs fedgate (issue #14), as behaviour:

- the answer to a read on a TLS stream goes to the socket within that read
  (Twisted 22.8+ otherwise holds it for two reactor turns, and the stream's
  immediate send found nothing to send: a zero-byte ``send``);
- the interface declarations Twisted makes on every TLS connection are
  built once per process, not again for every connection;
- a certificate's identity answer (the name matching) is kept across
  connections, bounded, and never stands in for the chain check.

Over real loopback sockets where the transport matters; no figures (the
benchmark measures those).
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.trial import unittest
from zope.interface.declarations import Provides

from fedgate.stream import namespaces as ns
from fedgate.stream.protocol import XmppStream
from fedgate.tls import contexts as contexts_module
from fedgate.tls.certs import CertificateStore
from fedgate.tls.contexts import IDENTITY_CACHE, TLSContexts, TLSInfo, TLSSettings, names_domain
from tests.support.pki import TestCA
from tests.support.s2speer import wait_until

CA = TestCA("handshake cost")
HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server'"
          b" xmlns:stream='http://etherx.jabber.org/streams' to='gw.example' from='r.example' version='1.0'>")


def _info(issued, errors=()) -> TLSInfo:
    return TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", issued.cert, tuple(errors))


class IdentityAnswersAcrossConnections(unittest.SynchronousTestCase):
    def setUp(self):
        contexts_module._identities.clear()
        self.addCleanup(contexts_module._identities.clear)

    def test_a_second_connection_with_the_same_certificate_reuses_the_answer(self):
        issued = CA.issue(dns=("r.example",))
        self.assertTrue(_info(issued).valid_for("r.example"))
        self.assertEqual(len(contexts_module._identities), 1)
        # A new connection: a new TLSInfo and a new certificate object with
        # the same bytes finds the answer kept (nothing added).
        again = _info(issued)
        self.assertTrue(again.valid_for("r.example"))
        self.assertEqual(len(contexts_module._identities), 1)

    def test_answers_belong_to_one_certificate_and_one_domain(self):
        good, other = CA.issue(dns=("r.example",)), CA.issue(dns=("o.example",))
        self.assertTrue(_info(good).valid_for("r.example"))
        self.assertFalse(_info(other).valid_for("r.example"))
        self.assertFalse(_info(good).valid_for("o.example"))
        self.assertTrue(_info(other).valid_for("o.example"))

    def test_a_kept_answer_never_replaces_the_chain_check(self):
        issued = CA.issue(dns=("r.example",))
        self.assertTrue(_info(issued).valid_for("r.example"))
        self.assertFalse(_info(issued, [(0, 20, "unable to get local issuer certificate")]).valid_for("r.example"))
        self.assertFalse(TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", None).valid_for("r.example"))

    def test_bounded_and_right_past_the_bound(self):
        wild = CA.issue(dns=("*.w.example",))
        kept = CA.issue(dns=("k.example",))
        self.assertTrue(names_domain(kept.cert, "k.example"))
        for n in range(IDENTITY_CACHE + 50):
            self.assertTrue(names_domain(wild.cert, f"d{n}.w.example"))
            self.assertFalse(names_domain(wild.cert, f"d{n}.elsewhere.example"))
            if n % 16 == 0:
                names_domain(kept.cert, "k.example")  # recently used: stays
            self.assertLessEqual(len(contexts_module._identities), IDENTITY_CACHE)
        self.assertEqual(len(contexts_module._identities), IDENTITY_CACHE)
        keys = [domain for _, domain in contexts_module._identities]
        self.assertIn("k.example", keys)
        self.assertNotIn("d0.w.example", keys)  # the oldest went first
        self.assertTrue(names_domain(wild.cert, "d0.w.example"))  # and is answered again, rightly

    def test_no_domain_past_1023_bytes_is_kept(self):
        issued = CA.issue(dns=("r.example",))
        self.assertFalse(names_domain(issued.cert, "a" * 2000))
        self.assertEqual(len(contexts_module._identities), 0)


class _Handler:
    """A stream role that answers a header with features, and <starttls/>
    with <proceed/> and TLS (as the inbound S2S role does)."""

    def __init__(self, creator):
        self.creator = creator
        self.io = None
        self.headers = 0
        self.tls = None
        self.tls_protocol = None

    def connected(self, io):
        self.io = io

    def header_received(self, header):
        self.headers += 1
        self.io.open_stream({"id": f"sid-{self.headers}", "from": "gw.example", "version": "1.0"},
                            f"<stream:features><starttls xmlns='{ns.TLS}'/></stream:features>"
                            if self.headers == 1 else "<stream:features/>")

    def element_received(self, element):
        self.io.write(f"<proceed xmlns='{ns.TLS}'/>")
        self.io.start_tls(self.creator)
        self.io.restart()

    def reject_stanza(self, stanza, failure):
        pass

    def error_header(self):
        return {"id": "err", "from": "gw.example", "version": "1.0"}

    def tls_established(self, info):
        self.tls = info
        self.tls_protocol = self.io.transport.protocol  # the TLS protocol under the stream

    def disconnected(self, reason):
        pass


class _Server(protocol.Factory):
    noisy = False

    def __init__(self, contexts):
        self.contexts = contexts
        self.streams = []
        self.sends = []  # (bytes handed to send(), while the stream handled a read)

    def buildProtocol(self, addr):
        stream = XmppStream(_Handler(self.contexts.server_creator("gw.example")), reactor)
        self.streams.append(stream)
        made, received = stream.makeConnection, stream.dataReceived
        reading = []

        def data_received(data):
            reading.append(True)
            try:
                received(data)
            finally:
                reading.pop()
        stream.dataReceived = data_received

        def make_connection(transport):
            write_some = transport.writeSomeData

            def recording(data):
                self.sends.append((len(data), bool(reading)))
                return write_some(data)
            transport.writeSomeData = recording
            made(transport)
        stream.makeConnection = make_connection
        return stream


class _Client(protocol.Protocol):
    """Header, <starttls/>, TLS, a new header; done once its answer came."""

    def __init__(self, options):
        self.options = options
        self.data = b""
        self.secured = False
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(HEADER)

    def dataReceived(self, data):
        self.data += data
        if not self.secured and b"<starttls" in self.data:
            self.data = b""
            self.transport.write(f"<starttls xmlns='{ns.TLS}'/>".encode())
            self.secured = None
        elif self.secured is None and b"<proceed" in self.data:
            self.data = b""
            self.secured = True
            self.transport.startTLS(self.options)
            self.transport.write(HEADER)
        elif self.secured and b"<stream:features" in self.data and not self.done.called:
            self.done.callback(self.data)


class TLSWritePathE2E(unittest.TestCase):
    """Over real loopback sockets, with the Twisted in use."""

    def setUp(self):
        directory = Path(tempfile.mkdtemp(prefix="fedgate-test-"))
        CA.issue(dns=("gw.example",)).write(directory / "certs", "gw.example")
        root = CA.write_root(directory / "ca.pem")
        self.contexts = TLSContexts(CertificateStore(str(directory / "certs")),
                                    TLSSettings(trust_roots=str(root)))
        self.options = ssl.optionsForClientTLS("gw.example", trustRoot=ssl.Certificate.loadPEM(CA.root_pem()))

    @defer.inlineCallbacks
    def _session(self, server):
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server)
        self.addCleanup(port.stopListening)
        client = _Client(self.options)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)
        try:
            answer = yield client.done
        finally:
            client.transport.abortConnection()
        yield wait_until(lambda: all(s.closed for s in server.streams), "the server's side to close")
        return answer

    @defer.inlineCallbacks
    def test_the_answer_to_a_read_leaves_within_the_read(self):
        server = _Server(self.contexts)
        answer = yield self._session(server)
        self.assertIn(b"id='sid-2'", answer)
        self.assertIsNotNone(server.streams[0].handler.tls)
        # Every send carried bytes (an immediate send of a TLS stream found
        # nothing when Twisted still held the answer), and each handshake
        # step's answer was sent while its read was handled: the first
        # header's, <proceed/>, and the header after TLS (the TLS server
        # flight goes from Twisted's own code, outside our read).
        self.assertNotIn(0, [size for size, _ in server.sends], server.sends)
        within_read = [size for size, parsing in server.sends if parsing and size]
        self.assertGreaterEqual(len(within_read), 3, server.sends)

    @defer.inlineCallbacks
    def test_tls_connections_share_their_interface_declarations(self):
        server = _Server(self.contexts)
        yield self._session(server)
        first = server.streams[0].handler.tls_protocol
        cls = type(first)
        provided, specs = contexts_module._DECLARATIONS[(cls, type(server.streams[0].transport))]
        self.assertTrue(specs)
        del first
        server.streams.clear()
        gc.collect()
        # A later connection's declarations are the very ones kept, not new
        # ones (zope.interface would otherwise have dropped them by now).
        yield self._session(server)
        second = server.streams[0].handler.tls_protocol
        self.assertIn(second.__provides__, specs)
        for interface, spec in zip(provided, specs):
            self.assertIs(Provides(cls, interface), spec)
        self.assertLessEqual(len(contexts_module._DECLARATIONS), contexts_module._DECLARATIONS_MAX)


def _handshake(server_connection, client_context) -> SSL.Connection:
    """A TLS handshake over memory BIOs; the client's connection."""
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    server_connection.set_accept_state()
    for _ in range(10):
        for side, other in ((client, server_connection), (server_connection, client)):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                other.bio_write(side.bio_read(65536))
            except SSL.WantReadError:
                pass
        if client.get_peer_certificate() is not None and server_connection.get_cipher_name():
            try:
                client.do_handshake()
                server_connection.do_handshake()
                return client
            except SSL.WantReadError:
                continue
    raise AssertionError("no handshake")


class ContextsBuiltOnce(unittest.SynchronousTestCase):
    """Each hosted domain's context is built once and shared by every
    connection; new certificates (a reload) take effect for the next one."""

    def test_connections_share_the_context_and_a_reload_takes_effect(self):
        directory = Path(tempfile.mkdtemp(prefix="fedgate-test-"))
        first = CA.issue(dns=("gw.example",))
        first.write(directory / "one", "gw.example")
        contexts = TLSContexts(CertificateStore(str(directory / "one")), TLSSettings())
        creator = contexts.server_creator("gw.example")
        a, b = creator.serverConnectionForTLS(None), creator.serverConnectionForTLS(None)
        self.assertIs(a.get_context(), b.get_context())
        client_context = SSL.Context(SSL.TLS_METHOD)
        seen = _handshake(b, client_context).get_peer_certificate().to_cryptography()
        self.assertEqual(seen, first.cert)

        second = CA.issue(dns=("gw.example",))
        second.write(directory / "two", "gw.example")
        contexts.replace_store(CertificateStore(str(directory / "two")))
        c, d = creator.serverConnectionForTLS(None), creator.serverConnectionForTLS(None)
        self.assertIsNot(c.get_context(), a.get_context())
        self.assertIs(c.get_context(), d.get_context())
        seen = _handshake(d, client_context).get_peer_certificate().to_cryptography()
        self.assertEqual(seen, second.cert)
        # Every connection still gets its own record of the verification.
        self.assertIsNot(c.fedgate_verify, d.fedgate_verify)


class KeptDeclarationsBound(unittest.SynchronousTestCase):
    def test_at_most_a_few_class_pairs_are_kept(self):
        saved = dict(contexts_module._DECLARATIONS)
        self.addCleanup(lambda: (contexts_module._DECLARATIONS.clear(),
                                 contexts_module._DECLARATIONS.update(saved)))
        contexts_module._DECLARATIONS.clear()
        for n in range(contexts_module._DECLARATIONS_MAX + 5):
            transport = type(f"Transport{n}", (protocol.Protocol,), {})()
            wrapped = protocol.Protocol()
            wrapped.transport = transport
            tls = type(f"TLS{n}", (protocol.Protocol,), {})()
            tls.wrappedProtocol = wrapped
            contexts_module.keep_declarations(tls)
        self.assertEqual(len(contexts_module._DECLARATIONS), contexts_module._DECLARATIONS_MAX)
        # No transport yet (a protocol not connected): nothing kept, nothing broken.
        contexts_module._DECLARATIONS.clear()
        contexts_module.keep_declarations(protocol.Protocol())
        self.assertEqual(contexts_module._DECLARATIONS, {})
