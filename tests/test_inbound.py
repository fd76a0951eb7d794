"""The inbound S2S roles (Receiving and Authoritative Server) in memory."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from fedgate.policy import PeerPolicy, PolicyTable
from fedgate.s2s import dialback
from fedgate.s2s.context import VerificationBudget
from fedgate.s2s.inbound import InboundS2S
from fedgate.s2s.pairs import INVALID, PENDING, VALID, ConnectionTable
from fedgate.s2s.verifier import DialbackError
from fedgate.stream import namespaces as ns
from fedgate.stream.errors import error_condition
from fedgate.tls.contexts import TLSInfo
from tests.support.gateway import shared_ca
from tests.support.memory import MemoryStream, RecordingRouter, server_header
from tests.support.s2s import FakeVerifier, make_context

SECRET = "authoritative secret"
LOCAL = frozenset({"gw.example", "chat.gw.example"})


class _ServerTLS:
    """TLS contexts for a StringTransport (nothing is encrypted)."""

    def server_creator(self, domain, alpn=None):
        return ("server", domain)


class InboundCase(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.table = ConnectionTable()
        self.router = RecordingRouter()
        self.verifier = FakeVerifier()
        self.budget = VerificationBudget(100)

    def open(self, per_stream=10, blocked=(), max_pairs=1000, tls=None, **header) -> MemoryStream:
        # Plaintext dialback (no TLS contexts here): encryption optional.
        policy = PolicyTable(PeerPolicy(encryption="optional"),
                             {d: PeerPolicy(d, allowed=False) for d in blocked})
        ctx = make_context(self.clock, local_domains=LOCAL, secret=SECRET, table=self.table,
                           router=self.router, verifier=self.verifier, budget=self.budget,
                           auth_timeout=90.0, max_pending_per_stream=per_stream, policy=policy,
                           max_pairs_per_connection=max_pairs, tls=tls)
        self.handler = InboundS2S(ctx)
        stream = MemoryStream(self.handler, self.clock)
        attrs = {"to": "gw.example", "from": "remote.example", "version": "1.0"}
        attrs.update(header)
        stream.feed(server_header(**{k: v for k, v in attrs.items() if v is not None}))
        return stream

    def authenticate(self, stream, local="chat.gw.example", remote="remote.example"):
        stream.feed(f"<db:result from='{remote}' to='{local}'>abc</db:result>")
        _, d = self.verifier.calls[-1]
        d.callback(True)
        return stream.take()


class HeaderTests(InboundCase):
    def test_answers_with_features_and_fresh_id(self):
        one = self.open()
        self.assertEqual(one.header.get("version"), "1.0")
        self.assertEqual(one.header.get("from"), "gw.example")
        [features] = one.take()
        self.assertEqual(features.name, "features")
        dialback_feature = features.firstChildElement()
        self.assertEqual((dialback_feature.uri, dialback_feature.name),
                         (ns.DIALBACK_FEATURE, "dialback"))
        self.assertEqual(dialback_feature.firstChildElement().name, "errors")
        two = self.open()
        self.assertNotEqual(one.header.get("id"), two.header.get("id"))
        self.assertGreaterEqual(len(one.header.get("id")), 16)

    def test_version_1_x_is_answered_with_1_0(self):
        stream = self.open(version="1.5")
        self.assertEqual(stream.header.get("version"), "1.0")
        self.assertIsNone(stream.stream_error())

    def test_other_major_version(self):
        stream = self.open(version="2.0")
        self.assertEqual(stream.stream_error(), "unsupported-version")
        self.assertTrue(stream.disconnecting)

    def test_pre_1_0_stream_gets_no_features(self):
        stream = self.open(version=None)
        self.assertIsNone(stream.header.get("version"))
        self.assertEqual(stream.take(), [])

    def test_unknown_to(self):
        stream = self.open(to="elsewhere.example")
        self.assertEqual(stream.stream_error(), "host-unknown")
        # Our header came first, naming no domain we do not serve.
        self.assertIsNotNone(stream.header)
        self.assertIsNone(stream.header.get("from"))

    def test_missing_to_is_tolerated_on_dialback_streams(self):
        stream = self.open(to=None)
        self.assertIsNone(stream.stream_error())
        self.assertIsNotNone(stream.header.get("id"))

    def test_changed_addresses_after_restart(self):
        # Real restarts (STARTTLS, then SASL EXTERNAL), as the handler's
        # states allow a new header only after one of its own.
        stream = self.open(tls=_ServerTLS())
        stream.transport.startTLS = lambda creator: None
        first_id = stream.header.get("id")
        stream.feed("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        stream.restart()
        stream.feed(server_header(to="gw.example", **{"from": "remote.example"}, version="1.0"))
        self.assertIsNone(stream.stream_error())
        self.assertNotEqual(self.handler.stream_id, first_id, "a new id after every restart")
        issued = shared_ca().issue(dns=("remote.example",))
        stream.stream.tls = TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", issued.cert)
        stream.feed("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>")
        stream.restart()
        stream.feed(server_header(to="chat.gw.example", **{"from": "remote.example"}, version="1.0"))
        self.assertEqual(stream.stream_error(), "improper-addressing")

    def test_blocked_peer(self):
        stream = self.open(blocked={"remote.example"})
        self.assertEqual(stream.stream_error(), "policy-violation")


class ReceivingServerTests(InboundCase):
    def test_valid_key_authenticates_the_pair_and_routes(self):
        stream = self.open()
        stream.take()
        stream.feed("<db:result from='remote.example' to='chat.gw.example'>k3y</db:result>")
        [(args, d)] = self.verifier.calls
        self.assertEqual(args, ("chat.gw.example", "remote.example", stream.header.get("id"), "k3y"))
        record = self.handler.record
        self.assertEqual(record.state_of("chat.gw.example", "remote.example"), PENDING)
        d.callback(True)
        [answer] = stream.take()
        self.assertEqual((answer.uri, answer.name, answer["type"], answer["from"], answer["to"]),
                         (ns.DIALBACK, "result", "valid", "chat.gw.example", "remote.example"))
        self.assertEqual(record.state_of("chat.gw.example", "remote.example"), VALID)
        stream.feed("<message from='a@remote.example' to='b@chat.gw.example'><body>x</body></message>")
        self.assertEqual([m["to"] for m in self.router.routed], ["b@chat.gw.example"])
        self.assertEqual(record.pairs[("chat.gw.example", "remote.example")].stanzas_in, 1)

    def test_invalid_key_on_the_first_pair_closes_the_stream(self):
        # XEP-0220 2.2.1: "invalid", then the stream is closed.
        stream = self.open()
        stream.take()
        stream.feed("<db:result from='remote.example' to='chat.gw.example'>bad</db:result>")
        self.verifier.calls[0][1].callback(False)
        [answer] = stream.take()
        self.assertEqual((answer.name, answer["type"]), ("result", "invalid"))
        self.assertEqual(self.handler.record.state_of("chat.gw.example", "remote.example"), INVALID)
        self.assertTrue(stream.disconnecting)
        self.assertTrue(stream.ended, "our stream is closed with </stream:stream>")

    def test_invalid_key_with_other_valid_pairs_is_forbidden(self):
        # XEP-0220 2.2.1: with valid pairs on the stream, a <forbidden/>
        # dialback error instead, and the valid pairs keep working.
        stream = self.open()
        stream.take()
        self.authenticate(stream, local="gw.example")
        stream.feed("<db:result from='remote.example' to='chat.gw.example'>bad</db:result>")
        self.verifier.calls[-1][1].callback(False)
        [answer] = stream.take()
        self.assertEqual((answer["type"], error_condition(answer)), ("error", "forbidden"))
        self.assertEqual(self.handler.record.state_of("chat.gw.example", "remote.example"), INVALID)
        self.assertFalse(stream.disconnecting)
        stream.feed("<message from='a@remote.example' to='b@gw.example'/>")
        self.assertEqual([m["to"] for m in self.router.routed], ["b@gw.example"])
        stream.feed("<message from='a@remote.example' to='b@chat.gw.example'/>")
        self.assertEqual(stream.stream_error(), "host-unknown")

    def test_verification_error_leaves_other_pairs_alone(self):
        stream = self.open()
        stream.take()
        self.authenticate(stream, local="gw.example")
        stream.feed("<db:result from='remote.example' to='chat.gw.example'>k</db:result>")
        self.verifier.calls[-1][1].errback(DialbackError("remote-server-not-found", "no DNS"))
        [answer] = stream.take()
        self.assertEqual((answer["type"], error_condition(answer)), ("error", "remote-server-not-found"))
        self.assertFalse(stream.disconnecting)
        stream.feed("<iq type='get' id='1' from='remote.example' to='gw.example'><ping xmlns='urn:xmpp:ping'/></iq>")
        self.assertEqual(len(self.router.routed), 1)

    def test_not_hosted_here(self):
        stream = self.open()
        stream.take()
        stream.feed("<db:result from='remote.example' to='other.example'>k</db:result>")
        [answer] = stream.take()
        self.assertEqual(error_condition(answer), "item-not-found")
        self.assertEqual(self.verifier.calls, [])

    def test_pending_cap_per_stream(self):
        stream = self.open(per_stream=2)
        stream.take()
        for n in range(3):
            stream.feed(f"<db:result from='r{n}.example' to='gw.example'>k</db:result>")
        self.assertEqual(len(self.verifier.calls), 2)
        [answer] = stream.take()
        self.assertEqual((answer["to"], error_condition(answer)), ("r2.example", "resource-constraint"))
        # Finishing one frees a place.
        self.verifier.calls[0][1].callback(True)
        stream.feed("<db:result from='r3.example' to='gw.example'>k</db:result>")
        self.assertEqual(len(self.verifier.calls), 3)

    def test_pending_cap_counts_until_the_connection_is_gone(self):
        self.verifier.finish_with_answer = False
        stream = self.open(per_stream=2)
        stream.take()
        for n in range(2):
            stream.feed(f"<db:result from='r{n}.example' to='gw.example'>k</db:result>")
        for _, d in self.verifier.calls:
            d.callback(True)
        self.assertEqual([a["type"] for a in stream.take()], ["valid", "valid"])
        self.assertEqual(self.budget.in_use, 2, "answered, but both connections are still open")
        stream.feed("<db:result from='r2.example' to='gw.example'>k</db:result>")
        [answer] = stream.take()
        self.assertEqual((answer["to"], error_condition(answer)), ("r2.example", "resource-constraint"))
        self.verifier.finishers.pop(0)()  # one verification connection closes
        self.assertEqual(self.budget.in_use, 1)
        stream.feed("<db:result from='r2.example' to='gw.example'>k</db:result>")
        self.assertEqual(len(self.verifier.calls), 3)

    def test_pair_cap_per_connection(self):
        stream = self.open(max_pairs=3)
        stream.take()
        for n in range(3):
            self.authenticate(stream, local="gw.example", remote=f"r{n}.example")
        stream.feed("<db:result from='r3.example' to='gw.example'>k</db:result>")
        [answer] = stream.take()
        self.assertEqual((answer["type"], answer["to"], error_condition(answer)),
                         ("error", "r3.example", "resource-constraint"))
        self.assertEqual(len(self.verifier.calls), 3, "no verification for a refused pair")
        self.assertEqual(len(self.handler.record.pairs), 3)
        self.assertFalse(stream.disconnecting)
        # A pair the connection already has is not a new one.
        stream.feed("<db:result from='r1.example' to='gw.example'>k</db:result>")
        self.assertEqual(len(self.verifier.calls), 4)

    def test_global_budget(self):
        self.budget = VerificationBudget(1)
        first, second = self.open(), self.open()
        first.feed("<db:result from='r1.example' to='gw.example'>k</db:result>")
        second.take()
        second.feed("<db:result from='r2.example' to='gw.example'>k</db:result>")
        [answer] = second.take()
        self.assertEqual(error_condition(answer), "resource-constraint")
        first.stream.connectionLost(None)
        self.assertEqual(self.budget.in_use, 0)

    def test_unsolicited_valid_is_never_accepted(self):
        stream = self.open()
        stream.take()
        stream.feed("<db:result from='remote.example' to='gw.example' type='valid'/>")
        self.assertIsNone(self.handler.record.state_of("gw.example", "remote.example"))
        stream.feed("<message from='a@remote.example' to='b@gw.example'/>")
        self.assertEqual(stream.stream_error(), "not-authorized")
        self.assertEqual(self.router.routed, [])

    def test_close_cancels_pending_verifications(self):
        stream = self.open()
        stream.feed("<db:result from='remote.example' to='gw.example'>k</db:result>")
        stream.stream.connectionLost(None)
        self.assertEqual(self.verifier.cancelled, [("gw.example", "remote.example")])
        self.assertEqual(self.budget.in_use, 0)
        self.assertEqual(len(self.table), 0)


class AuthoritativeServerTests(InboundCase):
    def verify(self, key, to="chat.gw.example"):
        stream = self.open(to=None)
        stream.take()
        stream.feed(f"<db:verify from='remote.example' to='{to}' id='S1'>{key}</db:verify>")
        [answer] = stream.take()
        return answer

    def test_right_key(self):
        key = dialback.dialback_key(SECRET, "remote.example", "chat.gw.example", "S1")
        answer = self.verify(key)
        self.assertEqual((answer.name, answer["type"], answer["id"], answer["from"], answer["to"]),
                         ("verify", "valid", "S1", "chat.gw.example", "remote.example"))

    def test_wrong_key(self):
        key = dialback.dialback_key(SECRET, "remote.example", "chat.gw.example", "S2")
        self.assertEqual(self.verify(key)["type"], "invalid")

    def test_not_ours(self):
        answer = self.verify("k", to="other.example")
        self.assertEqual((answer["type"], error_condition(answer)), ("error", "item-not-found"))


class StanzaRulesTests(InboundCase):
    def authenticated(self):
        stream = self.open()
        stream.take()
        self.authenticate(stream)
        return stream

    def test_missing_from(self):
        stream = self.authenticated()
        stream.feed("<message to='b@chat.gw.example'/>")
        self.assertEqual(stream.stream_error(), "improper-addressing")

    def test_malformed_to_is_a_stanza_error(self):
        # RFC 7622 addresses: one bad address rejects one stanza, not the
        # stream (more in tests/test_jid.py).
        stream = self.authenticated()
        stream.feed("<message id='m' from='a@remote.example' to='b@@chat..gw'/>")
        self.assertIsNone(stream.stream_error())
        self.assertFalse(stream.disconnecting)
        [(stanza, condition, _)] = self.router.bounced
        self.assertEqual((stanza["id"], condition), ("m", "jid-malformed"))
        self.assertEqual(self.router.reply_from, ["chat.gw.example"])
        self.assertEqual(self.router.routed, [])

    def test_from_not_authenticated(self):
        stream = self.authenticated()
        stream.feed("<message from='a@evil.example' to='b@chat.gw.example'/>")
        self.assertEqual(stream.stream_error(), "invalid-from")
        self.assertEqual(self.router.routed, [])

    def test_to_not_in_a_pair(self):
        stream = self.authenticated()
        stream.feed("<message from='a@remote.example' to='b@gw.example'/>")
        self.assertEqual(stream.stream_error(), "host-unknown")

    def test_handler_exception_bounces_only_that_stanza(self):
        stream = self.authenticated()
        self.router.fail_on_route = RuntimeError("boom")
        stream.feed("<message id='x' from='a@remote.example' to='b@chat.gw.example'/>")
        [(stanza, condition, _)] = self.router.bounced
        self.assertEqual((stanza["id"], condition), ("x", "internal-server-error"))
        self.assertFalse(stream.disconnecting)
        self.flushLoggedErrors(RuntimeError)

    def test_unknown_element(self):
        stream = self.authenticated()
        stream.feed("<bogus xmlns='urn:example:bogus'/>")
        self.assertEqual(stream.stream_error(), "unsupported-stanza-type")

    def test_starttls_without_certificates_fails_and_closes(self):
        stream = self.open()
        stream.take()
        stream.feed("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        [failure] = stream.take()
        self.assertEqual((failure.uri, failure.name), ("urn:ietf:params:xml:ns:xmpp-tls", "failure"))
        self.assertTrue(stream.disconnecting)

    def test_auth_timeout(self):
        stream = self.open()
        self.clock.advance(89)
        self.assertFalse(stream.disconnecting)
        self.clock.advance(2)
        stream.read()
        self.assertEqual(stream.stream_error(), "connection-timeout")

    def test_no_timeout_once_authenticated(self):
        stream = self.authenticated()
        self.clock.advance(200)
        self.assertFalse(stream.disconnecting)


class TLSPolicyTests(InboundCase):
    """With TLS contexts present (their inside does not matter before the
    handshake), the policy shapes what is offered and accepted."""

    def open_with_tls(self, **policy):
        ctx_policy = PolicyTable(PeerPolicy(**policy))
        ctx = make_context(self.clock, local_domains=LOCAL, secret=SECRET, table=self.table,
                           router=self.router, verifier=self.verifier, budget=self.budget,
                           policy=ctx_policy, tls=object())
        self.handler = InboundS2S(ctx)
        stream = MemoryStream(self.handler, self.clock)
        stream.feed(server_header(to="gw.example", **{"from": "remote.example"}, version="1.0"))
        return stream

    def test_required_tls_is_offered_alone(self):
        stream = self.open_with_tls(encryption="required")
        [features] = stream.take()
        [starttls] = list(features.elements())
        self.assertEqual((starttls.uri, starttls.name), (ns.TLS, "starttls"))
        self.assertEqual([c.name for c in starttls.elements()], ["required"])

    def test_dialback_before_required_tls_is_a_policy_violation(self):
        stream = self.open_with_tls(encryption="required")
        stream.take()
        stream.feed("<db:result from='remote.example' to='gw.example'>k</db:result>")
        [answer] = stream.take()
        self.assertEqual((answer["type"], error_condition(answer)), ("error", "policy-violation"))
        self.assertIn("policy requires TLS", str(answer.error.text))
        self.assertEqual(self.verifier.calls, [])
        self.assertFalse(stream.disconnecting, "other pairs on the stream are left alone")

    def test_optional_tls_offers_both(self):
        stream = self.open_with_tls(encryption="optional")
        [features] = stream.take()
        self.assertEqual(sorted(c.name for c in features.elements()), ["bidi", "dialback", "starttls"])
        self.assertEqual([c.name for c in features.starttls.elements()], [])

    def test_certificate_policy_without_tls(self):
        stream = self.open_with_tls(encryption="optional", authentication="certificate")
        stream.take()
        stream.feed("<db:result from='remote.example' to='gw.example'>k</db:result>")
        [answer] = stream.take()
        self.assertEqual(error_condition(answer), "policy-violation")

    def test_sasl_before_tls(self):
        stream = self.open_with_tls(encryption="optional")
        stream.take()
        stream.feed("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>")
        [failure] = stream.take()
        self.assertEqual((failure.name, failure.firstChildElement().name), ("failure", "encryption-required"))
        self.assertIsNone(self.handler.record.state_of("gw.example", "remote.example"))


class PeerLimitTests(InboundCase):
    """A peer's own stanza size and rate limits (set by the operator)."""

    def open_limited(self, **limits):
        self.table = ConnectionTable()
        policy = PolicyTable(PeerPolicy(encryption="optional"),
                             {"remote.example": PeerPolicy("remote.example", encryption="optional", **limits)})
        ctx = make_context(self.clock, local_domains=LOCAL, secret=SECRET, table=self.table,
                           router=self.router, verifier=self.verifier, budget=self.budget, policy=policy)
        self.handler = InboundS2S(ctx)
        stream = MemoryStream(self.handler, self.clock)
        stream.feed(server_header(to="gw.example", **{"from": "remote.example"}, version="1.0"))
        stream.take()
        self.authenticate(stream)
        return stream

    def test_stanza_size(self):
        stream = self.open_limited(max_stanza_bytes=300)
        stream.feed("<message from='a@remote.example' to='b@chat.gw.example'><body>short</body></message>")
        self.assertEqual(len(self.router.routed), 1)
        stream.feed("<message from='a@remote.example' to='b@chat.gw.example'><body>" + "x" * 400 + "</body></message>")
        self.assertEqual(stream.stream_error(), "policy-violation")
        self.assertEqual(len(self.router.routed), 1)

    def test_rate_limit_pauses_reading_and_loses_nothing(self):
        stream = self.open_limited(rate_limit=5.0)
        for n in range(12):  # a burst of 10 is allowed, then reading pauses
            stream.feed(f"<message from='a@remote.example' to='b@chat.gw.example' id='{n}'/>")
        self.assertEqual(len(self.router.routed), 12, "what was read is still delivered")
        self.assertEqual(stream.transport.producerState, "paused")
        self.clock.advance(1.0)
        self.assertEqual(stream.transport.producerState, "producing")
        self.assertFalse(stream.disconnecting)

    def test_no_limit_no_pause(self):
        stream = self.open_limited()
        for n in range(50):
            stream.feed(f"<message from='a@remote.example' to='b@chat.gw.example' id='{n}'/>")
        self.assertEqual(stream.transport.producerState, "producing")
