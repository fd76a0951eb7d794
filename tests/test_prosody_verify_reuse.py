"""fedgate verifying Prosody 0.12's dialback keys reuses one connection.

Prosody (prosody.example, s2s encryption required) is the Authoritative
Server, with a known ``dialback_secret`` so that this test can make its
keys (Prosody 0.12 and fedgate both follow XEP-0185).  Raw peers claim
prosody.example towards fedgate one after another; fedgate asks Prosody
each time, over one verification connection (STARTTLS, as Prosody
requires) kept open between them.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from fedgate.s2s.dialback import dialback_key
from tests.support.federation import start_dns
from tests.support.gateway import gateway_config, publish, shared_ca, start_gateway, temp_dir
from tests.support.prosody import prosody_available
from tests.support.prosody_federation import PROSODY, start_prosody
from tests.support.rawpeer import RawPeer, Reply
from tests.support.s2speer import s2s_header, wait_until
from tests.test_dialback_bounds_e2e import results

if not prosody_available():
    pytest.skip("prosody is not installed (scripts/bootstrap --test installs it)",
                allow_module_level=True)

GW = "gw.example"
SECRET = "prosody-dialback-secret"


class ProsodyAuthoritativeTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.dns, dns_port = start_dns(self)
        self.prosody = start_prosody(self, self.dns, dns_port, tls_issuer=shared_ca(),
                                     trusted_cas=[shared_ca()],
                                     extra_config=f'dialback_secret = "{SECRET}"')
        self.gateway = yield start_gateway(reactor, gateway_config(
            temp_dir(self), [GW], {"chat.gw.example": "sc"}, policy={"encryption": "optional"}),
            dns_port, self)
        publish(self.dns, self.gateway, [GW, "chat.gw.example"], "xmpp.gw.example")

    @defer.inlineCallbacks
    def claim(self, key_for=lambda stream_id: dialback_key(SECRET, GW, PROSODY, stream_id)) -> str:
        peer = RawPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.gateway.port_of("s2s")), peer)
        self.addCleanup(lambda: peer.transport.abortConnection() if not peer.lost.called else None)
        peer.transport.write(s2s_header(PROSODY, GW))
        yield wait_until(lambda: b"</stream:features>" in peer.data, "features")
        key = key_for(Reply(bytes(peer.data)).root["id"])
        peer.transport.write(f"<db:result from='{PROSODY}' to='{GW}'>{key}</db:result>".encode())
        yield wait_until(lambda: results(bytes(peer.data)), "the dialback answer", timeout=20)
        [answer] = results(bytes(peer.data))
        peer.transport.loseConnection()
        return answer["type"]

    @defer.inlineCallbacks
    def test_sequential_claims_share_one_verification_connection(self):
        answers = []
        for _ in range(8):
            answer = yield self.claim()
            answers.append(answer)
        bad = yield self.claim(key_for=lambda stream_id: "0" * 64)
        self.assertEqual(answers, ["valid"] * 8, self.prosody.log_tail(80))
        self.assertEqual(bad, "invalid", "Prosody said invalid for a wrong key on the same connection")
        self.assertEqual(self.gateway.verifier.connections_opened, 1,
                         "nine verifications over one connection to Prosody")
