"""XEP-0114 keeps working on the component port beside XEP-0225, with
slixmpp's ComponentXMPP as a real third-party component."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from tests.support.federation import add_component, start_dns
from tests.support.gateway import gateway_config, publish, start_gateway, temp_dir

REPO = Path(__file__).resolve().parent.parent

try:
    import slixmpp  # noqa: F401
except ImportError:  # pragma: no cover - scripts/bootstrap installs it
    slixmpp = None


class _Watcher(protocol.ProcessProtocol):
    def __init__(self):
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()
        self.output = b""

    def outReceived(self, data):
        self.output += data
        if b"READY" in self.output and not self.ready.called:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason):
        if not self.ready.called:
            self.ready.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(None)


class SlixmppComponentTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_echo_component_across_federation(self):
        if slixmpp is None:
            raise unittest.SkipTest("slixmpp is not installed (scripts/bootstrap installs it)")
        dns, dns_port = start_dns(self)
        a = yield start_gateway(reactor, gateway_config(temp_dir(self), ["a.example"], {"chat.a.example": "sa"}),
                                dns_port, self)
        b = yield start_gateway(reactor, gateway_config(temp_dir(self), ["b.example"], {"echo.b.example": "se"}),
                                dns_port, self)
        publish(dns, a, ["a.example", "chat.a.example"], "gw-a.example")
        publish(dns, b, ["b.example", "echo.b.example"], "gw-b.example")
        watcher = _Watcher()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        process = reactor.spawnProcess(
            watcher, sys.executable,
            [sys.executable, "-m", "tests.support.slixmpp_echo", "echo.b.example", "se", "127.0.0.1",
             str(b.port_of("components"))], env=env, path=str(REPO))

        def stop():
            if not watcher.ended.called:
                process.signalProcess("TERM")
            return watcher.ended
        self.addCleanup(stop)
        yield watcher.ready.addTimeout(20, reactor)
        self.assertIn("echo.b.example", b.router.components)
        chat = yield add_component(self, a, "chat.a.example", "sa")
        chat.send("<message from='u@chat.a.example' to='bot@echo.b.example' type='chat' id='m1'>"
                  "<body>hello slixmpp</body></message>")
        got = yield chat.next_element(timeout=15)
        self.assertEqual((got["from"], got["to"], got["id"], str(got.body)),
                         ("bot@echo.b.example", "u@chat.a.example", "echo-m1", "echo: hello slixmpp"))
        chat.send("<iq from='u@chat.a.example' to='echo.b.example' type='get' id='p1'>"
                  "<ping xmlns='urn:xmpp:ping'/></iq>")
        got = yield chat.next_element(timeout=15)
        self.assertEqual((got.name, got["type"], got["id"]), ("iq", "result", "p1"))
