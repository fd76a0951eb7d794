"""Stream restarts discard what the old stream established (RFC 6120
5.4.3.3 for TLS, 6.4.6 for SASL).

A remote server may authenticate a domain pair by dialback in plaintext
(encryption "optional" for it) and then ask for STARTTLS.  The pair was
proved on the old stream; after the restart it must be gone, and a
verification still running for it must not make it valid on the new stream.
Outbound, we never start TLS or SASL once a pair can have been proved.

First in memory (exact states and outputs), then over loopback: a raw peer
speaking for b.example authenticates to a real gateway a.example by
dialback, a real gateway b.example answering the verification, then
switches to TLS with a real handshake and finds its pair gone.
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet import ssl
from twisted.trial import unittest

from fedgate.s2s import dialback
from fedgate.s2s.inbound import InboundS2S
from fedgate.s2s.initiating import READY
from fedgate.s2s.outbound import OutboundS2S
from fedgate.s2s.pairs import INBOUND, VALID
from fedgate.s2s.policy_check import SASL_EXTERNAL
from fedgate.stream import namespaces as ns
from fedgate.tls.contexts import TLSInfo
from tests.support.admin import AdminClient
from tests.support.federation import TwoGatewaysFixture
from tests.support.gateway import gateway_config, shared_ca, temp_dir
from tests.support.rawpeer import Reply
from tests.support.s2s import FakeOwner, FakeVerifier
from tests.support.s2speer import (
    DIALBACK_FEATURES, PROCEED, STARTTLS, TIMEOUT, TLSPeer, s2s_header, wait_until)
from tests.test_starttls_injection import MemoryCase

RESULT = b"<db:result from='evil.example' to='a.example'>k3y</db:result>"
MESSAGE = (b"<message from='eve@evil.example' to='bob@chat.a.example' id='after'>"
           b"<body>over the old pair</body></message>")


def dialback_answers(data: bytes) -> list:
    return [(e["from"], e["to"], e.getAttribute("type")) for e in Reply(data).elements
            if (e.uri, e.name) == (ns.DIALBACK, "result")]


class InboundRestartInMemoryTests(MemoryCase):
    def setUp(self):
        super().setUp()
        self.verifier = FakeVerifier()

    def open(self):
        stream, transport = self.connect(InboundS2S, "optional")
        self.handler = stream.handler
        stream.dataReceived(s2s_header("evil.example", "a.example"))
        return stream, transport

    def record(self):
        [record] = list(self.table)
        return record

    def test_pair_proved_before_starttls_is_gone_after_it(self):
        stream, transport = self.open()
        stream.dataReceived(RESULT)
        self.verifier.answer("a.example", "evil.example")
        self.assertTrue(self.record().can_receive("a.example", "evil.example"))
        self.assertEqual(dialback_answers(transport.value()), [("a.example", "evil.example", "valid")])

        stream.dataReceived(STARTTLS)
        self.assertEqual(len(transport.tls_calls), 1)
        self.assertEqual(self.record().pairs, {}, "the pair survived the TLS restart")
        self.assertFalse(self.record().authenticated)
        self.assertIsNone(self.record().remote_domain)

        stream.dataReceived(s2s_header("evil.example", "a.example") + MESSAGE)
        self.assertEqual(self.router.routed, [])
        self.assertEqual(Reply(transport.after_tls()).error_condition(), "not-authorized")
        self.assertTrue(transport.disconnecting)

    def test_verification_pending_at_starttls_cannot_validate_after_it(self):
        stream, transport = self.open()
        stream.dataReceived(RESULT)
        self.assertEqual(len(self.verifier.calls), 1)
        self.assertEqual(self.budget.in_use, 1)
        stream.dataReceived(STARTTLS)
        self.assertEqual(self.budget.in_use, 0, "the verification place was not given back")
        stream.dataReceived(s2s_header("evil.example", "a.example"))
        before = len(transport.value())
        # The Authoritative Server's answer arrives after the restart.
        self.verifier.answer("a.example", "evil.example")
        self.assertEqual(self.record().pairs, {})
        self.assertEqual(transport.value()[before:], b"", "a dialback answer went out on the new stream")
        self.assertEqual(self.budget.in_use, 0)
        stream.dataReceived(MESSAGE)
        self.assertEqual(self.router.routed, [])
        self.assertEqual(Reply(transport.after_tls()).error_condition(), "not-authorized")

    def test_authentication_deadline_applies_again_after_the_restart(self):
        stream, transport = self.open()
        stream.dataReceived(RESULT)
        self.verifier.answer("a.example", "evil.example")
        self.clock.advance(200)  # past auth_timeout while authenticated: no error
        self.assertFalse(transport.disconnecting)
        stream.dataReceived(STARTTLS)
        stream.dataReceived(s2s_header("evil.example", "a.example"))
        self.clock.advance(self.handler.ctx.auth_timeout + 1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(Reply(transport.after_tls()).error_condition(), "connection-timeout")

    def test_sasl_restart_keeps_only_the_pair_sasl_proved(self):
        stream, transport = self.connect(InboundS2S, "optional")
        handler = stream.handler
        issued = shared_ca().issue(dns=("evil.example",))
        stream.tls = TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", issued.cert)
        stream.tls_started = True
        stream.dataReceived(s2s_header("evil.example", "a.example"))
        # Dialback for a second domain on the TLS stream, still unverified,
        # and one verified, before SASL.
        stream.dataReceived(b"<db:result from='other.example' to='a.example'>k3y</db:result>")
        stream.dataReceived(b"<db:result from='third.example' to='chat.a.example'>k3y</db:result>")
        self.verifier.answer("chat.a.example", "third.example")
        [record] = list(self.table)
        self.assertTrue(record.can_receive("chat.a.example", "third.example"))
        stream.dataReceived(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>")
        self.assertIn(b"<success", transport.value())
        self.assertEqual(list(record.pairs), [("a.example", "evil.example")])
        self.assertEqual(record.pairs[("a.example", "evil.example")].method, SASL_EXTERNAL)
        self.assertEqual(self.budget.in_use, 0)
        before = len(transport.value())
        self.verifier.answer("a.example", "other.example")
        self.assertEqual(list(record.pairs), [("a.example", "evil.example")])
        self.assertEqual(transport.value()[before:], b"")


class OutboundRestartInMemoryTests(MemoryCase):
    """Outbound, a pair is proved only after negotiation ends, so a restart
    after it must never happen: no STARTTLS offer is taken up then, and a
    <proceed/> nobody asked for is refused."""

    def open(self):
        self.owner = FakeOwner()
        stream, transport = self.connect(
            lambda ctx: OutboundS2S(ctx, "remote.example", "chat.a.example", self.owner), "optional")
        handler = stream.handler
        # No STARTTLS offered: dialback in plaintext (policy allows it).
        stream.dataReceived(s2s_header("remote.example", "chat.a.example", "plain-id") + DIALBACK_FEATURES)
        self.assertEqual(self.owner.events, [("open",)])
        handler.authenticate("chat.a.example")
        stream.dataReceived(b"<db:result type='valid' from='remote.example' to='chat.a.example'/>")
        self.assertEqual(handler.record.state_of("chat.a.example", "remote.example"), VALID)
        return stream, transport, handler

    def test_late_starttls_offer_is_not_taken_up(self):
        stream, transport, handler = self.open()
        before = len(transport.value())
        stream.dataReceived(b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
                            b"</stream:features>")
        self.assertNotIn(STARTTLS, transport.value()[before:])
        self.assertEqual(transport.tls_calls, [])

    def test_unsolicited_proceed_is_refused(self):
        stream, transport, handler = self.open()
        stream.dataReceived(PROCEED)
        self.assertEqual(transport.tls_calls, [])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(Reply(transport.value()).error_condition(), "unsupported-stanza-type")

    def test_unsolicited_sasl_success_is_refused(self):
        stream, transport, handler = self.open()
        stream.dataReceived(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(Reply(transport.value()).error_condition(), "unsupported-stanza-type")
        self.assertEqual(handler.state, READY, "no SASL restart")


class RestartOverLoopbackTests(TwoGatewaysFixture, unittest.TestCase):
    """A real gateway a.example; a real gateway b.example as the Authoritative
    Server; a raw peer as b.example's Originating Server."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        optional = {"encryption": "optional"}
        yield self.start_two_gateways(
            gateway_config(temp_dir(self), ["a.example"], {"chat.a.example": "secret-a"}, policy=optional),
            gateway_config(temp_dir(self), ["b.example"], {}, policy=optional))
        self.component = yield self.add_component(self.a, "chat.a.example", "secret-a")

    def inbound_record(self):
        records = [r for r in self.a.table if r.direction == INBOUND and r.remote_address.endswith(
            f":{self.peer.transport.getHost().port}")]
        self.assertEqual(len(records), 1)
        return records[0]

    @defer.inlineCallbacks
    def test_pair_proved_in_plaintext_is_gone_after_starttls(self):
        self.peer = peer = TLSPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.a.port_of("s2s")), peer)
        self.addCleanup(lambda: peer.transport.abortConnection() if not peer.lost.called else None)
        peer.transport.write(s2s_header("b.example", "chat.a.example"))
        yield wait_until(lambda: b"</stream:features>" in peer.plain, "features")
        stream_id = Reply(bytes(peer.plain)).root.getAttribute("id")
        key = dialback.dialback_key(self.b.ctx.secret, "chat.a.example", "b.example", stream_id)
        peer.transport.write(f"<db:result from='b.example' to='chat.a.example'>{key}</db:result>".encode())
        yield wait_until(lambda: b"type='valid'" in peer.plain or b'type="valid"' in peer.plain,
                         "the dialback answer")
        self.assertTrue(self.inbound_record().can_receive("chat.a.example", "b.example"))
        # Control: the pair carries stanzas before the restart.
        peer.transport.write(b"<message from='bob@b.example' to='alice@chat.a.example' id='before'>"
                             b"<body>plain</body></message>")
        got = yield self.component.next_element()
        self.assertEqual(got.getAttribute("id"), "before")

        peer.transport.write(STARTTLS)
        yield wait_until(lambda: PROCEED in peer.plain, "<proceed/>")
        trust = ssl.Certificate.loadPEM(shared_ca().root_pem())
        peer.start_tls(ssl.optionsForClientTLS("a.example", trustRoot=trust))
        peer.handshake.addTimeout(TIMEOUT, reactor)
        yield peer.handshake
        peer.transport.write(s2s_header("b.example", "chat.a.example"))
        yield wait_until(lambda: b"</stream:features>" in peer.secure, "features over TLS")
        record = self.inbound_record()
        self.assertEqual(record.pairs, {}, "the plaintext pair survived STARTTLS")
        self.assertIsNotNone(record.tls)
        # What an operator sees through the admin API.
        answer = yield AdminClient(reactor, self.a).get(f"/api/v1/connections/{record.id}")
        self.assertEqual(answer.status, 200)
        shown = answer.json
        self.assertEqual((shown["pairs"], shown["pair_count"], shown["state"]),
                         ([], 0, "authenticating"))

        peer.transport.write(b"<message from='bob@b.example' to='alice@chat.a.example' id='after'>"
                             b"<body>tls</body></message>")
        peer.lost.addTimeout(TIMEOUT, reactor)
        yield peer.lost
        self.assertEqual(Reply(bytes(peer.secure)).error_condition(), "not-authorized")
        self.assertEqual(self.component.received.pending, [])
