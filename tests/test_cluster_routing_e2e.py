"""Routing across cluster nodes: two or three gateways in one reactor sharing
one real redis-server, a remote gateway (b.example) federating with them
over loopback, components on various nodes."""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.support.federation import add_component, start_dns
from tests.support.gateway import gateway_config, publish, start_gateway, temp_dir
from tests.support.redisserver import start_redis
from tests.support.s2speer import wait_until
from tests.test_admin_api import TIMEOUT

COMPONENTS = {"chat.a.example": "secret-a", "bots.a.example": "secret-bots"}


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class RoutingCase(unittest.TestCase):
    timeout = 120
    node_names = "ab"
    cluster_options: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = start_redis(self)
        self.dns, dns_port = start_dns(self)
        self.nodes = {}
        for name in self.node_names:
            config = gateway_config(temp_dir(self), ["a.example"], COMPONENTS,
                                    policy={"encryption": "optional"})
            config["cluster"] = {"enabled": True, "redis": self.redis.socket_path,
                                 "node_id": f"node-{name}", "heartbeat": 0.5, "lease": 2.0,
                                 **self.cluster_options}
            self.nodes[name] = yield start_gateway(reactor, config, dns_port, self)
        self.remote = yield start_gateway(
            reactor, gateway_config(temp_dir(self), ["b.example"], {"chat.b.example": "secret-b"}),
            dns_port, self)
        # Remote servers reach the cluster through node B.
        publish(self.dns, self.nodes["b"], ["a.example"] + list(COMPONENTS), "node-b.example")
        publish(self.dns, self.remote, ["b.example", "chat.b.example"], "gw-b.example")
        for node in self.nodes.values():
            yield wait_until(lambda n=node: n.cluster.connected and n.cluster.membership.heartbeats,
                             "the cluster link")

    @defer.inlineCallbacks
    def known_everywhere(self, domain: str, holder: str):
        """Wait until every other node knows that ``holder`` holds ``domain``."""
        for name, node in self.nodes.items():
            if name != holder:
                yield wait_until(lambda n=node: f"node-{holder}" in n.cluster.cache.component_owners(domain),
                                 f"{domain} on node {holder} known to node {name}")


class CrossNodeTests(RoutingCase):
    @defer.inlineCallbacks
    def test_s2s_on_node_b_to_component_on_node_a_and_back(self):
        a, b = self.nodes["a"], self.nodes["b"]
        ca = yield add_component(self, a, "chat.a.example", "secret-a")
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        yield self.known_everywhere("chat.a.example", "a")
        cb.send("<message from='y@chat.b.example' to='x@chat.a.example' id='in1'><body>hi</body></message>")
        got = yield ca.next_element(timeout=TIMEOUT)
        self.assertEqual((got["id"], str(got.body)), ("in1", "hi"))
        # It came in on node B, and node A never talked to the remote.
        self.assertTrue(b.table.connections_of("chat.b.example"))
        self.assertFalse(a.table.connections_of("chat.b.example"))
        self.assertEqual(b.cluster.counters.forwarded, 1)
        self.assertEqual(a.cluster.counters.received, 1)
        yield wait_until(lambda: b.cluster.counters.acked == 1 and not len(b.cluster.inflight),
                         "the acknowledgement")
        # An iq both ways: the answer goes back out (node A opens a stream
        # of its own: no node has one that may carry chat.a -> chat.b).
        cb.send("<iq type='get' from='y@chat.b.example' to='x@chat.a.example' id='q1'>"
                "<query xmlns='jabber:iq:version'/></iq>")
        iq = yield ca.next_element(timeout=TIMEOUT)
        self.assertEqual((iq.name, iq["id"]), ("iq", "q1"))
        ca.send("<iq type='result' from='x@chat.a.example' to='y@chat.b.example' id='q1'/>")
        answer = yield cb.next_element(timeout=TIMEOUT)
        self.assertEqual((answer.name, answer["type"], answer["id"]), ("iq", "result", "q1"))

    @defer.inlineCallbacks
    def test_component_on_node_a_uses_the_stream_node_b_has(self):
        a, b = self.nodes["a"], self.nodes["b"]
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        # bots.a.example first sits on node B and talks to chat.b.example:
        # node B opens an authenticated stream bots.a -> chat.b.
        bots = yield add_component(self, b, "bots.a.example", "secret-bots")
        bots.send("<message from='bot@bots.a.example' to='y@chat.b.example' id='m1'/>")
        self.assertEqual((yield cb.next_element(timeout=TIMEOUT))["id"], "m1")
        yield wait_until(lambda: a.cluster.cache.pair_owner("bots.a.example", "chat.b.example") == "node-b",
                         "node B's stream known to node A")
        # The component moves to node A and goes on talking.
        yield bots.close()
        bots = yield add_component(self, a, "bots.a.example", "secret-bots")
        for i in range(20):
            bots.send(f"<message from='bot@bots.a.example' to='y@chat.b.example' id='n{i}'/>")
        ids = []
        for _ in range(20):
            ids.append((yield cb.next_element(timeout=TIMEOUT))["id"])
        self.assertEqual(ids, [f"n{i}" for i in range(20)])  # in order
        # Through node B's stream: node A opened none.
        self.assertFalse(a.table.connections_of("chat.b.example"))
        self.assertEqual(a.cluster.counters.forwarded, 20)
        yield wait_until(lambda: a.cluster.counters.acked == 20, "the acknowledgements")

    @defer.inlineCallbacks
    def test_component_on_node_a_opens_a_stream_when_no_node_has_one(self):
        a = self.nodes["a"]
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        ca = yield add_component(self, a, "chat.a.example", "secret-a")
        ca.send("<message from='x@chat.a.example' to='y@chat.b.example' id='o1'/>")
        self.assertEqual((yield cb.next_element(timeout=TIMEOUT))["id"], "o1")
        self.assertTrue(a.table.connections_of("chat.b.example"))
        self.assertEqual(a.cluster.counters.forwarded, 0)


class SharedDomainTests(RoutingCase):
    node_names = "abc"

    @defer.inlineCallbacks
    def test_load_balanced_domain_spanning_nodes(self):
        """chat.a.example is held by a session on node A and one on node C;
        stanzas landing on node B (which holds none) go to both in turn; a
        node holding a session keeps its stanzas local."""
        a, c = self.nodes["a"], self.nodes["c"]
        on_a = yield add_component(self, a, "chat.a.example", "secret-a")
        on_c = yield add_component(self, c, "chat.a.example", "secret-a")
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        yield self.known_everywhere("chat.a.example", "a")
        yield self.known_everywhere("chat.a.example", "c")
        total = 40
        for i in range(total):
            cb.send(f"<message from='y@chat.b.example' to='x@chat.a.example' id='s{i}'/>")
        got = {"a": [], "c": []}
        yield wait_until(lambda: len(on_a.received.pending) + len(on_c.received.pending) >= total,
                         "every stanza", TIMEOUT)
        got["a"] = [e["id"] for e in on_a.received.pending]
        got["c"] = [e["id"] for e in on_c.received.pending]
        self.assertEqual(sorted(got["a"] + got["c"]), sorted(f"s{i}" for i in range(total)))
        # Both nodes took a fair share.
        self.assertGreaterEqual(len(got["a"]), total // 4)
        self.assertGreaterEqual(len(got["c"]), total // 4)
        self.assertEqual(self.nodes["b"].cluster.counters.forwarded, total)
