"""Two real gateways over TLS: certificates good and bad in both directions,
Direct TLS (XEP-0368), dialback over TLS, and XEP-0344."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from fedgate.s2s.pairs import INBOUND, OUTBOUND
from fedgate.tls.certs import CertificateStore
from tests.support.federation import TwoGatewaysFixture
from tests.support.gateway import gateway_config, temp_dir, shared_ca
from tests.support.pki import DAY, NOW

TIMEOUT = 10

GOOD = {
    "dns-id": lambda ca, d: ca.issue(dns=(d,)),
    "srv-id": lambda ca, d: ca.issue(srv=(d,)),
    "xmppaddr": lambda ca, d: ca.issue(xmpp=(d,)),
    "server-auth-only": lambda ca, d: ca.issue(dns=(d,), eku=("server",)),
    "issued-by-root": lambda ca, d: ca.issue(dns=(d,), issuer=ca.root),
}
BAD = {
    "expired": lambda ca, d: ca.issue(dns=(d,), not_before=NOW - 30 * DAY, not_after=NOW - DAY),
    "not-yet-valid": lambda ca, d: ca.issue(dns=(d,), not_before=NOW + DAY, not_after=NOW + 30 * DAY),
    "self-signed": lambda ca, d: ca.issue(dns=(d,), self_signed=True),
    "wrong-name": lambda ca, d: ca.issue(dns=("other.example",)),
    "untrusted-ca": lambda ca, d: ca.other_ca().issue(dns=(d,)),
    "missing-intermediate": lambda ca, d: _without_chain(ca.issue(dns=(d,))),
}


def _without_chain(issued):
    issued.chain = ()
    return issued


class TLSCase(TwoGatewaysFixture, unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def start(self, a_s2s=None, b_s2s=None, b_config=None):
        a_conf = gateway_config(temp_dir(self), ["a.example"], {"chat.a.example": "sa"}, **(a_s2s or {}))
        b_conf = gateway_config(temp_dir(self), ["b.example"], {"chat.b.example": "sb"}, **(b_s2s or {}))
        if b_config:
            b_config(b_conf)
        yield self.start_two_gateways(a_conf, b_conf)
        self.ca_client = yield self.add_component(self.a, "chat.a.example", "sa")
        self.cb_client = yield self.add_component(self.b, "chat.b.example", "sb")

    def present(self, gateway, domain, issued):
        """Make ``gateway`` present ``issued`` for ``domain`` (no start-up check:
        this is how a peer with a bad certificate looks)."""
        directory = Path(temp_dir(self))
        cert, key = issued.write(directory, domain)
        gateway.tls.replace_store(CertificateStore(None, {domain: (str(cert), str(key))}))

    def send_a_to_b(self, n="1"):
        self.ca_client.send(f"<message from='u@chat.a.example' to='v@chat.b.example' id='m{n}'>"
                            f"<body>over TLS</body></message>")

    @defer.inlineCallbacks
    def expect_delivered(self):
        got = yield self.cb_client.next_element(timeout=TIMEOUT)
        self.assertEqual((got.name, got["from"]), ("message", "u@chat.a.example"))

    @defer.inlineCallbacks
    def expect_bounced(self, condition):
        got = yield self.ca_client.next_element(timeout=TIMEOUT)
        self.assertEqual(got["type"], "error", got.toXml())
        self.assertEqual(got.error.firstChildElement().name, condition, got.toXml())
        self.assertEqual(self.cb_client.received.pending, [], "nothing may reach B's component")
        return got


CERTIFICATE_POLICY_FOR_A = {"peers": {"chat.a.example": {"authentication": "certificate"}}}
CERTIFICATE_POLICY_FOR_B = {"peers": {"chat.b.example": {"authentication": "certificate"}}}


def _make(kind: str, maker, direction: str, good: bool):
    @defer.inlineCallbacks
    def test(self):
        if direction == "inbound":
            # B requires a certificate from chat.a.example; A presents `kind`.
            yield self.start(b_s2s=CERTIFICATE_POLICY_FOR_A)
            self.present(self.a, "chat.a.example", maker(shared_ca(), "chat.a.example"))
        else:
            # A requires a certificate from chat.b.example; B presents `kind`.
            yield self.start(a_s2s=CERTIFICATE_POLICY_FOR_B)
            self.present(self.b, "chat.b.example", maker(shared_ca(), "chat.b.example"))
        self.send_a_to_b()
        if good:
            yield self.expect_delivered()
            [out] = [r for r in self.a.table if r.direction == OUTBOUND]
            self.assertTrue(out.tls["chain_ok"], out.tls)
        elif direction == "inbound":
            # B answers dialback with an error (not-authorized); XEP-0220 2.4:
            # the queued stanza bounces with remote-server-timeout, the
            # peer's condition and reason in the text.
            got = yield self.expect_bounced("remote-server-timeout")
            self.assertIn("not-authorized", str(got.error.text))
            self.assertIn("certificate", str(got.error.text))
        else:
            got = yield self.expect_bounced("policy-violation")
            self.assertIn("policy requires a valid certificate from chat.b.example", str(got.error.text))
        if not good:
            # The refusing side counts the failure, by reason, in its metrics.
            refuser = self.b if direction == "inbound" else self.a
            count = refuser.admin.metrics.registry.get_sample_value(
                "fedgate_tls_failures_total", {"reason": FAILURE_REASON[kind]})
            self.assertGreaterEqual(count or 0, 1, kind)
    return test


FAILURE_REASON = {"expired": "expired-certificate", "not-yet-valid": "expired-certificate",
                  "self-signed": "untrusted-certificate", "wrong-name": "name-mismatch",
                  "untrusted-ca": "untrusted-certificate", "missing-intermediate": "untrusted-certificate"}


class CertificateMatrix(TLSCase):
    """Every bad certificate is refused under the certificate policy, in both
    directions, with nothing routed; every good one passes."""


for _kind, _maker in list(GOOD.items()) + list(BAD.items()):
    for _direction in ("inbound", "outbound"):
        _name = f"test_{_direction}_{_kind.replace('-', '_')}"
        setattr(CertificateMatrix, _name, _make(_kind, _maker, _direction, _kind in GOOD))


class TransportTests(TLSCase):
    @defer.inlineCallbacks
    def test_direct_tls(self):
        """Only an _xmpps-server record: A must use Direct TLS (XEP-0368)."""
        def direct(conf):
            conf["s2s"]["direct_tls_listen"] = ["tcp:0:interface=127.0.0.1"]
        yield self.start(b_config=direct)
        self.dns.add_srv("_xmpps-server._tcp.chat.b.example", 0, 0,
                         self.b.port_of("s2s_direct_tls"), "gw-b.example")
        # Replace the STARTTLS record for chat.b.example by pointing it nowhere.
        self.dns.add_srv("_xmpp-server._tcp.chat.b.example", 5, 0, 1, "gw-b.example")
        self.send_a_to_b()
        yield self.expect_delivered()
        [out] = [r for r in self.a.table if r.direction == OUTBOUND]
        self.assertTrue(out.tls["chain_ok"])
        self.assertTrue(out.remote_address.endswith(f":{self.b.port_of('s2s_direct_tls')}"), out.remote_address)
        [into_b] = [r for r in self.b.table if r.direction == INBOUND and r.authenticated]
        self.assertEqual([p.method for p in into_b.valid_pairs()], ["sasl-external"])

    @defer.inlineCallbacks
    def test_dialback_over_tls(self):
        """A's certificate is not trusted by B: no SASL EXTERNAL, but TLS
        still protects a dialback with a callback (policy: dialback)."""
        yield self.start()
        self.present(self.a, "chat.a.example", shared_ca().other_ca().issue(dns=("chat.a.example",)))
        self.send_a_to_b()
        yield self.expect_delivered()
        [into_b] = [r for r in self.b.table if r.direction == INBOUND and r.authenticated]
        self.assertEqual([p.method for p in into_b.valid_pairs()], ["dialback"])
        self.assertIsNotNone(into_b.tls)
        self.assertFalse(into_b.tls["chain_ok"])

    @defer.inlineCallbacks
    def test_xep_0344_piggyback_without_callback(self):
        """One certificate for both of A's domains: the second pair on the
        stream is accepted by certificate, without a callback.  (Without bidi,
        so that A's answer takes A's own stream and piggybacks.)"""
        yield self.start(a_s2s={"bidi": False}, b_s2s={"bidi": False})
        both = shared_ca().issue(dns=("a.example", "chat.a.example"))
        directory = Path(temp_dir(self))
        cert, key = both.write(directory, "a")
        self.a.tls.replace_store(CertificateStore(str(directory)))
        self.send_a_to_b()
        yield self.expect_delivered()
        # a.example (the gateway itself) now pings chat.b.example's side.
        self.cb_client.send("<iq from='svc@chat.b.example' to='a.example' type='get' id='p'>"
                            "<ping xmlns='urn:xmpp:ping'/></iq>")
        got = yield self.cb_client.next_element(timeout=TIMEOUT)
        self.assertEqual((got["type"], got["from"]), ("result", "a.example"))
        [into_b] = [r for r in self.b.table if r.direction == INBOUND and r.authenticated
                    and r.remote_domain == "chat.a.example"]
        self.assertEqual(sorted((p.remote, p.method) for p in into_b.valid_pairs()),
                         [("a.example", "dialback-with-valid-cert"), ("chat.a.example", "sasl-external")])

    @defer.inlineCallbacks
    def test_tls_required_but_not_offered(self):
        """A's default policy requires TLS; B offers no STARTTLS (as a server
        without TLS would): A's stanzas bounce with a text naming the policy."""
        yield self.start()
        object.__setattr__(self.b.ctx, "tls", None)  # B as a server without TLS
        self.send_a_to_b()
        got = yield self.expect_bounced("policy-violation")
        self.assertIn("policy requires TLS with chat.b.example", str(got.error.text))
