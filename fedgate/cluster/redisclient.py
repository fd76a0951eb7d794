"""A small Twisted-facing wrapper around redis-py, the cluster's Redis client.

Why redis-py with threads (see the README's Cluster section for the figures):
Debian bookworm ships ``python3-redis`` (4.3.4), so the .deb needs nothing
vendored; it is the maintained, official client; txredisapi is not in
bookworm.  redis-py blocks, so every command runs in a dedicated, bounded
:class:`~twisted.python.threadpool.ThreadPool` and its result comes back to
the reactor as a Deferred; the reactor thread never touches a socket.  Only
APIs present in both redis-py 4.3.4 and the newest release are used.

Three parts:

- :class:`RedisClient`: commands and pipelines (a batch of commands in one
  round trip), at most ``max_pending`` outstanding; a command that cannot be
  sent fails with :class:`RedisUnavailable` and is not retried (the caller
  decides whether a retry is safe).  redis-py's pool reconnects on the next
  command.
- :class:`Publisher`: PUBLISH calls made in one reactor turn go out as one
  pipeline, one pipeline in flight at a time (so messages keep their order),
  and each call's Deferred fires with the number of subscribers that got the
  message: 0 is how a cluster sees that nobody listens on a channel.
  Owners that gather several items into one message (the relay: all the
  stanzas for one node) hook :attr:`Publisher.before_flush` and call
  :meth:`Publisher.wake`; what piles up while a pipeline is on the wire
  leaves in the next one.
- :class:`Subscriber`: one listener thread owns a pub/sub connection, reads
  with ``get_message(timeout)`` and hands messages to the reactor in batches
  through ``callFromThread``; channels can be added and removed at runtime.
  When the connection drops it reconnects with capped exponential backoff,
  resubscribes, and only then calls ``on_connected``: messages published
  while it was away are lost (Redis pub/sub delivers at most once), so the
  owner reloads its state in full there, and nothing published after the
  resubscription can be missed.

Whoever starts a client stops it (the gateway stops its clients last, after
it has left the cluster).  As a safety net :meth:`RedisClient.start` also adds
a "during shutdown" trigger: never "before", because Twisted fires all
"before" triggers at once without waiting for one another's Deferreds, and the
gateway's own stopService (itself a "before" trigger) still needs Redis while
it flushes, waits for acks and leaves the cluster.  Stopping waits for the
threads at most :data:`STOP_JOIN_TIMEOUT` seconds, so a black-holed Redis
cannot freeze the reactor.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Callable, Iterable, Sequence

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

# re-exported: callers and tests name them from here
from fedgate.cluster.address import MISSING_CLIENT, RedisAddress, RedisClientMissing  # noqa: F401

log = Logger(namespace="fedgate.cluster.redis")

#: How long :meth:`RedisClient.stop` / :meth:`Subscriber.stop` wait for their
#: threads (on the reactor thread) before leaving them behind: they are daemon
#: threads, every socket they use has ``socket_timeout``, and with Redis
#: black-holed each queued command would otherwise hold the reactor that long.
STOP_JOIN_TIMEOUT = 1.0

#: The most bytes of messages a :class:`Subscriber` hands to the reactor in
#: one batch (a batch ends with the message that reaches it, so a batch
#: holds at most this plus one message).  With ``max_batches_queued`` batches waiting
#: at most, the listener holds about ``max_batches_queued`` x this (default
#: 8 x 4 MiB) before it stops reading and Redis holds the rest.
MAX_BATCH_BYTES = 4 * 1024 * 1024


class RedisUnavailable(Exception):
    """Redis could not be reached, or the connection broke during a command."""


class RedisBusy(Exception):
    """More commands (or messages) are waiting than the configured bound."""


def load_redis():
    """The redis module, or :class:`RedisClientMissing`."""
    try:
        import redis
        import redis.backoff
        import redis.retry
    except ImportError as e:
        raise RedisClientMissing(str(e)) from None
    return redis


def connect_redis(address: RedisAddress, *, max_connections: int, socket_timeout: float,
                  health_check_interval: float = 0):
    """A ``redis.Redis`` for ``address``; nothing is sent yet.  redis-py's own
    retries are switched off (newer releases retry by default): reconnection
    is this module's business, bounded and logged.  The pool blocks rather
    than open more than ``max_connections`` sockets."""
    redis = load_redis()
    kwargs: dict[str, Any] = dict(
        password=address.password, socket_timeout=socket_timeout,
        health_check_interval=health_check_interval,
        retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0))
    if address.path:
        connection_class = redis.UnixDomainSocketConnection
        kwargs["path"] = address.path
    else:
        connection_class = redis.SSLConnection if address.tls else redis.Connection
        kwargs.update(host=address.host, port=address.port, socket_connect_timeout=socket_timeout)
        if address.tls:
            # redis-py 4.3.4 (bookworm) does not check the name by default
            kwargs.update(ssl_cert_reqs="required", ssl_ca_certs=address.tls_ca_file,
                          ssl_check_hostname=True)
    pool = redis.BlockingConnectionPool(max_connections=max_connections, timeout=socket_timeout,
                                        connection_class=connection_class, **kwargs)
    return redis.Redis(connection_pool=pool)


def _connection_errors(redis) -> tuple[type[BaseException], ...]:
    return (redis.ConnectionError, redis.TimeoutError, OSError)


class RedisClient:
    """Commands and pipelines on a bounded thread pool; see the module docstring.

    ``threads`` bounds the pool (and the sockets it opens); ``max_pending``
    bounds the commands waiting for or running in it, past which a command
    fails at once with :class:`RedisBusy`.
    """

    def __init__(self, reactor, address: RedisAddress, *, threads: int = 4,
                 max_pending: int = 10_000, socket_timeout: float = 5.0, name: str = "fedgate-redis"):
        self.reactor = reactor
        self.address = address
        self.threads = threads
        self.max_pending = max_pending
        self.socket_timeout = socket_timeout
        self.name = name
        self._redis_module = load_redis()
        self._errors = _connection_errors(self._redis_module)
        self._redis = None
        self._pool: ThreadPool | None = None
        self._pending = 0
        self._trigger = None
        self._subscribers: list[Subscriber] = []

    # -- lifecycle ----------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._pool is not None

    def start(self) -> None:
        if self._pool is not None:
            return
        self._redis = connect_redis(self.address, max_connections=self.threads,
                                    socket_timeout=self.socket_timeout)
        self._pool = ThreadPool(0, self.threads, name=self.name)
        self._pool.start()
        # "during", not "before": see the module docstring
        self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def stop(self, join_timeout: float = STOP_JOIN_TIMEOUT) -> None:
        """Stop every subscriber and the pool, joining their threads for at
        most ``join_timeout`` seconds in all (the rest are daemon threads
        that end by themselves once their socket times out)."""
        deadline = time.monotonic() + join_timeout
        for subscriber in list(self._subscribers):
            subscriber.stop(max(0.0, deadline - time.monotonic()))
        pool, self._pool = self._pool, None
        redis, self._redis = self._redis, None
        if pool is not None:
            # ThreadPool.stop() joins every worker without a bound: do it on
            # a helper thread and wait for that one only until the deadline.
            # The sockets are closed there, once no worker uses them: closing
            # one a worker is reading wakes that worker, which closes it too,
            # and redis-py's Connection.disconnect() is not safe against that
            # (4.3.4: AttributeError on a socket the other thread cleared).
            def stop_then_close():
                try:
                    pool.stop()
                finally:
                    if redis is not None:
                        redis.connection_pool.disconnect()
            stopper = threading.Thread(target=stop_then_close, name=f"{self.name}-stop", daemon=True)
            stopper.start()
            stopper.join(max(0.0, deadline - time.monotonic()))
            if stopper.is_alive():
                log.warn("Redis client {name}: threads still busy after {timeout} s (Redis at "
                         "{address} not answering); leaving them to time out",
                         name=self.name, timeout=join_timeout, address=self.address.describe())
        if self._trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError):
                pass  # the trigger is what called us
            self._trigger = None

    # -- commands -------------------------------------------------------------
    def run(self, fn: Callable[..., Any], *args) -> defer.Deferred:
        """``fn(redis, *args)`` in a pool thread, with ``redis`` the
        ``redis.Redis``; connection errors become :class:`RedisUnavailable`."""
        if self._pool is None:
            return defer.fail(RedisUnavailable("the Redis client is stopped"))
        if self._pending >= self.max_pending:
            return defer.fail(RedisBusy(f"{self._pending} Redis commands pending "
                                        f"(max_pending {self.max_pending})"))
        self._pending += 1
        client = self._redis

        def call():
            try:
                return fn(client, *args)
            except self._errors as e:
                raise RedisUnavailable(f"{self.address.describe()}: {e}") from e

        def done(result):
            self._pending -= 1
            return result
        return deferToThreadPool(self.reactor, self._pool, call).addBoth(done)

    def execute(self, *command) -> defer.Deferred:
        """One command, such as ``execute("SET", key, value)``."""
        return self.run(lambda r: r.execute_command(*command))

    def pipeline(self, commands: Iterable[Sequence], *, transaction: bool = False,
                 raise_on_error: bool = True) -> defer.Deferred:
        """Every command of ``commands`` in one round trip (MULTI/EXEC around
        them if ``transaction``); fires with the list of replies.  With
        ``raise_on_error`` false, a command Redis refused is an exception
        instance in the list instead of failing the whole Deferred."""
        commands = [tuple(c) for c in commands]

        def send(r):
            pipe = r.pipeline(transaction=transaction)
            for command in commands:
                pipe.execute_command(*command)
            return pipe.execute(raise_on_error=raise_on_error)
        return self.run(send)

    # -- helpers for the other parts ------------------------------------------
    def subscriber(self, **kwargs) -> "Subscriber":
        """A :class:`Subscriber` on the same address, stopped with this client."""
        subscriber = Subscriber(self.reactor, self.address, socket_timeout=self.socket_timeout, **kwargs)
        self._subscribers.append(subscriber)
        return subscriber

    def publisher(self, **kwargs) -> "Publisher":
        return Publisher(self, **kwargs)


class Publisher:
    """PUBLISH with batching: calls made in one reactor turn, and those made
    while the previous batch is on the wire, go out as one pipeline of at
    most ``batch`` messages.  At most ``max_queued`` messages wait; past that
    :meth:`publish` fails at once with :class:`RedisBusy`."""

    def __init__(self, client: RedisClient, *, batch: int = 1000, max_queued: int = 50_000):
        self.client = client
        self.batch = batch
        self.max_queued = max_queued
        self._queue: list[tuple[str | bytes, bytes | str, defer.Deferred]] = []
        self._scheduled = False
        self._in_flight = False
        #: called (no arguments) just before each pipeline is put together:
        #: owners that gather their own messages (several stanzas for one
        #: node in one message) publish them there, so whatever piled up
        #: while the previous pipeline was on the wire leaves in the next
        self.before_flush: list[Callable[[], Any]] = []
        self._drain_waiters: list[defer.Deferred] = []

    @property
    def queued(self) -> int:
        return len(self._queue)

    def drained(self) -> defer.Deferred:
        """Fires once nothing is queued, scheduled or on the wire (what was
        published before has reached Redis, or failed)."""
        if not self._queue and not self._in_flight and not self._scheduled:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._drain_waiters.append(d)
        return d

    def _fire_drained(self) -> None:
        if self._queue or self._in_flight or self._scheduled or not self._drain_waiters:
            return
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiting in waiters:
            waiting.callback(None)

    def publish(self, channel: str | bytes, message: bytes | str) -> defer.Deferred:
        """Fires with the number of subscribers that received ``message``."""
        if len(self._queue) >= self.max_queued:
            return defer.fail(RedisBusy(f"{len(self._queue)} messages waiting to be published "
                                        f"(max_queued {self.max_queued})"))
        d: defer.Deferred = defer.Deferred()
        self._queue.append((channel, message, d))
        self.wake()
        return d

    def wake(self) -> None:
        """Have a pipeline put together soon (this reactor turn, or when the
        one on the wire is back): an owner in :attr:`before_flush` has
        something to publish."""
        if not self._scheduled and not self._in_flight:
            self._scheduled = True
            self.client.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._in_flight:
            return
        for gather in self.before_flush:
            try:
                gather()
            except Exception:
                log.failure("Redis publisher: gathering messages failed")
        if not self._queue:
            self._fire_drained()
            return
        sending, self._queue = self._queue[:self.batch], self._queue[self.batch:]
        self._in_flight = True
        d = self.client.pipeline([("PUBLISH", channel, message) for channel, message, _ in sending])

        def sent(counts):
            for (_, _, waiting), count in zip(sending, counts):
                waiting.callback(int(count))

        def failed(failure):
            for _, _, waiting in sending:
                waiting.errback(failure)

        def next_batch(_):
            self._in_flight = False
            self._flush()
        d.addCallbacks(sent, failed).addBoth(next_batch)


class Subscriber:
    """A listener thread on one pub/sub connection; see the module docstring.

    ``on_messages(batch)`` runs in the reactor thread with a list of
    ``(channel, data)`` (channel as str, data as bytes), at most ``batch``
    long and ``max_batch_bytes`` of data (:data:`MAX_BATCH_BYTES`); at most ``max_batches_queued`` batches wait for the reactor, after
    which the thread stops reading and Redis holds the rest (up to its
    ``client-output-buffer-limit pubsub``).  ``on_connected()`` runs after
    every (re)subscription, ``on_disconnected(reason)`` after each loss.
    Reconnection waits ``backoff_initial`` seconds, doubling (with jitter) up
    to ``backoff_max``; ``health_check`` seconds idle make redis-py PING the
    connection, so a silent server is noticed too.
    """

    def __init__(self, reactor, address: RedisAddress, *, channels: Iterable[str] = (),
                 on_messages: Callable[[list[tuple[str, bytes]]], Any],
                 on_connected: Callable[[], Any] | None = None,
                 on_disconnected: Callable[[str], Any] | None = None,
                 batch: int = 500, max_batch_bytes: int = MAX_BATCH_BYTES,
                 max_batches_queued: int = 8, poll_interval: float = 0.05,
                 backoff_initial: float = 0.05, backoff_max: float = 2.0,
                 health_check: float = 1.0, socket_timeout: float = 5.0,
                 name: str = "fedgate-redis-subscriber", rng: random.Random | None = None):
        self.reactor = reactor
        self.address = address
        self.on_messages = on_messages
        self.on_connected = on_connected
        self.on_disconnected = on_disconnected
        self.batch = batch
        self.max_batch_bytes = max_batch_bytes
        self.max_batches_queued = max_batches_queued
        self.poll_interval = poll_interval
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.health_check = health_check
        self.socket_timeout = socket_timeout
        self.name = name
        self._rng = rng or random.Random()
        self._redis_module = load_redis()
        self._errors = _connection_errors(self._redis_module)
        self._lock = threading.Lock()
        self._channels: set[str] = set(channels)
        self._changes: list[tuple[str, str]] = []  # ("subscribe"|"unsubscribe", channel)
        self._stopping = threading.Event()
        self._room = threading.Semaphore(max_batches_queued)
        self._thread: threading.Thread | None = None
        #: Whether the pub/sub connection is subscribed (reactor-thread view).
        self.connected = False
        self.reconnects = 0
        #: batches handed to the reactor, and those it has taken
        self.handed = 0
        self.delivered = 0

    # -- the reactor side ----------------------------------------------------
    @property
    def channels(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._channels)

    def subscribe(self, channel: str) -> None:
        """Add ``channel``; takes effect on the listener's next poll (within
        ``poll_interval``), and survives reconnects."""
        with self._lock:
            if channel not in self._channels:
                self._channels.add(channel)
                self._changes.append(("subscribe", channel))

    def unsubscribe(self, channel: str) -> None:
        with self._lock:
            if channel in self._channels:
                self._channels.discard(channel)
                self._changes.append(("unsubscribe", channel))

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._room = threading.Semaphore(self.max_batches_queued)
        self._thread = threading.Thread(target=self._listen, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, join_timeout: float = STOP_JOIN_TIMEOUT) -> None:
        """Stop the listener and join its thread: within ``poll_interval``
        normally; a connect or read hanging on a black-holed Redis is waited
        for at most ``join_timeout`` seconds (then the daemon thread is left
        to end at its ``socket_timeout``; it delivers nothing more)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._room.release()  # in case it waits for the reactor
        thread.join(join_timeout)
        if thread.is_alive():
            log.warn("Redis subscriber {name}: listener still blocked after {timeout} s; "
                     "leaving it to time out", name=self.name, timeout=join_timeout)
        self.connected = False

    def _deliver(self, batch) -> None:
        self.delivered += 1
        self._room.release()
        if self._thread is None:
            return
        try:
            self.on_messages(batch)
        except Exception:
            log.failure("Redis subscriber {name}: message handler failed", name=self.name)

    def _failing(self, reason: str) -> None:
        if not self.connected and self._thread is not None:
            log.warn("Redis subscriber {name} cannot connect to {address}: {reason}; retrying "
                     "(at most every {cap} s)", name=self.name, address=self.address.describe(),
                     reason=reason, cap=self.backoff_max)

    def _set_connected(self, up: bool, reason: str = "") -> None:
        if self._thread is None or self.connected == up:
            return
        self.connected = up
        callback = self.on_connected if up else self.on_disconnected
        if up:
            log.info("Redis subscriber {name} connected to {address}", name=self.name,
                     address=self.address.describe())
        else:
            log.warn("Redis subscriber {name} lost {address}: {reason}", name=self.name,
                     address=self.address.describe(), reason=reason)
        if callback is not None:
            try:
                callback() if up else callback(reason)
            except Exception:
                log.failure("Redis subscriber {name}: connection callback failed", name=self.name)

    def _unexpected(self, reason: str) -> None:
        log.error("Redis subscriber {name}: unexpected error on {address}: {reason}; reconnecting",
                  name=self.name, address=self.address.describe(), reason=reason)

    # -- the listener thread -------------------------------------------------
    def _listen(self) -> None:
        delay = self.backoff_initial
        while not self._stopping.is_set():
            client = pubsub = None
            try:
                client = connect_redis(self.address, max_connections=1, socket_timeout=self.socket_timeout,
                                       health_check_interval=self.health_check)
                # subscribe confirmations are read (and skipped by _read):
                # connected means the server confirmed the subscription
                pubsub = client.pubsub(ignore_subscribe_messages=False)
                with self._lock:
                    channels = sorted(self._channels)
                    self._changes.clear()
                # A subscription is needed before get_message talks to the
                # server at all; a private channel keeps one when there is
                # nothing else, so a lost connection is noticed even then.
                pubsub.subscribe(f"__fedgate_keepalive__:{id(self)}", *channels)
                self._confirmed(pubsub)  # or the server's refusal (NOPERM ...) raised here
                self.reactor.callFromThread(self._set_connected, True)
                delay = self.backoff_initial
                self._read(pubsub)
            except Exception as e:
                # Any error, not only a broken connection (a NOPERM on
                # SUBSCRIBE, MASTERDOWN, a bug): the thread must not die with
                # ``connected`` still true.  Treated as a disconnection.
                if self._stopping.is_set():
                    break
                reason = str(e) or type(e).__name__
                if not isinstance(e, self._errors):
                    reason = f"{type(e).__name__}: {reason}"
                    self.reactor.callFromThread(self._unexpected, reason)
                if delay == self.backoff_initial:  # the first failure of a streak
                    self.reactor.callFromThread(self._failing, reason)
                self.reactor.callFromThread(self._set_connected, False, reason)
                self.reconnects += 1
                wait = delay * (0.5 + self._rng.random() / 2)
                delay = min(delay * 2, self.backoff_max)
                self._stopping.wait(wait)
            finally:
                for thing in (pubsub, client):
                    if thing is not None:
                        try:
                            thing.close()
                        except Exception:
                            pass

    def _confirmed(self, pubsub) -> None:
        """Wait (``socket_timeout`` at most) for the server to confirm the
        first subscription; an error reply (a NOPERM under ACLs, say) is
        raised by redis-py here, before anyone is told we are connected."""
        deadline = time.monotonic() + self.socket_timeout
        while not self._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Redis did not confirm the subscription")
            message = pubsub.get_message(timeout=min(left, self.poll_interval))
            if message is not None and message.get("type") == "subscribe":
                return

    def _read(self, pubsub) -> None:
        while not self._stopping.is_set():
            with self._lock:
                changes, self._changes = self._changes, []
            for action, channel in changes:
                getattr(pubsub, action)(channel)
            message = pubsub.get_message(timeout=self.poll_interval)
            if message is None:
                continue
            batch, size = [], 0
            while message is not None:
                if message.get("type") == "message":
                    channel = message["channel"]
                    if isinstance(channel, bytes):
                        channel = channel.decode("utf-8", "replace")
                    data = message["data"]
                    batch.append((channel, data))
                    size += len(data) if isinstance(data, (bytes, str)) else 0
                if len(batch) >= self.batch or size >= self.max_batch_bytes:
                    break
                message = pubsub.get_message(timeout=0)
            if batch:
                self._room.acquire()
                if self._stopping.is_set():
                    return
                self.handed += 1
                self.reactor.callFromThread(self._deliver, batch)
