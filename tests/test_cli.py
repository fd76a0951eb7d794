"""fedgatectl against a real gateway: run as `python -m fedgate.cli` in a
subprocess, as an operator would, while the gateway runs in this reactor."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from twisted.internet import defer, reactor, utils
from twisted.trial import unittest

from fedgate.cli import CliError, url_from_endpoint
from fedgate.cli_render import table
from tests.test_admin_api import AdminCase

REPO = Path(__file__).resolve().parent.parent


class HelperTests(unittest.TestCase):
    def test_url_from_endpoint(self):
        self.assertEqual(url_from_endpoint("tcp:8269:interface=127.0.0.1"), "http://127.0.0.1:8269")
        self.assertEqual(url_from_endpoint("tcp:port=9000"), "http://127.0.0.1:9000")
        self.assertEqual(url_from_endpoint("tcp6:8269:interface=\\:\\:1"), "http://[::1]:8269")
        self.assertEqual(url_from_endpoint("ssl:8443:privateKey=k.pem"), "https://127.0.0.1:8443")
        self.assertEqual(url_from_endpoint("tcp:80:interface=0.0.0.0"), "http://127.0.0.1:80")
        self.assertRaises(CliError, url_from_endpoint, "unix:/run/fedgate.sock")
        self.assertRaises(CliError, url_from_endpoint, "tcp:0")

    def test_peers_help_describes_every_action(self):
        import contextlib
        import io
        from fedgate.cli import parser
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit):
            parser().parse_args(["peers", "--help"])
        described = {line.split()[0] for line in out.getvalue().splitlines()
                     if line.startswith("    ") and not line.startswith("     ") and len(line.split()) > 1}
        self.assertEqual(described, {"list", "show", "delete", "block", "unblock", "allow", "set"})
        self.assertIn("clear its note", out.getvalue())

    def test_table(self):
        text = table([{"a": "x", "b": None, "c": True, "d": ["p", "q"]}, {"a": "longer", "b": 1, "c": False, "d": []}],
                     [("A", "a"), ("B", "b"), ("C", "c"), ("D", "d")])
        self.assertEqual(text.splitlines(), ["A       B  C    D", "x       -  yes  p,q", "longer  1  no   -"])


class CliTests(AdminCase):
    timeout = 120

    def ctl(self, *args, env: dict | None = None, stdin: bytes | None = None):
        environ = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", ""),
                   "FEDGATE_ADMIN_URL": self.api.base, "FEDGATE_ADMIN_TOKEN": self.api.token}
        environ.update(env or {})
        environ = {k: v for k, v in environ.items() if v is not None}
        if stdin is None:
            return utils.getProcessOutputAndValue(sys.executable, ["-m", "fedgate.cli", *args],
                                                  env=environ, path=str(REPO))
        from twisted.internet import protocol

        class Feed(protocol.ProcessProtocol):
            def __init__(self):
                self.out, self.err = b"", b""
                self.done = defer.Deferred()

            def connectionMade(self):
                self.transport.write(stdin)
                self.transport.closeStdin()

            def outReceived(self, data):
                self.out += data

            def errReceived(self, data):
                self.err += data

            def processEnded(self, reason):
                self.done.callback((self.out, self.err, reason.value.exitCode))
        feed = Feed()
        reactor.spawnProcess(feed, sys.executable, [sys.executable, "-m", "fedgate.cli", *args],
                             env=environ, path=str(REPO))
        return feed.done

    @defer.inlineCallbacks
    def ok(self, *args, **kwargs) -> str:
        out, err, code = yield self.ctl(*args, **kwargs)
        self.assertEqual(code, 0, (args, out, err))
        return out.decode()

    @defer.inlineCallbacks
    def test_peers_policy_status(self):
        out = yield self.ok("status")
        self.assertIn("version", out)
        self.assertIn("0.1.0", out)
        out = yield self.ok("peers", "set", "Partner.Example", "--block", "--address", "127.0.0.1:5999",
                            "--note", "contract 9")
        self.assertIn("partner.example", out)
        self.assertTrue(self.a.policy.is_blocked("partner.example"))
        out = yield self.ok("peers", "allow", "partner.example")
        self.assertFalse(self.a.policy.is_blocked("partner.example"))
        self.assertEqual(self.a.policy.peers["partner.example"].note, "contract 9")
        # unblock lifts a block and its reason with it.
        yield self.ok("peers", "block", "partner.example", "--note", "abuse report 42")
        self.assertEqual(self.a.policy.peers["partner.example"].note, "abuse report 42")
        yield self.ok("peers", "unblock", "partner.example")
        self.assertFalse(self.a.policy.is_blocked("partner.example"))
        self.assertEqual(self.a.policy.peers["partner.example"].note, "")
        self.assertEqual(self.a.policy.static_addresses("partner.example"), (("127.0.0.1", 5999),))
        out = yield self.ok("peers", "list")
        lines = out.splitlines()
        self.assertEqual(lines[0], "mode: open")
        self.assertTrue(lines[1].startswith("DOMAIN"))
        self.assertTrue(any(line.startswith("partner.example") and "127.0.0.1:5999" in line for line in lines))
        out = yield self.ok("--json", "peers", "show", "partner.example")
        self.assertEqual(json.loads(out)["addresses"], ["127.0.0.1:5999"])
        # A new peer is blocked with one request: no PATCH -> 404 first.
        requests = []  # the admin API's access log lines
        from twisted.logger import globalLogPublisher
        observer = lambda event: requests.append(event)  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        yield self.ok("peers", "block", "new.example", "--note", "spam")
        self.assertTrue(self.a.policy.is_blocked("new.example"))
        self.assertEqual(self.a.policy.peers["new.example"].note, "spam")
        lines = [e for e in requests if "new.example" in str(e.get("path"))]
        self.assertEqual([(e.get("method"), e.get("status")) for e in lines], [("PATCH", 201)])
        yield self.ok("peers", "delete", "new.example")
        self.assertNotIn("new.example", self.a.policy.peers)
        out = yield self.ok("policy", "set", "--mode", "allowlist")
        self.assertIn("allowlist", out)
        out = yield self.ok("policy")
        self.assertIn("allowlist", out)
        yield self.ok("policy", "reset")
        self.assertEqual(self.a.policy.mode, "open")
        out = yield self.ok("metrics")
        self.assertIn("fedgate_s2s_connections", out)

    @defer.inlineCallbacks
    def test_live_objects_and_diagnose(self):
        yield self.federate()
        out = yield self.ok("connections", "list", "--direction", "outbound")
        [header, row] = out.splitlines()
        self.assertTrue(header.startswith("ID"))
        conn_id = row.split()[0]
        self.assertIn("chat.b.example", row)
        out = yield self.ok("connections", "show", conn_id)
        self.assertIn("LOCAL", out)
        self.assertIn("chat.a.example", out)
        out = yield self.ok("destinations", "list")
        self.assertIn("chat.b.example", out)
        out = yield self.ok("destinations", "reset", "chat.b.example")
        self.assertIn("state", out)
        out = yield self.ok("connections", "close", conn_id)
        self.assertIn("policy-violation", out)

        secret_file = Path(self.a.config.state_dir) / "bot.secret"
        secret_file.write_text("a-secret-for-the-bot-component\n")
        out = yield self.ok("components", "set", "bot.a.example", "--secret-file", str(secret_file))
        self.assertIn("bot.a.example", out)
        self.assertNotIn("a-secret-for-the-bot", out)
        self.assertEqual(self.a.component_secrets["bot.a.example"], "a-secret-for-the-bot-component")
        yield self.ok("components", "set", "pipe.a.example", stdin=b"secret-from-standard-input\n")
        self.assertEqual(self.a.component_secrets["pipe.a.example"], "secret-from-standard-input")
        out = yield self.ok("components", "set", "bots.a.example", "--password-file", "-",
                            "--allowed-hostname", "weather.a.example", stdin=b"a bot password here\n")
        self.assertIn("xep-0225", out)
        self.assertEqual(self.a.component_credentials.get("bots.a.example").allowed, {"weather.a.example"})
        out = yield self.ok("components", "list")
        self.assertIn("chat.a.example", out)
        out, err, code = yield self.ctl("components", "disconnect", "bot.a.example")
        self.assertEqual(code, 1)
        self.assertIn(b"not connected", err)
        yield self.ok("components", "remove", "bot.a.example")
        self.assertNotIn("bot.a.example", self.a.component_secrets)

        out = yield self.ok("diagnose", "b.example")
        self.assertIn("a.example -> b.example: federation works", out)
        self.assertIn("authentication", out)
        out, err, code = yield self.ctl("diagnose", "nowhere.example")
        self.assertEqual(code, 1)
        self.assertIn(b"federation FAILS", out)

    @defer.inlineCallbacks
    def test_errors_are_clear(self):
        out, err, code = yield self.ctl("status", env={"FEDGATE_ADMIN_TOKEN": "wrong-token"})
        self.assertEqual(code, 77)
        self.assertIn(b"refused the admin token", err)
        out, err, code = yield self.ctl("status", env={"FEDGATE_ADMIN_URL": "http://127.0.0.1:1"})
        self.assertEqual(code, 69)
        self.assertIn(b"cannot reach the gateway's admin API at http://127.0.0.1:1", err)
        out, err, code = yield self.ctl("peers", "show", "nobody.example")
        self.assertEqual(code, 1)
        self.assertIn(b"404 no such peer", err)
        out, err, code = yield self.ctl("peers", "show", "bad..example")
        self.assertEqual(code, 1)
        self.assertIn(b"422", err)
        out, err, code = yield self.ctl("status", env={"FEDGATE_ADMIN_URL": None, "FEDGATE_ADMIN_TOKEN": None,
                                                       "FEDGATE_CONFIG": "/nonexistent/fedgate.toml"})
        self.assertEqual(code, 78)
        self.assertIn(b"file not found", err)
        out, err, code = yield self.ctl("peers")
        self.assertEqual(code, 2)

    @defer.inlineCallbacks
    def test_url_and_token_from_the_configuration(self):
        config = Path(self.a.config.state_dir) / "ctl.toml"
        config.write_text(f'state_dir = "{self.a.config.state_dir}"\ndomains = ["a.example"]\n'
                          f'[admin]\nlisten = ["tcp:{self.api.port}:interface=127.0.0.1"]\n')
        out = yield self.ok("--config", str(config), "--json", "status",
                            env={"FEDGATE_ADMIN_URL": None, "FEDGATE_ADMIN_TOKEN": None})
        self.assertEqual(json.loads(out)["domains"], ["a.example"])
        out = yield self.ok("status", env={"FEDGATE_ADMIN_URL": None, "FEDGATE_ADMIN_TOKEN": None,
                                           "FEDGATE_CONFIG": str(config)})
        self.assertIn("uptime_seconds", out)


class ReadableTimesTests(unittest.TestCase):
    """status and destinations show print local times and ages, not epochs."""

    def test_status_and_destination(self):
        import time
        from fedgate.cli_render import duration, render, when
        now = 1_800_000_000.0
        started = now - 3725
        text = render("status", {"version": "0.1.0", "started_at": started, "uptime_seconds": 3725.0,
                                 "counts": {"queued_stanzas": 3}}, now=now)
        local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        rows = {line.split()[0]: " ".join(line.split()[1:]) for line in text.splitlines()}
        self.assertEqual(rows["started_at"], f"{local} (1 h 2 min ago)")
        self.assertEqual(rows["uptime_seconds"], "3725 (1 h 2 min)")
        self.assertNotIn(str(int(started)), text)
        dest = {"domain": "p.example", "state": "backoff", "queue": {"stanzas": 1, "bytes": 9,
                "oldest_age_seconds": 4.25}, "failures": 2, "last_error": "x", "retry_at": now + 90,
                "retry_in_seconds": 90.0, "connection_id": None, "connection_ids": [],
                "pending_pairs": [{"local": "a.example", "connection_id": 7, "age_seconds": 12.0}]}
        text = render("destinations", dest, now=now)
        rows = {line.split()[0]: " ".join(line.split()[1:]) for line in text.splitlines() if line}
        self.assertEqual(rows["retry_at"],
                         f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now + 90))} (in 1 min 30 s)")
        self.assertEqual(rows["a.example"], "7 12 s")
        self.assertNotIn(str(int(now + 90)), text)
        self.assertEqual((duration(4.25), duration(59), duration(90061)), ("4.2 s", "59 s", "1 d 1 h"))
        self.assertTrue(when(now + 5, now).endswith("(in 5.0 s)"))
