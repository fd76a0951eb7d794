"""XEP-0225 component connections over real sockets: TLS, SASL, binding,
federation between two gateways, and the XEP's error cases."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from fedgate.component.certauth import fingerprint
from fedgate.component.scram import derive
from tests.support.federation import TwoGatewaysFixture, add_component
from tests.support.gateway import gateway_config, temp_dir, shared_ca
from tests.support.pki import TestCA
from tests.support.xep0225_client import SaslFailed, connect, error_condition

TIMEOUT = 10
PASSWORD = "correct horse battery staple"
HOSTNAMES = ["svc.b.example", "bot.b.example"]


def credential(password=PASSWORD, allowed=HOSTNAMES):
    return {"scram_sha256": derive(password, "sha256").encode(),
            "scram_sha1": derive(password, "sha1").encode(), "allowed": list(allowed)}


class Xep0225Case(TwoGatewaysFixture, unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        a_conf = gateway_config(temp_dir(self), ["a.example"], {"chat.a.example": "sa"})
        b_dir = temp_dir(self)
        b_conf = gateway_config(b_dir, ["b.example"], {"chat.b.example": "sb"},
                                extra_hosted=HOSTNAMES + ["lb.b.example", "other.b.example"])
        b_conf["components"].update({
            "credentials": {"svc.b.example": credential(),
                            "other.b.example": credential("other password", ["other.b.example", "lb.b.example"])},
            "load_balanced": ["lb.b.example"],
        })
        self.ca_file = Path(b_dir) / "ca.pem"
        yield self.start_two_gateways(a_conf, b_conf, b_published=["b.example"] + HOSTNAMES)
        self.chat = yield add_component(self, self.a, "chat.a.example", "sa")

    @defer.inlineCallbacks
    def client(self, to="b.example", sender="svc.b.example", tls=True, mechanism="SCRAM-SHA-256",
               username="svc.b.example", password=PASSWORD, cert=None):
        c = yield connect(reactor, self.b.port_of("components"), to, sender)
        self.addCleanup(c.close)
        if tls:
            yield c.starttls(self.ca_file, *(cert or (None, None)))
        if mechanism:
            yield c.auth(mechanism, username, password)
        return c


class FederationTests(Xep0225Case):
    @defer.inlineCallbacks
    def test_two_hostnames_over_federation_then_unbind(self):
        c = yield self.client()
        self.assertEqual(c.features.firstChildElement().uri, "urn:xmpp:component:0")
        for host in HOSTNAMES:
            reply = yield c.bind(host)
            self.assertEqual((reply["type"], str(reply.bind.hostname)), ("result", host))
        # Traffic from and to both hostnames across federation.
        for host in HOSTNAMES:
            c.send(f"<message from='agent@{host}' to='u@chat.a.example' id='to-{host}'><body>hi</body></message>")
            got = yield self.chat.next_element(timeout=TIMEOUT)
            self.assertEqual((got["from"], got["id"]), (f"agent@{host}", f"to-{host}"))
            self.chat.send(f"<message from='u@chat.a.example' to='agent@{host}' id='from-{host}'/>")
            got = yield c.next()
            self.assertEqual((got.name, got["to"], got["id"], got.uri),
                             ("message", f"agent@{host}", f"from-{host}", "jabber:client"))
        # Unbind one: its route disappears, the other keeps working.
        reply = yield c.unbind("bot.b.example")
        self.assertEqual(reply["type"], "result")
        self.assertNotIn("bot.b.example", self.b.router.components)
        self.chat.send("<message from='u@chat.a.example' to='agent@bot.b.example' id='gone'/>")
        bounce = yield self.chat.next_element(timeout=TIMEOUT)
        self.assertEqual((bounce["type"], bounce["id"], error_condition(bounce)),
                         ("error", "gone", "service-unavailable"))
        self.chat.send("<message from='u@chat.a.example' to='agent@svc.b.example' id='still'/>")
        got = yield c.next()
        self.assertEqual(got["id"], "still")
        # A stanza without 'from' is stamped with the default (oldest) hostname.
        c.send("<message to='u@chat.a.example' id='stamped'/>")
        got = yield self.chat.next_element(timeout=TIMEOUT)
        self.assertEqual((got["id"], got["from"]), ("stamped", "svc.b.example"))
        # Unbinding the last hostname closes the stream.
        reply = yield c.unbind("svc.b.example")
        self.assertEqual(reply["type"], "result")
        yield c.closed.addTimeout(TIMEOUT, reactor)
        self.assertEqual(self.b.router.components, {})

    @defer.inlineCallbacks
    def test_scram_sha1_and_plain_over_tls(self):
        for mechanism in ("SCRAM-SHA-1", "PLAIN"):
            c = yield self.client(mechanism=mechanism)
            reply = yield c.bind("bot.b.example")
            self.assertEqual(reply["type"], "result")
            yield c.unbind("bot.b.example")
            yield c.closed.addTimeout(TIMEOUT, reactor)

    @defer.inlineCallbacks
    def test_load_balancing_across_streams(self):
        first = yield self.client(sender="other.b.example", username="other.b.example", password="other password")
        second = yield self.client(sender="other.b.example", username="other.b.example", password="other password")
        for c in (first, second):
            reply = yield c.bind("lb.b.example")
            self.assertEqual(reply["type"], "result")
        self.publish_extra("lb.b.example")
        for n in range(4):
            self.chat.send(f"<message from='u@chat.a.example' to='x@lb.b.example' id='lb{n}'/>")
        got = {}
        for name, c in (("first", first), ("second", second)):
            for _ in range(2):
                element = yield c.next()
                got.setdefault(name, []).append(element["id"])
        self.assertEqual(sorted(got["first"] + got["second"]), ["lb0", "lb1", "lb2", "lb3"])

    def publish_extra(self, host):
        self.dns.add_srv(f"_xmpp-server._tcp.{host}", 0, 0, self.b.port_of("s2s"), "gw-b.example")


class ErrorTests(Xep0225Case):
    @defer.inlineCallbacks
    def test_bind_before_auth(self):
        c = yield self.client(mechanism=None)
        c.send("<iq type='set' id='early'><bind xmlns='urn:xmpp:component:0'>"
               "<hostname>svc.b.example</hostname></bind></iq>")
        yield c.closed.addTimeout(TIMEOUT, reactor)
        self.assertEqual(c.stream_error, "not-authorized")
        self.assertNotIn("svc.b.example", self.b.router.components)

    @defer.inlineCallbacks
    def test_hostname_bound_by_another_stream(self):
        first = yield self.client()
        yield first.bind("svc.b.example")
        second = yield self.client()
        reply = yield second.bind("svc.b.example")
        self.assertEqual((reply["type"], error_condition(reply)), ("error", "conflict"))
        again = yield first.bind("svc.b.example/other-resource")
        self.assertEqual(error_condition(again), "conflict", "already bound on this stream")

    @defer.inlineCallbacks
    def test_hostname_not_allowed(self):
        c = yield self.client()
        reply = yield c.bind("other.b.example")
        self.assertEqual(error_condition(reply), "not-allowed")

    @defer.inlineCallbacks
    def test_malformed_requests(self):
        c = yield self.client()
        for body in ("<bind xmlns='urn:xmpp:component:0'/>",
                     "<bind xmlns='urn:xmpp:component:0'><hostname>a b</hostname></bind>",
                     "<bind xmlns='urn:xmpp:component:0'><hostname>x</hostname><hostname>y</hostname></bind>"):
            c.send(f"<iq type='set' id='bad'>{body}</iq>")
            reply = yield c.next()
            self.assertEqual(error_condition(reply), "bad-request", body)
        reply = yield c.unbind("bot.b.example")
        self.assertEqual(error_condition(reply), "item-not-found")

    @defer.inlineCallbacks
    def test_plain_without_tls_is_refused(self):
        c = yield self.client(tls=False, mechanism=None)
        with self.assertRaises(SaslFailed) as raised:
            yield c.auth("PLAIN", "svc.b.example", PASSWORD)
        self.assertEqual(raised.exception.condition, "encryption-required")

    @defer.inlineCallbacks
    def test_wrong_password(self):
        for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"):
            c = yield self.client(mechanism=None)
            with self.assertRaises(SaslFailed) as raised:
                yield c.auth(mechanism, "svc.b.example", "wrong")
            self.assertEqual(raised.exception.condition, "not-authorized", mechanism)

    @defer.inlineCallbacks
    def test_bind_of_the_gateway_domain_or_an_xep0114_domain(self):
        c = yield self.client()
        for hostname in ("b.example", "chat.b.example", "a.example"):
            reply = yield c.bind(hostname)
            self.assertEqual(error_condition(reply), "not-allowed", hostname)
        self.assertEqual(self.b.router.components, {})

    @defer.inlineCallbacks
    def test_client_certificate_for_another_domain(self):
        cert_dir = Path(temp_dir(self))
        paths = shared_ca().issue(dns=("evil.example",)).write(cert_dir, "evil")
        c = yield self.client(mechanism=None, cert=paths)
        with self.assertRaises(SaslFailed) as raised:
            yield c.auth("EXTERNAL", authzid="svc.b.example")
        self.assertEqual(raised.exception.condition, "not-authorized")

    @defer.inlineCallbacks
    def test_explicit_wrong_from_is_a_stream_error(self):
        c = yield self.client()
        yield c.bind("svc.b.example")
        c.send("<message from='x@bot.b.example' to='u@chat.a.example' id='spoof'/>")
        yield c.closed.addTimeout(TIMEOUT, reactor)
        self.assertEqual(c.stream_error, "invalid-from")
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.chat.received.pending, [], "nothing was routed")


def write_cert(testcase, issued, name: str):
    return issued.write(Path(temp_dir(testcase)), name)


class ExternalWithoutPinsTests(Xep0225Case):
    """No credential on gateway B enables certificate authentication: a
    certificate from B's own trust roots proves nothing, whichever name it
    carries (a component identity, B's own domain, an XEP-0114 component's
    domain, a remote domain)."""

    def test_external_not_offered(self):
        return self.assertExternalRefused("svc.b.example", offered=False)

    def test_certificate_trusted_by_the_roots_for_a_component_identity(self):
        return self.assertExternalRefused("svc.b.example")

    def test_certificate_of_another_identity(self):
        return self.assertExternalRefused("other.b.example")

    def test_certificate_of_the_gateway_domain(self):
        return self.assertExternalRefused("b.example")

    def test_certificate_of_an_xep0114_component_domain(self):
        return self.assertExternalRefused("chat.b.example")

    def test_certificate_of_a_remote_domain(self):
        return self.assertExternalRefused("a.example")

    @defer.inlineCallbacks
    def assertExternalRefused(self, name: str, offered: bool = True):
        paths = write_cert(self, shared_ca().issue(dns=(name,)), "client")
        c = yield self.client(mechanism=None, cert=paths, sender=name)
        if not offered:
            self.assertNotIn("EXTERNAL", c.mechanisms())
            return
        try:
            yield c.auth("EXTERNAL", authzid=name)
        except SaslFailed as failed:
            self.assertEqual(failed.condition, "not-authorized")
        else:  # what the gateway did before the fix: bind the name and take its traffic
            reply = yield c.bind(name)
            self.fail(f"EXTERNAL as {name} succeeded; bind answered {reply['type']}")
        self.assertNotIn(name, self.b.router.components)


class PinnedExternalTests(TwoGatewaysFixture, unittest.TestCase):
    """Gateway B with certificate authentication configured: pinned.b.example
    by fingerprint (a self-signed certificate: B's trust roots play no part),
    anchored.b.example by its own CA and exact name, with a load-balanced
    hostname; svc.b.example by SCRAM only."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.component_ca = TestCA("components")
        self.pinned = shared_ca().issue(dns=("pinned.b.example",), self_signed=True)
        b_dir = Path(temp_dir(self))
        digest = fingerprint(self.pinned.cert)
        hosted = ["svc.b.example", "pinned.b.example", "web.b.example", "anchored.b.example",
                  "lb.b.example"]
        conf = gateway_config(str(b_dir), ["b.example"], {"chat.b.example": "sb"}, extra_hosted=hosted)
        conf["components"].update({
            "credentials": {
                "svc.b.example": credential(allowed=[]),
                "pinned.b.example": {"certificate_sha256": [
                    ":".join(digest[i:i + 2] for i in range(0, 64, 2)).upper()], "allowed": ["web.b.example"]},
                "anchored.b.example": {"trust_anchor": str(self.component_ca.write_root(b_dir / "components.pem")),
                                       "certificate_name": "anchored.b.example", "allowed": ["lb.b.example"]},
            },
            "load_balanced": ["lb.b.example"],
        })
        self.ca_file = b_dir / "ca.pem"
        a_conf = gateway_config(temp_dir(self), ["a.example"], {"chat.a.example": "sa"})
        yield self.start_two_gateways(a_conf, conf, b_published=["b.example"] + hosted)
        self.chat = yield add_component(self, self.a, "chat.a.example", "sa")

    @defer.inlineCallbacks
    def external(self, issued, identity: str, sender: str | None = None):
        """A stream authenticated with EXTERNAL as ``identity`` presenting
        ``issued``; raises SaslFailed if refused."""
        c = yield connect(reactor, self.b.port_of("components"), "b.example", sender)
        self.addCleanup(c.close)
        yield c.starttls(self.ca_file, *write_cert(self, issued, "client"))
        offered = "EXTERNAL" in c.mechanisms()  # only to a certificate naming a pinned identity
        yield c.auth("EXTERNAL", authzid=identity)
        self.assertTrue(offered, "EXTERNAL succeeded without being offered")
        return c

    @defer.inlineCallbacks
    def assertRefused(self, issued, identity: str):
        failure = yield self.assertFailure(self.external(issued, identity), SaslFailed)
        self.assertEqual(failure.condition, "not-authorized")
        self.assertEqual(self.b.router.components, {})

    # -- the controls that work ------------------------------------------------------
    @defer.inlineCallbacks
    def test_fingerprint_pin_works(self):
        c = yield self.external(self.pinned, "", sender="pinned.b.example")  # identity from the header
        for host in ("pinned.b.example", "web.b.example"):
            reply = yield c.bind(host)
            self.assertEqual(reply["type"], "result", host)
        c.send("<message from='bot@web.b.example' to='u@chat.a.example' id='out'/>")
        got = yield self.chat.next_element(timeout=TIMEOUT)
        self.assertEqual((got["from"], got["id"]), ("bot@web.b.example", "out"))

    @defer.inlineCallbacks
    def test_anchor_and_name_work(self):
        c = yield self.external(self.component_ca.issue(dns=("anchored.b.example",)), "anchored.b.example")
        reply = yield c.bind("anchored.b.example")
        self.assertEqual(reply["type"], "result")

    @defer.inlineCallbacks
    def test_load_balanced_hostname_bound_by_two_connections_of_one_identity(self):
        streams = []
        for _ in range(2):
            c = yield self.external(self.component_ca.issue(dns=("anchored.b.example",)), "anchored.b.example")
            reply = yield c.bind("lb.b.example")
            self.assertEqual(reply["type"], "result")
            streams.append(c)
        self.assertEqual(len(self.b.router.components["lb.b.example"].members), 2)
        for n in range(4):
            self.chat.send(f"<message from='u@chat.a.example' to='x@lb.b.example' id='lb{n}'/>")
        got = []
        for c in streams:
            for _ in range(2):
                element = yield c.next()
                got.append(element["id"])
        self.assertEqual(sorted(got), ["lb0", "lb1", "lb2", "lb3"])

    # -- one refusal each ----------------------------------------------------------------
    def test_certificate_trusted_by_the_global_roots_without_a_pin(self):
        # svc.b.example has SCRAM keys only; B trusts the shared CA.
        return self.assertRefused(shared_ca().issue(dns=("svc.b.example",)), "svc.b.example")

    def test_wrong_fingerprint(self):
        same_name = shared_ca().issue(dns=("pinned.b.example",), self_signed=True)
        return self.assertRefused(same_name, "pinned.b.example")

    def test_pinned_certificate_for_another_identity(self):
        return self.assertRefused(self.pinned, "anchored.b.example")

    def test_certificate_from_another_anchor(self):
        # Issued by B's global trust root, with the right name: not the component's anchor.
        return self.assertRefused(shared_ca().issue(dns=("anchored.b.example",)), "anchored.b.example")

    def test_right_anchor_wrong_name(self):
        return self.assertRefused(self.component_ca.issue(dns=("other.b.example",)), "anchored.b.example")

    @defer.inlineCallbacks
    def test_bind_refusals(self):
        c = yield self.external(self.pinned, "pinned.b.example")
        for hostname in ("b.example",  # the gateway's own domain
                         "chat.b.example",  # an XEP-0114 component's
                         "anchored.b.example", "lb.b.example", "svc.b.example",  # other identities'
                         "a.example", "remote.example"):  # remote domains
            reply = yield c.bind(hostname)
            self.assertEqual(error_condition(reply), "not-allowed", hostname)
        self.assertEqual(self.b.router.components, {})
        # The XEP-0114 component still gets its domain.
        yield add_component(self, self.b, "chat.b.example", "sb")
        self.assertIn("chat.b.example", self.b.router.components)
