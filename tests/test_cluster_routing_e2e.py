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

    @staticmethod
    def held_by(node, held, kind: bytes, what: str):
        """Fires once ``held`` (what ``node``'s subscriber read and did not
        handle) has a message of ``kind`` on the node's own channel."""
        mine = node.cluster.channel(node.cluster.node_id)
        return wait_until(lambda: any(c == mine and d[:1] == kind for c, d in held), what)

    @defer.inlineCallbacks
    def fence_then_release(self, b, held, cb):
        """B's fence arrives behind A's held acknowledgement: B handles what
        it held, so all three count as acknowledged and none bounces."""
        yield self.held_by(b, held, b"F", "B's fence, held after the acknowledgement")
        b.cluster.subscriber.on_messages = b.cluster.messages
        b.cluster.messages(held)
        self.assertEqual(len(b.cluster.inflight), 0)
        self.assertEqual((b.cluster.counters.acked, b.cluster.counters.bounced["timeout"]), (3, 0))
        yield sleep(0.3)
        self.assertEqual(cb.received.pending, [])  # no bounce came back

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
    def test_another_local_domain_joins_node_b_stream_to_the_remote(self):
        """Node B has a stream to chat.b.example for bots.a.example; a
        stanza from chat.a.example on node A goes to node B, which
        authenticates chat.a -> chat.b on that same stream."""
        a, b = self.nodes["a"], self.nodes["b"]
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        bots = yield add_component(self, b, "bots.a.example", "secret-bots")
        bots.send("<message from='bot@bots.a.example' to='y@chat.b.example' id='m1'/>")
        self.assertEqual((yield cb.next_element(timeout=TIMEOUT))["id"], "m1")
        yield wait_until(lambda: a.cluster.cache.stream_owner("chat.b.example") == "node-b",
                         "node B's stream known to node A")
        [stream] = [r for r in b.table if r.direction == "outbound"]
        ca = yield add_component(self, a, "chat.a.example", "secret-a")
        ca.send("<message from='x@chat.a.example' to='y@chat.b.example' id='j1'/>")
        self.assertEqual((yield cb.next_element(timeout=TIMEOUT))["id"], "j1")
        self.assertFalse(a.table.connections_of("chat.b.example"))
        self.assertEqual(a.cluster.counters.forwarded, 1)
        self.assertTrue(stream.can_send("chat.a.example", "chat.b.example"))
        self.assertEqual([r for r in b.table if r.direction == "outbound"], [stream])

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


def error_condition(element) -> str | None:
    if element.getAttribute("type") != "error" or element.error is None:
        return None
    return element.error.firstChildElement().name


@defer.inlineCallbacks
def drain(client, want: int, timeout: float = TIMEOUT) -> defer.Deferred:
    """The next ``want`` elements ``client`` receives."""
    out = []
    for _ in range(want):
        out.append((yield client.next_element(timeout=timeout)))
    return out


class NodeFailureTests(RoutingCase):
    node_names = "abc"

    @defer.inlineCallbacks
    def test_dead_node_is_routed_around_at_once(self):
        """chat.a.example is held on nodes A and C; node A dies (its Redis
        subscription and heartbeat stop, as with kill -9) while the remote
        floods through node B: the first PUBLISH to A that reaches nobody
        drops A, and every stanza ends at C or bounced: none is lost."""
        a, b, c = self.nodes["a"], self.nodes["b"], self.nodes["c"]
        on_a = yield add_component(self, a, "chat.a.example", "secret-a")
        on_c = yield add_component(self, c, "chat.a.example", "secret-a")
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        yield self.known_everywhere("chat.a.example", "a")
        yield self.known_everywhere("chat.a.example", "c")
        cb.send("<message from='y@chat.b.example' to='x@chat.a.example' id='warm'/>")
        yield wait_until(lambda: len(on_a.received.pending) + len(on_c.received.pending) == 1, "warm-up")
        a.cluster.kill()
        killed_at = reactor.seconds()
        sent = 200
        for i in range(sent):
            cb.send(f"<message from='y@chat.b.example' to='x@chat.a.example' id='f{i}'><body>{i}</body></message>")
        yield wait_until(lambda: "node-a" not in b.cluster.cache.component_owners("chat.a.example"),
                         "node A dropped on node B")
        noticed = reactor.seconds() - killed_at
        yield wait_until(lambda: len(on_c.received.pending) + len(cb.received.pending) >= sent - 1,
                         "the flood's outcome", TIMEOUT)
        yield sleep(0.3)
        at_c = {e["id"] for e in on_c.received.pending if e["id"].startswith("f")}
        bounced = {e["id"] for e in cb.received.pending if error_condition(e)}
        # A stanza already on its way to A when A died may have reached A's
        # component (A's reactor still runs here); none reached it after.
        at_a = {e["id"] for e in on_a.received.pending if e["id"].startswith("f")}
        self.assertEqual(len(at_c) + len(bounced) + len(at_a), sent, (len(at_c), len(bounced), len(at_a)))
        self.assertFalse(at_c & bounced)
        self.assertGreater(len(at_c), sent // 2)
        self.assertGreaterEqual(b.cluster.counters.rerouted, 1)
        print(f"\nnode A's death noticed by node B {noticed * 1000:.0f} ms after it (bound 100 ms); "
              f"{len(at_c)} delivered to C, {len(at_a)} to A before, {len(bounced)} bounced of {sent}")
        self.assertLess(noticed, 0.1 + 0.05)  # 50 ms slack for this loaded machine's scheduler

    @defer.inlineCallbacks
    def test_only_holder_dead_bounces_service_unavailable(self):
        a, b = self.nodes["a"], self.nodes["b"]
        yield add_component(self, a, "chat.a.example", "secret-a")
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        yield self.known_everywhere("chat.a.example", "a")
        a.cluster.kill()
        for i in range(5):
            cb.send(f"<message from='y@chat.b.example' to='x@chat.a.example' id='d{i}'/>")
        got = yield drain(cb, 5)
        self.assertEqual(sorted(e["id"] for e in got), [f"d{i}" for i in range(5)])
        self.assertEqual({error_condition(e) for e in got}, {"service-unavailable"})


class DeadNodeInFlightTests(RoutingCase):
    @defer.inlineCallbacks
    def test_unacknowledged_stanzas_bounce_as_soon_as_the_node_is_found_dead(self):
        """Stanzas node A took but had not acknowledged when it died bounce
        the moment node B finds it dead by its lease (2 s here), not at
        ack_timeout (6 s); a stanza that reached nobody is routed again (here
        bounced) at once.  (A PUBLISH reaching nobody proves only that A's
        subscriber is away, which a live node whose subscriber reconnects
        also shows: what A got waits for the lease, see
        SubscriberBlipTests.)"""
        a, b = self.nodes["a"], self.nodes["b"]
        ca = yield add_component(self, a, "chat.a.example", "secret-a")
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        yield self.known_everywhere("chat.a.example", "a")
        a.cluster.publisher.before_flush.remove(a.cluster._flush_acks)
        for i in range(3):
            cb.send(f"<message from='y@chat.b.example' to='x@chat.a.example' id='u{i}'/>")
        yield drain(ca, 3)
        self.assertEqual(len(b.cluster.inflight), 3)
        a.cluster.kill()
        started = reactor.seconds()
        cb.send("<message from='y@chat.b.example' to='x@chat.a.example' id='after'/>")
        first = yield drain(cb, 1, timeout=3.0)
        self.assertEqual([(e["id"], error_condition(e)) for e in first],
                         [("after", "service-unavailable")])
        self.assertLess(reactor.seconds() - started, 0.5)
        got = yield drain(cb, 3, timeout=5.0)
        took = reactor.seconds() - started
        conditions = {e["id"]: error_condition(e) for e in got}
        self.assertEqual(conditions, {"u0": "remote-server-timeout", "u1": "remote-server-timeout",
                                      "u2": "remote-server-timeout"})
        lease = b.cluster.settings.lease
        self.assertLess(took, lease + b.cluster.membership.liveness_interval + 0.5)
        self.assertEqual(len(b.cluster.inflight), 0)


class GoneNodeFenceTests(RoutingCase):
    @defer.inlineCallbacks
    def test_acknowledgements_on_their_way_are_counted_before_bouncing(self):
        """Node B finds node A gone while A's acknowledgements are still on
        their way to B's subscriber: B bounces only what is still
        unacknowledged once its fence message has come back, here nothing."""
        a, b = self.nodes["a"], self.nodes["b"]
        ca = yield add_component(self, a, "chat.a.example", "secret-a")
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        yield self.known_everywhere("chat.a.example", "a")
        held = []
        b.cluster.subscriber.on_messages = held.extend  # B reads, but handles nothing yet
        for i in range(3):
            cb.send(f"<message from='y@chat.b.example' to='x@chat.a.example' id='g{i}'/>")
        yield drain(ca, 3)
        yield self.held_by(b, held, b"R", "A's acknowledgement, held")
        self.assertEqual(len(b.cluster.inflight), 3)
        b.cluster._node_gone("node-a")  # as when its lease key is found missing
        self.assertEqual(b.cluster.counters.bounced["timeout"], 0)  # not yet
        yield self.fence_then_release(b, held, cb)


class RedisOutageTests(RoutingCase):
    @defer.inlineCallbacks
    def test_redis_down_bounces_cross_node_then_recovers(self):
        a, b = self.nodes["a"], self.nodes["b"]
        ca = yield add_component(self, a, "chat.a.example", "secret-a")
        local = yield add_component(self, b, "bots.a.example", "secret-bots")
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        yield self.known_everywhere("chat.a.example", "a")
        cb.send("<message from='y@chat.b.example' to='x@chat.a.example' id='before'/>")
        self.assertEqual((yield ca.next_element(timeout=TIMEOUT))["id"], "before")

        self.redis.stop()
        yield wait_until(lambda: not b.cluster.connected and not a.cluster.connected, "the outage seen")
        for i in range(10):
            cb.send(f"<message from='y@chat.b.example' to='x@chat.a.example' id='down{i}'/>")
        # Local delivery on node B goes on meanwhile.
        cb.send("<message from='y@chat.b.example' to='x@bots.a.example' id='local'/>")
        self.assertEqual((yield local.next_element(timeout=TIMEOUT))["id"], "local")
        got = yield drain(cb, 10)
        self.assertEqual(sorted(e["id"] for e in got), sorted(f"down{i}" for i in range(10)))
        self.assertEqual({error_condition(e) for e in got}, {"remote-server-timeout"})
        self.assertEqual(b.cluster.counters.bounced["redis"], 10)

        self.redis.start()
        yield wait_until(lambda: b.cluster.connected and a.cluster.connected, "reconnection", 10)
        yield self.known_everywhere("chat.a.example", "a")
        cb.send("<message from='y@chat.b.example' to='x@chat.a.example' id='after'/>")
        self.assertEqual((yield ca.next_element(timeout=TIMEOUT))["id"], "after")
        self.assertTrue(ca.received.pending == [])


class AckTimeoutTests(RoutingCase):
    cluster_options = {"ack_timeout": 0.5}

    @defer.inlineCallbacks
    def test_unacknowledged_stanza_bounces_after_the_timeout(self):
        """Node A takes the stanza but its acknowledgements never leave (as
        with a hung node, whose subscription Redis still counts): node B
        bounces with remote-server-timeout once ack_timeout has passed."""
        a, b = self.nodes["a"], self.nodes["b"]
        ca = yield add_component(self, a, "chat.a.example", "secret-a")
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        yield self.known_everywhere("chat.a.example", "a")
        a.cluster.publisher.before_flush.remove(a.cluster._flush_acks)  # acknowledgements lost
        cb.send("<message from='y@chat.b.example' to='x@chat.a.example' id='t1'/>")
        self.assertEqual((yield ca.next_element(timeout=TIMEOUT))["id"], "t1")
        bounce = yield cb.next_element(timeout=TIMEOUT)
        self.assertEqual((bounce["id"], error_condition(bounce)), ("t1", "remote-server-timeout"))
        self.assertEqual(b.cluster.counters.bounced["timeout"], 1)
        self.assertEqual(len(b.cluster.inflight), 0)


class InFlightBoundTests(RoutingCase):
    cluster_options = {"ack_timeout": 1.0, "max_in_flight": 5}

    @defer.inlineCallbacks
    def test_past_max_in_flight_bounces_resource_constraint(self):
        a, b = self.nodes["a"], self.nodes["b"]
        ca = yield add_component(self, a, "chat.a.example", "secret-a")
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        yield self.known_everywhere("chat.a.example", "a")
        a.cluster.publisher.before_flush.remove(a.cluster._flush_acks)  # nothing is acknowledged: the table fills
        for i in range(8):
            cb.send(f"<message from='y@chat.b.example' to='x@chat.a.example' id='p{i}'/>")
        delivered = yield drain(ca, 5)
        self.assertEqual([e["id"] for e in delivered], [f"p{i}" for i in range(5)])
        bounces = yield drain(cb, 8)  # 3 at once, then the 5 unacknowledged ones
        conditions = {}
        for e in bounces:
            conditions.setdefault(error_condition(e), []).append(e["id"])
        self.assertEqual(sorted(conditions["resource-constraint"]), ["p5", "p6", "p7"])
        self.assertEqual(sorted(conditions["remote-server-timeout"]), [f"p{i}" for i in range(5)])
        self.assertEqual(b.cluster.counters.bounced["full"], 3)
        self.assertEqual(b.cluster.inflight.refused, 3)


class ClusterViewTests(RoutingCase):
    node_names = "abc"

    @defer.inlineCallbacks
    def test_any_node_answers_for_the_cluster_and_the_cli_prints_it(self):
        import os
        import sys

        from twisted.internet import utils

        from fedgate.admin.openapi import document
        from tests.support.admin import AdminClient
        from tests.test_admin_api import V1
        from tests.test_admin_openapi import validate
        a, b, c = self.nodes["a"], self.nodes["b"], self.nodes["c"]
        ca = yield add_component(self, a, "chat.a.example", "secret-a")
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        yield self.known_everywhere("chat.a.example", "a")
        cb.send("<message from='y@chat.b.example' to='x@chat.a.example' id='v1'/>")
        yield ca.next_element(timeout=TIMEOUT)
        # Wait for a heartbeat after the traffic, so the view shows node B's stream.
        beats = b.cluster.membership.heartbeats
        yield wait_until(lambda: b.cluster.membership.heartbeats > beats, "a heartbeat")

        api = AdminClient(reactor, c)
        got = yield api.get(f"{V1}/cluster")
        self.assertEqual(got.status, 200, got.body)
        doc = document("1")
        schema = doc["paths"][f"{V1}/cluster"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        self.assertEqual(validate(schema, got.json, doc["components"]["schemas"]), [])
        view = got.json
        self.assertEqual(view["node"], "node-c")
        nodes = {n["node"]: n for n in view["nodes"]}
        self.assertEqual(set(nodes), {"node-a", "node-b", "node-c"})
        self.assertEqual({n["health"] for n in nodes.values()}, {"up"})
        self.assertEqual(nodes["node-a"]["components"], ["chat.a.example"])
        self.assertIn("chat.b.example", {s["remote"] for s in nodes["node-b"]["streams"]})
        self.assertEqual(nodes["node-b"]["relay"]["forwarded"], 1)
        self.assertLess(nodes["node-a"]["heartbeat_age_seconds"], 2.0)

        # fedgatectl cluster status, against node C.
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {"PYTHONPATH": repo, "PATH": os.environ.get("PATH", ""),
               "FEDGATE_ADMIN_URL": api.base, "FEDGATE_ADMIN_TOKEN": api.token}
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, ["-m", "fedgate.cli", "cluster", "status"], env=env, path=repo)
        self.assertEqual(code, 0, err)
        text = out.decode()
        self.assertIn("cluster seen from node-c: Redis connected", text)
        rows = {line.split()[0]: line.split() for line in text.splitlines()
                if line.startswith("node-")}
        self.assertEqual(rows["node-a"][1], "up")
        self.assertIn("chat.a.example", rows["node-a"])
        self.assertRegex(text, r"node-b\s+\d+\s+inbound\s+chat.b.example")

        # The metrics count the cross-node stanzas with bounded labels.
        metrics = yield AdminClient(reactor, b).get("/metrics")
        text = metrics.body.decode()
        self.assertIn('fedgate_cluster_stanzas_total{outcome="forwarded"} 1.0', text)
        self.assertIn('fedgate_cluster_bounces_total{reason="timeout"} 0.0', text)
        self.assertIn("fedgate_cluster_redis_connected 1.0", text)
        self.assertIn("fedgate_cluster_nodes 3.0", text)

        # Node A dies silently: once its lease has run out it shows as down.
        a.cluster.kill()
        yield sleep(2.2)
        got = yield api.get(f"{V1}/cluster")
        nodes = {n["node"]: n for n in got.json["nodes"]}
        self.assertEqual((nodes["node-a"]["health"], nodes["node-b"]["health"]), ("down", "up"))

    @defer.inlineCallbacks
    def test_single_node_answers_404(self):
        from tests.support.admin import AdminClient
        from tests.test_admin_api import V1
        got = yield AdminClient(reactor, self.remote).get(f"{V1}/cluster")
        self.assertEqual(got.status, 404)
        self.assertIn("cluster mode is off", got.json["message"])


class HungNodeTests(RoutingCase):
    node_names = "abc"
    cluster_options = {"ack_timeout": 1.0}

    @defer.inlineCallbacks
    def test_hung_node_is_dropped_within_its_lease(self):
        """Node A hangs (as with SIGSTOP: Redis still counts its
        subscription, but it neither renews its lease nor acknowledges):
        stanzas sent to it bounce after ack_timeout, and once its lease (2 s
        here) has run out node B routes everything to node C.  Every stanza
        is accounted for.  Here A's reactor runs on (only its heartbeats
        and acknowledgements stop), so it notices its own lease run out
        and from then on discards what it is sent: those bounce and are
        never delivered."""
        a, b, c = self.nodes["a"], self.nodes["b"], self.nodes["c"]
        on_a = yield add_component(self, a, "chat.a.example", "secret-a")
        on_c = yield add_component(self, c, "chat.a.example", "secret-a")
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        yield self.known_everywhere("chat.a.example", "a")
        yield self.known_everywhere("chat.a.example", "c")
        a.cluster.membership.stop()  # no more heartbeats
        a.cluster.publisher.before_flush.remove(a.cluster._flush_acks)  # no more acknowledgements
        hung_at = reactor.seconds()
        dropped_at = []

        def watch():
            if not dropped_at and "node-a" not in b.cluster.cache.component_owners("chat.a.example"):
                dropped_at.append(reactor.seconds())
        watcher = task.LoopingCall(watch)
        watcher.start(0.02)
        self.addCleanup(lambda: watcher.running and watcher.stop())
        sent = 0
        while reactor.seconds() - hung_at < 3.5:
            cb.send(f"<message from='y@chat.b.example' to='x@chat.a.example' id='h{sent}'/>")
            sent += 1
            yield sleep(0.05)
        yield sleep(1.5)  # the last ones to A time out
        watcher.stop()
        ids = {f"h{i}" for i in range(sent)}
        at_a = {e["id"] for e in on_a.received.pending}
        at_c = {e["id"] for e in on_c.received.pending}
        bounced = {e["id"] for e in cb.received.pending if error_condition(e) == "remote-server-timeout"}
        self.assertEqual(at_a | at_c | bounced, ids)
        self.assertEqual(at_a & at_c, set())
        # To A while its lease held: taken there, never acknowledged, bounced.
        self.assertLessEqual(at_a, bounced)
        # To A once its own lease had run out by its own clock: discarded
        # there unhandled, refused, bounced; never delivered.
        discarded = a.cluster.counters.discarded
        self.assertEqual(len(bounced - at_a), discarded)
        self.assertGreater(discarded, 0)
        self.assertTrue(dropped_at)
        noticed = dropped_at[0] - hung_at
        print(f"\nhung node dropped {noticed:.2f} s after it hung (lease 2 s, heartbeat 0.5 s); "
              f"{len(at_c)} to C, {len(at_a)} to A and bounced, {discarded} discarded by A "
              f"(its lease had run out) and bounced, of {sent}")
        self.assertLess(noticed, 2.0 + 0.5 + 0.3)


class RedisRestartFloodTests(RoutingCase):
    cluster_options = {"ack_timeout": 1.0}

    @defer.inlineCallbacks
    def test_redis_restart_in_the_middle_of_a_flood_loses_nothing(self):
        """The remote floods node B for a component on node A; Redis restarts
        half way.  Every stanza ends delivered or bounced (none silently
        lost); some may be both (acknowledgement lost with Redis)."""
        a, b = self.nodes["a"], self.nodes["b"]
        ca = yield add_component(self, a, "chat.a.example", "secret-a")
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        yield self.known_everywhere("chat.a.example", "a")
        sent, restarted = 0, False
        started = reactor.seconds()
        while reactor.seconds() - started < 3.0:
            for _ in range(20):
                cb.send(f"<message from='y@chat.b.example' to='x@chat.a.example' id='r{sent}'/>")
                sent += 1
            if not restarted and reactor.seconds() - started > 1.0:
                self.redis.restart()
                restarted = True
            yield sleep(0.01)
        ids = {f"r{i}" for i in range(sent)}

        def outcome():
            at_a = {e["id"] for e in ca.received.pending}
            bounced = {e["id"] for e in cb.received.pending if error_condition(e)}
            return at_a, bounced
        yield wait_until(lambda: set.union(*outcome()) == ids and not len(b.cluster.inflight),
                         "every stanza's outcome", 15)
        at_a, bounced = outcome()
        self.assertEqual(len(ca.received.pending), len(at_a))  # no duplicates delivered
        both = at_a & bounced
        conditions = {}
        for e in cb.received.pending:
            if error_condition(e):
                conditions[error_condition(e)] = conditions.get(error_condition(e), 0) + 1
        print(f"\nbounce conditions: {conditions}")
        print(f"\nRedis restarted mid-flood: {sent} sent, {len(at_a)} delivered, {len(bounced)} "
              f"bounced ({dict(b.cluster.counters.bounced)}), {len(both)} both delivered and "
              "bounced, 0 lost")
        self.assertGreater(len(at_a), sent // 2)
        self.assertTrue(b.cluster.connected and a.cluster.connected)


class CleanStopTests(RoutingCase):
    """M2: a node that stops waits (bounded) for the acknowledgements of
    what it forwarded, and sends its own, before it leaves."""

    @defer.inlineCallbacks
    def three_in_flight_with_acks_held(self, prefix):
        """Three stanzas from the remote's component via B to A's component,
        whose acknowledgements A holds back; fires (a, b, the remote's
        component)."""
        a, b = self.nodes["a"], self.nodes["b"]
        ca = yield add_component(self, a, "chat.a.example", "secret-a")
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        yield self.known_everywhere("chat.a.example", "a")
        a.cluster.publisher.before_flush.remove(a.cluster._flush_acks)  # A holds its acks
        for i in range(3):
            cb.send(f"<message from='y@chat.b.example' to='x@chat.a.example' id='{prefix}{i}'/>")
        yield drain(ca, 3)
        self.assertEqual(len(b.cluster.inflight), 3)
        return a, b, cb

    @defer.inlineCallbacks
    def test_stopping_origin_waits_for_acks_instead_of_bouncing(self):
        a, b, cb = yield self.three_in_flight_with_acks_held("s")
        stopping = b.cluster.stop()
        yield sleep(0.2)  # B is waiting, subscriber up; now A's acks go out
        a.cluster.publisher.before_flush.append(a.cluster._flush_acks)
        a.cluster.publisher.wake()
        yield stopping
        self.assertEqual((b.cluster.counters.acked, b.cluster.counters.bounced["timeout"]), (3, 0))
        yield sleep(0.3)
        self.assertEqual(cb.received.pending, [])  # delivered, and no bounce

    @defer.inlineCallbacks
    def test_stopping_receiver_sends_its_acks_before_leaving(self):
        a, b, cb = yield self.three_in_flight_with_acks_held("r")
        # A's last acks reach Redis before its "down" does: announced first,
        # B's fence could come back before the acks and B would bounce what
        # A delivered (this test failed so about once in six CI runs).
        at_leave = []
        leave = a.cluster.membership.leave

        def leaving():
            publisher = a.cluster.publisher
            at_leave.append((publisher.queued, publisher._in_flight, publisher._scheduled))
            return leave()
        a.cluster.membership.leave = leaving
        yield a.cluster.stop()
        self.assertEqual(at_leave, [(0, False, False)], "nothing of A's left to publish at its leave")
        yield wait_until(lambda: not len(b.cluster.inflight), "B's table emptied")
        self.assertEqual((b.cluster.counters.acked, b.cluster.counters.bounced["timeout"]), (3, 0))
        yield sleep(0.3)
        self.assertEqual(cb.received.pending, [])  # delivered, and no bounce
