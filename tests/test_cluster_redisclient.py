"""fedgate.cluster.redisclient against a real redis-server (tests/support/redisserver.py)."""

from __future__ import annotations

import sys
import threading
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from fedgate.cluster.redisclient import (MISSING_CLIENT, RedisAddress, RedisBusy, RedisClient,
                                         RedisClientMissing, RedisUnavailable, load_redis)
from tests.support.redisserver import start_redis


def wait_for(predicate, timeout=5.0, step=0.01):
    """Fires once ``predicate()`` is true; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout

    @defer.inlineCallbacks
    def poll():
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout} s")
            yield task.deferLater(reactor, step, lambda: None)
    return poll()


class AddressTests(unittest.TestCase):
    def test_forms(self):
        self.assertEqual(RedisAddress.parse("redis.example:6380"), RedisAddress(host="redis.example", port=6380))
        self.assertEqual(RedisAddress.parse("redis.example"), RedisAddress(host="redis.example", port=6379))
        self.assertEqual(RedisAddress.parse("[2001:db8::1]:7000"), RedisAddress(host="2001:db8::1", port=7000))
        self.assertEqual(RedisAddress.parse("/run/redis/redis.sock"), RedisAddress(path="/run/redis/redis.sock"))
        self.assertEqual(RedisAddress.parse("unix:/run/r.sock", password="pw").password, "pw")
        self.assertEqual(RedisAddress.parse("[::1]:6379", tls=True).describe(), "tls:[::1]:6379")

    def test_bad_forms(self):
        for text in ("", "host:0", "host:99999", "host:x", "2001:db8::1", "[::1", "[::1]6379",
                     "unix:relative", ":6379"):
            with self.assertRaises(ValueError, msg=text):
                RedisAddress.parse(text)


class MissingClientTests(unittest.TestCase):
    def test_one_line_naming_the_packages(self):
        saved = {name: mod for name, mod in sys.modules.items() if name == "redis" or name.startswith("redis.")}
        for name in saved:
            del sys.modules[name]
        sys.modules["redis"] = None  # makes "import redis" raise ImportError
        try:
            with self.assertRaises(RedisClientMissing) as caught:
                load_redis()
            with self.assertRaises(RedisClientMissing):
                RedisClient(reactor, RedisAddress(path="/nonexistent"))
        finally:
            del sys.modules["redis"]
            sys.modules.update(saved)
        message = str(caught.exception)
        self.assertIn("python3-redis", message)
        self.assertIn("pip package redis", message)
        self.assertTrue(message.startswith(MISSING_CLIENT))
        self.assertNotIn("\n", message)


class WithRedis(unittest.TestCase):
    """A real redis-server and a started client on it."""

    def setUp(self):
        self.server = start_redis(self)
        self.client = RedisClient(reactor, self.server.address, threads=2)
        self.client.start()
        self.addCleanup(self.client.stop)


class ClientTests(WithRedis):

    @defer.inlineCallbacks
    def test_commands_and_pipeline(self):
        self.assertTrue((yield self.client.execute("SET", "k", "v")))
        self.assertEqual((yield self.client.execute("GET", "k")), b"v")
        replies = yield self.client.pipeline([("INCR", "n"), ("INCR", "n"), ("GET", "n")])
        self.assertEqual(replies, [1, 2, b"2"])
        replies = yield self.client.pipeline([("INCR", "k"), ("INCR", "n")], raise_on_error=False)
        self.assertIsInstance(replies[0], Exception)  # "v" is not an integer
        self.assertEqual(replies[1], 3)
        replies = yield self.client.pipeline([("SET", "t", "1"), ("INCR", "t")], transaction=True)
        self.assertEqual(replies, [True, 2])

    @defer.inlineCallbacks
    def test_commands_run_off_the_reactor_thread(self):
        main = threading.get_ident()
        seen = yield self.client.run(lambda r: threading.get_ident())
        self.assertNotEqual(seen, main)

    @defer.inlineCallbacks
    def test_max_pending_bound(self):
        self.client.max_pending = 3
        gate = threading.Event()
        blocked = [self.client.run(lambda r: gate.wait(5)) for _ in range(3)]
        with self.assertRaises(RedisBusy):
            yield self.client.execute("PING")
        gate.set()
        yield defer.gatherResults(blocked)
        self.assertTrue((yield self.client.execute("PING")))

    @defer.inlineCallbacks
    def test_server_down_is_an_error_value_then_recovers(self):
        yield self.client.execute("SET", "k", "v")
        self.server.stop()
        with self.assertRaises(RedisUnavailable):
            yield self.client.execute("GET", "k")
        self.server.start()
        # Persistence is off: the restarted server is empty, and the pool
        # reconnects on the next command.
        self.assertIsNone((yield self.client.execute("GET", "k")))

    @defer.inlineCallbacks
    def test_stop_joins_threads(self):
        yield self.client.execute("PING")  # the pool has a thread now
        self.assertTrue([t for t in threading.enumerate() if self.client.name in t.name])
        self.client.stop()
        self.assertEqual([t.name for t in threading.enumerate() if self.client.name in t.name], [])
        self.assertFalse(self.client.running)
        yield self.assertFailure(self.client.execute("PING"), RedisUnavailable)


class PubSubTests(unittest.TestCase):
    def setUp(self):
        self.server = start_redis(self)
        self.client = RedisClient(reactor, self.server.address, threads=2)
        self.client.start()
        self.addCleanup(self.client.stop)
        self.received: list[tuple[str, bytes]] = []
        self.batches: list[int] = []
        self.events: list[str] = []

    def subscriber(self, channels=("c1",), **kwargs):
        def on_messages(batch):
            self.batches.append(len(batch))
            self.received.extend(batch)
        sub = self.client.subscriber(channels=channels, on_messages=on_messages,
                                     on_connected=lambda: self.events.append("up"),
                                     on_disconnected=lambda reason: self.events.append("down"), **kwargs)
        sub.start()
        return sub

    @defer.inlineCallbacks
    def test_publish_counts_receivers_and_batches(self):
        publisher = self.client.publisher()
        self.assertEqual((yield publisher.publish("c1", b"nobody")), 0)
        sub = self.subscriber()
        yield wait_for(lambda: sub.connected)
        calls = []
        original = self.client.pipeline

        def counting(commands, **kwargs):
            calls.append(len(commands))
            return original(commands, **kwargs)
        self.client.pipeline = counting
        counts = yield defer.gatherResults([publisher.publish("c1", b"m%d" % i) for i in range(200)])
        self.assertEqual(counts, [1] * 200)
        self.assertEqual(calls, [200])  # one reactor turn, one round trip
        yield wait_for(lambda: len(self.received) == 200)
        self.assertEqual(self.received, [("c1", b"m%d" % i) for i in range(200)])
        self.assertLess(len(self.batches), 200)  # handed over in batches

    @defer.inlineCallbacks
    def test_publisher_bound(self):
        publisher = self.client.publisher(max_queued=3)
        waiting = [publisher.publish("c", b"x") for _ in range(3)]
        with self.assertRaises(RedisBusy):
            yield publisher.publish("c", b"one too many")
        self.assertEqual((yield defer.gatherResults(waiting)), [0, 0, 0])

    @defer.inlineCallbacks
    def test_batch_size_bound(self):
        publisher = self.client.publisher(batch=50)
        sub = self.subscriber(batch=10)
        yield wait_for(lambda: sub.connected)
        yield defer.gatherResults([publisher.publish("c1", b"%d" % i) for i in range(120)])
        yield wait_for(lambda: len(self.received) == 120)
        self.assertLessEqual(max(self.batches), 10)
        self.assertEqual([int(d) for _, d in self.received], list(range(120)))

    @defer.inlineCallbacks
    def test_channels_added_and_removed_at_runtime(self):
        publisher = self.client.publisher()
        sub = self.subscriber(channels=())
        yield wait_for(lambda: sub.connected)
        self.assertEqual((yield publisher.publish("late", b"before")), 0)
        sub.subscribe("late")

        @defer.inlineCallbacks
        def receivers():
            return (yield self.client.execute("PUBSUB", "NUMSUB", "late"))[1]
        yield wait_for(lambda: sub.channels == {"late"})
        for _ in range(200):
            if (yield receivers()) == 1:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual((yield publisher.publish("late", b"after")), 1)
        yield wait_for(lambda: self.received == [("late", b"after")])
        sub.unsubscribe("late")
        for _ in range(200):
            if (yield receivers()) == 0:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual((yield publisher.publish("late", b"gone")), 0)

    @defer.inlineCallbacks
    def test_reconnect_after_restart(self):
        publisher = self.client.publisher()
        sub = self.subscriber(backoff_initial=0.02, backoff_max=0.2)
        yield wait_for(lambda: sub.connected)
        self.assertEqual(self.events, ["up"])
        self.server.restart()
        yield wait_for(lambda: self.events == ["up", "down", "up"])
        self.assertTrue(sub.connected)
        self.assertEqual((yield publisher.publish("c1", b"after restart")), 1)
        yield wait_for(lambda: ("c1", b"after restart") in self.received)

    @defer.inlineCallbacks
    def test_backoff_is_capped_while_redis_is_down(self):
        sub = self.subscriber(backoff_initial=0.01, backoff_max=0.05)
        yield wait_for(lambda: sub.connected)
        self.server.stop()
        yield wait_for(lambda: self.events == ["up", "down"])
        start = sub.reconnects
        yield task.deferLater(reactor, 0.5, lambda: None)
        # 0.5 s at a cap of 0.05 s (jittered down to half) is at least 5
        # attempts, and at most 0.5 / 0.005 without a cap.
        self.assertGreaterEqual(sub.reconnects - start, 5)
        self.server.start()
        yield wait_for(lambda: self.events == ["up", "down", "up"])

    @defer.inlineCallbacks
    def test_stop_joins_the_listener(self):
        sub = self.subscriber()
        yield wait_for(lambda: sub.connected)
        thread = sub._thread
        self.client.stop()
        self.assertFalse(thread.is_alive())
        self.assertFalse(sub.connected)


class BoundAndTransportTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_batches_waiting_for_the_reactor_are_bounded(self):
        """While the reactor is busy, the listener hands over at most
        ``max_batches_queued`` batches and then stops reading (Redis holds
        the rest); nothing is lost or reordered."""
        server = start_redis(self)
        client = RedisClient(reactor, server.address)
        client.start()
        self.addCleanup(client.stop)
        received, waiting_seen = [], []
        flood_done = threading.Event()

        def flood():
            # Another process's publisher, while the reactor thread sleeps.
            import redis
            r = redis.Redis(unix_socket_path=server.socket_path)
            for i in range(300):
                r.publish("c", b"%d" % i)
            r.close()
            flood_done.set()

        def on_messages(batch):
            if not received:
                threading.Thread(target=flood).start()
                flood_done.wait(10)
                time.sleep(0.2)  # the listener has had time to read all it would
                waiting_seen.append(sub.handed - sub.delivered)
            received.extend(int(data) for _, data in batch)

        sub = client.subscriber(channels=["c"], on_messages=on_messages, batch=10, max_batches_queued=2)
        sub.start()
        yield wait_for(lambda: sub.connected)
        publisher = client.publisher()
        for _ in range(200):
            if (yield client.execute("PUBSUB", "NUMSUB", "c"))[1] == 1:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        yield publisher.publish("c", b"-1")
        yield wait_for(lambda: len(received) == 301)
        self.assertEqual(received, list(range(-1, 300)))
        self.assertEqual(len(waiting_seen), 1)
        self.assertLessEqual(waiting_seen[0], 2)
        self.assertGreater(sub.handed, 20)  # 300 messages in batches of at most 10

    @defer.inlineCallbacks
    def test_password_and_tcp(self):
        from tests.support.twistd import free_ports
        [port] = free_ports(1)
        server = start_redis(self, password="pw-0123456789", tcp_port=port)
        good = RedisClient(reactor, RedisAddress.parse(f"127.0.0.1:{port}", password="pw-0123456789"))
        good.start()
        self.addCleanup(good.stop)
        self.assertEqual((yield good.execute("SET", "k", "tcp")), True)
        bad = RedisClient(reactor, RedisAddress.parse(f"127.0.0.1:{port}", password="wrong"))
        bad.start()
        self.addCleanup(bad.stop)
        yield self.assertFailure(bad.execute("GET", "k"), RedisUnavailable, load_redis().ResponseError)
        unix = RedisClient(reactor, server.address)
        unix.start()
        self.addCleanup(unix.stop)
        self.assertEqual((yield unix.execute("GET", "k")), b"tcp")

    @defer.inlineCallbacks
    def test_tls(self):
        from tests.support.gateway import shared_ca, temp_dir
        from tests.support.twistd import free_ports
        directory = temp_dir(self)
        ca = shared_ca()
        cert, key = ca.issue(dns=("localhost",)).write(directory, "redis")
        root = ca.write_root(f"{directory}/ca.pem")
        [port] = free_ports(1)
        start_redis(self, options={"tls-port": str(port), "tls-cert-file": str(cert),
                                   "tls-key-file": str(key), "tls-ca-cert-file": str(root),
                                   "tls-auth-clients": "no"})
        client = RedisClient(reactor, RedisAddress.parse(f"localhost:{port}", tls=True,
                                                         tls_ca_file=str(root)))
        client.start()
        self.addCleanup(client.stop)
        self.assertEqual((yield client.execute("SET", "k", "over tls")), True)
        # A client that does not trust the server's CA refuses it.
        other = f"{directory}/other.pem"
        from tests.support.pki import TestCA
        TestCA().write_root(other)
        wary = RedisClient(reactor, RedisAddress.parse(f"localhost:{port}", tls=True, tls_ca_file=other))
        wary.start()
        self.addCleanup(wary.stop)
        yield self.assertFailure(wary.execute("GET", "k"), RedisUnavailable)
        # M6: the certificate names localhost; 127.0.0.1 is not that name.
        misnamed = RedisClient(reactor, RedisAddress.parse(f"127.0.0.1:{port}", tls=True,
                                                           tls_ca_file=str(root)))
        misnamed.start()
        self.addCleanup(misnamed.stop)
        yield self.assertFailure(misnamed.execute("GET", "k"), RedisUnavailable)


class _ShutdownPhases:
    """The real reactor, except that its "shutdown" system event is Twisted's
    own three-phase event (twisted.internet.base._ThreePhaseEvent, what the
    reactor uses) that the test fires: triggers run in the reactor's order."""

    def __init__(self, real):
        from twisted.internet.base import _ThreePhaseEvent
        self._real = real
        self.shutdown = _ThreePhaseEvent()

    def __getattr__(self, name):
        return getattr(self._real, name)

    def addSystemEventTrigger(self, phase, event, f, *args, **kwargs):
        assert event == "shutdown"
        return self.shutdown.addTrigger(phase, f, *args, **kwargs)

    def removeSystemEventTrigger(self, trigger):
        self.shutdown.removeTrigger(trigger)


class ShutdownOrderTests(unittest.TestCase):
    """H1: the gateway's stopService is a "before shutdown" trigger registered
    before the cluster's client starts (startService waits for the store
    first); the client must still work while stopService's Deferred waits."""

    @defer.inlineCallbacks
    def test_client_outlives_an_earlier_before_trigger_that_waits(self):
        server = start_redis(self)
        phases = _ShutdownPhases(reactor)
        replies = []

        @defer.inlineCallbacks
        def stop_service():  # waits (flush, acks, leave) and needs Redis meanwhile
            yield task.deferLater(reactor, 0.2, lambda: None)
            try:
                replies.append((yield client.execute("PING")))
            except RedisUnavailable as e:
                replies.append(e)
        phases.addSystemEventTrigger("before", "shutdown", stop_service)
        client = RedisClient(phases, server.address, threads=2)
        client.start()
        self.addCleanup(client.stop)
        sub = client.subscriber(channels=["c"], on_messages=lambda batch: None)
        sub.start()
        yield wait_for(lambda: sub.connected)
        phases.shutdown.fireEvent()
        yield wait_for(lambda: replies, timeout=5)
        self.assertEqual(replies, [True])
        # The client's own safety net ran after the "before" phase was over.
        yield wait_for(lambda: not client.running, timeout=5)
        self.assertEqual(phases.shutdown.state, "BASE")
        self.assertFalse(sub.connected)


class BlackHoleTests(unittest.TestCase):
    """L6: with Redis not answering, stop() (on the reactor thread) is bounded."""

    @defer.inlineCallbacks
    def test_stop_is_bounded_with_redis_black_holed(self):
        import socket
        from fedgate.cluster.redisclient import STOP_JOIN_TIMEOUT
        hole = socket.socket()
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)  # accepts in the kernel's backlog, never answers
        self.addCleanup(hole.close)
        port = hole.getsockname()[1]
        client = RedisClient(reactor, RedisAddress.parse(f"127.0.0.1:{port}"), threads=2,
                             socket_timeout=8.0)
        client.start()
        self.addCleanup(client.stop)
        waiting = [client.execute("PING") for _ in range(6)]
        for d in waiting:
            d.addErrback(lambda f: None)
        sub = client.subscriber(channels=["c"], on_messages=lambda batch: None)
        sub.start()
        yield task.deferLater(reactor, 0.2, lambda: None)  # both threads blocked on the hole
        started = time.monotonic()
        client.stop()
        took = time.monotonic() - started
        # Unbounded, the subscriber alone takes its 8 s socket timeout and the
        # pool 3 jobs x 8 s per thread; the margin is for a loaded machine.
        self.assertLess(took, STOP_JOIN_TIMEOUT + 2.5)
        self.assertFalse(client.running)
        self.assertFalse(sub.connected)


    def test_stop_leaves_a_socket_a_blocked_worker_reads_to_that_worker(self):
        """Shutting down a socket a pool worker is blocked on wakes the
        worker, which closes it at the same moment; redis-py 4.3.4's
        Connection.disconnect() then failed with AttributeError in stop()
        (CI, Debian's stack).  stop() must leave a busy socket alone: the
        black hole sees no end of stream when stop() returns."""
        import select
        import socket
        hole = socket.socket()
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        self.addCleanup(hole.close)
        client = RedisClient(reactor, RedisAddress.parse(f"127.0.0.1:{hole.getsockname()[1]}"),
                             threads=2, socket_timeout=30.0)
        client.start()
        self.addCleanup(client.stop)
        waiting = [client.execute("PING") for _ in range(2)]
        for d in waiting:
            d.addErrback(lambda f: None)
        deadline = time.monotonic() + 5
        accepted = []
        while len(accepted) < 2 and time.monotonic() < deadline:
            if select.select([hole], [], [], 0.1)[0]:
                conn, _ = hole.accept()
                self.addCleanup(conn.close)
                accepted.append(conn)
        self.assertEqual(len(accepted), 2, "both workers connected")
        for conn in accepted:  # each worker sent its first command and now waits
            conn.settimeout(5)
            self.assertTrue(conn.recv(4096).startswith(b"*"))
        client.stop(join_timeout=0.2)
        for conn in accepted:
            readable = select.select([conn], [], [], 0.3)[0]
            self.assertEqual(readable, [], "stop() shut down a socket a worker was reading")


class IdleSocketTests(WithRedis):

    @defer.inlineCallbacks
    def test_stop_closes_the_idle_sockets(self):
        """The sockets are closed after the workers stopped, not left open
        (moving the close to the stopper thread must not lose it)."""
        watcher = RedisClient(reactor, self.server.address, threads=1)
        watcher.start()
        self.addCleanup(watcher.stop)

        @defer.inlineCallbacks
        def clients():
            info = yield watcher.run(lambda r: r.info("clients"))
            return info["connected_clients"]
        yield defer.gatherResults([self.client.run(lambda r: (r.ping(), time.sleep(0.1)))
                                   for _ in range(2)])
        before = yield clients()  # the watcher's one, and the client's one or two
        self.assertGreaterEqual(before, 2)
        self.client.stop()
        for _ in range(250):
            now = yield clients()
            if now == 1:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(now, 1, "only the watcher's connection is left")


class PublisherDrainedTests(WithRedis):
    """What a node published before it announces "down" must reach Redis
    first (fedgate.cluster.relay's clean stop waits on drained())."""

    @defer.inlineCallbacks
    def test_drained_fires_after_everything_published_reached_redis(self):
        from fedgate.cluster.redisclient import Publisher
        publisher = Publisher(self.client)
        self.assertTrue((yield publisher.drained()) is None)  # nothing pending: at once
        order = []
        for n in range(3):
            publisher.publish("c", b"m%d" % n).addCallback(lambda _, n=n: order.append(n))
        waiting = publisher.drained()
        waiting.addCallback(lambda _: order.append("drained"))
        self.assertEqual(order, [], "nothing has reached Redis yet")
        yield waiting
        self.assertEqual(order, [0, 1, 2, "drained"])

    @defer.inlineCallbacks
    def test_drained_waits_for_what_before_flush_adds(self):
        from fedgate.cluster.redisclient import Publisher
        publisher = Publisher(self.client)
        late = []
        gathered = []

        def gather():
            if not gathered:
                gathered.append(True)
                publisher.publish("c", b"gathered").addCallback(late.append)
        publisher.before_flush.append(gather)
        publisher.wake()
        yield publisher.drained()
        self.assertEqual(late, [0], "the gathered message was published (to no subscriber)")


class SubscriberRobustnessTests(WithRedis):

    @defer.inlineCallbacks
    def test_survives_a_response_error_and_reconnects(self):
        """M3: NOPERM on SUBSCRIBE (an ACL without channel rights) does not
        kill the listener; it backs off, and subscribes once allowed."""
        yield self.client.execute("ACL", "SETUSER", "default", "resetchannels")
        self.addCleanup(lambda: self.client.execute("ACL", "SETUSER", "default", "allchannels")
                        if self.server.running else None)
        events, received = [], []
        sub = self.client.subscriber(channels=["c"], on_messages=received.extend,
                                     on_connected=lambda: events.append("up"),
                                     backoff_initial=0.02, backoff_max=0.1)
        sub.start()
        yield wait_for(lambda: sub.reconnects >= 2)
        self.assertFalse(sub.connected)
        self.assertEqual(events, [])
        self.assertTrue(sub._thread.is_alive())
        yield self.client.execute("ACL", "SETUSER", "default", "allchannels")
        yield wait_for(lambda: sub.connected)
        self.assertEqual(events, ["up"])
        self.assertEqual((yield self.client.execute("PUBLISH", "c", b"x")), 1)
        yield wait_for(lambda: received == [("c", b"x")])

    @defer.inlineCallbacks
    def test_batches_are_bounded_in_bytes(self):
        """M7: messages of 100 KiB with a 256 KiB cap: at most 3 per batch."""
        batches = []
        sub = self.client.subscriber(channels=["c"], on_messages=batches.append,
                                     max_batch_bytes=256 * 1024, max_batches_queued=1)
        sub.start()
        yield wait_for(lambda: sub.connected)
        payload = b"x" * (100 * 1024)
        yield self.client.pipeline([("PUBLISH", "c", payload)] * 30)
        yield wait_for(lambda: sum(len(b) for b in batches) == 30)
        self.assertLessEqual(max(len(b) for b in batches), 3)
        self.assertGreater(len(batches), 9)

    def test_default_byte_cap_is_documented(self):
        from fedgate.cluster.redisclient import MAX_BATCH_BYTES, Subscriber
        self.assertEqual(MAX_BATCH_BYTES, 4 * 1024 * 1024)
        sub = Subscriber(reactor, self.server.address, on_messages=lambda b: None)
        self.assertEqual(sub.max_batch_bytes, MAX_BATCH_BYTES)


class AddressSecrecyTests(unittest.TestCase):
    def test_repr_hides_the_password(self):
        address = RedisAddress.parse("redis.example:6380", password="s3cret-pw")
        self.assertNotIn("s3cret-pw", repr(address))
        self.assertEqual(address.password, "s3cret-pw")

    def test_tls_checks_the_hostname(self):
        """M6: redis-py 4.3.4 does not check the name unless told."""
        from fedgate.cluster.redisclient import connect_redis
        r = connect_redis(RedisAddress.parse("redis.example:6380", tls=True), max_connections=1,
                          socket_timeout=1)
        self.assertIs(r.connection_pool.connection_kwargs.get("ssl_check_hostname"), True)
