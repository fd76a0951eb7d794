"""Component routes over real HTTP: XEP-0114 secrets and XEP-0225
credentials (salted SCRAM keys, allowed hostnames), write-only, live."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, reactor

from tests.support.component_client import connect_component
from tests.support.xep0225_client import SaslFailed, connect
from tests.test_admin_api import TIMEOUT, V1, AdminCase


class ComponentTests(AdminCase):
    @defer.inlineCallbacks
    def test_components(self):
        ca, _ = yield self.components()
        got = yield self.api.get(f"{V1}/components")
        self.assertEqual(got.json["components"], [{
            "domain": "chat.a.example", "source": "config", "protocols": ["xep-0114"],
            "secret_set": True, "password_set": False, "allowed_hostnames": [], "note": "",
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
                                             {"allowed_hostnames": ["a.example"]})), 409)
        self.assertError((yield self.api.put(f"{V1}/components/x.a.example",
                                             {"password": "short"})), 422, "password")
        self.assertError((yield self.api.put(f"{V1}/components/x.a.example",
                                             {"allowed_hostnames": ["a..b"]})), 422, "allowed_hostnames")
