"""Three cluster nodes in one reactor sharing one real redis-server: an admin
write on any node reaches every node's live connections within a second,
survives a Redis restart, and the dialback secret is the cluster's."""

from __future__ import annotations

import json
import time

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from fedgate.cluster.redisclient import RedisClient
from fedgate.policy import PeerPolicy
from fedgate.s2s.dialback import dialback_key
from fedgate.storage.interface import ComponentCredential, peer_to_row
from tests.support.admin import AdminClient
from tests.support.federation import add_component, start_dns
from tests.support.gateway import gateway_config, publish, start_gateway, temp_dir
from tests.support.rawpeer import RawPeer
from tests.support.redisserver import start_redis
from tests.support.s2speer import s2s_header, wait_until
from tests.test_admin_api import TIMEOUT, V1

PROPAGATION = 1.0  # seconds: the bound for every node to apply a change


class ClusterCase(unittest.TestCase):
    timeout = 90
    redis_options: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = start_redis(self, options=self.redis_options)
        self.dns, dns_port = start_dns(self)
        self.nodes = {}
        for name in "abc":
            config = gateway_config(temp_dir(self), ["a.example"], {"chat.a.example": "secret-a"},
                                    extra_hosted=["*.a.example"], policy={"encryption": "optional"})
            config["cluster"] = {"enabled": True, "redis": self.redis.socket_path,
                                 "node_id": f"node-{name}", "heartbeat": 0.5, "lease": 2.0}
            self.nodes[name] = yield start_gateway(reactor, config, dns_port, self)
        self.remote = yield start_gateway(
            reactor, gateway_config(temp_dir(self), ["b.example"], {"chat.b.example": "secret-b"}),
            dns_port, self)
        publish(self.dns, self.nodes["a"], ["a.example", "chat.a.example"], "node-a.example")
        publish(self.dns, self.remote, ["b.example", "chat.b.example"], "gw-b.example")
        for node in self.nodes.values():
            yield wait_until(lambda: node.admin.sync.connected and node.admin.sync.reloads >= 1,
                             "the change feed")

    def api(self, name: str) -> AdminClient:
        return AdminClient(reactor, self.nodes[name])

    @defer.inlineCallbacks
    def federate(self):
        """chat.a.example on node A writes to chat.b.example on the remote
        gateway: an S2S stream between node A and the remote exists."""
        ca = yield add_component(self, self.nodes["a"], "chat.a.example", "secret-a")
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        ca.send("<message from='x@chat.a.example' to='y@chat.b.example' id='m1'/>")
        self.assertEqual((yield cb.next_element(timeout=TIMEOUT))["id"], "m1")
        self.assertTrue(self.nodes["a"].table.connections_of("chat.b.example"))
        return ca, cb

    @defer.inlineCallbacks
    def applied_everywhere(self, predicate, what: str, timeout: float = PROPAGATION):
        """Wait until ``predicate(node)`` holds on every node; the seconds it took."""
        started = time.monotonic()
        yield wait_until(lambda: all(predicate(n) for n in self.nodes.values()), what, timeout)
        return time.monotonic() - started


class PolicyPropagationTests(ClusterCase):
    @defer.inlineCallbacks
    def test_block_on_node_c_closes_the_stream_on_node_a(self):
        ca, cb = yield self.federate()
        a = self.nodes["a"]
        started = time.monotonic()
        got = yield self.api("c").put(f"{V1}/peers/chat.b.example", {"allowed": False, "note": "abuse"})
        self.assertEqual(got.status, 201)
        # Node A closes its stream to the blocked peer, within the bound.
        yield wait_until(lambda: not a.table.connections_of("chat.b.example"), "the close on A",
                         PROPAGATION)
        closed_after = time.monotonic() - started
        yield self.applied_everywhere(lambda n: n.policy.is_blocked("chat.b.example"), "the block")
        self.assertGreaterEqual(a.admin.enforcer.closed, 1)
        print(f"\nblock through node C's admin API: node A's stream closed {closed_after * 1000:.0f} ms "
              "after the request")
        # Node A's admin API shows the stored entry as its own.
        got = yield self.api("a").get(f"{V1}/peers/chat.b.example")
        self.assertEqual((got.json["allowed"], got.json["note"], got.json["source"]), (False, "abuse", "api"))
        # Traffic to the peer now bounces on node A.
        ca.send("<message from='x@chat.a.example' to='y@chat.b.example' id='m2'/>")
        bounce = yield ca.next_element(timeout=TIMEOUT)
        self.assertEqual((bounce["id"], bounce["type"]), ("m2", "error"))
        self.assertEqual(bounce.error.firstChildElement().name, "policy-violation")

        # Deleting the entry on node B lifts the block everywhere.
        got = yield self.api("b").delete(f"{V1}/peers/chat.b.example")
        self.assertEqual(got.status, 204)
        yield self.applied_everywhere(lambda n: not n.policy.is_blocked("chat.b.example"), "the unblock")
        ca.send("<message from='x@chat.a.example' to='y@chat.b.example' id='m3'/>")
        self.assertEqual((yield cb.next_element(timeout=TIMEOUT))["id"], "m3")

    @defer.inlineCallbacks
    def test_allowlist_mode_set_on_node_b_applies_on_node_a(self):
        yield self.federate()
        a = self.nodes["a"]
        got = yield self.api("b").patch(f"{V1}/policy", {"mode": "allowlist"})
        self.assertEqual(got.json["mode"], "allowlist")
        yield wait_until(lambda: not a.table.connections_of("chat.b.example"), "the close on A",
                         PROPAGATION)
        yield self.applied_everywhere(lambda n: n.policy.mode == "allowlist", "the mode")
        got = yield self.api("a").get(f"{V1}/policy")
        self.assertEqual(got.json["mode"], "allowlist")

    @defer.inlineCallbacks
    def test_component_credentials_follow(self):
        got = yield self.api("b").put(f"{V1}/components/bots.a.example", {"secret": "bots-secret-0123456789"})
        self.assertEqual(got.status, 201, got.body)
        yield self.applied_everywhere(
            lambda n: n.admin.components.current("bots.a.example") is not None, "the credentials")
        # A component authenticates on node C with what was stored through node B.
        yield add_component(self, self.nodes["c"], "bots.a.example", "bots-secret-0123456789")
        yield wait_until(lambda: self.nodes["c"].router.sessions_for("bots.a.example"), "the session")
        got = yield self.api("a").delete(f"{V1}/components/bots.a.example/credentials")
        self.assertEqual(got.status, 204, got.body)
        # Removed through node A: node C ends the session.
        yield wait_until(lambda: not self.nodes["c"].router.sessions_for("bots.a.example"),
                         "the session's end on C", PROPAGATION)
        yield self.applied_everywhere(
            lambda n: n.admin.components.current("bots.a.example") is None, "the removal")

    @defer.inlineCallbacks
    def test_dialback_secret_is_shared(self):
        secrets = {n.ctx.secret for n in self.nodes.values()}
        self.assertEqual(len(secrets), 1)
        self.assertNotEqual(secrets, {self.remote.ctx.secret})
        # A key node A issued, checked by node B as the Authoritative Server
        # over a real connection.
        key = dialback_key(self.nodes["a"].ctx.secret, "b.example", "a.example", "stream-1")
        for key_text, expected in ((key, "valid"), ("0" * 64, "invalid")):
            peer = RawPeer()
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.nodes["b"].port_of("s2s")),
                                  peer)
            self.addCleanup(lambda p=peer: p.transport.abortConnection() if not p.lost.called else None)
            peer.transport.write(s2s_header("b.example", "a.example")
                                 + f"<db:verify from='b.example' to='a.example' id='stream-1'>{key_text}"
                                   "</db:verify>".encode())
            yield wait_until(lambda: b"</db:verify>" in peer.data or b"type='" in peer.data
                             or b'type="' in peer.data, "the answer")
            text = bytes(peer.data).decode()
            self.assertRegex(text, f"<db:verify[^>]*type=['\"]{expected}['\"]")


class RedisRestartTests(ClusterCase):
    # The documented durable configuration: the data survives the restart.
    redis_options = {"appendonly": "yes", "appendfsync": "always"}

    @defer.inlineCallbacks
    def test_change_after_a_redis_restart_arrives(self):
        ca, cb = yield self.federate()
        a = self.nodes["a"]
        reloads = {name: n.admin.sync.reloads for name, n in self.nodes.items()}
        self.redis.restart()
        yield self.applied_everywhere(
            lambda n: n.admin.sync.connected and n.admin.sync.reloads > reloads[n.config.cluster.node_id[-1]],
            "resubscription and reload", 10)
        got = yield self.api("c").put(f"{V1}/peers/chat.b.example", {"allowed": False})
        self.assertEqual(got.status, 201, got.body)
        yield wait_until(lambda: not a.table.connections_of("chat.b.example"), "the close on A",
                         PROPAGATION)

    @defer.inlineCallbacks
    def test_a_missed_notice_is_made_up_by_the_reload(self):
        """A change whose notice nobody heard (written straight into Redis,
        as if published while the nodes were disconnected) is in force on
        every node after the next reconnect."""
        yield self.federate()
        a = self.nodes["a"]
        store = a.admin.storage
        writer = RedisClient(reactor, self.redis.address)
        writer.start()
        self.addCleanup(writer.stop)
        blocked = PeerPolicy("chat.b.example", allowed=False, note="written while away")
        yield writer.execute("HSET", store.key("peers"), "chat.b.example", json.dumps(peer_to_row(blocked)))
        yield writer.execute("HSET", store.key("components"), "late.a.example",
                             json.dumps({"domain": "late.a.example", "secret": "s"}))
        self.assertFalse(a.policy.is_blocked("chat.b.example"))
        writer.stop()
        self.redis.restart()
        yield self.applied_everywhere(lambda n: n.policy.is_blocked("chat.b.example"), "the reload", 10)
        yield wait_until(lambda: not a.table.connections_of("chat.b.example"), "the close on A")
        yield self.applied_everywhere(
            lambda n: n.admin.components.current("late.a.example") == ComponentCredential(
                "late.a.example", "s"), "the component")


class RedisDownTests(ClusterCase):
    @defer.inlineCallbacks
    def test_nodes_keep_serving_and_refuse_writes_while_redis_is_down(self):
        ca, cb = yield self.federate()
        yield self.api("b").put(f"{V1}/peers/blocked.example", {"allowed": False})
        yield self.applied_everywhere(lambda n: n.policy.is_blocked("blocked.example"), "the block")
        self.redis.stop()
        yield self.applied_everywhere(lambda n: not n.admin.sync.connected, "the lost feed", 10)
        # Writes are refused with 503 (nothing acknowledged that Redis lacks)...
        got = yield self.api("a").put(f"{V1}/peers/other.example", {"allowed": False})
        self.assertEqual(got.status, 503, got.body)
        self.assertIn("storage unavailable", got.json["message"])
        # ...while traffic flows on, under the policy each node holds.
        ca.send("<message from='x@chat.a.example' to='y@chat.b.example' id='during'/>")
        self.assertEqual((yield cb.next_element(timeout=TIMEOUT))["id"], "during")
        self.assertTrue(all(n.policy.is_blocked("blocked.example") for n in self.nodes.values()))
        # Redis comes back empty (persistence off here): the reload brings
        # every node in line with it, and writes work again.
        self.redis.start()
        yield self.applied_everywhere(lambda n: n.admin.sync.connected
                                      and not n.policy.is_blocked("blocked.example"), "the reload", 10)
        got = yield self.api("a").put(f"{V1}/peers/other.example", {"allowed": False})
        self.assertEqual(got.status, 201, got.body)
        yield self.applied_everywhere(lambda n: n.policy.is_blocked("other.example"), "the new block")
