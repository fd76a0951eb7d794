"""STARTTLS command injection (the CVE-2011-0411 class), in both roles, in
memory.

Bytes that arrive in the same read as ``<starttls/>`` (we receive) or
``<proceed/>`` (we initiate) were sent in plaintext, before TLS: anyone on
the path could have put them there.  They must be dropped, never parsed as
if they had come over TLS.

Here, in memory, the exact position of the switch to TLS in our output can
be checked; test_starttls_injection_e2e.py does the same over real loopback
sockets against a real gateway.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from fedgate.s2s import dialback
from fedgate.s2s.context import VerificationBudget
from fedgate.s2s.inbound import InboundS2S
from fedgate.s2s.outbound import OutboundS2S
from fedgate.s2s.pairs import PENDING, VALID, ConnectionTable
from fedgate.stream import namespaces as ns
from fedgate.stream.protocol import XmppStream
from fedgate.tls.contexts import TLSInfo
from tests.support.memory import RecordingRouter
from tests.support.rawpeer import Reply
from tests.support.s2s import FakeOwner, FakeTLS, FakeVerifier, TLSRecordingTransport, make_context
from tests.support.s2speer import DIALBACK_FEATURES, PROCEED, STARTTLS, s2s_header
from tests.support.tlsremote import VALID_RESULT


#: What a man in the middle appends to a peer's <starttls/>: a dialback
#: request (would start a verification), a verify request (would be answered
#: with our key's verdict) and a stanza (would be routed or refused).
INBOUND_INJECTION = (
    b"<db:result from='evil.example' to='a.example'>k3y</db:result>"
    b"<db:verify from='evil.example' to='a.example' id='sid-1'>k3y</db:verify>"
    b"<message from='eve@evil.example' to='bob@chat.a.example' id='injected'>"
    b"<body>injected</body></message>")

#: What a man in the middle appends to a server's <proceed/>: features that
#: would make us authenticate at once, and the 'valid' answer to that.
OUTBOUND_INJECTIONS = {
    # continuing the plaintext stream
    "features_and_result": DIALBACK_FEATURES + VALID_RESULT,
    # pretending a new stream has already begun (as a parser that restarted
    # but went on with the rest of the chunk would see it)
    "new_header_features_and_result": (s2s_header("remote.example", "chat.a.example", "injected-id",
                                                  decl=False) + DIALBACK_FEATURES + VALID_RESULT),
}


# -- in memory -------------------------------------------------------------------

class MemoryCase(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.table = ConnectionTable()
        self.router = RecordingRouter()
        self.verifier = FakeVerifier()
        self.budget = VerificationBudget(10)

    def connect(self, handler, encryption: str) -> tuple[XmppStream, TLSRecordingTransport]:
        ctx = make_context(self.clock, local_domains={"a.example", "chat.a.example"},
                           secret="s3cret", table=self.table, router=self.router, verifier=self.verifier,
                           budget=self.budget, encryption=encryption, tls=FakeTLS())
        handler = handler(ctx)
        stream = XmppStream(handler, self.clock)
        transport = TLSRecordingTransport()
        stream.makeConnection(transport)
        return stream, transport


class ReceivingInMemoryTests(MemoryCase):
    """We receive <starttls/>: the injected rest of the chunk is dropped."""

    def open(self, encryption="optional"):
        stream, transport = self.connect(InboundS2S, encryption)
        self.handler = stream.handler
        return stream, transport

    def assert_nothing_processed(self):
        self.assertEqual(self.verifier.calls, [])
        self.assertEqual(self.budget.in_use, 0)
        self.assertEqual(self.router.routed, [])
        self.assertEqual(self.router.bounced, [])
        self.assertEqual([r.pairs for r in self.table], [{}])

    def test_rest_of_the_chunk_is_dropped(self):
        for encryption in ("optional", "required"):
            stream, transport = self.open(encryption)
            stream.dataReceived(s2s_header("evil.example", "a.example") + STARTTLS + INBOUND_INJECTION)
            [(creator, _)] = transport.tls_calls
            self.assertEqual(creator, ("server", "a.example"))
            self.assertTrue(transport.before_tls().endswith(PROCEED), transport.before_tls())
            self.assertEqual(Reply(transport.before_tls()).elements[-1].name, "proceed")
            self.assertEqual(transport.after_tls(), b"", "nothing may follow <proceed/> in plaintext")
            self.assertFalse(transport.disconnecting)
            self.assert_nothing_processed()
            # The next bytes (decrypted, in real life) start a new stream.
            stream.dataReceived(s2s_header("evil.example", "a.example"))
            reply = Reply(transport.after_tls())
            self.assertEqual(reply.root.getAttribute("from"), "a.example")
            self.assertNotEqual(reply.root.getAttribute("id"),
                                Reply(transport.before_tls()).root.getAttribute("id"))
            [features] = reply.elements
            offered = [(c.uri, c.name) for c in features.elements()]
            self.assertIn((ns.DIALBACK_FEATURE, "dialback"), offered)
            self.assertNotIn((ns.TLS, "starttls"), offered, "no second STARTTLS offer once TLS has started")
            self.assert_nothing_processed()
            stream.connectionLost(None)

    def test_injection_in_a_later_chunk_is_not_part_of_the_new_stream(self):
        # Plaintext that arrives after the switch is the TLS layer's problem
        # in real life; here it reaches the fresh parser, which wants a new
        # header and closes instead of acting on it.
        stream, transport = self.open()
        stream.dataReceived(s2s_header("evil.example", "a.example") + STARTTLS)
        stream.dataReceived(INBOUND_INJECTION)
        self.assertTrue(transport.disconnecting)
        self.assertIsNotNone(Reply(transport.after_tls()).error_condition())
        self.assert_nothing_processed()

    def test_dialback_before_starttls_in_the_same_chunk_is_still_handled(self):
        # Control: the drop is exactly "after <starttls/>", not "the whole chunk".
        stream, transport = self.open()
        stream.dataReceived(s2s_header("evil.example", "a.example")
                            + b"<db:result from='evil.example' to='a.example'>k3y</db:result>"
                            + STARTTLS + INBOUND_INJECTION)
        self.assertEqual(len(self.verifier.calls), 1)
        self.assertEqual(len(transport.tls_calls), 1)
        self.assertEqual(transport.after_tls(), b"")


class InitiatingInMemoryTests(MemoryCase):
    """We initiate and receive <proceed/>: the rest of the chunk is dropped."""

    def open(self):
        self.owner = FakeOwner()
        stream, transport = self.connect(
            lambda ctx: OutboundS2S(ctx, "remote.example", "chat.a.example", self.owner), "optional")
        stream.dataReceived(s2s_header("remote.example", "chat.a.example", "plain-id")
                            + b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'>"
                              b"<required/></starttls></stream:features>")
        self.assertTrue(transport.value().endswith(STARTTLS), transport.value())
        return stream, transport

    def check_injection(self, injection: bytes):
        stream, transport = self.open()
        handler = stream.handler
        stream.dataReceived(PROCEED + injection)
        [(creator, _)] = transport.tls_calls
        self.assertEqual(creator, ("client", "chat.a.example", "remote.example"))
        self.assertTrue(transport.before_tls().endswith(STARTTLS))
        # After the switch: our new header and nothing else (no dialback
        # request answering injected features).
        after = Reply(transport.after_tls())
        self.assertEqual((after.root.getAttribute("to"), after.root.getAttribute("from")),
                         ("remote.example", "chat.a.example"))
        self.assertEqual(after.elements, [])
        self.assertEqual(self.owner.events, [])
        self.assertEqual(handler.record.pairs, {})
        self.assertEqual(handler.stream_id, "plain-id", "the injected header was parsed")
        self.assertFalse(transport.disconnecting)

        # The handshake completes (simulated) and the real server speaks.
        stream.tls = TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256")
        stream.dataReceived(s2s_header("remote.example", "chat.a.example", "tls-id") + DIALBACK_FEATURES)
        self.assertEqual(self.owner.events, [("open",)])
        handler.authenticate("chat.a.example")
        self.assertEqual(handler.record.state_of("chat.a.example", "remote.example"), PENDING)
        request = Reply(transport.after_tls()).elements[-1]
        self.assertEqual(str(request), dialback.dialback_key("s3cret", "remote.example",
                                                             "chat.a.example", "tls-id"))
        stream.dataReceived(VALID_RESULT)
        self.assertEqual(handler.record.state_of("chat.a.example", "remote.example"), VALID)

    def test_features_and_result_after_proceed(self):
        self.check_injection(OUTBOUND_INJECTIONS["features_and_result"])

    def test_new_header_after_proceed(self):
        self.check_injection(OUTBOUND_INJECTIONS["new_header_features_and_result"])
