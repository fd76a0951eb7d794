"""A real Prosody 0.12 federating with a three-node fedgate cluster (issue 13,
Tests: Prosody).

The cluster hosts gw.example and the XEP-0114 component chat.gw.example;
its SRV records name node A only, so Prosody's streams land on node A,
while the component is connected to node B.  Prosody's own component
svc.prosody.example exchanges messages and iq with chat.gw.example both
ways: Prosody -> node A -> (Redis) -> node B -> component, and back from
node B through whatever stream the cluster has to Prosody.  TLS is
required on both sides and every first stream authenticates by SASL
EXTERNAL (certificates from the shared test CA), as in
test_prosody_interop.SecureAuthInterop.

Blocking a peer through another node's admin API, and the peer's stream
closing on node A, is covered in one reactor by
test_cluster_policy_e2e.PolicyPropagationTests (with a fedgate peer); it is
not repeated here.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.support.clusternodes import Cluster
from tests.support.component_client import connect_component
from tests.support.federation import start_dns
from tests.support.gateway import shared_ca
from tests.support.prosody import prosody_available
from tests.support.prosody_federation import PROSODY, PROSODY_COMPONENT, start_prosody
from tests.support.redisserver import start_redis

if not prosody_available():
    pytest.skip("prosody is not installed (scripts/bootstrap --test installs it)",
                allow_module_level=True)

GW, GW_COMPONENT, GW_SECRET = "gw.example", "chat.gw.example", "secret-gw"
TIMEOUT = 20


class ProsodyAgainstACluster(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = start_redis(self)
        self.dns, dns_port = start_dns(self)
        self.prosody = start_prosody(self, self.dns, dns_port, s2s_secure_auth=True,
                                     tls_issuer=shared_ca(), trusted_cas=[shared_ca()])
        # The cluster starts after Prosody so that it stops first (see
        # tests/support/prosody_federation.py).
        self.cluster = Cluster(self, self.redis, dns_port, [GW], {GW_COMPONENT: GW_SECRET},
                               s2s={"peers": {d: {"authentication": "certificate"}
                                              for d in (PROSODY, PROSODY_COMPONENT)}})
        yield self.cluster.start(3)
        for name in self.cluster.nodes:
            yield self.cluster.wait_seen(name)
        self.cluster.publish(self.dns, [GW, GW_COMPONENT], "a")
        self.gw_comp = yield connect_component(reactor, "127.0.0.1", self.cluster["b"].component_port,
                                               GW_COMPONENT, GW_SECRET, timeout=TIMEOUT)
        self.addCleanup(self.gw_comp.close)
        self.prosody_comp = yield connect_component(reactor, "127.0.0.1", self.prosody.component_port,
                                                    PROSODY_COMPONENT, "secret-p", timeout=TIMEOUT)
        self.addCleanup(self.prosody_comp.close)

    @defer.inlineCallbacks
    def receive(self, peer, what: str):
        try:
            element = yield peer.next_element(timeout=TIMEOUT)
        except defer.TimeoutError:
            self.fail(f"{peer.domain} received no {what} within {TIMEOUT} s\n"
                      f"{self.cluster.diagnostics()}\n{self.prosody.log_tail(80)}")
        return element

    def assertAttrs(self, element, expected: dict):
        self.assertEqual({k: element.getAttribute(k) for k in expected}, expected, element.toXml())

    @defer.inlineCallbacks
    def inbound_from_prosody(self, name: str) -> list:
        """Node ``name``'s authenticated inbound connections from Prosody's domains."""
        answer = yield self.cluster[name].api().get("/api/v1/connections?direction=inbound")
        self.assertEqual(answer.status, 200, answer.body)
        return [c for c in answer.json["connections"]
                if c["remote_domain"] in (PROSODY, PROSODY_COMPONENT) and c["state"] == "authenticated"]

    @defer.inlineCallbacks
    def test_messages_both_ways(self):
        self.prosody_comp.send(f"<message from='bob@{PROSODY_COMPONENT}/r' to='alice@{GW_COMPONENT}' "
                               "type='chat' id='p1'><body>to node B, via node A</body></message>")
        got = yield self.receive(self.gw_comp, "message from Prosody")
        self.assertAttrs(got, {"from": f"bob@{PROSODY_COMPONENT}/r", "to": f"alice@{GW_COMPONENT}",
                               "id": "p1", "type": "chat"})
        self.assertEqual(str(got.body), "to node B, via node A")
        # Prosody's stream landed on node A (the only SRV target), not on B.
        self.assertTrue((yield self.inbound_from_prosody("a")), self.cluster.diagnostics())
        self.assertFalse((yield self.inbound_from_prosody("b")))

        self.gw_comp.send(f"<message from='alice@{GW_COMPONENT}/r' to='bob@{PROSODY_COMPONENT}' "
                          "type='chat' id='g1'><body>back &amp; forth</body></message>")
        got = yield self.receive(self.prosody_comp, "message from the component on node B")
        self.assertAttrs(got, {"from": f"alice@{GW_COMPONENT}/r", "to": f"bob@{PROSODY_COMPONENT}",
                               "id": "g1", "type": "chat"})
        self.assertEqual(str(got.body), "back & forth")

    @defer.inlineCallbacks
    def test_iq_both_ways(self):
        # Prosody's component asks the component on node B, which answers.
        self.prosody_comp.send(f"<iq from='bob@{PROSODY_COMPONENT}' to='{GW_COMPONENT}' type='get' "
                               "id='q1'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        got = yield self.receive(self.gw_comp, "iq from Prosody")
        self.assertAttrs(got, {"type": "get", "id": "q1", "from": f"bob@{PROSODY_COMPONENT}"})
        self.gw_comp.send(f"<iq from='{GW_COMPONENT}' to='bob@{PROSODY_COMPONENT}' type='result' "
                          "id='q1'><query xmlns='http://jabber.org/protocol/disco#info'>"
                          "<identity category='gateway' type='xmpp' name='node B'/></query></iq>")
        got = yield self.receive(self.prosody_comp, "iq result from node B")
        self.assertAttrs(got, {"type": "result", "id": "q1", "from": GW_COMPONENT})
        # And the other way: the component on node B asks, Prosody's answers.
        self.gw_comp.send(f"<iq from='alice@{GW_COMPONENT}/r' to='{PROSODY_COMPONENT}' type='get' "
                          "id='q2'><ping xmlns='urn:xmpp:ping'/></iq>")
        got = yield self.receive(self.prosody_comp, "iq from node B")
        self.assertAttrs(got, {"type": "get", "id": "q2", "from": f"alice@{GW_COMPONENT}/r"})
        self.prosody_comp.send(f"<iq from='{PROSODY_COMPONENT}' to='alice@{GW_COMPONENT}/r' "
                               "type='result' id='q2'/>")
        got = yield self.receive(self.gw_comp, "iq result from Prosody")
        self.assertAttrs(got, {"type": "result", "id": "q2", "from": PROSODY_COMPONENT})
