"""STARTTLS and SASL EXTERNAL in memory, with real TLS handshakes.

Our initiating stream (a.example) and our receiving stream (b.example) talk
through Twisted's iosim pump; tests/support/tlsmemory.py gives each side a
real TLS layer, so the certificates from the test CA are verified by
OpenSSL exactly as over a socket (test_tls_e2e.py does that over loopback).
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial import unittest

from fedgate.s2s.inbound import InboundS2S
from fedgate.s2s.outbound import OutboundS2S
from fedgate.s2s.pairs import PENDING, VALID
from fedgate.s2s.policy_check import SASL_EXTERNAL
from fedgate.stream import namespaces as ns
from fedgate.stream.protocol import XmppStream
from fedgate.tls.certs import CertificateStore
from fedgate.tls.contexts import TLSContexts, TLSSettings
from tests.support.gateway import shared_ca, temp_dir
from tests.support.memory import RecordingRouter
from tests.support.rawpeer import Reply
from tests.support.s2s import FakeOwner, FakeVerifier, make_context
from tests.support.tlsmemory import connect_in_memory, documents

A, B = "a.example", "b.example"


class TLSInMemoryCase(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.roots = str(shared_ca().write_root(Path(temp_dir(self)) / "ca.pem"))

    def tls(self, domain: str, issued) -> TLSContexts:
        """TLS contexts presenting ``issued`` for ``domain``, trusting the test CA."""
        cert, key = issued.write(Path(temp_dir(self)), domain)
        return TLSContexts(CertificateStore(None, {domain: (str(cert), str(key))}),
                           TLSSettings(trust_roots=self.roots))

    def federate(self, a_certificate, b_certificate):
        """a.example (initiating, presenting ``a_certificate``) opens a
        stream to b.example (receiving); both require TLS."""
        self.a_ctx = make_context(self.clock, local_domains={A}, router=RecordingRouter(),
                                  verifier=FakeVerifier(), encryption="required",
                                  tls=self.tls(A, a_certificate))
        self.b_ctx = make_context(self.clock, local_domains={B}, router=RecordingRouter(),
                                  verifier=FakeVerifier(), encryption="required",
                                  tls=self.tls(B, b_certificate))
        self.owner = FakeOwner()
        self.outbound = OutboundS2S(self.a_ctx, B, A, self.owner)
        self.outbound.authenticate(A)  # the pair the sender wants, queued until the stream is open
        self.inbound = InboundS2S(self.b_ctx)
        self.a_stream = XmppStream(self.outbound, self.clock)
        self.b_stream = XmppStream(self.inbound, self.clock)
        self.b_io, self.a_io, self.pump = connect_in_memory(self.b_stream, self.a_stream)

    def b_features_over_tls(self) -> list[tuple[str, str]]:
        """What b.example offered on its first stream over TLS."""
        first = Reply(documents(bytes(self.b_io.over_tls))[0])
        [features] = [e for e in first.elements if (e.uri, e.name) == (ns.STREAMS, "features")]
        return [(c.uri, c.name, tuple(str(m) for m in c.elements())) for c in features.elements()]

    def assert_real_tls(self):
        for stream in (self.a_stream, self.b_stream):
            self.assertIsNotNone(stream.tls, "no handshake completed")
            self.assertIn(stream.tls.version, ("TLSv1.2", "TLSv1.3"))
        # Before the switch: plaintext up to <proceed/>; after it, nothing
        # readable crossed the pump in either direction.
        self.assertTrue(bytes(self.b_io.cleartext).endswith(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"))
        for io in (self.a_io, self.b_io):
            self.assertIn(b"<stream:stream", bytes(io.over_tls))
            self.assertNotIn(b"stream", bytes(io.wire_after_tls))
            self.assertNotIn(b"jabber", bytes(io.wire_after_tls))


class SaslExternalInMemoryTests(TLSInMemoryCase):
    def test_trusted_certificate_authenticates_with_sasl_external(self):
        ca = shared_ca()
        self.federate(ca.issue(dns=(A,)), ca.issue(dns=(B,)))
        self.assert_real_tls()
        self.assertTrue(self.b_stream.tls.valid_for(A))
        self.assertTrue(self.a_stream.tls.valid_for(B))
        self.assertIn((ns.SASL, "mechanisms", ("EXTERNAL",)), self.b_features_over_tls())
        [record] = list(self.b_ctx.table)
        self.assertEqual(record.state_of(B, A), VALID)
        self.assertEqual([(p.local, p.remote, p.method) for p in record.valid_pairs()],
                         [(B, A, SASL_EXTERNAL)])
        self.assertEqual(self.outbound.record.state_of(A, B), VALID)
        self.assertIn(("pair", A, VALID), self.owner.events)
        self.assertEqual(self.b_ctx.verifier.calls, [], "no dialback was needed")
        self.assertFalse(self.a_io.disconnecting or self.b_io.disconnecting)

    def test_untrusted_certificate_gets_no_external(self):
        # a.example presents a certificate from a CA b.example does not trust:
        # TLS still encrypts, but b.example offers no SASL EXTERNAL, and
        # a.example falls back to dialback (b.example starts a verification).
        self.federate(shared_ca().other_ca().issue(dns=(A,)), shared_ca().issue(dns=(B,)))
        self.assert_real_tls()
        self.assertFalse(self.b_stream.tls.valid_for(A))
        self.assertFalse(self.b_stream.tls.chain_ok)
        offered = self.b_features_over_tls()
        self.assertNotIn(ns.SASL, [uri for uri, _, _ in offered])
        self.assertIn((ns.DIALBACK_FEATURE, "dialback"), [(uri, name) for uri, name, _ in offered])
        self.assertNotIn(b"EXTERNAL", bytes(self.a_io.over_tls))
        [((receiving, originating, stream_id, key), _)] = self.b_ctx.verifier.calls
        self.assertEqual((receiving, originating), (B, A))
        [record] = list(self.b_ctx.table)
        self.assertEqual(record.state_of(B, A), PENDING)
        self.assertEqual(record.valid_pairs(), [])
        self.assertEqual(self.outbound.record.state_of(A, B), PENDING)

    def test_certificate_for_another_name_gets_no_external(self):
        # Trusted, but issued to another domain: no EXTERNAL for a.example.
        self.federate(shared_ca().issue(dns=("other.example",)), shared_ca().issue(dns=(B,)))
        self.assert_real_tls()
        self.assertTrue(self.b_stream.tls.chain_ok)
        self.assertFalse(self.b_stream.tls.valid_for(A))
        self.assertNotIn(ns.SASL, [uri for uri, _, _ in self.b_features_over_tls()])
        [((receiving, originating, _, _), _)] = self.b_ctx.verifier.calls
        self.assertEqual((receiving, originating), (B, A))
        self.assertEqual([r.valid_pairs() for r in self.b_ctx.table], [[]])
