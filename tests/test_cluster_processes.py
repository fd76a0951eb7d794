"""Three cluster nodes as ``twistd fedgate`` processes on one redis-server,
under failures only separate processes show (issue 13, Tests: as
subprocesses).

The remote server is a fedgate gateway in this process (``remote.example``,
XEP-0198 on its S2S streams, as between fedgate gateways) whose component
``chat.remote.example`` floods ``chat.a.example``.  The cluster's SRV
records send the remote to node B first and node C second; the
component ``chat.a.example`` sits on node A, so every stanza crosses from
node B (or C) to node A through Redis.  Every stanza is counted: delivered
at the receiving component(s), bounced at the sending one
(:mod:`tests.support.floodcount`); the counts are printed.

- kill -9 of node B mid-flood: the remote reconnects to node C and the
  flood goes on; what node B had acknowledged to the remote but not yet
  passed on died with it, and is reported as a number.  Everything written
  after the kill is delivered or bounced.
- SIGSTOP of node A (the component's node) mid-flood: the other nodes see
  it gone within its lease (2 s here, 6 s by default); the component
  reconnects to node C; after SIGCONT, nothing is missing.  Node A, whose
  own lease ran out while it was stopped, notices by its own clock and
  discards what it received meanwhile until it has rejoined, and node B
  bounces exactly what A had not acknowledged: a stanza is both delivered
  and bounced only if A delivered it in its last moments before the stop
  and its acknowledgement had not reached Redis yet (see BOTH_BOUND).
- Redis restarted mid-flood: delivered + bounced = sent; traffic that stays
  on one node never needed Redis and is all delivered.
"""

from __future__ import annotations

import sys
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from fedgate.s2s.pairs import OUTBOUND
from tests.support.clusternodes import Cluster, poll, sleep
from tests.support.federation import start_dns
from tests.support.floodcount import Flood, Tally, connect_counting, settled
from tests.support.gateway import gateway_config, publish, start_gateway, temp_dir
from tests.support.redisserver import start_redis

COMPONENT, SECRET = "chat.a.example", "secret-a"
REMOTE, REMOTE_COMPONENT, REMOTE_SECRET = "remote.example", "chat.remote.example", "secret-r"
LEASE, HEARTBEAT = 2.0, 0.5
TOTAL, RATE = 3000, 1000.0  # stanzas per flood, written per second
SETTLE = 40.0  # seconds for a flood's last stanzas to arrive or bounce
#: Most stanzas both delivered and bounced around a SIGSTOP of the
#: receiving node.  Not 0: node A writes a stanza to its component, then
#: acknowledges it to Redis in its next pipeline (a reactor turn and a
#: thread hop later, ~1 ms).  Those are two writes to two systems, and no
#: process can make them one: stopped between the two, A has delivered a
#: stanza whose acknowledgement reaches Redis (or the socket, for a write
#: Twisted had buffered) only after SIGCONT, by which time node B has
#: bounced it.  Acknowledging first would lose the stanza instead.  So the
#: window is what A handled in the last few milliseconds before the stop:
#: at RATE (1,000/s) a few stanzas; 50 ms of the flow is the bound.
BOTH_BOUND = int(RATE * 0.05)


def report(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class ClusterProcesses(unittest.TestCase):
    timeout = 150
    redis_options: dict = {}
    #: [s2s] of the remote server: a long queue, so nothing bounces there
    #: just because a node took a while to come back
    remote_s2s = {"queue_max_stanzas": 50000, "queue_max_bytes": 64 * 1024 * 1024}

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = start_redis(self, options=self.redis_options)
        self.dns, dns_port = start_dns(self)
        self.cluster = Cluster(self, self.redis, dns_port, ["a.example"], {COMPONENT: SECRET},
                               lease=LEASE, heartbeat=HEARTBEAT,
                               s2s={"queue_max_stanzas": 50000,
                                    "queue_max_bytes": 64 * 1024 * 1024})
        yield self.cluster.start(3)
        self.remote = yield start_gateway(
            reactor, gateway_config(temp_dir(self), [REMOTE], {REMOTE_COMPONENT: REMOTE_SECRET},
                                    **self.remote_s2s), dns_port, self)
        publish(self.dns, self.remote, [REMOTE, REMOTE_COMPONENT], "gw-remote.example")
        self.sender = yield connect_counting(self.remote.port_of("components"), REMOTE_COMPONENT,
                                             REMOTE_SECRET, self)
        self.addCleanup(self.print_logs_on_failure)

    def print_logs_on_failure(self):
        for node in self.cluster.nodes.values():
            if node.tracebacks():
                report(node.log_tail(80))

    def flood(self, total=TOTAL, rate=RATE, prefix="f") -> Flood:
        return Flood(self.sender, f"load@{REMOTE_COMPONENT}", f"bot@{COMPONENT}", total, rate,
                     prefix=prefix)

    @defer.inlineCallbacks
    def warm_up(self, receiver, prefix="w"):
        """One stanza through, so the remote's stream to the cluster exists."""
        flood = self.flood(1, 100.0, prefix).start()
        yield settled(flood, [receiver], 30)
        tally = Tally.of(flood, receiver)
        self.assertEqual((tally.delivered, tally.bounced), (1, 0),
                         f"warm-up: {tally}\n{self.cluster.diagnostics()}")

    def remote_streams_to(self, node) -> int:
        """The remote gateway's authenticated outbound streams to ``node``."""
        return sum(1 for r in self.remote.table
                   if r.direction == OUTBOUND and r.valid_pairs()
                   and str(r.remote_address).endswith(f":{node.s2s_port}"))


class LocalTrafficAcrossARedisRestart(ClusterProcesses):
    """What one node holds needs no Redis: the remote streams to node A,
    where the component is, and a Redis restart mid-flood loses nothing."""

    redis_options = {"appendonly": "yes"}

    @defer.inlineCallbacks
    def test_redis_restart_mid_flood_local(self):
        self.cluster.publish(self.dns, ["a.example", COMPONENT], "a")
        receiver = yield connect_counting(self.cluster["a"].component_port, COMPONENT, SECRET, self)
        yield self.warm_up(receiver)
        flood = self.flood().start()
        yield flood.until(TOTAL // 3)
        restarted_at = flood.sent
        self.cluster.restart_redis()
        tally = yield settled(flood, [receiver], SETTLE)
        report(tally.line(f"redis restart after {restarted_at}, one node"))
        self.assertEqual((tally.sent, tally.delivered, tally.bounced, tally.duplicated),
                         (TOTAL, TOTAL, 0, 0), f"{tally}\n{self.cluster.diagnostics()}")
        # Each node did see Redis go and come back: it reloaded in full twice.
        for node in self.cluster.nodes.values():
            yield poll(lambda: node.log_text().count("reloaded from the shared store") >= 2,
                       f"{node.name}'s reload after the restart", 15)
            self.assertTrue(node.running, node.log_tail())
            self.assertEqual(node.tracebacks(), 0, node.log_tail(80))


class CrossNode(ClusterProcesses):
    """The remote reaches node B (node C second); the component is on node A."""

    redis_options = {"appendonly": "yes"}

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.cluster.publish(self.dns, ["a.example", COMPONENT], "b", "c")
        for name in self.cluster.nodes:
            yield self.cluster.wait_seen(name)
        self.receiver = yield connect_counting(self.cluster["a"].component_port, COMPONENT, SECRET,
                                               self)
        yield self.warm_up(self.receiver)

    @defer.inlineCallbacks
    def settle_after(self, flood, receivers, first: int):
        """Wait until every id written after the first ``first`` is
        delivered or bounced (or SETTLE passes); the tally of all and of those."""
        later = [f"{flood.prefix}{i}" for i in range(first + 1, flood.total + 1)]

        def check():
            return flood.done.called and Tally.of(flood, *receivers, ids=later).missing == 0
        try:
            yield poll(check, "the stanzas written after the failure", SETTLE, 0.1)
        except AssertionError:
            pass
        return Tally.of(flood, *receivers), Tally.of(flood, *receivers, ids=later)

    @defer.inlineCallbacks
    def test_kill_9_of_the_node_the_flood_passes(self):
        b = self.cluster["b"]
        self.assertGreaterEqual(self.remote_streams_to(b), 1, "the remote's stream is on node B")
        flood = self.flood().start()
        yield flood.until(TOTAL // 3)
        killed_at = flood.sent
        b.kill()
        gone = yield self.cluster.wait_gone("b", by="a", timeout=LEASE + 5)
        everything, later = yield self.settle_after(flood, [self.receiver], killed_at)
        report(everything.line(f"kill -9 of node B after {killed_at} written (down in node "
                               f"A's cluster view after {gone:.2f} s)"))
        report(later.line("  of them written after the kill"))
        report(f"  lost in node B's memory (acknowledged to the remote, never passed on): "
               f"{everything.missing}")
        # Everything written after the kill went through node C.
        self.assertEqual((later.sent, later.missing, later.bounced), (TOTAL - killed_at, 0, 0),
                         f"{later}\n{self.cluster.diagnostics()}")
        self.assertEqual(everything.both, 0, everything)
        # Node B rejoins on its ports and is seen alive again.
        yield b.restart()
        yield self.cluster.wait_seen("b")

    @defer.inlineCallbacks
    def test_sigterm_of_the_node_the_flood_passes(self):
        """H1/M2: a clean stop (SIGTERM, the reactor's real shutdown
        triggers) of node B mid-flood: B keeps its Redis clients until it
        has waited for node A's acknowledgements and left, so no stanza is
        both delivered and bounced, and node A hears B leave (a "down"
        announcement, long before B's lease would run out)."""
        b = self.cluster["b"]
        self.assertGreaterEqual(self.remote_streams_to(b), 1, "the remote's stream is on node B")
        flood = self.flood().start()
        yield flood.until(TOTAL // 3)
        stopped_at = flood.sent
        gone = self.cluster.wait_gone("b", by="a", timeout=LEASE + 5)
        status = yield b.terminate()
        gone = yield gone
        everything, later = yield self.settle_after(flood, [self.receiver], stopped_at)
        report(everything.line(f"SIGTERM of node B after {stopped_at} written (down in node "
                               f"A's cluster view after {gone:.2f} s, exit status {status})"))
        report(later.line("  of them written after the SIGTERM"))
        log = b.log_text(since_start=True)
        # (twistd ends by re-raising the signal that stopped it)
        self.assertIn(status, (0, -15), b.log_tail(80))
        self.assertEqual(b.tracebacks(), 0, b.log_tail(80))
        self.assertIn("Shutting down:", log)
        self.assertNotIn("Redis client is stopped", log)
        self.assertEqual(everything.both, 0, f"{everything}\n{self.cluster.diagnostics()}")
        # B's lease (renewed every HEARTBEAT) would run out 1.5-2 s after the
        # SIGTERM; a clean leave is heard at once.
        self.assertLess(gone, LEASE / 2, "node A saw B's lease run out, not B leave")

    @defer.inlineCallbacks
    def sigstop_of_the_component_node(self):
        """Node A (the component's) is stopped mid-flood, found gone by node
        B, the component moves to node C, and node A is continued after the
        flood.  Returns the flood, the tally, and the id written when the
        component moved."""
        a = self.cluster["a"]
        total = 2 * TOTAL  # long enough to go on for a while after the move
        flood = self.flood(total).start()
        yield flood.until(TOTAL // 3)
        paused_at = flood.sent
        a.pause()
        self.addCleanup(a.resume)
        gone = yield self.cluster.wait_gone("a", by="b", timeout=LEASE + 10)
        self.detected_at = flood.sent
        report(f"SIGSTOP of node A after {paused_at} written: node B saw it gone in {gone:.2f} s "
               f"(lease {LEASE} s, heartbeat {HEARTBEAT} s)")
        self.assertLessEqual(gone, LEASE + 2 * HEARTBEAT + 0.5, self.cluster.diagnostics())
        # The component reconnects to another node and the flood goes on there.
        self.moved = yield connect_counting(self.cluster["c"].component_port, COMPONENT, SECRET, self)
        moved_at = flood.sent
        self.assertLess(moved_at + RATE, total, "the flood ended before the component moved")
        yield flood.done
        a.resume()
        tally = yield settled(flood, [self.receiver, self.moved], SETTLE)
        report(tally.line("SIGSTOP of node A, SIGCONT after the flood"))
        report(f"  delivered on node A {Tally.of(flood, self.receiver).delivered}, on node C "
               f"{Tally.of(flood, self.moved).delivered} (the component moved after {moved_at} "
               "written)")
        self.paused_at = paused_at
        return flood, tally, moved_at

    @defer.inlineCallbacks
    def test_sigstop_of_the_component_node(self):
        flood, tally, moved_at = yield self.sigstop_of_the_component_node()
        self.assertEqual((tally.sent, tally.missing, tally.duplicated), (flood.total, 0, 0),
                         f"{tally}\n{self.cluster.diagnostics()}")
        # What was written a second after the move went to node C.
        later = [f"{flood.prefix}{i}" for i in range(moved_at + int(RATE) + 1, flood.total + 1)]
        self.assertEqual(Tally.of(flood, self.moved, ids=later).delivered, len(later),
                         f"{Tally.of(flood, self.moved, ids=later)}\n{self.cluster.diagnostics()}")
        # What node A took while hung (its lease ran out meanwhile) it
        # discards after SIGCONT, unhandled, and node B bounces; what A
        # acknowledged node B never bounces.  Both delivered and bounced:
        # only what A delivered just before the stop (BOTH_BOUND).
        both = sorted(int(i[len(flood.prefix):]) for i in flood.ids()
                      if i in flood.sender.bounced and (self.receiver.delivered.get(i)
                                                        or self.moved.delivered.get(i)))
        a = self.cluster["a"]
        yield poll(lambda: "rejoined after this node's lease ran out" in a.log_text(),
                   "node A's rejoin after SIGCONT", 15)
        discarded = [line for line in a.log_text().splitlines()
                     if "rejoined after this node's lease ran out" in line]
        report(f"  window: {len(both)} stanzas both delivered and bounced"
               + (f", written #{both[0]} to #{both[-1]} (paused after #{self.paused_at}, "
                  f"found dead after #{self.detected_at})" if both else "")
               + f"; {len(flood.sender.bounced)} bounced in all; node A: {discarded[-1:]}")
        self.assertLessEqual(len(both), BOTH_BOUND, both[:BOTH_BOUND + 5])
        if both:  # only around the stop
            self.assertGreater(both[0], self.paused_at - RATE * HEARTBEAT, both[:5])
            self.assertLessEqual(both[-1], self.paused_at + RATE * HEARTBEAT, both[-5:])

    @defer.inlineCallbacks
    def test_redis_restart_mid_flood(self):
        flood = self.flood().start()
        yield flood.until(TOTAL // 3)
        restarted_at = flood.sent
        started = time.monotonic()
        self.cluster.restart_redis()
        report(f"redis restarted in {time.monotonic() - started:.2f} s")
        everything, later = yield self.settle_after(flood, [self.receiver], restarted_at)
        report(everything.line(f"redis restart after {restarted_at} written, across nodes"))
        self.assertEqual((everything.sent, everything.missing, everything.both), (TOTAL, 0, 0),
                         f"{everything}\n{self.cluster.diagnostics()}")
        # Once Redis is back, stanzas cross nodes again.
        self.assertGreater(later.delivered, 0, f"{later}\n{self.cluster.diagnostics()}")
        self.assertEqual(set(everything.conditions) - {"remote-server-timeout"}, set(),
                         "cross-node stanzas bounce with remote-server-timeout while Redis is "
                         f"down\n{self.cluster.diagnostics(60)}")
