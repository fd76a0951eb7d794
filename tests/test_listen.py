"""A listener that cannot bind is named with its reason, and a gateway
whose start fails that way asks to stop with status 73 (fedgate.tap);
the twistd process itself is in tests/test_twistd_startup.py."""

from __future__ import annotations

import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from fedgate.config import parse_config
from fedgate.listen import ListenFailed, listen
from fedgate.service import Gateway
from fedgate.tap import EX_CANTCREAT, ExitOnStartFailure, choose_storage
from tests.support.dnsserver import make_client_resolver
from tests.support.gateway import gateway_config, temp_dir


def held_port(testcase) -> int:
    """A loopback port with something already listening on it."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    testcase.addCleanup(holder.close)
    return holder.getsockname()[1]


class ListenTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_busy_port_names_kind_endpoint_and_reason(self):
        port = held_port(self)
        description = f"tcp:{port}:interface=127.0.0.1"
        error = yield self.assertFailure(
            listen(reactor, "s2s_direct_tls", description, protocol.Factory()), ListenFailed)
        self.assertEqual(str(error), f"cannot listen for s2s_direct_tls on {description}: "
                                     "Address already in use")
        self.assertEqual((error.kind, error.description), ("s2s_direct_tls", description))

    @defer.inlineCallbacks
    def test_a_free_port_listens(self):
        port = yield listen(reactor, "s2s", "tcp:0:interface=127.0.0.1", protocol.Factory())
        self.addCleanup(port.stopListening)
        self.assertEqual(port.getHost().host, "127.0.0.1")


class StartFailureTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_gateway_that_cannot_bind_asks_to_exit_73(self):
        busy = held_port(self)
        config = parse_config(gateway_config(
            temp_dir(self), ["a.example"], {},
            direct_tls_listen=[f"tcp:{busy}:interface=127.0.0.1"]), "<test>")
        gateway = Gateway(config, reactor, make_client_resolver(reactor, 1), choose_storage(config, reactor))
        process = MemoryReactorClock()  # stands for twistd's reactor, which would stop
        statuses = []
        starter = ExitOnStartFailure(gateway, process, statuses.append)
        yield starter.startService()
        self.addCleanup(starter.stopService)
        self.assertEqual(statuses, [EX_CANTCREAT])
        self.assertEqual(starter.exit_status, 73)
        # The plain S2S listener opened before the Direct TLS one failed;
        # stopping (what twistd does once the reactor stops) closes it.
        self.assertEqual(len(gateway.ports["s2s"]), 1)
        process.run()  # the stop was queued for when the reactor runs
        self.assertFalse(process.running)
        yield starter.stopService()
        self.assertEqual(gateway.ports["s2s"], [])
