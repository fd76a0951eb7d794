"""Throttling of failed component authentications (XEP-0114 handshakes and
XEP-0225 SASL), and the bounded pool that checks passwords off the reactor.

Failures are counted under two keys: the source address with the component
domain tried, and the source address alone (IPv6 by /64, as the kernel
hands out a /64 to one host).  Past ``free_failures`` on a key, each further
failure costs a delay that doubles up to ``max_delay``:
``min(max_delay, base_delay * 2 ** (n - free_failures - 1))`` for the n-th
failure.  A key forgets its failures after ``forget_after`` seconds without
one, and success clears the (address, domain) key.

What a delay does differs by key, so that a healthy component on the same
host is never slowed by an attacker next to it:

- (address, domain): the failure's answer waits the delay, and new attempts
  for that domain from that address are refused without being checked
  until it has passed (no guessing while blocked);
- address alone: only the answer to a *failure* waits (a success is never
  delayed nor refused), and only past the much higher
  ``address_free_failures``, which holds an attacker's connection and
  slows one that rotates domain names.

The table is keyed by peer input, so it holds at most ``max_entries`` keys;
past that the key touched longest ago is forgotten.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

log = Logger(namespace="fedgate.component.throttle")

XEP0114 = "xep0114"
XEP0225 = "xep0225"
PROTOCOLS = (XEP0114, XEP0225)
#: events reported to the metrics
FAILURE = "failure"
THROTTLED = "throttled"


@dataclass(frozen=True)
class ThrottleSettings:
    free_failures: int = 3
    base_delay: float = 1.0
    max_delay: float = 60.0
    forget_after: float = 600.0
    address_free_failures: int = 100
    max_entries: int = 10000


def source_of(peer: str) -> str:
    """The throttle's address key for ``'host:port'``: the host, an IPv6
    host cut to its /64."""
    host = peer.rpartition(":")[0] if ":" in peer else peer
    host = host.strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]  # not an IP (a UNIX socket, a test transport): as given, bounded
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class _Entry:
    __slots__ = ("failures", "last", "blocked_until")

    def __init__(self):
        self.failures = 0
        self.last = 0.0
        self.blocked_until = 0.0


class AuthThrottle:
    """Failure counts and delays for component authentication.  ``on_event``
    is called with (event, protocol) for each failure and each refused
    attempt (the metrics count them)."""

    def __init__(self, clock, settings: ThrottleSettings = ThrottleSettings(), on_event=None):
        self.clock = clock
        self.settings = settings
        self.on_event = on_event
        self._entries: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, key, create: bool) -> _Entry | None:
        entry = self._entries.get(key)
        now = self.clock.seconds()
        if entry is not None and now - entry.last >= self.settings.forget_after \
                and now >= entry.blocked_until:
            del self._entries[key]
            entry = None
        if entry is None and create:
            entry = self._entries[key] = _Entry()
            while len(self._entries) > self.settings.max_entries:
                self._entries.popitem(last=False)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def _delay(self, failures: int, free: int) -> float:
        s = self.settings
        if failures <= free:
            return 0.0
        return min(s.max_delay, s.base_delay * 2 ** min(failures - free - 1, 64))

    def refusal(self, source: str, domain: str, protocol: str) -> float:
        """Seconds until an attempt for ``domain`` from ``source`` may be
        checked: 0 lets it through; otherwise it is refused unchecked."""
        entry = self._entry((source, domain), create=False)
        wait = 0.0 if entry is None else max(0.0, entry.blocked_until - self.clock.seconds())
        if wait > 0:
            self._event(THROTTLED, protocol)
        return wait

    def failed(self, source: str, domain: str, protocol: str) -> float:
        """Record a failure; returns the seconds its answer must wait."""
        s = self.settings
        now = self.clock.seconds()
        self._event(FAILURE, protocol)
        delays = []
        for key, free in (((source, domain), s.free_failures), ((source,), s.address_free_failures)):
            entry = self._entry(key, create=True)
            entry.failures += 1
            entry.last = now
            delay = self._delay(entry.failures, free)
            if len(key) == 2:
                entry.blocked_until = now + delay
            delays.append(delay)
        if delays[0] > 0 or delays[1] > 0:
            self._event(THROTTLED, protocol)
        return max(delays)

    def succeeded(self, source: str, domain: str) -> None:
        """A right secret for ``domain``: its failures from ``source`` are forgiven."""
        self._entries.pop((source, domain), None)

    def failures(self, source: str, domain: str | None = None) -> int:
        """Failures counted now for a key (for tests and diagnostics)."""
        entry = self._entry((source,) if domain is None else (source, domain), create=False)
        return 0 if entry is None else entry.failures

    def _event(self, event: str, protocol: str) -> None:
        if self.on_event is not None:
            self.on_event(event, protocol)


class Busy(Exception):
    """The password pool's queue is full: answer temporary-auth-failure."""


class PasswordPool:
    """Runs password derivations (PBKDF2 for SASL PLAIN) on a few threads,
    off the reactor, with at most ``max_pending`` checks waiting or running;
    past that :meth:`run` fails with :class:`Busy` at once."""

    def __init__(self, reactor, threads_: int = 2, max_pending: int = 32):
        self.reactor = reactor
        self.max_pending = max_pending
        self.pending = 0
        self.threads = threads_
        self._pool: ThreadPool | None = None

    def start(self) -> None:
        """Start a fresh pool (a stopped ThreadPool cannot be restarted, and
        the gateway service may be started again)."""
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=self.threads, name="fedgate-component-auth")
            self._pool.start()

    def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    def run(self, fn, *args) -> defer.Deferred:
        if self.pending >= self.max_pending or self._pool is None:
            return defer.fail(Busy())
        self.pending += 1
        d = threads.deferToThreadPool(self.reactor, self._pool, fn, *args)

        def done(result):
            self.pending -= 1
            return result
        return d.addBoth(done)


class InlinePasswords:
    """Checks passwords on the calling thread (for in-memory tests and
    tools); the gateway uses :class:`PasswordPool`."""

    def run(self, fn, *args) -> defer.Deferred:
        return defer.maybeDeferred(fn, *args)
