"""Every admin route over a real HTTP listener, with treq, against real
gateways federating over loopback (DNS from a loopback server too)."""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.support.admin import AdminClient
from tests.support.federation import TwoGatewaysFixture, add_component
from tests.support.gateway import gateway_config, temp_dir

TIMEOUT = 15
V1 = "/api/v1"


def wait_for(predicate, timeout: float = 10.0):
    """Poll ``predicate`` on the reactor until it is true."""
    @defer.inlineCallbacks
    def poll():
        for _ in range(int(timeout / 0.05)):
            if predicate():
                return True
            yield task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError("condition not reached in time")
    return poll()


class AdminCase(TwoGatewaysFixture, unittest.TestCase):
    timeout = 60
    config_a: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        # A wildcard certificate covers components added at run time.
        config = gateway_config(temp_dir(self), ["a.example"], {"chat.a.example": "secret-a"},
                                extra_hosted=["*.a.example"])
        config["s2s"]["peers"] = {"static.example": {"addresses": ["127.0.0.1:1"], "note": "from file"}}
        for key, value in self.config_a.items():
            config.setdefault(key, {}).update(value)
        self.config_dict = config
        yield self.start_two_gateways(
            config, gateway_config(temp_dir(self), ["b.example"], {"chat.b.example": "secret-b"}),
            a_published=["a.example", "chat.a.example"])
        self.api = AdminClient(reactor, self.a)

    @defer.inlineCallbacks
    def components(self):
        ca = yield add_component(self, self.a, "chat.a.example", "secret-a")
        cb = yield add_component(self, self.b, "chat.b.example", "secret-b")
        return ca, cb

    @defer.inlineCallbacks
    def federate(self):
        """A message from chat.a.example to chat.b.example, delivered."""
        ca, cb = yield self.components()
        ca.send("<message from='x@chat.a.example' to='y@chat.b.example' id='m1'><body>hi</body></message>")
        got = yield cb.next_element(timeout=TIMEOUT)
        self.assertEqual(got["id"], "m1")
        return ca, cb

    def assertError(self, answer, status: int, text: str | None = None):
        self.assertEqual(answer.status, status, answer.body)
        self.assertTrue(answer.header("content-type").startswith("application/json"))
        body = answer.json
        self.assertEqual(body["status"], status)
        self.assertTrue(body["message"])
        if text is not None:
            self.assertIn(text, body["message"])
        return body


class StatusAndPolicyTests(AdminCase):
    @defer.inlineCallbacks
    def test_status(self):
        got = yield self.api.get(f"{V1}/status")
        self.assertEqual(got.status, 200)
        body = got.json
        self.assertEqual(body["version"], "0.1.0")
        self.assertEqual(body["domains"], ["a.example"])
        self.assertEqual(body["components"], {"configured": ["chat.a.example"], "connected": []})
        kinds = {(item["kind"], item["port"]) for item in body["listeners"]}
        self.assertIn(("admin", self.api.port), kinds)
        self.assertIn(("s2s", self.a.port_of("s2s")), kinds)
        self.assertGreaterEqual(body["uptime_seconds"], 0)
        self.assertEqual(body["counts"]["peers"], 1)
        self.assertEqual(got.header("cache-control"), "no-store")

    @defer.inlineCallbacks
    def test_policy_get_patch_put_delete(self):
        got = yield self.api.get(f"{V1}/policy")
        self.assertEqual(got.json, {"mode": "open", "source": "config", "default": {
            "encryption": "required", "authentication": "dialback", "max_stanza_bytes": None,
            "rate_limit": None}})
        got = yield self.api.patch(f"{V1}/policy", {"mode": "allowlist"})
        self.assertEqual((got.status, got.json["mode"], got.json["source"]), (200, "allowlist", "api"))
        self.assertTrue(self.a.policy.is_blocked("anyone.example"))
        self.assertEqual(self.a.policy.default.encryption, "required")
        self.assertError((yield self.api.put(f"{V1}/policy", {"mode": "open"})), 422, "default")
        got = yield self.api.put(f"{V1}/policy", {"mode": "open", "default": {"encryption": "optional"}})
        self.assertEqual(got.json["default"]["encryption"], "optional")
        self.assertError((yield self.api.patch(f"{V1}/policy", {"mode": "closed"})), 422, "mode")
        self.assertError((yield self.api.patch(f"{V1}/policy", {"default": {"x": 1}})), 422, "default.x")
        got = yield self.api.delete(f"{V1}/policy")
        self.assertEqual((got.json["mode"], got.json["source"]), ("open", "config"))
        self.assertEqual(self.a.policy.default.encryption, "required")


class PeerTests(AdminCase):
    @defer.inlineCallbacks
    def test_crud(self):
        got = yield self.api.put(f"{V1}/peers/Partner.EXAMPLE.", {
            "allowed": True, "encryption": "optional", "addresses": ["192.0.2.1:5270", "[2001:db8::1]"],
            "max_stanza_bytes": 65536, "rate_limit": 5, "note": "contract 7"})
        self.assertEqual(got.status, 201, got.body)
        self.assertEqual(got.json["domain"], "partner.example")
        self.assertEqual(got.json["addresses"], ["192.0.2.1:5270", "[2001:db8::1]:5269"])
        self.assertEqual((got.json["source"], got.json["rate_limit"]), ("api", 5.0))
        self.assertEqual(got.json["live"], {"blocked": False, "connections": [], "queued_stanzas": 0})
        self.assertEqual(self.a.policy.static_addresses("partner.example"),
                         (("192.0.2.1", 5270), ("2001:db8::1", 5269)))
        got = yield self.api.put(f"{V1}/peers/partner.example", {"note": "replaced"})
        self.assertEqual(got.status, 200)
        self.assertEqual((got.json["encryption"], got.json["addresses"], got.json["note"]),
                         ("required", [], "replaced"))
        got = yield self.api.patch(f"{V1}/peers/partner.example", {"allowed": False})
        self.assertEqual((got.json["allowed"], got.json["note"]), (False, "replaced"))
        self.assertTrue(self.a.policy.is_blocked("partner.example"))
        listing = yield self.api.get(f"{V1}/peers")
        self.assertEqual([p["domain"] for p in listing.json["peers"]], ["partner.example", "static.example"])
        self.assertEqual(listing.json["mode"], "open")
        got = yield self.api.get(f"{V1}/peers/PARTNER.example")
        self.assertEqual(got.json["allowed"], False)
        got = yield self.api.delete(f"{V1}/peers/partner.example")
        self.assertEqual((got.status, got.body), (204, b""))
        self.assertFalse(self.a.policy.is_blocked("partner.example"))
        self.assertError((yield self.api.get(f"{V1}/peers/partner.example")), 404)
        self.assertError((yield self.api.delete(f"{V1}/peers/partner.example")), 404)
        # A first write may be a PATCH: one request creates the peer from
        # the default policy with the fields given.
        got = yield self.api.patch(f"{V1}/peers/partner.example", {"allowed": False, "note": "x"})
        self.assertEqual((got.status, got.json["allowed"], got.json["note"], got.json["encryption"]),
                         (201, False, "x", "required"))
        self.assertTrue(self.a.policy.is_blocked("partner.example"))
        got = yield self.api.patch(f"{V1}/peers/partner.example", {"note": "y"})
        self.assertEqual((got.status, got.json["allowed"], got.json["note"]), (200, False, "y"))
        self.assertError((yield self.api.patch(f"{V1}/peers/chat.a.example", {"note": "x"})), 422,
                         "served by this gateway")

    @defer.inlineCallbacks
    def test_config_layer(self):
        got = yield self.api.get(f"{V1}/peers/static.example")
        self.assertEqual((got.json["source"], got.json["note"]), ("config", "from file"))
        self.assertError((yield self.api.delete(f"{V1}/peers/static.example")), 409, "configuration file")
        got = yield self.api.patch(f"{V1}/peers/static.example", {"allowed": False})
        self.assertEqual((got.json["source"], got.json["note"], got.json["allowed"]), ("api", "from file", False))
        got = yield self.api.delete(f"{V1}/peers/static.example")
        self.assertEqual((got.status, got.json["source"], got.json["allowed"]), (200, "config", True))

    @defer.inlineCallbacks
    def test_idn_domains_are_one_peer(self):
        got = yield self.api.put(f"{V1}/peers/b%C3%BCcher.example", {"note": "u-label"})
        self.assertEqual((got.status, got.json["domain"]), (201, "bücher.example"))
        got = yield self.api.get(f"{V1}/peers/xn--bcher-kva.example")
        self.assertEqual((got.status, got.json["note"]), (200, "u-label"))
        got = yield self.api.put(f"{V1}/peers/XN--BCHER-KVA.example", {"note": "a-label"})
        self.assertEqual(got.status, 200)

    @defer.inlineCallbacks
    def test_validation_errors(self):
        url = f"{V1}/peers/p.example"
        self.assertError((yield self.api.put(f"{V1}/peers/bad..example", {})), 422)
        self.assertError((yield self.api.put(f"{V1}/peers/chat.a.example", {})), 422, "served by this gateway")
        self.assertError((yield self.api.put(f"{V1}/peers/-x-.example", {})), 422)
        self.assertError((yield self.api.put(url, {"encryption": "maybe"})), 422, "encryption")
        self.assertError((yield self.api.put(url, {"blocked": True})), 422, "blocked")
        self.assertError((yield self.api.put(url, {"addresses": ["h:99999"]})), 422, "addresses")
        self.assertError((yield self.api.put(url, {"addresses": "h:1"})), 422, "addresses")
        self.assertError((yield self.api.put(url, {"allowed": "yes"})), 422, "allowed")
        self.assertError((yield self.api.put(url, {"max_stanza_bytes": 0})), 422, "max_stanza_bytes")
        self.assertError((yield self.api.put(url, {"rate_limit": -1})), 422, "rate_limit")
        self.assertError((yield self.api.put(url, {"domain": "other.example"})), 422, "domain")
        self.assertError((yield self.api.put(url, data=b"{not json")), 400, "malformed JSON")
        self.assertError((yield self.api.put(url, data=b"\xff\xfe")), 400)
        self.assertError((yield self.api.put(url, [1, 2])), 400, "JSON object")
        self.assertError((yield self.api.put(url, data=b"{}", content_type="text/plain")), 415)
        self.assertError((yield self.api.put(url, data=b"{}", content_type=None)), 415)
        self.assertError((yield self.api.put(url)), 415)
        big = b'{"note": "' + b"x" * (1024 * 1024) + b'"}'
        self.assertError((yield self.api.put(url, data=big)), 413)
        got = yield self.api.put(url, data=b'{"note": "ok"}', content_type="application/json; charset=utf-8")
        self.assertEqual(got.status, 201)
        self.assertEqual(self.a.policy.peers["p.example"].note, "ok")

    @defer.inlineCallbacks
    def test_storage_failure_is_503_and_changes_nothing(self):
        yield self.a.admin.storage.close()
        self.assertError((yield self.api.put(f"{V1}/peers/p.example", {"allowed": False})), 503, "storage")
        self.assertNotIn("p.example", self.a.policy.peers)
        self.assertFalse(self.a.policy.is_blocked("p.example"))

    @defer.inlineCallbacks
    def test_methods(self):
        got = yield self.api.request("POST", f"{V1}/peers", {})
        body = self.assertError(got, 405)
        self.assertEqual(got.header("allow"), "GET, HEAD, OPTIONS")
        self.assertIn("POST", body["message"])
        got = yield self.api.request("OPTIONS", f"{V1}/peers/p.example")
        self.assertEqual((got.status, got.header("allow")), (204, "DELETE, GET, HEAD, OPTIONS, PATCH, PUT"))
        got = yield self.api.request("HEAD", f"{V1}/status")
        self.assertEqual((got.status, got.body), (200, b""))
        self.assertGreater(int(got.header("content-length")), 10)
        self.assertError((yield self.api.get(f"{V1}/nothing")), 404, "route")
        self.assertError((yield self.api.get(f"{V1}/peers/")), 404)
        self.assertError((yield self.api.get("/api/v2/status")), 404)


class ConnectionTests(AdminCase):
    @defer.inlineCallbacks
    def test_list_filter_show_close(self):
        yield self.federate()
        got = yield self.api.get(f"{V1}/connections")
        conns = got.json["connections"]
        outbound = [c for c in conns if c["direction"] == "outbound"]
        self.assertEqual(len(outbound), 1, conns)
        out = outbound[0]
        self.assertEqual((out["remote_domain"], out["state"]), ("chat.b.example", "authenticated"))
        self.assertIn(out["auth_methods"][0], ("sasl-external", "dialback", "dialback-with-valid-cert"))
        self.assertEqual(out["counters"]["stanzas_out"], 1)
        self.assertIsNotNone(out["tls"])
        self.assertIn("bidi", out)
        self.assertNotIn("pairs", out)
        for query, expect in (("?direction=outbound", [out["id"]]),
                              ("?remote=CHAT.B.example&state=authenticated", [out["id"]]),
                              ("?remote=nobody.example", [])):
            got = yield self.api.get(f"{V1}/connections{query}")
            self.assertEqual([c["id"] for c in got.json["connections"]
                              if c["direction"] == "outbound" or not expect], expect, query)
        self.assertError((yield self.api.get(f"{V1}/connections?direction=sideways")), 422, "direction")
        self.assertError((yield self.api.get(f"{V1}/connections?state=dead")), 422, "state")
        self.assertError((yield self.api.get(f"{V1}/connections?remote=a..b")), 422)

        got = yield self.api.get(f"{V1}/connections/{out['id']}")
        detail = got.json
        self.assertEqual(detail["id"], out["id"])
        self.assertEqual([(p["local"], p["remote"], p["state"]) for p in detail["pairs"]],
                         [("chat.a.example", "chat.b.example", "valid")])
        self.assertIn("version", detail["tls"])
        self.assertError((yield self.api.get(f"{V1}/connections/999999")), 404)
        self.assertError((yield self.api.get(f"{V1}/connections/abc")), 404)

        got = yield self.api.delete(f"{V1}/connections/{out['id']}")
        self.assertEqual(got.status, 202)
        self.assertEqual(got.json["condition"], "policy-violation")
        self.assertIn("operator", got.json["text"])
        yield wait_for(lambda: self.a.table.get(out["id"]) is None)
        self.assertError((yield self.api.delete(f"{V1}/connections/{out['id']}")), 404)


class DestinationTests(AdminCase):
    @defer.inlineCallbacks
    def test_list_show_reset(self):
        ca, _ = yield self.federate()
        ca.send("<message from='x@chat.a.example' to='y@nowhere.example' id='m2'/>")
        bounce = yield ca.next_element(timeout=TIMEOUT)
        self.assertEqual(bounce["type"], "error")
        got = yield self.api.get(f"{V1}/destinations")
        by_domain = {d["domain"]: d for d in got.json["destinations"]}
        self.assertEqual(by_domain["chat.b.example"]["state"], "open")
        self.assertIsInstance(by_domain["chat.b.example"]["connection_id"], int)
        nowhere = by_domain["nowhere.example"]
        self.assertEqual((nowhere["state"], nowhere["failures"]), ("backoff", 1))
        self.assertIn("nowhere.example", nowhere["last_error"])
        self.assertGreater(nowhere["retry_in_seconds"], 0)
        got = yield self.api.get(f"{V1}/destinations/NOWHERE.example")
        self.assertEqual(got.json["queue"], {"stanzas": 0, "bytes": 0, "oldest_age_seconds": None})
        got = yield self.api.post(f"{V1}/destinations/nowhere.example/reset")
        self.assertEqual(got.status, 200, got.body)
        self.assertEqual((got.json["state"], got.json["failures"], got.json["retry_at"]), ("idle", 0, None))
        self.assertError((yield self.api.get(f"{V1}/destinations/unknown.example")), 404)
        self.assertError((yield self.api.post(f"{V1}/destinations/unknown.example/reset")), 404)
        self.assertError((yield self.api.get(f"{V1}/destinations/x..y")), 422)


class DiagnoseTests(AdminCase):
    config_a = {"s2s": {"connect_timeout": 2}}

    @defer.inlineCallbacks
    def test_diagnose_a_working_peer(self):
        got = yield self.api.post(f"{V1}/diagnose/b.example")
        self.assertEqual(got.status, 200, got.body)
        report = got.json
        steps = {s["step"]: s for s in report["steps"]}
        self.assertEqual(list(steps), ["policy", "dns", "tcp", "stream", "tls", "authentication"])
        self.assertTrue(report["ok"], report)
        self.assertEqual((report["domain"], report["from"]), ("b.example", "a.example"))
        self.assertEqual(steps["dns"]["source"], "srv")
        self.assertEqual(steps["dns"]["targets"][0]["addresses"], ["127.0.0.1"])
        self.assertEqual(steps["tcp"]["connected"]["port"], self.b.port_of("s2s"))
        features = {f["name"] for f in steps["stream"]["features"]}
        self.assertIn("starttls", features)
        self.assertEqual(steps["tls"]["mode"], "starttls")
        self.assertTrue(steps["tls"]["certificate"]["valid_for_domain"])
        self.assertIn(steps["tls"]["version"], ("TLSv1.2", "TLSv1.3"))
        self.assertIn(steps["authentication"]["method"], ("sasl-external", "dialback"))
        self.assertTrue(all(s["ms"] >= 0 for s in report["steps"]))

    @defer.inlineCallbacks
    def test_diagnose_with_dialback(self):
        # B calls back A's authoritative server to check our key: a real
        # round trip of XEP-0220 over the probe's stream.
        got = yield self.api.post(f"{V1}/diagnose/chat.b.example",
                                  {"from": "chat.a.example", "method": "dialback"})
        auth = got.json["steps"][-1]
        self.assertEqual((auth["step"], auth["method"], auth["result"], auth["status"]),
                         ("authentication", "dialback", "valid", "ok"), got.json)
        self.assertTrue(got.json["ok"])
        self.assertError((yield self.api.post(f"{V1}/diagnose/b.example", {"method": "x"})), 422, "method")

    @defer.inlineCallbacks
    def test_diagnose_failures(self):
        got = yield self.api.post(f"{V1}/diagnose/nowhere.example", {"from": "chat.a.example"})
        report = got.json
        self.assertFalse(report["ok"])
        self.assertEqual(report["from"], "chat.a.example")
        self.assertEqual([(s["step"], s["status"]) for s in report["steps"]],
                         [("policy", "ok"), ("dns", "failed"), ("tcp", "skipped"), ("stream", "skipped"),
                          ("tls", "skipped"), ("authentication", "skipped")])
        self.assertEqual(report["steps"][1]["source"], "fallback")
        got = yield self.api.post(f"{V1}/diagnose/static.example")
        steps = {s["step"]: s for s in got.json["steps"]}
        self.assertEqual(steps["dns"]["source"], "static")
        self.assertEqual(steps["tcp"]["status"], "failed")
        self.assertEqual(steps["tcp"]["attempts"][0]["port"], 1)
        self.assertError((yield self.api.post(f"{V1}/diagnose/a..b")), 422)
        self.assertError((yield self.api.post(f"{V1}/diagnose/b.example", {"from": "b.example"})), 422, "from")
        self.assertError((yield self.api.post(f"{V1}/diagnose/chat.a.example")), 422)
        self.assertError((yield self.api.post(f"{V1}/diagnose/b.example", {"to": 1})), 422)


class DocumentTests(AdminCase):
    @defer.inlineCallbacks
    def test_openapi_and_metrics(self):
        got = yield self.api.get(f"{V1}/openapi.json")
        self.assertEqual((got.status, got.json["openapi"]), (200, "3.1.0"))
        got = yield self.api.get("/metrics")
        self.assertEqual(got.status, 200)
        self.assertTrue(got.header("content-type").startswith("text/plain"))
        self.assertIn(b"fedgate_s2s_connections", got.body)
        self.assertError((yield self.api.get("/metrics", token=None)), 401)
