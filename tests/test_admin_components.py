"""Component routes over real HTTP: XEP-0114 secrets and XEP-0225
credentials (salted SCRAM keys, certificate pins, allowed hostnames),
write-only, live; no identity may claim another's hostname."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, reactor

from fedgate.component.certauth import fingerprint
from tests.support.component_client import connect_component
from tests.support.gateway import temp_dir
from tests.support.pki import TestCA
from tests.support.xep0225_client import SaslFailed, connect, error_condition
from tests.test_admin_api import TIMEOUT, V1, AdminCase


class ComponentTests(AdminCase):
    @defer.inlineCallbacks
    def test_components(self):
        ca, _ = yield self.components()
        got = yield self.api.get(f"{V1}/components")
        self.assertEqual(got.json["components"], [{
            "domain": "chat.a.example", "source": "config", "protocols": ["xep-0114"],
            "secret_set": True, "password_set": False, "allowed_hostnames": [],
            "certificate_sha256": [], "trust_anchor_set": False, "certificate_name": None, "note": "",
            "connected": True, "bound_hostnames": ["chat.a.example"],
            "peer": got.json["components"][0]["peer"], "stanzas_in": 0, "stanzas_out": 0}])
        self.assertNotIn(b"secret-a", got.body)

        secret = "a-new-component-secret"
        got = yield self.api.put(f"{V1}/components/Bot.A.example", {"secret": secret, "note": "bot"})
        self.assertEqual((got.status, got.json["domain"], got.json["connected"]), (201, "bot.a.example", False))
        self.assertNotIn(secret.encode(), got.body)
        bot = yield connect_component(reactor, "127.0.0.1", self.a.port_of("components"),
                                      "bot.a.example", secret)
        got = yield self.api.get(f"{V1}/components/bot.a.example")
        self.assertEqual((got.json["connected"], got.json["source"], got.json["note"]), (True, "api", "bot"))
        self.assertIn("bot.a.example", self.a.router.live_local_domains)

        got = yield self.api.delete(f"{V1}/components/bot.a.example")
        self.assertEqual((got.status, got.json["disconnected"]), (202, True))
        error = yield bot.next_element(timeout=TIMEOUT)
        self.assertEqual(error.name, "error")
        self.assertEqual([c.name for c in error.elements()][0], "policy-violation")
        yield bot.when_disconnected()
        self.assertError((yield self.api.delete(f"{V1}/components/bot.a.example")), 409, "not connected")

        got = yield self.api.delete(f"{V1}/components/bot.a.example/credentials")
        self.assertEqual(got.status, 204)
        self.assertNotIn("bot.a.example", self.a.router.live_local_domains)
        yield self.assertFailure(connect_component(reactor, "127.0.0.1", self.a.port_of("components"),
                                                   "bot.a.example", secret, timeout=5), Exception)
        self.assertError((yield self.api.get(f"{V1}/components/bot.a.example")), 404)
        self.assertError((yield self.api.delete(f"{V1}/components/bot.a.example/credentials")), 404)
        self.assertError((yield self.api.delete(f"{V1}/components/chat.a.example/credentials")), 409)
        self.assertError((yield self.api.put(f"{V1}/components/x.a.example", {"secret": "short"})), 422, "secret")
        self.assertError((yield self.api.put(f"{V1}/components/bot.c.example", {"secret": secret})), 422,
                         "no certificate for bot.c.example")
        self.assertError((yield self.api.put(f"{V1}/components/x.a.example", {"note": "only"})), 422, "secret")
        self.assertError((yield self.api.patch(f"{V1}/components/none.a.example", {"note": "x"})), 404)
        self.assertError((yield self.api.put(f"{V1}/components/x.a.example", {"secret": secret, "k": 1})), 422, "k")
        self.assertError((yield self.api.put(f"{V1}/components/a.example", {"secret": secret})), 409)
        self.assertTrue(ca.is_authenticated)


class Xep0225ComponentTests(AdminCase):
    @defer.inlineCallbacks
    def client(self, username: str, password: str):
        c = yield connect(reactor, self.a.port_of("components"), "a.example", username)
        self.addCleanup(c.close)
        yield c.starttls(Path(self.a.config.state_dir) / "ca.pem")
        yield c.auth("SCRAM-SHA-256", username, password)
        return c

    @defer.inlineCallbacks
    def test_credentials_and_hostnames(self):
        password = "a long bot password"
        got = yield self.api.put(f"{V1}/components/bots.a.example",
                                 {"password": password, "allowed_hostnames": ["Weather.A.example"]})
        self.assertEqual(got.status, 201, got.body)
        body = got.json
        self.assertEqual((body["protocols"], body["password_set"], body["secret_set"], body["allowed_hostnames"]),
                         (["xep-0225"], True, False, ["weather.a.example"]))
        self.assertNotIn(password.encode(), got.body)
        self.assertIn("weather.a.example", self.a.router.live_local_domains)
        c = yield self.client("bots.a.example", password)
        reply = yield c.bind("weather.a.example")
        self.assertEqual(reply["type"], "result")
        got = yield self.api.get(f"{V1}/components/bots.a.example")
        self.assertEqual((got.json["connected"], got.json["bound_hostnames"]), (True, ["weather.a.example"]))
        # A new password: stored as new salted keys; the note kept by PATCH.
        got = yield self.api.patch(f"{V1}/components/bots.a.example", {"note": "weather bot"})
        self.assertEqual((got.json["note"], got.json["password_set"]), ("weather bot", True))
        got = yield self.api.patch(f"{V1}/components/bots.a.example", {"password": "another long password"})
        self.assertEqual(got.json["note"], "weather bot")
        got = yield self.api.delete(f"{V1}/components/bots.a.example")
        self.assertEqual(got.status, 202)
        yield c.closed
        yield self.assertFailure(self.client("bots.a.example", password), SaslFailed)
        c2 = yield self.client("bots.a.example", "another long password")
        got = yield self.api.delete(f"{V1}/components/bots.a.example/credentials")
        self.assertEqual(got.status, 204)
        yield c2.closed
        self.assertNotIn("weather.a.example", self.a.router.live_local_domains)
        self.assertError((yield self.api.put(f"{V1}/components/x.a.example",
                                             {"allowed_hostnames": ["a.example"]})), 422, "allowed_hostnames")
        self.assertError((yield self.api.put(f"{V1}/components/x.a.example",
                                             {"password": "short"})), 422, "password")
        self.assertError((yield self.api.put(f"{V1}/components/x.a.example",
                                             {"allowed_hostnames": ["a..b"]})), 422, "allowed_hostnames")


class CertificateCredentialTests(AdminCase):
    """SASL EXTERNAL set up through the API: a pinned fingerprint, then the
    component's own trust anchor and exact name; refusals name the field."""

    @defer.inlineCallbacks
    def external(self, issued, identity: str):
        c = yield connect(reactor, self.a.port_of("components"), "a.example", identity)
        self.addCleanup(c.close)
        yield c.starttls(Path(self.a.config.state_dir) / "ca.pem", *issued.write(Path(temp_dir(self)), "c"))
        yield c.auth("EXTERNAL", authzid=identity)
        return c

    @defer.inlineCallbacks
    def test_fingerprint_then_anchor(self):
        component_ca = TestCA("api components")
        bot = component_ca.issue(dns=("bots.a.example",))
        digest = fingerprint(bot.cert)
        colons = ":".join(digest[i:i + 2] for i in range(0, 64, 2)).upper()
        # Before: a certificate alone authenticates nobody.
        yield self.assertFailure(self.external(bot, "bots.a.example"), SaslFailed)
        got = yield self.api.put(f"{V1}/components/bots.a.example",
                                 {"certificate_sha256": [colons], "allowed_hostnames": ["weather.a.example"]})
        self.assertEqual(got.status, 201, got.body)
        self.assertEqual((got.json["protocols"], got.json["password_set"], got.json["certificate_sha256"],
                          got.json["trust_anchor_set"], got.json["certificate_name"]),
                         (["xep-0225"], False, [digest], False, None))
        c = yield self.external(bot, "bots.a.example")
        reply = yield c.bind("weather.a.example")
        self.assertEqual(reply["type"], "result")
        reply = yield c.bind("chat.a.example")
        self.assertEqual(error_condition(reply), "not-allowed")
        # Another certificate with the same name is not the pinned one.
        yield self.assertFailure(self.external(component_ca.issue(dns=("bots.a.example",)), "bots.a.example"),
                                 SaslFailed)
        # Switch to the component's own CA and an exact name.
        got = yield self.api.patch(f"{V1}/components/bots.a.example",
                                   {"certificate_sha256": None, "trust_anchor_pem": component_ca.root_pem().decode(),
                                    "certificate_name": "Robots.A.example"})
        self.assertEqual((got.json["certificate_sha256"], got.json["trust_anchor_set"], got.json["certificate_name"]),
                         ([], True, "robots.a.example"))
        self.assertNotIn(b"BEGIN CERTIFICATE", got.body)
        c = yield self.external(component_ca.issue(dns=("robots.a.example",)), "bots.a.example")
        yield self.assertFailure(self.external(bot, "bots.a.example"), SaslFailed)  # wrong name now
        yield self.assertFailure(self.external(TestCA("x").issue(dns=("robots.a.example",)), "bots.a.example"),
                                 SaslFailed)  # another anchor
        stored = yield self.a.admin.storage.get_component("bots.a.example")
        self.assertEqual((stored.certificate_name, stored.certificate_sha256), ("robots.a.example", ()))

    @defer.inlineCallbacks
    def test_certificate_fields_are_validated(self):
        put = self.api.put
        pin = "ab" * 32
        for body, field in (({"certificate_sha256": ["ab:cd"]}, "certificate_sha256"),
                            ({"certificate_sha256": [pin] * 17}, "certificate_sha256"),
                            ({"certificate_sha256": pin}, "certificate_sha256"),
                            ({"trust_anchor_pem": "not pem"}, "trust_anchor_pem"),
                            ({"trust_anchor_pem": "x" * 70000}, "trust_anchor_pem"),
                            ({"certificate_sha256": [pin], "certificate_name": "x.a.example"}, "certificate_name"),
                            ({"certificate_name": "x.a.example"}, "certificate_name")):
            answer = yield put(f"{V1}/components/x.a.example", body)
            self.assertError(answer, 422, field)
            self.assertEqual(answer.json["field"], field)
        self.assertError((yield self.api.get(f"{V1}/components/x.a.example")), 404)

    @defer.inlineCallbacks
    def test_hostnames_of_others_are_refused(self):
        put = self.api.put
        got = yield put(f"{V1}/components/bots.a.example",
                        {"password": "the bots' password", "allowed_hostnames": ["weather.a.example"]})
        self.assertEqual(got.status, 201)
        # Hostnames of another identity, of an XEP-0114 component, of the gateway.
        for taken in ("bots.a.example", "weather.a.example", "chat.a.example", "a.example"):
            answer = yield put(f"{V1}/components/greedy.a.example",
                               {"password": "a long enough password", "allowed_hostnames": [taken]})
            self.assertError(answer, 422, "allowed_hostnames")
            self.assertEqual(answer.json["field"], "allowed_hostnames")
        # An identity (or XEP-0114 component) named after another identity's hostname.
        self.assertError((yield put(f"{V1}/components/weather.a.example",
                                    {"password": "a long enough password"})), 409, "bots.a.example")
        self.assertError((yield put(f"{V1}/components/weather.a.example", {"secret": "a" * 16})), 409)
        self.assertError((yield self.api.get(f"{V1}/components/greedy.a.example")), 404)
