"""Gateway.reload (SIGHUP): the configuration file's peer policy and the
certificates change under live streams, on real gateways over loopback.

The SIGHUP path itself, through a real twistd process, is in
tests/test_twistd_plugin.py."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from fedgate.policy import PeerPolicy
from fedgate.tap import reload_on_sighup
from tests.support.federation import add_component, start_dns
from tests.support.gateway import gateway_config, publish, shared_ca, start_gateway, temp_dir, write_config
from tests.support.s2speer import PROCEED, STARTTLS, TLSPeer, s2s_header, wait_until
from tests.test_admin_api import TIMEOUT, wait_for
from tests.test_admin_live import error_of


class ReloadCase(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.dns, self.dns_port = start_dns(self)
        self.state = Path(temp_dir(self))
        self.config_dict = gateway_config(str(self.state), ["a.example"], {"chat.a.example": "sa"})
        self.config_file = self.state / "fedgate.toml"
        self.a = yield start_gateway(reactor, self.config_dict, self.dns_port, self,
                                     config_file=self.config_file)
        publish(self.dns, self.a, ["a.example", "chat.a.example"], "gw-a.example")
        self.logged: list[tuple[str, str]] = []

        def observe(event):
            if event.get("log_namespace") == "fedgate.service":
                self.logged.append((event["log_level"].name, formatEvent(event)))
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def edit(self, **s2s):
        self.config_dict["s2s"].update(s2s)
        write_config(self.config_file, self.config_dict)

    def reload_lines(self) -> list[tuple[str, str]]:
        return [(level, text) for level, text in self.logged if "eload" in text]

    @defer.inlineCallbacks
    def peer(self, domain: str, secret: str):
        """Another gateway hosting ``domain`` with a component chat.<domain>."""
        gateway = yield start_gateway(reactor, gateway_config(
            temp_dir(self), [domain], {f"chat.{domain}": secret}), self.dns_port, self)
        publish(self.dns, gateway, [domain, f"chat.{domain}"], f"gw-{domain}")
        component = yield add_component(self, gateway, f"chat.{domain}", secret)
        return component

    @defer.inlineCallbacks
    def served_certificate(self, domain: str):
        """The certificate a new STARTTLS connection to gateway A gets."""
        peer = TLSPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.a.port_of("s2s")), peer)
        self.addCleanup(lambda: peer.transport.abortConnection() if not peer.lost.called else None)
        peer.transport.write(s2s_header("probe.example", domain) + STARTTLS)
        yield wait_until(lambda: PROCEED in peer.plain, "<proceed/>")
        trust = ssl.Certificate.loadPEM(shared_ca().root_pem())
        peer.start_tls(ssl.optionsForClientTLS(domain, trustRoot=trust))
        peer.handshake.addTimeout(TIMEOUT, reactor)
        connection = yield peer.handshake
        return connection.get_peer_certificate().to_cryptography()


class ReloadTests(ReloadCase):
    @defer.inlineCallbacks
    def test_new_block_and_certificate_leave_another_peers_connection_alone(self):
        ca = yield add_component(self, self.a, "chat.a.example", "sa")
        cb = yield self.peer("b.example", "sb")
        cc = yield self.peer("c.example", "sc")
        for n, (to, client) in enumerate([("chat.b.example", cb), ("chat.c.example", cc)]):
            ca.send(f"<message from='x@chat.a.example' to='y@{to}' id='m{n}'/>")
            self.assertEqual((yield client.next_element(timeout=TIMEOUT))["id"], f"m{n}")
        b_links = {r.id for r in self.a.table.connections_of("chat.b.example")}
        self.assertTrue(b_links)
        self.assertTrue(self.a.table.connections_of("chat.c.example"))
        before = yield self.served_certificate("a.example")

        renewed = shared_ca().issue(dns=("a.example",))
        renewed.write(self.state / "certs", "a.example")
        self.edit(peers={"chat.c.example": {"blocked": True, "note": "abuse report 42"}})
        self.assertTrue(self.a.reload())

        # The newly blocked peer's streams end; the other peer's stay, and
        # keep carrying stanzas both ways.
        yield wait_for(lambda: not self.a.table.connections_of("chat.c.example"))
        self.assertTrue(self.a.policy.is_blocked("chat.c.example"))
        ca.send("<message from='x@chat.a.example' to='y@chat.b.example' id='after'/>")
        self.assertEqual((yield cb.next_element(timeout=TIMEOUT))["id"], "after")
        cb.send("<message from='y@chat.b.example' to='x@chat.a.example' id='back'/>")
        self.assertEqual((yield ca.next_element(timeout=TIMEOUT))["id"], "back")
        self.assertEqual({r.id for r in self.a.table.connections_of("chat.b.example")}, b_links)
        ca.send("<message from='x@chat.a.example' to='y@chat.c.example' id='blocked'/>")
        bounce = yield ca.next_element(timeout=TIMEOUT)
        self.assertEqual((bounce["id"], error_of(bounce)), ("blocked", "policy-violation"))

        # New connections get the new certificate.
        after = yield self.served_certificate("a.example")
        self.assertNotEqual(after.serial_number, before.serial_number)
        self.assertEqual(after.serial_number, renewed.cert.serial_number)
        self.assertEqual(self.reload_lines(), [("info", (
            f"Reloaded {self.config_file}: peers added: chat.c.example; "
            "certificates replaced for a.example"))])

    @defer.inlineCallbacks
    def test_a_broken_file_keeps_the_running_settings(self):
        self.config_file.write_text("domains = [\n")
        self.assertFalse(self.a.reload())
        [(level, line)] = self.reload_lines()
        self.assertEqual(level, "error")
        self.assertTrue(line.startswith(
            f"Reload failed, running settings kept: configuration error: {self.config_file}: "
            "not valid TOML"), line)

        # A hosted domain without a certificate: nothing applies, not even
        # the peer policy read from the same file.
        before = self.a.tls.store
        (self.state / "certs" / "a.example.crt").unlink()
        self.edit(peers={"spam.example": {"blocked": True}})
        self.assertFalse(self.a.reload())
        self.assertEqual(self.reload_lines()[-1], (
            "error", "Reload failed, running settings kept: certificate error: "
                     f"{self.config_file}: no certificate for hosted domain a.example"))
        self.assertIs(self.a.tls.store, before)
        self.assertFalse(self.a.policy.is_blocked("spam.example"))
        cert = yield self.served_certificate("a.example")
        self.assertIn("a.example", str(cert.subject) + str(cert.extensions))

    @defer.inlineCallbacks
    def test_stored_entries_keep_winning(self):
        registry = self.a.admin.peers
        yield registry.put(PeerPolicy("partner.example", allowed=True, note="contract"))
        self.edit(peers={"partner.example": {"blocked": True}, "spam.example": {"blocked": True}},
                  policy={"mode": "allowlist"})
        self.assertTrue(self.a.reload())
        self.assertFalse(self.a.policy.is_blocked("partner.example"))
        self.assertEqual((registry.source("partner.example"), registry.get("partner.example").note),
                         ("api", "contract"))
        self.assertTrue(self.a.policy.is_blocked("spam.example"))
        self.assertEqual(self.a.policy.mode, "allowlist")
        self.assertEqual(self.reload_lines()[-1][1], (
            f"Reloaded {self.config_file}: peers added: spam.example; peers kept as stored "
            "through the admin API: partner.example; federation mode and default policy "
            "changed; certificates unchanged"))
        # Deleting the stored entry falls back to the reloaded file's.
        self.assertEqual((yield registry.delete("partner.example")), "config")
        self.assertTrue(self.a.policy.is_blocked("partner.example"))

        # A stored federation setting wins over the file's too; a peer gone
        # from the file is gone from the table.
        yield registry.set_global("open", PeerPolicy())
        self.edit(peers={"partner.example": {"blocked": True}}, policy={"mode": "allowlist",
                                                                        "encryption": "optional"})
        self.assertTrue(self.a.reload())
        self.assertEqual(self.a.policy.mode, "open")
        self.assertNotIn("spam.example", self.a.policy.peers)
        # partner.example's file entry takes its unset keys from the file's
        # new [s2s.policy], so it changed too.
        self.assertEqual(self.reload_lines()[-1][1], (
            f"Reloaded {self.config_file}: peers changed: partner.example; peers removed: "
            "spam.example; federation setting kept as stored through the admin API; "
            "certificates unchanged"))
        self.assertEqual(self.a.policy.for_peer("partner.example").encryption, "optional")
        yield registry.reset_global()
        self.assertEqual((self.a.policy.mode, self.a.policy.default.encryption),
                         ("allowlist", "optional"))

    def test_settings_that_need_a_restart_are_named(self):
        self.edit(listen=["tcp:0:interface=127.0.0.2"], queue_max_stanzas=5)
        self.config_dict["limits"] = {"max_depth": 10}
        write_config(self.config_file, self.config_dict)
        self.assertTrue(self.a.reload())
        self.assertEqual(self.reload_lines(), [
            ("info", f"Reloaded {self.config_file}: peer policy unchanged; certificates unchanged"),
            ("warn", "Reload: changes to s2s.listen, s2s.queue_max_stanzas, limits.max_depth in "
                     f"{self.config_file} apply only after a restart")])
        self.assertEqual(self.a.config.s2s.listen, ("tcp:0:interface=127.0.0.1",))


class SighupTests(unittest.TestCase):
    def test_the_handler_queues_the_reload_on_the_reactor_thread(self):
        installed, queued = {}, []

        class Signals:
            SIGHUP = 1

            @staticmethod
            def signal(number, handler):
                installed[number] = handler

        class Reactor:
            @staticmethod
            def callFromThread(f, *args):
                queued.append(f)

        def reload():
            raise AssertionError("called in the signal handler")

        reload_on_sighup(Reactor, reload, Signals)
        installed[1](1, None)
        self.assertEqual(queued, [reload])
