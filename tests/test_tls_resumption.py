"""TLS session resumption never stands in for certificate validation.

The attack: connect once with an untrusted self-signed certificate for a
victim's domain, keep the TLS session, and resume it on a second
connection.  An abbreviated handshake runs no certificate verification, so
the gateway must not treat the peer's certificate as validated there: no
SASL EXTERNAL (S2S or XEP-0225), no XEP-0344 dialback shortcut, nothing
routed.  The attacker is a raw pyOpenSSL client over loopback against a real
gateway, for TLS 1.2 and 1.3, over STARTTLS and Direct TLS.

The gateway's chosen behaviour is pinned too: it never resumes (a
resumption attempt gets a full handshake), and a trusted certificate still
authenticates.  The unit tests at the end check the second line of defence:
should a session be resumed anyway, ``tls_info`` reports the certificate as
not verified on that connection.
"""

from __future__ import annotations

import base64
from pathlib import Path

from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.trial import unittest
from twisted.words.xish import domish
from zope.interface import implementer

from fedgate.component.scram import derive
from fedgate.s2s.pairs import INBOUND
from fedgate.s2s.policy_check import DIALBACK_WITH_CERT
from fedgate.tls.certs import CertificateStore
from fedgate.tls import contexts as tls_contexts
from fedgate.tls.contexts import TLSContexts, TLSSettings, VerifyResult, tls_info
from tests.support.federation import add_component, start_dns
from tests.support.gateway import gateway_config, publish, shared_ca, start_gateway, temp_dir

TIMEOUT = 10
STREAMS = "http://etherx.jabber.org/streams"
TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
DIALBACK_NS = "jabber:server:dialback"
VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": getattr(SSL, "TLS1_3_VERSION", 772)}
VICTIM = "victim.example"
COMPONENT = "svc.b.example"  # an XEP-0225 component identity on gateway B


def session_reused(connection: SSL.Connection) -> bool:
    """The attacker's view: did this handshake resume the offered session?"""
    return bool(SSL._lib.SSL_session_reused(connection._ssl))


@implementer(IOpenSSLClientConnectionCreator)
class AttackerTLS:
    """The attacker's TLS client: presents ``cert``, trusts anything, pins the
    highest TLS version, and offers ``session`` for resumption.  One context
    for both connections, as a real client would keep."""

    def __init__(self, cert_paths, version: str, server_name: str, alpn: bytes | None = None):
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_max_proto_version(VERSIONS[version])
        ctx.set_verify(SSL.VERIFY_NONE, lambda *args: True)
        ctx.use_certificate_chain_file(str(cert_paths[0]))
        ctx.use_privatekey_file(str(cert_paths[1]))
        if alpn:
            ctx.set_alpn_protos([alpn])
        self.ctx, self.server_name = ctx, server_name
        self.session = None
        self.connection: SSL.Connection | None = None

    def clientConnectionForTLS(self, tls_protocol):
        connection = SSL.Connection(self.ctx, None)
        connection.set_tlsext_host_name(self.server_name.encode("ascii"))
        if self.session is not None:
            connection.set_session(self.session)
        self.connection = connection
        return connection


class RawStream(protocol.Protocol):
    """A hand-driven XMPP stream (S2S or component) that can STARTTLS or start
    with TLS, and collects top-level elements with Twisted's own parser."""

    def __init__(self, namespace: str, to: str, sender: str, tls: AttackerTLS, direct: bool):
        self.namespace, self.to, self.sender, self.tls, self.direct = namespace, to, sender, tls, direct
        self.elements: defer.DeferredQueue = defer.DeferredQueue()
        self.features = None
        self.stream_error = None
        self.closed = defer.Deferred()

    def connectionMade(self):
        if self.direct:
            self.transport.startTLS(self.tls)
        self._header()

    def _header(self):
        self.parser = domish.elementStream()
        self.parser.DocumentStartEvent = lambda root: None
        self.parser.ElementEvent = self._element
        self.parser.DocumentEndEvent = lambda: None
        dialback = f" xmlns:db='{DIALBACK_NS}'" if self.namespace == "jabber:server" else ""
        self.send(f"<?xml version='1.0'?><stream:stream xmlns='{self.namespace}' xmlns:stream='{STREAMS}'"
                  f"{dialback} to='{self.to}' from='{self.sender}' version='1.0'>")

    def _element(self, element):
        if element.uri == STREAMS and element.name == "error":
            self.stream_error = next(c.name for c in element.elements() if c.name != "text")
        self.elements.put(element)

    def dataReceived(self, data):
        self.parser.parse(data)

    def connectionLost(self, reason):
        if not self.closed.called:
            self.closed.callback(None)

    def send(self, text: str):
        self.transport.write(text.encode("utf-8"))

    def next(self):
        return self.elements.get().addTimeout(TIMEOUT, reactor)

    @defer.inlineCallbacks
    def next_features(self):
        element = yield self.next()
        assert (element.uri, element.name) == (STREAMS, "features"), element.toXml()
        self.features = element
        return element

    @defer.inlineCallbacks
    def starttls(self):
        self.send(f"<starttls xmlns='{TLS_NS}'/>")
        proceed = yield self.next()
        assert proceed.name == "proceed", proceed.toXml()
        self.transport.startTLS(self.tls)
        self._header()
        yield self.next_features()

    def mechanisms(self) -> list[str]:
        for child in self.features.elements():
            if child.uri == SASL_NS and child.name == "mechanisms":
                return [str(m) for m in child.elements()]
        return []

    @defer.inlineCallbacks
    def external(self, authzid: str = ""):
        """SASL EXTERNAL; the name of the answer (success or failure)."""
        data = base64.b64encode(authzid.encode()).decode() if authzid else "="
        self.send(f"<auth xmlns='{SASL_NS}' mechanism='EXTERNAL'>{data}</auth>")
        answer = yield self.next()
        return answer.name

    @property
    def reused(self) -> bool:
        return session_reused(self.tls.connection)

    def close(self):
        if self.transport is not None and self.transport.connected:
            self.transport.loseConnection()
        return self.closed


class ResumptionCase(unittest.TestCase):
    """Gateway B hosts b.example, an XEP-0114 component chat.b.example (the
    target of spoofed stanzas) and an XEP-0225 identity svc.b.example."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.dns, dns_port = start_dns(self)
        conf = gateway_config(temp_dir(self), ["b.example"], {"chat.b.example": "sb"}, extra_hosted=[COMPONENT])
        conf["s2s"]["direct_tls_listen"] = ["tcp:0:interface=127.0.0.1"]
        conf["components"]["credentials"] = {COMPONENT: {
            "scram_sha256": derive("component password", "sha256").encode(), "allowed": [COMPONENT],
            # certificate authentication pinned to the test CA and the exact name
            "trust_anchor": conf["tls"]["trust_roots"], "certificate_name": COMPONENT}}
        self.b = yield start_gateway(reactor, conf, dns_port, self)
        publish(self.dns, self.b, ["b.example", "chat.b.example"], "gw-b.example")
        self.chat = yield add_component(self, self.b, "chat.b.example", "sb")
        self.cert_dir = Path(temp_dir(self))

    def untrusted(self, domain: str):
        """The attacker's certificate: self-signed, naming the victim."""
        return shared_ca().issue(dns=(domain,), self_signed=True).write(self.cert_dir, f"untrusted-{domain}")

    def trusted(self, domain: str):
        return shared_ca().issue(dns=(domain,)).write(self.cert_dir, f"trusted-{domain}")

    @defer.inlineCallbacks
    def s2s(self, tls: AttackerTLS, direct: bool, sender: str = VICTIM) -> RawStream:
        """An S2S stream from ``sender`` to b.example, encrypted and at its
        post-TLS features."""
        port = self.b.port_of("s2s_direct_tls" if direct else "s2s")
        stream = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                       RawStream("jabber:server", "b.example", sender, tls, direct))
        self.addCleanup(stream.close)
        yield stream.next_features()
        if not direct:
            yield stream.starttls()
        return stream

    @defer.inlineCallbacks
    def component(self, tls: AttackerTLS) -> RawStream:
        """An XEP-0225 stream from svc.b.example, after STARTTLS."""
        stream = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.b.port_of("components")),
                                       RawStream("jabber:client", "b.example", COMPONENT, tls, False))
        self.addCleanup(stream.close)
        yield stream.next_features()
        yield stream.starttls()
        return stream

    @defer.inlineCallbacks
    def first_then_resumed(self, connect, tls: AttackerTLS):
        """Connect, keep the session (with TLS 1.3 the ticket has arrived by
        the post-TLS features), close, and connect again offering it."""
        first = yield connect(tls)
        self.assertNotIn("EXTERNAL", first.mechanisms(), "the untrusted certificate on a full handshake")
        tls.session = tls.connection.get_session()
        yield first.close()
        second = yield connect(tls)
        return second

    @defer.inlineCallbacks
    def assert_nothing_routed(self, stream: RawStream, stanza: str):
        """``stanza`` ends the stream with an error and reaches no component."""
        stream.send(stanza)
        yield stream.closed.addTimeout(TIMEOUT, reactor)
        self.assertIn(stream.stream_error, ("not-authorized", "invalid-from"))
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.chat.received.pending, [], "a spoofed stanza reached the component")


class S2SResumptionAttack(ResumptionCase):
    """An untrusted certificate for victim.example, resumed, on inbound S2S."""


def _s2s_attack(version: str, direct: bool):
    @defer.inlineCallbacks
    def test(self):
        tls = AttackerTLS(self.untrusted(VICTIM), version, "b.example", b"xmpp-server" if direct else None)
        stream = yield self.first_then_resumed(lambda t: self.s2s(t, direct), tls)
        self.assertEqual(tls.connection.get_protocol_version_name(), f"TLSv{version}")
        # No SASL EXTERNAL offered, and none accepted when tried anyway.
        self.assertNotIn("EXTERNAL", stream.mechanisms(), f"resumed={stream.reused}")
        answer = yield stream.external(VICTIM)
        self.assertEqual(answer, "failure")
        # No XEP-0344 shortcut: the request goes to a real verification,
        # which fails (victim.example resolves nowhere).
        stream.send(f"<db:result from='{VICTIM}' to='chat.b.example'>forged-key</db:result>")
        result = yield stream.next()
        self.assertEqual((result.uri, result.name), (DIALBACK_NS, "result"), result.toXml())
        self.assertNotEqual(result.getAttribute("type"), "valid", result.toXml())
        methods = [p.method for r in self.b.table if r.direction == INBOUND for p in r.pairs.values()]
        self.assertNotIn(DIALBACK_WITH_CERT, methods)
        # A stanza with the victim's 'from' is refused, not routed.
        yield self.assert_nothing_routed(
            stream, f"<message from='mallory@{VICTIM}' to='u@chat.b.example' id='spoof'><body>x</body></message>")
    return test


for _version in VERSIONS:
    for _direct, _how in ((False, "starttls"), (True, "direct_tls")):
        setattr(S2SResumptionAttack, f"test_tls{_version.replace('.', '')}_{_how}", _s2s_attack(_version, _direct))


class ComponentResumptionAttack(ResumptionCase):
    """An untrusted certificate for svc.b.example, resumed, on the XEP-0225
    listener (STARTTLS only: it has no Direct TLS port)."""


def _component_attack(version: str):
    @defer.inlineCallbacks
    def test(self):
        tls = AttackerTLS(self.untrusted(COMPONENT), version, "b.example")
        stream = yield self.first_then_resumed(self.component, tls)
        self.assertEqual(tls.connection.get_protocol_version_name(), f"TLSv{version}")
        self.assertNotIn("EXTERNAL", stream.mechanisms(), f"resumed={stream.reused}")
        answer = yield stream.external(COMPONENT)
        self.assertEqual(answer, "failure")
        self.assertNotIn(COMPONENT, self.b.router.components)
        yield self.assert_nothing_routed(
            stream, f"<message from='x@{COMPONENT}' to='u@chat.b.example' id='spoof'><body>x</body></message>")
    return test


for _version in VERSIONS:
    setattr(ComponentResumptionAttack, f"test_tls{_version.replace('.', '')}_starttls", _component_attack(_version))


class TrustedCertificateControl(ResumptionCase):
    """A trusted certificate authenticates on every connection; a resumption
    attempt gets a full handshake (the gateway does not resume), which
    verifies the certificate again."""


def _s2s_control(version: str, direct: bool):
    @defer.inlineCallbacks
    def test(self):
        tls = AttackerTLS(self.trusted("a.example"), version, "b.example", b"xmpp-server" if direct else None)
        connect = lambda t: self.s2s(t, direct, sender="a.example")  # noqa: E731
        first = yield connect(tls)
        self.assertFalse(first.reused)
        self.assertIn("EXTERNAL", first.mechanisms())
        tls.session = tls.connection.get_session()
        yield first.close()
        second = yield connect(tls)
        self.assertFalse(second.reused, "the gateway resumed a session")
        self.assertIn("EXTERNAL", second.mechanisms())
        answer = yield second.external("a.example")
        self.assertEqual(answer, "success")
    return test


def _component_control(version: str):
    @defer.inlineCallbacks
    def test(self):
        tls = AttackerTLS(self.trusted(COMPONENT), version, "b.example")
        first = yield self.component(tls)
        self.assertIn("EXTERNAL", first.mechanisms())
        tls.session = tls.connection.get_session()
        yield first.close()
        second = yield self.component(tls)
        self.assertFalse(second.reused, "the gateway resumed a session")
        self.assertIn("EXTERNAL", second.mechanisms())
        answer = yield second.external(COMPONENT)
        self.assertEqual(answer, "success")
    return test


for _version in VERSIONS:
    for _direct, _how in ((False, "starttls"), (True, "direct_tls")):
        setattr(TrustedCertificateControl, f"test_s2s_tls{_version.replace('.', '')}_{_how}",
                _s2s_control(_version, _direct))
    setattr(TrustedCertificateControl, f"test_component_tls{_version.replace('.', '')}",
            _component_control(_version))


# -- the second line of defence, in memory -----------------------------------------


def _handshake(client: SSL.Connection, server: SSL.Connection) -> None:
    """Drive a handshake between two memory-BIO connections, then let the
    client read what follows it (TLS 1.3 session tickets)."""
    client.set_connect_state()
    server.set_accept_state()
    done = [False, False]
    for _ in range(50):
        for i, (this, other) in enumerate(((client, server), (server, client))):
            if not done[i]:
                try:
                    this.do_handshake()
                    done[i] = True
                except SSL.WantReadError:
                    pass
            try:
                data = this.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            if data:
                other.bio_write(data)
        if all(done):
            break
    assert all(done), "the handshake did not finish"
    server.write(b"x")  # application data after the tickets
    client.bio_write(server.bio_read(65536))
    assert client.recv(1) == b"x"


class ResumingContexts(TLSContexts):
    """Our contexts with resumption switched back on (the old behaviour)."""

    @staticmethod
    def _refuse_resumption(ctx):
        ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        ctx.set_session_id(b"fedgate")


class ReusedSessionUnits(unittest.TestCase):
    """``tls_info`` never reports a verified chain for a certificate that no
    verification judged on this connection."""

    def setUp(self):
        ca = shared_ca()
        directory = Path(temp_dir(self))
        server_cert = ca.issue(dns=("b.example",)).write(directory, "b.example")
        self.client_paths = ca.issue(dns=("a.example",)).write(directory, "a.example")
        root = ca.write_root(directory / "ca.pem")
        self.contexts = TLSContexts(CertificateStore(str(directory)), TLSSettings(trust_roots=str(root)))
        self.server_cert = server_cert

    def client_context(self, version: str) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_max_proto_version(VERSIONS[version])
        ctx.set_verify(SSL.VERIFY_NONE, lambda *args: True)
        ctx.use_certificate_chain_file(str(self.client_paths[0]))
        ctx.use_privatekey_file(str(self.client_paths[1]))
        return ctx

    def connect(self, server_ctx, client_ctx, session=None):
        server = SSL.Connection(server_ctx, None)
        server.fedgate_verify = VerifyResult()
        client = SSL.Connection(client_ctx, None)
        if session is not None:
            client.set_session(session)
        _handshake(client, server)
        return client, server

    def test_server_contexts_do_not_resume(self):
        """The chosen behaviour: no session cache, no tickets, so a resumption
        attempt is a full handshake and the certificate is verified again."""
        for version in VERSIONS:
            server_ctx = self.contexts.server_context("b.example")
            self.assertEqual(server_ctx.get_session_cache_mode(), SSL.SESS_CACHE_OFF)
            client_ctx = self.client_context(version)
            client, server = self.connect(server_ctx, client_ctx)
            client2, server2 = self.connect(server_ctx, client_ctx, client.get_session())
            self.assertFalse(session_reused(client2), version)
            info = tls_info(server2)
            self.assertTrue(info.valid_for("a.example"), (version, info.chain_errors))

    def test_a_resumed_session_is_not_verified(self):
        """Re-enable resumption on our own context (as a regression, or a
        future OpenSSL default, might): the resumed connection still carries
        the cached certificate, but its chain does not count as verified,
        even for a certificate that was trusted the first time."""
        for version in VERSIONS:
            contexts = ResumingContexts(self.contexts.store, self.contexts.settings)
            server_ctx = contexts.server_context("b.example")
            client_ctx = self.client_context(version)
            client, server = self.connect(server_ctx, client_ctx)
            self.assertTrue(tls_info(server).valid_for("a.example"), version)
            client2, server2 = self.connect(server_ctx, client_ctx, client.get_session())
            self.assertTrue(session_reused(client2), f"{version}: the test did not resume")
            info = tls_info(server2)
            self.assertIsNotNone(info.peer_certificate, version)
            self.assertFalse(info.chain_ok, version)
            self.assertFalse(info.valid_for("a.example"), version)
            self.assertIn(tls_contexts.RESUMED_SESSION_ERROR, [text for _, _, text in info.chain_errors])

    def test_a_certificate_no_callback_judged_is_not_verified(self):
        """The backstop that needs no private OpenSSL API: a peer certificate
        with no run of the verify callback behind it is not verified."""
        server_ctx = self.contexts.server_context("b.example")
        client, server = self.connect(server_ctx, self.client_context("1.3"))
        self.assertTrue(tls_info(server).chain_ok)
        server.fedgate_verify = VerifyResult()  # as if the callback never ran
        info = tls_info(server)
        self.assertFalse(info.chain_ok)
        self.assertIn(tls_contexts.RESUMED_SESSION_ERROR, [text for _, _, text in info.chain_errors])

    def test_our_outbound_connections_never_resume(self):
        """The client side: against a server that would resume, our outbound
        connections offer no session, so every one verifies the server's
        certificate in a full handshake."""
        for version in VERSIONS:
            server_ctx = ResumingContexts(self.contexts.store, self.contexts.settings).server_context("b.example")
            server_ctx.set_max_proto_version(VERSIONS[version])
            for attempt in range(2):
                server = SSL.Connection(server_ctx, None)
                server.fedgate_verify = VerifyResult()
                client = self.contexts.client_creator("a.example", "b.example").clientConnectionForTLS(None)
                _handshake(client, server)
                self.assertFalse(session_reused(client), (version, attempt))
                info = tls_info(client)
                self.assertTrue(info.valid_for("b.example"), (version, attempt, info.chain_errors))
