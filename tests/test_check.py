"""fedgatectl check, one check at a time with good and broken inputs: real
certificates from the test CA, a real DNS server on loopback, real sockets;
then the whole command against a running gateway and a stopped one."""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path

from twisted.internet import defer, reactor, utils
from twisted.trial import unittest

from fedgate.check import ERROR, INFO, OK, WARNING
from fedgate.check.certificates import check_certificates
from fedgate.check.config import check_config
from fedgate.check.dns import check_dns, check_domain, make_resolver
from fedgate.check.listeners import check_listeners
from fedgate.check.peers import summarise
from fedgate.config import parse_config
from tests.support.dnsserver import TestDNSServer
from tests.support.gateway import shared_ca, temp_dir, write_config
from tests.support.pki import NOW, DAY
from tests.test_admin_api import AdminCase

REPO = Path(__file__).resolve().parent.parent


def levels(findings, subject=None):
    return [(f.level, f.message) for f in findings if subject is None or f.subject == subject]


def has(findings, level, words, subject=None):
    return any(f.level == level and words in f.message for f in findings
               if subject is None or f.subject == subject)


class ConfigCheckTests(unittest.TestCase):
    def test_good_typo_and_deprecated(self):
        d = Path(temp_dir(self))
        good = write_config(d / "good.toml", {"state_dir": str(d), "domains": ["a.example"]})
        config, findings = check_config(good)
        self.assertEqual(config.domains, ("a.example",))
        self.assertEqual([f.level for f in findings], [OK])
        typo = write_config(d / "typo.toml", {"state_dir": str(d), "domainz": ["a.example"]})
        config, [finding] = check_config(typo)
        self.assertIsNone(config)
        self.assertEqual(finding.level, ERROR)
        self.assertEqual(finding.message, "domainz: unknown key (did you mean 'domains'?)")
        old = write_config(d / "old.toml", {"state_dir": str(d), "domains": ["a.example"],
                                            "s2s": {"peers": {"p.example": {"blocked": True}}}})
        config, findings = check_config(old)
        self.assertFalse(config.s2s.peers["p.example"].allowed)
        self.assertTrue(has(findings, WARNING, "deprecated: write allowed = false", "s2s.peers.p.example.blocked"))


class CertificateCheckTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(temp_dir(self))
        self.ca = shared_ca()
        self.roots = str(self.ca.write_root(self.dir / "ca.pem"))
        (self.dir / "certs").mkdir()

    def config(self, domains=("a.example",), components=(), trust=None, overrides=None):
        tls = {"certificates": str(self.dir / "certs"), "trust_roots": trust or self.roots}
        if overrides:
            tls["domains"] = overrides
        return parse_config({"state_dir": str(self.dir), "domains": list(domains), "tls": tls,
                             "components": {"domains": {c: {"secret": "s"} for c in components}}})

    def check(self, config, public=None):
        return check_certificates(config, public_roots=(public, None) if public else None)

    def test_good_certificate(self):
        self.ca.issue(dns=("a.example",)).write(self.dir / "certs", "a")
        # An SRV-ID alone: named under [tls.domains] (the directory indexes DNS names).
        chat, chat_key = self.ca.issue(srv=("chat.a.example",)).write(self.dir, "chat")
        overrides = {"chat.a.example": {"certificate": str(chat), "key": str(chat_key)}}
        findings = self.check(self.config(components=["chat.a.example"], overrides=overrides), public=self.roots)
        self.assertEqual([f.level for f in findings], [OK, OK], levels(findings))
        self.assertIn("DNS-ID, key fits", findings[0].message)
        self.assertEqual(findings[0].facts["match"], "dns-id")
        self.assertEqual(findings[1].facts["match"], "srv-id")
        # The same certificates, with the system's roots as the public ones:
        # the test CA is not among them.
        findings = self.check(self.config(components=["chat.a.example"], overrides=overrides))
        self.assertTrue(has(findings, WARNING, "does not chain to the system's public roots", "a.example"))
        self.assertFalse(has(findings, ERROR, ""))

    def test_broken_certificates_are_errors(self):
        certs = self.dir / "certs"
        self.ca.issue(dns=("a.example",), not_before=NOW - 100 * DAY, not_after=NOW - DAY).write(certs, "a")
        self.ca.issue(dns=("other.example",)).write(certs, "b")
        cert_path, _ = self.ca.issue(dns=("c.example",)).write(certs, "c")
        (certs / "c.key").write_bytes(self.ca.issue(dns=("c.example",)).key_pem())
        wrong, _ = self.ca.issue(dns=("other.example",)).write(self.dir, "wrong")
        config = self.config(domains=("a.example", "b.example", "c.example", "d.example"),
                             overrides={"d.example": {"certificate": str(wrong), "key": str(self.dir / "wrong.key")}})
        findings = self.check(config, public=self.roots)
        self.assertTrue(has(findings, ERROR, "expired on", "a.example"), levels(findings))
        self.assertTrue(has(findings, ERROR, "no usable certificate", "b.example"))
        self.assertTrue(has(findings, ERROR, "the key does not match the certificate", "c.example"))
        self.assertTrue(has(findings, ERROR, "does not name d.example", "d.example"))
        self.assertEqual([f.level for f in findings], [ERROR] * 4)

    def test_warnings(self):
        certs = self.dir / "certs"
        self.ca.issue(dns=("soon.example",), not_after=NOW + 10 * DAY).write(certs, "soon")
        self.ca.issue(dns=("addr.example",), xmpp=("addr.example",)).write(certs, "addr")
        self.ca.issue(xmpp=("only.example",)).write(certs, "only")
        self.ca.other_ca().issue(dns=("foreign.example",)).write(certs, "foreign")
        config = self.config(domains=("soon.example", "addr.example", "only.example", "foreign.example"))
        findings = self.check(config, public=self.roots)
        self.assertFalse(has(findings, ERROR, ""), levels(findings))
        self.assertTrue(has(findings, WARNING, "expires within 30 days", "soon.example"))
        self.assertFalse(has(findings, WARNING, "expires within", "addr.example"))
        self.assertTrue(has(findings, WARNING, "ejabberd 23.01 crashes", "addr.example"))
        self.assertFalse(has(findings, WARNING, "ejabberd", "soon.example"))
        self.assertTrue(has(findings, WARNING, "matches only by XmppAddr", "only.example"))
        self.assertTrue(has(findings, WARNING, "does not chain to tls.trust_roots", "foreign.example"))
        self.assertTrue(has(findings, WARNING, "does not chain to the system's public roots", "foreign.example"))
        self.assertFalse(has(findings, WARNING, "does not chain", "soon.example"))

    def test_missing_directory(self):
        [finding] = self.check(parse_config({"state_dir": str(self.dir), "domains": ["a.example"],
                                             "tls": {"certificates": str(self.dir / "none")}}))
        self.assertEqual((finding.level, finding.message),
                         (ERROR, f"certificate directory {self.dir / 'none'} does not exist"))


class DnsCheckTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.dns = TestDNSServer(reactor)
        port = self.dns.start()
        self.addCleanup(self.dns.stop)
        self.resolver = make_resolver(f"127.0.0.1:{port}", timeout=1.0)

    @defer.inlineCallbacks
    def test_records_and_their_absence(self):
        self.dns.add_srv("_xmpp-server._tcp.good.example", 5, 10, 5269, "xmpp.good.example")
        self.dns.add_a("xmpp.good.example", "192.0.2.1")
        self.dns.add_aaaa("xmpp.good.example", "2001:db8::1")
        found = yield defer.ensureDeferred(check_domain(self.resolver, "good.example", False))
        self.assertEqual(levels(found), [(OK, "_xmpp-server._tcp.good.example -> xmpp.good.example:5269 "
                                              "(priority 5, weight 10) = 192.0.2.1, 2001:db8::1")])
        self.dns.add_a("plain.example", "192.0.2.2")
        found = yield defer.ensureDeferred(check_domain(self.resolver, "plain.example", False))
        self.assertEqual([f.level for f in found], [INFO, OK])
        self.assertIn("port 5269 without SRV records", found[1].message)
        found = yield defer.ensureDeferred(check_domain(self.resolver, "nothing.example", False))
        self.assertEqual([f.level for f in found], [INFO, ERROR])
        self.assertIn("resolves to nothing", found[1].message)
        self.dns.add_srv("_xmpp-server._tcp.dangling.example", 0, 0, 5269, "gone.example")
        found = yield defer.ensureDeferred(check_domain(self.resolver, "dangling.example", False))
        self.assertEqual([f.level for f in found], [WARNING, ERROR])
        self.assertIn("gone.example has no A or AAAA record", found[0].message)
        self.dns.add_srv("_xmpp-server._tcp.refused.example", 0, 0, 0, ".")
        self.dns.add_a("refused.example", "192.0.2.3")
        found = yield defer.ensureDeferred(check_domain(self.resolver, "refused.example", False))
        self.assertEqual([f.level for f in found], [WARNING, OK])
        self.assertIn("not offered", found[0].message)

    @defer.inlineCallbacks
    def test_direct_tls_only_where_configured(self):
        self.dns.add_srv("_xmpp-server._tcp.d.example", 0, 0, 5269, "x.d.example")
        self.dns.add_a("x.d.example", "192.0.2.1")
        config = parse_config({"state_dir": "/tmp/x", "domains": ["d.example"]})
        found = yield defer.ensureDeferred(check_dns(config, self.resolver))
        self.assertEqual([f.level for f in found], [OK])
        self.assertNotIn(("_xmpps-server._tcp.d.example", "SRV"), self.dns.queries)
        config = parse_config({"state_dir": "/tmp/x", "domains": ["d.example"],
                               "s2s": {"direct_tls_listen": ["tcp:5270"]}})
        found = yield defer.ensureDeferred(check_dns(config, self.resolver))
        self.assertEqual([f.level for f in found], [OK, WARNING])
        self.assertIn("Direct TLS is configured, but peers cannot find it", found[1].message)
        self.dns.add_srv("_xmpps-server._tcp.d.example", 0, 0, 5270, "x.d.example")
        found = yield defer.ensureDeferred(check_dns(config, self.resolver))
        self.assertEqual([f.level for f in found], [OK, OK])
        self.assertIn("x.d.example:5270", found[1].message)

    @defer.inlineCallbacks
    def test_silent_dns_is_a_warning(self):
        self.dns.add_silent("_xmpp-server._tcp.slow.example")
        self.dns.add_silent("slow.example")
        found = yield defer.ensureDeferred(check_domain(self.resolver, "slow.example", False))
        self.assertEqual([f.level for f in found], [WARNING])
        self.assertIn("no answer from DNS", found[0].message)


class ListenerCheckTests(unittest.TestCase):
    def test_free_busy_held_and_missing_address(self):
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        busy_port = busy.getsockname()[1]
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
        probe.close()
        config = parse_config({"state_dir": "/tmp/x", "domains": ["a.example"],
                               "s2s": {"listen": [f"tcp:{busy_port}:interface=127.0.0.1"]},
                               "components": {"listen": [f"tcp:{free_port}:interface=127.0.0.1"]},
                               "admin": {"listen": ["tcp:8269:interface=192.0.2.77", "tcp:0"]}})
        found = check_listeners(config)
        self.assertEqual(levels(found), [(ERROR, "in use by another program"), (OK, "free"),
                                         (ERROR, "this host has no address 192.0.2.77"),
                                         (OK, "an ephemeral port: always free")])
        live = [{"kind": "s2s", "host": "127.0.0.1", "port": busy_port}]
        found = check_listeners(config, live)
        self.assertEqual(found[0].message, "held by this gateway")
        self.assertEqual(found[1].level, WARNING)
        self.assertIn("restart it", found[1].message)
        # Held by something on that port that is not the gateway's listener of that kind.
        found = check_listeners(config, [{"kind": "components", "host": "127.0.0.1", "port": busy_port}])
        self.assertEqual((found[0].level, found[0].message), (ERROR, "in use by another program (not this gateway)"))


class PeerSummaryTests(unittest.TestCase):
    def test_summaries(self):
        ok = summarise("p.example", {"ok": True, "from": "a.example", "ms": 12.5, "steps": [
            {"step": "tls", "status": "ok", "version": "TLSv1.3"},
            {"step": "authentication", "status": "ok", "method": "sasl-external"}]})
        self.assertEqual((ok.level, ok.message),
                         (OK, "federation from a.example works (TLSv1.3, sasl-external) in 12.5 ms"))
        bad = summarise("p.example", {"ok": False, "from": "a.example", "ms": 3, "steps": [
            {"step": "policy", "status": "ok"}, {"step": "dns", "status": "warning"},
            {"step": "tcp", "status": "failed", "error": "connection refused"},
            {"step": "stream", "status": "skipped", "reason": "an earlier step failed"}]})
        self.assertEqual((bad.level, bad.message),
                         (ERROR, "federation from a.example fails at tcp: connection refused"))


class CheckCommandTests(AdminCase):
    """The whole command in a subprocess, as an operator runs it."""

    timeout = 120

    def write(self, name: str, admin_port: int) -> Path:
        config = json.loads(json.dumps(self.config_dict))
        config["s2s"]["listen"] = [f"tcp:{self.a.port_of('s2s')}:interface=127.0.0.1"]
        config["components"]["listen"] = [f"tcp:{self.a.port_of('components')}:interface=127.0.0.1"]
        config["admin"]["listen"] = [f"tcp:{admin_port}:interface=127.0.0.1"]
        return write_config(Path(self.a.config.state_dir) / name, config)

    def check(self, config: Path, *args):
        env = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "")}
        return utils.getProcessOutputAndValue(
            sys.executable, ["-m", "fedgate.cli", "--config", str(config), "check",
                             "--dns-server", f"127.0.0.1:{self.dns.port}", *args], env=env, path=str(REPO))

    @defer.inlineCallbacks
    def test_running_and_stopped(self):
        config = self.write("check.toml", self.api.port)
        out, err, code = yield self.check(config, "b.example", "--json")
        report = json.loads(out)
        self.assertTrue(report["gateway_running"], report)
        self.assertEqual(code, 1, err)  # static.example's address is 127.0.0.1:1
        found = {}
        for f in report["findings"]:  # the first finding of each subject
            found.setdefault((f["check"], f["subject"]), f)
        self.assertEqual(found[("peers", "b.example")]["level"], "ok")
        self.assertIn("federation from a.example works", found[("peers", "b.example")]["message"])
        self.assertEqual(found[("peers", "static.example")]["level"], "error")
        self.assertIn("fails at tcp", found[("peers", "static.example")]["message"])
        s2s = found[("listeners", f"s2s tcp:{self.a.port_of('s2s')}:interface=127.0.0.1")]
        self.assertEqual((s2s["level"], s2s["message"]), ("ok", "held by this gateway"))
        self.assertEqual(found[("certificates", "a.example")]["level"], "ok")
        self.assertEqual(found[("dns", "a.example")]["level"], "ok")
        self.assertIn("gw-a.example", found[("dns", "a.example")]["message"])
        self.assertEqual(report["errors"], 1)

        # The admin API gone (a port nobody holds): the configuration alone,
        # and the gateway's ports are now someone else's.
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
        probe.close()
        out, err, code = yield self.check(self.write("stopped.toml", closed))
        text = out.decode()
        self.assertEqual(code, 1, err)
        self.assertIn(f"s2s tcp:{self.a.port_of('s2s')}:interface=127.0.0.1: in use by another program", text)
        self.assertIn("static.example: not checked: needs the running gateway's admin API", text)
        self.assertIn("the gateway's admin API did not answer: checked the configuration only", text)
        self.assertTrue(text.splitlines()[0] == "config:")

    @defer.inlineCallbacks
    def test_broken_config_fails_and_names_the_key(self):
        config = Path(self.a.config.state_dir) / "typo.toml"
        config.write_text('state_dir = "/tmp/x"\ndomainz = ["a.example"]\n')
        out, err, code = yield self.check(config)
        self.assertEqual(code, 1)
        self.assertIn("domainz: unknown key (did you mean 'domains'?)", out.decode())
