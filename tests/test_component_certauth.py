"""XEP-0225 certificate authentication and binding rules, in memory:
fingerprint pins, a component's own trust anchor with the exact name, the
registry's refusals, and the stream handler offering and accepting SASL
EXTERNAL only for identities that pin their certificate."""

from __future__ import annotations

import base64

from twisted.trial import unittest

from fedgate.component.certauth import CertificateAuth, fingerprint, load_anchors, normalize_fingerprint
from fedgate.component.credentials import Credential, CredentialRegistry
from fedgate.component.scram import derive
from fedgate.component.xep0225 import Xep0225Settings, Xep0225Stream
from fedgate.router import Router
from fedgate.stream import namespaces as ns
from fedgate.tls.contexts import RESUMED_SESSION_ERROR, X509_V_NOT_VERIFIED_HERE, TLSInfo
from tests.support.gateway import shared_ca
from tests.support.memory import MemoryStream
from tests.support.pki import TestCA

GATEWAY = "gw.example"
XEP0114 = "chat.gw.example"


def pem(ca: TestCA, which: str = "root") -> str:
    return ca.root_pem().decode() if which == "root" else ca.intermediate.cert_pem(with_chain=False).decode()


class CertificateAuthTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.own_ca = TestCA("bots")
        cls.other_ca = TestCA("other")
        cls.bot = cls.own_ca.issue(dns=("bots.example",))

    def test_fingerprints_normalise(self):
        digest = fingerprint(self.bot.cert)
        colons = ":".join(digest[i:i + 2] for i in range(0, 64, 2)).upper()
        self.assertEqual(normalize_fingerprint(colons), digest)
        self.assertEqual(normalize_fingerprint(" " + digest.upper() + " "), digest)
        for bad in (digest[:-2], digest + "00", "zz" * 32, 42, ""):
            self.assertRaises(ValueError, normalize_fingerprint, bad)

    def test_pinned_fingerprint_accepts_that_certificate_only(self):
        auth = CertificateAuth(frozenset({fingerprint(self.bot.cert)}))
        self.assertIsNone(auth.refusal(self.bot.cert, self.bot.chain))
        same_name = self.own_ca.issue(dns=("bots.example",))
        self.assertIn("not pinned", auth.refusal(same_name.cert, same_name.chain))
        self.assertEqual(auth.refusal(None), "no client certificate")

    def test_anchor_and_exact_name(self):
        auth = CertificateAuth(anchor_pem=pem(self.own_ca), name="bots.example")
        self.assertIsNone(auth.refusal(self.bot.cert, self.bot.chain))
        # An intermediate named as the anchor is enough (partial chain).
        by_intermediate = CertificateAuth(anchor_pem=pem(self.own_ca, "intermediate"), name="bots.example")
        self.assertIsNone(by_intermediate.refusal(self.bot.cert, ()))

    def test_anchor_without_the_intermediate_in_the_chain_is_refused(self):
        auth = CertificateAuth(anchor_pem=pem(self.own_ca), name="bots.example")
        self.assertIn("trust anchor", auth.refusal(self.bot.cert, ()))

    def test_certificate_of_another_anchor_is_refused(self):
        auth = CertificateAuth(anchor_pem=pem(self.own_ca), name="bots.example")
        foreign = self.other_ca.issue(dns=("bots.example",))
        self.assertIn("trust anchor", auth.refusal(foreign.cert, foreign.chain))
        # Its intermediate sent along does not make it trusted either.
        self.assertIn("trust anchor", auth.refusal(foreign.cert, foreign.chain + self.bot.chain))

    def test_right_anchor_wrong_name_is_refused(self):
        auth = CertificateAuth(anchor_pem=pem(self.own_ca), name="bots.example")
        for cert in (self.own_ca.issue(dns=("other.example",)),
                     self.own_ca.issue(dns=("*.example",)),  # a wildcard is not the exact name
                     self.own_ca.issue(dns=("sub.bots.example",))):
            self.assertIn("does not carry the name bots.example", auth.refusal(cert.cert, cert.chain))
        xmpp_addr = self.own_ca.issue(xmpp=("bots.example",))
        self.assertIsNone(auth.refusal(xmpp_addr.cert, xmpp_addr.chain))

    def test_settings_that_identify_nothing_are_errors(self):
        self.assertRaises(ValueError, CertificateAuth)
        self.assertRaises(ValueError, CertificateAuth, anchor_pem=pem(self.own_ca))  # no name
        self.assertRaises(ValueError, CertificateAuth, frozenset({"00" * 32}), name="bots.example")
        self.assertRaises(ValueError, load_anchors, self.bot.cert_pem(with_chain=False))  # not a CA
        self.assertRaises(ValueError, load_anchors, "not a certificate")
        self.assertRaises(ValueError, load_anchors, self.own_ca.root_pem() * 17)  # past the bound
        self.assertEqual(len(load_anchors(self.own_ca.root_pem() * 16)), 16)


def registry(**extra) -> CredentialRegistry:
    """bots.example (SCRAM, may bind weather.example and lb.example) and
    other.example (SCRAM) on a gateway serving gw.example, with an XEP-0114
    component chat.gw.example."""
    credentials = {
        "bots.example": Credential("bots.example", derive("p", "sha1"), None,
                                   frozenset({"weather.example", "lb.example"})),
        "other.example": Credential("other.example", derive("q", "sha1")),
    }
    credentials.update(extra)
    hosted = {GATEWAY, XEP0114}
    for credential in credentials.values():
        hosted |= credential.hostnames
    return CredentialRegistry(credentials, own_domains={GATEWAY}, xep0114={XEP0114: "secret"},
                              hosted=hosted)


class BindingRuleTests(unittest.TestCase):
    def test_configured_hostnames_bind(self):
        reg = registry()
        for hostname in ("bots.example", "weather.example", "lb.example"):
            self.assertIsNone(reg.bind_refusal("bots.example", hostname))

    def test_identity_without_a_credential_binds_nothing(self):
        self.assertIn("no component credential", registry().bind_refusal("cert.example", "cert.example"))

    def test_gateway_domain(self):
        reg = registry(**{"greedy.example": Credential("greedy.example", allowed=frozenset({GATEWAY}))})
        self.assertIn("gateway's own domains", reg.bind_refusal("greedy.example", GATEWAY))
        self.assertIn("not configured", registry().bind_refusal("bots.example", GATEWAY))

    def test_xep0114_component_domain(self):
        reg = registry(**{"greedy.example": Credential("greedy.example", allowed=frozenset({XEP0114}))})
        self.assertIn("XEP-0114", reg.bind_refusal("greedy.example", XEP0114))

    def test_another_identitys_domain(self):
        reg = registry(**{"greedy.example": Credential(
            "greedy.example", allowed=frozenset({"other.example", "weather.example"}))})
        self.assertIn("identity other.example", reg.bind_refusal("greedy.example", "other.example"))
        self.assertIn("identity bots.example", reg.bind_refusal("greedy.example", "weather.example"))
        # ...and the identity it was taken from may not bind it either while both claim it.
        self.assertIn("identity greedy.example", reg.bind_refusal("bots.example", "weather.example"))
        self.assertEqual([h for h, _ in reg.conflicts(reg.get("greedy.example"))],
                         ["other.example", "weather.example"])

    def test_remote_domain(self):
        reg = registry()
        reg.hosted.discard("weather.example")  # e.g. no longer served
        self.assertIn("not hosted", reg.bind_refusal("bots.example", "weather.example"))

    def test_external_needs_certificate_settings(self):
        bot = shared_ca().issue(dns=("bots.example",))
        reg = registry()
        self.assertFalse(reg.certificate_auth_enabled())
        self.assertIn("not enabled", reg.external_refusal("bots.example", bot.cert, bot.chain))
        self.assertIn("no component credential", reg.external_refusal("x.example", bot.cert, bot.chain))
        pinned = Credential("pinned.example", certificate=CertificateAuth(frozenset({fingerprint(bot.cert)})))
        reg = registry(**{"pinned.example": pinned})
        self.assertTrue(reg.certificate_auth_enabled())
        self.assertTrue(reg.certificate_auth_enabled("Pinned.example"))
        self.assertFalse(reg.certificate_auth_enabled("bots.example"))
        self.assertIsNone(reg.external_refusal("pinned.example", bot.cert, bot.chain))


CLIENT_HEADER = ("<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
                 "xmlns:stream='http://etherx.jabber.org/streams' to='gw.example' {sender}version='1.0'>")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode() if text else "="


class StreamTests(unittest.TestCase):
    """The handler over a real XmppStream in memory; TLS facts set directly
    as the handshake would."""

    @classmethod
    def setUpClass(cls):
        cls.bot = shared_ca().issue(dns=("bots.example",))  # trusted by global roots, too
        cls.pins = frozenset({fingerprint(cls.bot.cert)})

    def open(self, reg, cert=None, sender="bots.example", resumed=False):
        self.router = Router({GATEWAY}, set(reg.hosted) - {GATEWAY})
        handler = Xep0225Stream(reg, self.router, None, Xep0225Settings(
            require_tls=False, load_balanced=frozenset({"lb.example"})), reg.hosted)
        mem = MemoryStream(handler, stream_ns=ns.CLIENT)
        mem.stream.tls = TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256",
                                 cert.cert if cert else None,
                                 ((0, X509_V_NOT_VERIFIED_HERE, RESUMED_SESSION_ERROR),) if resumed else (),
                                 cert.chain if cert else ())
        mem.feed(CLIENT_HEADER.format(sender=f"from='{sender}' " if sender else ""))
        features = mem.take()[-1]
        mechanisms = [str(m) for child in features.elements() if child.name == "mechanisms"
                      for m in child.elements()]
        return mem, handler, mechanisms

    def external(self, mem, authzid=""):
        mem.feed(f"<auth xmlns='{ns.SASL}' mechanism='EXTERNAL'>{b64(authzid)}</auth>")
        return mem.take()[-1].name

    def bind(self, mem, hostname):
        mem.restart()
        mem.feed(CLIENT_HEADER.format(sender=""))
        mem.take()
        mem.feed(f"<iq type='set' id='b'><bind xmlns='urn:xmpp:component:0'><hostname>{hostname}"
                 "</hostname></bind></iq>")
        reply = mem.take()[-1]
        if reply["type"] == "error":
            return next(c.name for c in reply.error.elements() if c.name != "text")
        return reply["type"]

    def test_external_not_offered_without_certificate_settings(self):
        mem, handler, mechanisms = self.open(registry(), self.bot)
        self.assertNotIn("EXTERNAL", mechanisms)
        self.assertEqual(self.external(mem, "bots.example"), "failure")
        self.assertIsNone(handler.identity)

    def test_external_not_offered_without_a_client_certificate(self):
        reg = registry(**{"bots.example": Credential("bots.example", certificate=CertificateAuth(self.pins))})
        _, _, mechanisms = self.open(reg, None)
        self.assertNotIn("EXTERNAL", mechanisms)

    def test_a_certificate_not_verified_on_this_handshake_never_authenticates(self):
        """A resumed session carries the certificate of an earlier handshake:
        even the pinned certificate is then neither offered nor accepted."""
        reg = registry(**{"bots.example": Credential("bots.example", certificate=CertificateAuth(self.pins))})
        mem, handler, mechanisms = self.open(reg, self.bot, sender=None, resumed=True)
        self.assertNotIn("EXTERNAL", mechanisms)
        self.assertEqual(self.external(mem, "bots.example"), "failure")
        self.assertIsNone(handler.identity)

    def test_pinned_identity_authenticates_and_binds_its_own_hostnames_only(self):
        reg = registry(**{"bots.example": Credential(
            "bots.example", allowed=frozenset({"weather.example"}), certificate=CertificateAuth(self.pins))})
        mem, handler, mechanisms = self.open(reg, self.bot, sender=None)
        self.assertIn("EXTERNAL", mechanisms)
        self.assertEqual(self.external(mem, "bots.example"), "success")
        self.assertEqual(handler.identity, "bots.example")
        self.assertEqual(self.bind(mem, "weather.example"), "result")
        for hostname in (GATEWAY, XEP0114, "other.example", "remote.example"):
            self.assertEqual(self.bind(mem, hostname), "not-allowed", hostname)
        self.assertEqual(sorted(self.router.components), ["weather.example"])

    def test_bound_hostname_resource_follows_rfc7622(self):
        """Stanzas are stamped with the bound hostname, so its resource must
        be a valid resourcepart: 1023 bytes bind, 1024 bytes do not."""
        reg = registry(**{"bots.example": Credential("bots.example", certificate=CertificateAuth(self.pins))})
        mem, handler, _ = self.open(reg, self.bot, sender=None)
        self.assertEqual(self.external(mem, "bots.example"), "success")
        self.assertEqual(self.bind(mem, "bots.example/" + "r" * 1024), "bad-request")
        self.assertEqual(self.bind(mem, "bots.example/" + "r" * 1023), "result")

    def test_stream_from_names_the_identity(self):
        reg = registry(**{"bots.example": Credential("bots.example", certificate=CertificateAuth(self.pins))})
        mem, handler, _ = self.open(reg, self.bot, sender="bots.example")
        self.assertEqual(self.external(mem), "success")
        self.assertEqual(handler.identity, "bots.example")

    def test_certificate_pinned_for_another_identity(self):
        reg = registry(**{"pinned.example": Credential("pinned.example", certificate=CertificateAuth(self.pins))})
        # The stream says it is bots.example: the certificate identifies
        # pinned.example only, so EXTERNAL is not even offered ...
        mem, handler, mechanisms = self.open(reg, self.bot)
        self.assertNotIn("EXTERNAL", mechanisms)
        self.assertEqual(self.external(mem, "bots.example"), "failure")  # no pin for bots.example
        self.assertEqual(self.external(mem, GATEWAY), "failure")
        self.assertIsNone(handler.identity)
        # ... and without a 'from' it is offered (some identity matches), but
        # naming another identity still fails.
        mem, handler, mechanisms = self.open(reg, self.bot, sender=None)
        self.assertIn("EXTERNAL", mechanisms)
        self.assertEqual(self.external(mem, "bots.example"), "failure")
        self.assertIsNone(handler.identity)

    def test_load_balanced_hostname_is_shared_within_one_identity_only(self):
        reg = registry(**{"bots.example": Credential(
            "bots.example", allowed=frozenset({"lb.example"}), certificate=CertificateAuth(self.pins))})
        first, _, _ = self.open(reg, self.bot)
        router = self.router
        self.external(first, "bots.example")
        self.assertEqual(self.bind(first, "lb.example"), "result")
        second, handler, _ = self.open(reg, self.bot)
        self.router = handler.router = router
        self.external(second, "bots.example")
        self.assertEqual(self.bind(second, "lb.example"), "result")
        self.assertEqual(len(router.components["lb.example"].members), 2)
        # A stream of another identity (say lb.example was moved to it by an
        # operator) cannot join the group the first identity's streams hold.
        reg.set(Credential("other.example", derive("q", "sha1"), allowed=frozenset({"lb.example"}),
                           certificate=CertificateAuth(self.pins)))
        reg.set(Credential("bots.example", certificate=CertificateAuth(self.pins)))
        third, handler, _ = self.open(reg, self.bot)
        handler.router = router
        self.external(third, "other.example")
        self.assertEqual(self.bind(third, "lb.example"), "conflict")
        self.assertEqual(len(router.components["lb.example"].members), 2)
