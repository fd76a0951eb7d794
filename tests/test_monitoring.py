"""The shipped Grafana dashboard and Prometheus alert rules: promtool
accepts the rules, every metric they or the dashboard name is one a real
gateway exports (scraped over loopback), the certificate expiry metric is
there for each hosted domain and no other, and the README's admin routes
are the ones the API serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.trial import unittest

from fedgate.tls.certs import _not_after
from tests.support.admin import AdminClient
from tests.support.federation import start_dns
from tests.support.gateway import gateway_config, start_gateway, temp_dir

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "etc" / "prometheus" / "fedgate-alerts.yml"
DASHBOARD = REPO / "etc" / "grafana" / "fedgate-dashboard.json"
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def named_metrics(text: str) -> set[str]:
    return set(re.findall(r"\bfedgate_[a-z0-9_]+", text))


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


class RulesTests(unittest.TestCase):
    def test_promtool_accepts_the_rules(self):
        promtool = shutil.which("promtool")
        if promtool is None:
            raise unittest.SkipTest("promtool not installed (scripts/bootstrap --test installs "
                                    "Debian's prometheus as root)")
        done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("SUCCESS: 5 rules found", done.stdout)

    def test_the_alerts_the_issue_asks_for(self):
        text = RULES.read_text()
        self.assertEqual(re.findall(r"alert: (\w+)", text), [
            "FedgateQueueGrowing", "FedgateBounceRateHigh", "FedgateTLSFailuresRising",
            "FedgateNoAuthenticatedPeer", "FedgateCertificateExpiring"])
        self.assertIn("fedgate_certificate_expiry_timestamp_seconds - time() < 14 * 86400", text)

    def test_dashboard_panels(self):
        exprs = " ".join(dashboard_exprs())
        for metric in ("fedgate_s2s_connections", "fedgate_s2s_domain_pairs", "fedgate_s2s_stanzas_total",
                       "fedgate_bounces_total", "fedgate_queue_stanzas", "fedgate_tls_failures_total",
                       "fedgate_s2s_handshake_seconds_bucket"):
            self.assertIn(metric, exprs)

    def test_debian_package_installs_both(self):
        lines = (REPO / "debian" / "fedgate.install").read_text().splitlines()
        self.assertIn("etc/grafana/fedgate-dashboard.json usr/share/fedgate/grafana/", lines)
        self.assertIn("etc/prometheus/fedgate-alerts.yml usr/share/fedgate/prometheus/", lines)


class ExportedTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        _, dns_port = start_dns(self)
        config = gateway_config(temp_dir(self), ["a.example", "b.example"], {"chat.a.example": "s"})
        self.gateway = yield start_gateway(reactor, config, dns_port, self)
        self.api = AdminClient(reactor, self.gateway)

    @defer.inlineCallbacks
    def test_every_named_metric_is_exported(self):
        got = yield self.api.get("/metrics")
        self.assertEqual(got.status, 200)
        families = list(text_string_to_metric_families(got.body.decode()))
        exported = {f.name for f in families} | {s.name for f in families for s in f.samples}
        named = named_metrics(RULES.read_text()) | named_metrics(" ".join(dashboard_exprs()))
        self.assertGreaterEqual(len(named), 10)
        missing = {n for n in named if n not in exported
                   and not any(n.endswith(x) and n[:-len(x)] in exported for x in SUFFIXES)}
        self.assertEqual(missing, set())
        # The certificate expiry: one sample per hosted domain, the real notAfter.
        [expiry] = [f for f in families if f.name == "fedgate_certificate_expiry_timestamp_seconds"]
        values = {s.labels["domain"]: s.value for s in expiry.samples}
        self.assertEqual(set(values), {"a.example", "b.example"})
        pair = self.gateway.tls.store.pair_for("a.example")
        self.assertEqual(values["a.example"], _not_after(pair.leaf).timestamp())

    @defer.inlineCallbacks
    def test_readme_admin_routes_are_served(self):
        readme = (REPO / "README.md").read_text()
        section = readme.split("## Operating it", 1)[1].split("\n## ", 1)[0]
        mentioned = re.findall(r"`((?:GET|PUT|PATCH|DELETE|POST)(?:\|(?:GET|PUT|PATCH|DELETE|POST))*) (/[^`\s]*)`",
                               section)
        self.assertGreaterEqual(len(mentioned), 15)
        routes = {(r.method, r.template) for r in self.gateway.admin.api.routes()}
        for methods, path in mentioned:
            full = path if path.startswith("/api/v1/") or path == "/metrics" else "/api/v1" + path
            for method in methods.split("|"):
                self.assertIn((method, full), routes, f"README: {methods} {path}")
        self.assertIn("`GET /metrics` (at the root, not under `/api/v1/`", section)
        self.assertEqual((yield self.api.get("/api/v1/metrics")).status, 404)
