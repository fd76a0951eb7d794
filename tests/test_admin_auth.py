"""The admin API's bearer token: no route is reachable without it, in any
method or path spelling; where the token comes from; the metrics exception."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial import unittest

from fedgate.admin.auth import BearerCheck, load_or_create_token, read_token
from fedgate.config import parse_config
from tests.support.admin import AdminClient, raw_request, token_of
from tests.support.dnsserver import TestDNSServer
from tests.support.gateway import gateway_config, start_gateway, temp_dir

METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "PATCH", "POST", "DELETE")
V1 = "/api/v1"


def concrete(template: str) -> str:
    return template.replace("{domain}", "p.example").replace("{id}", "1")


class BearerCheckTests(unittest.TestCase):
    def test_matches(self):
        check = BearerCheck("s3cret-token-of-some-length")
        self.assertTrue(check.matches(b"Bearer s3cret-token-of-some-length"))
        self.assertTrue(check.matches(b"bearer   s3cret-token-of-some-length  "))
        for bad in (None, b"", b"Bearer", b"Bearer ", b"Basic s3cret-token-of-some-length",
                    b"Bearer s3cret-token-of-some-lengtH", b"Bearer s3cret-token-of-some-length2",
                    b"s3cret-token-of-some-length"):
            self.assertFalse(check.matches(bad), bad)

    def test_token_sources(self):
        state = temp_dir(self)
        base = {"state_dir": state, "domains": ["gw.example"]}
        config = parse_config(base)
        self.assertIsNone(read_token(config))
        token, path, generated = load_or_create_token(config)
        self.assertTrue(generated)
        self.assertEqual(path, Path(state) / "admin.token")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)
        self.assertGreaterEqual(len(token), 32)
        self.assertEqual(load_or_create_token(config), (token, path, False))
        inline = parse_config({**base, "admin": {"token": "t" * 20}})
        self.assertEqual(load_or_create_token(inline), ("t" * 20, None, False))
        elsewhere = os.path.join(state, "sub", "tok")
        custom = parse_config({**base, "admin": {"token_file": elsewhere}})
        token2, path2, generated2 = load_or_create_token(custom)
        self.assertEqual((path2, generated2), (Path(elsewhere), True))
        self.assertEqual(read_token(custom), token2)


class ConfigTests(unittest.TestCase):
    def test_admin_keys(self):
        base = {"state_dir": "/x", "domains": ["gw.example"]}
        config = parse_config(base)
        self.assertEqual(config.admin.listen, ("tcp:8269:interface=127.0.0.1",))
        self.assertFalse(config.admin.metrics_open)
        config = parse_config({**base, "admin": {"listen": [], "metrics_open": True,
                                                 "metrics_domains": ["Partner.Example"]}})
        self.assertEqual((config.admin.listen, config.admin.metrics_domains), ((), ("partner.example",)))
        from fedgate.config import ConfigError
        for admin, key in (({"token": "short"}, "admin.token"),
                           ({"token": "x" * 20, "token_file": "/f"}, "admin.token_file"),
                           ({"listen": ["nonsense:1"]}, "admin.listen"),
                           ({"metrics_open": "yes"}, "admin.metrics_open"),
                           ({"metrics_domains": ["a..b"]}, "admin.metrics_domains"),
                           ({"tokne": "x"}, "admin.tokne")):
            with self.assertRaises(ConfigError) as caught:
                parse_config({**base, "admin": admin})
            self.assertIn(f": {key}: ", str(caught.exception))


class AuthOverHttpTests(unittest.TestCase):
    timeout = 60
    metrics_open = False

    @defer.inlineCallbacks
    def setUp(self):
        dns = TestDNSServer(reactor)
        port = dns.start()
        self.addCleanup(dns.stop)
        config = gateway_config(temp_dir(self), ["gw.example"], {"chat.gw.example": "s"})
        config["admin"]["metrics_open"] = self.metrics_open
        self.gateway = yield start_gateway(reactor, config, port, self)
        self.api = AdminClient(reactor, self.gateway)
        self.port = self.api.port

    @defer.inlineCallbacks
    def test_every_route_and_method_needs_the_token(self):
        routes = self.gateway.admin.api.routes()
        paths = sorted({concrete(r.template) for r in routes})
        self.assertIn("/metrics", paths)
        for path in paths:
            for method in METHODS:
                for token in (None, "wrong-token", self.api.token + "x", ""):
                    got = yield self.api.request(method, path, {"note": "x"} if method in ("PUT", "PATCH", "POST") else None,
                                                 token=token)
                    self.assertEqual(got.status, 401, (method, path, token))
                    self.assertEqual(got.header("www-authenticate"), 'Bearer realm="fedgate"')
                    if method != "HEAD":
                        self.assertIn("Bearer", got.json["message"])
        self.assertEqual(self.gateway.policy.peers, {})

    @defer.inlineCallbacks
    def test_path_variants_need_the_token_and_never_alias(self):
        variants = ["/api/v1/../api/v1/status", "/api/v1/./status", "/api/v1/%2e%2e/v1/status",
                    "/api/v1/%2E/status", "/api%2Fv1/status", "/api%2fv1%2fstatus",
                    "/api/v1/peers/p.example%2F..%2F..%2Fstatus", "//api/v1/status", "/api/v1//status",
                    "/api/v1/status/", "/api/v1/status?x=1", "/metrics/../api/v1/status",
                    "/api\\v1\\status", "/API/V1/STATUS", "/api/v1/status%00", "/metrics/",
                    "/", "*", "/api/v1/peers/%ff"]
        for target in variants:
            for method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE"):
                status, body = yield raw_request(reactor, self.port, method, target)
                # The asterisk form too: the token is checked as soon as the
                # headers are in (fedgate.admin.channel), before twisted.web
                # would answer it itself.
                self.assertEqual(status, 401, (method, target))
        # With the token, none of them reaches another route: malformed
        # paths are refused, unknown ones are 404 (only the query string
        # variant is the real route).
        for target in variants:
            status, body = yield raw_request(reactor, self.port, "GET", target, self.api.token)
            expected = 200 if target == "/api/v1/status?x=1" else (400, 404, 405)
            if isinstance(expected, tuple):
                self.assertIn(status, expected, (target, body))
            else:
                self.assertEqual(status, expected, (target, body))

    @defer.inlineCallbacks
    def test_writes_without_token_change_nothing(self):
        status, _ = yield raw_request(reactor, self.port, "PUT", "/api/v1/peers/evil.example",
                                      body=b'{"allowed": false}')
        self.assertEqual(status, 401)
        self.assertNotIn("evil.example", self.gateway.policy.peers)
        status, _ = yield raw_request(reactor, self.port, "PUT", "/api/v1/peers/good.example",
                                      self.api.token, body=b'{"allowed": false}')
        self.assertEqual(status, 201)
        self.assertTrue(self.gateway.policy.is_blocked("good.example"))

    @defer.inlineCallbacks
    def test_metrics_need_the_token_by_default(self):
        got = yield self.api.get("/metrics", token=None)
        self.assertEqual(got.status, 401)
        got = yield self.api.get("/metrics")
        self.assertEqual(got.status, 200)

    def test_token_file_is_private(self):
        path = Path(self.gateway.config.state_dir) / "admin.token"
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)
        self.assertEqual(token_of(self.gateway), self.api.token)


class OpenMetricsTests(AuthOverHttpTests):
    metrics_open = True

    @defer.inlineCallbacks
    def test_metrics_need_the_token_by_default(self):
        got = yield self.api.get("/metrics", token=None)
        self.assertEqual(got.status, 200)
        self.assertIn(b"fedgate_s2s_connections", got.body)
        for method in ("PUT", "DELETE", "POST", "OPTIONS"):
            got = yield self.api.request(method, "/metrics", token=None)
            self.assertEqual(got.status, 401, method)
        got = yield self.api.get(f"{V1}/status", token=None)
        self.assertEqual(got.status, 401)

    # Every route except GET/HEAD /metrics still needs the token.
    @defer.inlineCallbacks
    def test_every_route_and_method_needs_the_token(self):
        for route in self.gateway.admin.api.routes():
            path = concrete(route.template)
            for method in METHODS:
                if path == "/metrics" and method in ("GET", "HEAD"):
                    continue
                got = yield self.api.request(method, path, token=None)
                self.assertEqual(got.status, 401, (method, path))
