"""Cluster relay under faults that a live node survives: its subscriber cut
off by Redis while it still works (H2), its acknowledgements waiting in
its own subscriber when the ack timer fires (M1).  Two gateways in one
reactor, one real redis-server, a remote gateway over loopback."""

from __future__ import annotations

from twisted.internet import defer, reactor

from tests.support.federation import add_component
from tests.support.s2speer import wait_until
from tests.test_admin_api import TIMEOUT
from tests.test_cluster_routing_e2e import RoutingCase, drain, error_condition, sleep


def ids(elements, prefix: str) -> set:
    return {e["id"] for e in elements if e["id"].startswith(prefix)}


class SubscriberBlipTests(RoutingCase):
    @defer.inlineCallbacks
    def test_live_node_whose_subscriber_is_cut_off_is_not_fenced(self):
        """Redis cuts node A's subscriber off (CLIENT KILL, as its
        client-output-buffer-limit pubsub does to a lagging subscriber)
        while A still has relayed stanzas read but not yet handled.  A
        stanza node B relays to A meanwhile reaches nobody and is routed
        again (here: bounced, A being the only holder).  A is alive: B
        neither declares it dead nor bounces what A got, A delivers and
        acknowledges it, and no stanza is both delivered and bounced, none
        is lost."""
        a, b = self.nodes["a"], self.nodes["b"]
        ca = yield add_component(self, a, "chat.a.example", "secret-a")
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        yield self.known_everywhere("chat.a.example", "a")
        sub = a.cluster.subscriber
        sent = []

        def send(name):
            sent.append(name)
            cb.send(f"<message from='y@chat.b.example' to='x@chat.a.example' id='{name}'/>")

        for i in range(3):
            send(f"w{i}")
        yield wait_until(lambda: len(ca.received.pending) >= 3 and not len(b.cluster.inflight),
                         "the warm-up delivered and acknowledged")
        # A's reactor lags: its subscriber reads, the handling waits.
        held = []
        sub.on_messages = held.extend
        for i in range(5):
            send(f"h{i}")
        yield wait_until(lambda: len(b.cluster.inflight) == 5 and all(
            e.confirmed for e in b.cluster.inflight._waiting.values()), "A's subscriber got them")
        yield wait_until(lambda: all(any(f"h{i}".encode() in d for _, d in held) for i in range(5)),
                         "A's subscriber handed them over")
        # Its subscriber connection is cut (as Redis does to a lagging
        # subscriber; redis-py would reconnect within milliseconds, this
        # keeps it away until the test brings it back).
        sub.stop()
        a.cluster.lost("cut off (test)")
        numsub = yield b.cluster.client.execute("PUBSUB", "NUMSUB", a.cluster.channel("node-a"))
        self.assertEqual(int(numsub[1]), 0)
        for i in range(5):
            send(f"p{i}")
        yield wait_until(lambda: b.cluster.counters.rerouted >= 5, "the stanzas that reached nobody")
        yield sleep(0.3)  # time for any fence B would publish to come back
        # A's reactor catches up, and its subscriber comes back.
        sub.on_messages = a.cluster.messages
        a.cluster.messages(held)
        sub.start()
        yield wait_until(lambda: sub.connected, "A's subscriber back again", TIMEOUT)
        yield self.known_everywhere("chat.a.example", "a")
        for i in range(3):
            send(f"q{i}")
        yield wait_until(lambda: len(ids(ca.received.pending, "q")) == 3, "the flow goes on")
        yield wait_until(lambda: not len(b.cluster.inflight), "every stanza settled", TIMEOUT)
        yield sleep(0.3)
        delivered = ids(ca.received.pending, "")
        bounced = {e["id"] for e in cb.received.pending if error_condition(e)}
        self.assertEqual(delivered & bounced, set())
        self.assertEqual(set(sent) - delivered - bounced, set())
        self.assertEqual(ids(ca.received.pending, "h"), {f"h{i}" for i in range(5)})
        self.assertEqual(bounced, {f"p{i}" for i in range(5)})
        self.assertEqual(b.cluster.counters.bounced["timeout"], 0)
        self.assertIsNone(a.cluster._rejoin)


class AckFenceTests(RoutingCase):
    cluster_options = {"ack_timeout": 0.5}

    @defer.inlineCallbacks
    def test_acknowledgements_waiting_for_the_origin_count_before_the_timeout(self):
        """Node B's ack timer fires while A's acknowledgements already wait
        in B's own subscriber (B was stalled): B expires through a fence on
        its own channel, so they are counted first and nothing bounces."""
        a, b = self.nodes["a"], self.nodes["b"]
        ca = yield add_component(self, a, "chat.a.example", "secret-a")
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        yield self.known_everywhere("chat.a.example", "a")
        held = []
        b.cluster.subscriber.on_messages = held.extend  # B reads, handles nothing yet
        for i in range(3):
            cb.send(f"<message from='y@chat.b.example' to='x@chat.a.example' id='k{i}'/>")
        for _ in range(3):
            yield ca.next_element(timeout=TIMEOUT)
        yield self.held_by(b, held, b"R", "A's acknowledgement, held")
        yield sleep(0.8)  # past ack_timeout: B's timer has fired
        self.assertEqual(b.cluster.counters.bounced["timeout"], 0)
        yield self.fence_then_release(b, held, cb)

    @defer.inlineCallbacks
    def test_still_unacknowledged_after_the_fence_bounces(self):
        """The fence comes back and nothing acknowledged the stanza: it
        bounces, and the timer is armed again for the next one."""
        a, b = self.nodes["a"], self.nodes["b"]
        ca = yield add_component(self, a, "chat.a.example", "secret-a")
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        yield self.known_everywhere("chat.a.example", "a")
        a.cluster.publisher.before_flush.remove(a.cluster._flush_acks)  # acknowledgements lost
        for name in ("t1", "t2"):
            cb.send(f"<message from='y@chat.b.example' to='x@chat.a.example' id='{name}'/>")
            yield ca.next_element(timeout=TIMEOUT)
            yield sleep(0.3)
        got = yield drain(cb, 2)
        self.assertEqual([(e["id"], error_condition(e)) for e in got],
                         [("t1", "remote-server-timeout"), ("t2", "remote-server-timeout")])
        self.assertEqual((b.cluster.counters.bounced["timeout"], len(b.cluster.inflight)), (2, 0))


class BounceLoopTests(RoutingCase):
    @defer.inlineCallbacks
    def test_one_failing_bounce_loses_nothing_else(self):
        """The router raises on the first stanza of a loop whose entries are
        already out of the in-flight table: the others still bounce and the
        ack timer stays armed."""
        a, b = self.nodes["a"], self.nodes["b"]
        ca = yield add_component(self, a, "chat.a.example", "secret-a")
        cb = yield add_component(self, self.remote, "chat.b.example", "secret-b")
        yield self.known_everywhere("chat.a.example", "a")
        a.cluster.publisher.before_flush.remove(a.cluster._flush_acks)
        for i in range(3):
            cb.send(f"<message from='y@chat.b.example' to='x@chat.a.example' id='e{i}'/>")
        for _ in range(3):
            yield ca.next_element(timeout=TIMEOUT)
        yield wait_until(lambda: len(b.cluster.inflight) == 3 and all(
            e.confirmed for e in b.cluster.inflight._waiting.values()), "A's subscriber got them")
        router = b.cluster.router
        real = router.bounce
        calls = []

        def bounce(stanza, *args):
            calls.append(stanza.id)
            if len(calls) == 1:
                raise RuntimeError("a bug in the first bounce")
            return real(stanza, *args)

        router.bounce = bounce
        self.addCleanup(setattr, router, "bounce", real)
        b.cluster._bounce_node("node-a")
        self.assertEqual(len(calls), 3)
        got = yield drain(cb, 2)
        self.assertEqual(sorted(e["id"] for e in got), ["e1", "e2"])
        self.assertEqual(len(b.cluster.inflight), 0)
        self.flushLoggedErrors(RuntimeError)


class NodeIdCollisionTests(RoutingCase):
    @defer.inlineCallbacks
    def start_node(self, node_id: str):
        from tests.support.federation import start_dns
        from tests.support.gateway import gateway_config, start_gateway, temp_dir
        from tests.test_cluster_routing_e2e import COMPONENTS
        _, dns_port = start_dns(self)
        config = gateway_config(temp_dir(self), ["a.example"], COMPONENTS,
                                policy={"encryption": "optional"})
        config["cluster"] = {"enabled": True, "redis": self.redis.socket_path,
                             "node_id": node_id, "heartbeat": 0.5, "lease": 2.0}
        node = yield start_gateway(reactor, config, dns_port, self)
        return node

    @defer.inlineCallbacks
    def test_second_node_with_the_same_id_leaves_the_cluster(self):
        """A second running node given node A's id finds the liveness key
        held by another instance, past a lease, and leaves the cluster's
        routing (one critical line); node A keeps its key and is the only
        subscriber of its channel."""
        a = self.nodes["a"]
        dup = yield self.start_node("node-a")
        started = reactor.seconds()
        yield wait_until(lambda: dup.cluster.collided, "the duplicate found out", 10)
        self.assertLess(reactor.seconds() - started, 2.0 + 0.5 + 1.5)
        self.assertFalse(a.cluster.collided)
        self.assertIsNone(dup.cluster.subscriber)
        numsub = yield a.cluster.client.execute("PUBSUB", "NUMSUB", a.cluster.channel("node-a"))
        self.assertEqual(int(numsub[1]), 1)
        held = yield a.cluster.client.execute("GET", "fedgate:alive:node-a")
        self.assertEqual(held.decode(), a.cluster.instance)
        # Its clean stop leaves node A's entries alone.
        yield dup.cluster.membership.leave()
        self.assertEqual(int((yield a.cluster.client.execute("EXISTS", "fedgate:alive:node-a"))), 1)

    @defer.inlineCallbacks
    def test_restart_after_kill_takes_the_id_over_once_the_lease_ran_out(self):
        """A new run of a killed node finds its predecessor's key: it waits
        for the lease to run out, then holds the id."""
        a = self.nodes["a"]
        a.cluster.kill()
        again = yield self.start_node("node-a")
        yield wait_until(lambda: again.cluster.membership.heartbeats >= 1, "the id taken over", 10)
        self.assertFalse(again.cluster.collided)
        held = yield again.cluster.client.execute("GET", "fedgate:alive:node-a")
        self.assertEqual(held.decode(), again.cluster.instance)


class HeartbeatBoundTests(RoutingCase):
    @defer.inlineCallbacks
    def test_pairs_remote_peers_grow_are_bounded_in_heartbeat_and_hash(self):
        """80 outbound streams of 100 valid pairs each (8,000 pairs, as
        remote peers may authenticate up to max_pairs_per_connection on each
        stream): the heartbeat lists at most MAX_PAIRS_LISTED pairs per
        stream with the count, and the ownership hash holds at most
        MAX_ANNOUNCED_PER_STREAM per stream and MAX_ANNOUNCED_PAIRS in all."""
        import json
        from fedgate.cluster import relay as relay_module
        from fedgate.s2s.pairs import LOCAL, OUTBOUND, VALID, ConnectionRecord
        b = self.nodes["b"]
        streams, per_stream = 80, 100
        self.assertGreater(streams * relay_module.MAX_ANNOUNCED_PER_STREAM,
                           relay_module.MAX_ANNOUNCED_PAIRS)
        for n in range(streams):
            record = ConnectionRecord(OUTBOUND, "192.0.2.1:5269", 0.0, remote_domain=f"r{n}.example")
            for i in range(per_stream):
                record.set_pair(f"l{i}.a.example", f"r{n}.example", VALID, "dialback", 0.0,
                                origin=LOCAL)
            b.table.add(record)
            self.addCleanup(b.table.remove, record)
        info = b.cluster.info()
        listed = [s for s in info["streams"] if s["remote"].startswith("r")]
        self.assertEqual(len(listed), streams)
        self.assertEqual({(len(s["pairs"]), s["pair_count"]) for s in listed},
                         {(relay_module.MAX_PAIRS_LISTED, per_stream)})
        self.assertLess(len(json.dumps(info)), 40_000)
        heartbeats = b.cluster.membership.heartbeats
        yield wait_until(lambda: b.cluster.membership.heartbeats >= heartbeats + 2, "two heartbeats")
        fields = yield b.cluster.client.execute("HKEYS", "fedgate:owns:node-b")
        pairs = [f.decode() for f in fields if f.startswith(b"s|")]
        self.assertEqual(len(pairs), relay_module.MAX_ANNOUNCED_PAIRS)
        by_remote = {}
        for field in pairs:
            remote = field.split("|")[2]
            by_remote[remote] = by_remote.get(remote, 0) + 1
        self.assertLessEqual(max(by_remote.values()), relay_module.MAX_ANNOUNCED_PER_STREAM)
        # Node A finds a stream to a remote domain whose pairs were cut.
        yield wait_until(lambda: self.nodes["a"].cluster.cache.stream_owner("r0.example") == "node-b",
                         "node B's stream known to node A")
