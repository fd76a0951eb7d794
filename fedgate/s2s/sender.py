"""Per-destination senders: one bounded queue and one stream per remote domain.

Stanzas for a remote domain go straight onto its outbound stream when the
(local, remote) pair is valid there; otherwise they wait in the domain's
queue while the stream is set up.  The queue is bounded by count and bytes;
stanzas wait at most ``max_wait`` seconds.  After a failure the destination
backs off for a jittered, exponentially growing, capped delay before the
next attempt (reset on success), so a dead peer costs us one attempt per
backoff period, not one per stanza.

Every stanza accepted ends delivered (written to an authenticated stream) or
bounced with the condition from :data:`BOUNCE`; the counters prove it.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from twisted.logger import Logger
from twisted.words.xish import domish

from fedgate.s2s.connect import ConnectError
from fedgate.s2s.outbound import OutboundS2S
from fedgate.s2s.pairs import INVALID, VALID

log = Logger(namespace="fedgate.s2s.sender")

#: Why a stanza could not be sent -> the stanza error it bounces with.
BOUNCE = {
    "connect": "remote-server-not-found",       # could not resolve or connect
    "stream": "remote-server-timeout",          # connected, but the stream failed or timed out
    "invalid": "internal-server-error",         # dialback invalid (XEP-0220 2.1.1)
    "policy": "policy-violation",               # blocked by policy
    "queue-full": "resource-constraint",
}

IDLE, CONNECTING, OPEN, BACKOFF = "idle", "connecting", "open", "backoff"
REVERSE = "reverse"  # authenticating in the reverse direction on a bidi stream


@dataclass(frozen=True)
class SenderSettings:
    max_stanzas: int = 1000
    max_bytes: int = 4 * 1024 * 1024
    max_wait: float = 60.0
    backoff_initial: float = 2.0
    backoff_max: float = 600.0


@dataclass
class _Queued:
    local: str
    stanza: domish.Element
    size: int
    since: float


def stanza_size(stanza: domish.Element) -> int:
    """A cheap estimate of a stanza's size for queue accounting."""
    total = 64
    for key, value in stanza.attributes.items():
        total += len(value) + 8
    for child in stanza.children:
        total += len(child) if isinstance(child, str) else stanza_size(child)
    return total


class Destination:
    """Everything about sending to one remote domain."""

    def __init__(self, sender: "S2SSender", remote: str):
        self.sender = sender
        self.remote = remote
        self.state = IDLE
        self.stream: OutboundS2S | None = None
        self.queue: deque[_Queued] = deque()
        self.queued_bytes = 0
        self.failures = 0
        self.last_error: str | None = None
        self.retry_at: float | None = None
        self._last_condition: str | None = None
        self._routes: dict = {}
        self._retry_timer = None
        self._expiry_timer = None
        self._operator_closed: OutboundS2S | None = None

    # -- entry ------------------------------------------------------------
    def send(self, local: str, stanza: domish.Element) -> None:
        sender = self.sender
        sender.accepted += 1
        stream = self.stream
        if stream is not None and stream is self._operator_closed:
            stream = None  # closing: what comes now waits for the next connection
        if stream is not None and stream.is_valid(local):
            stream.send_stanza(local, stanza)
            sender.delivered += 1
            return
        route = self._route(local)
        if route is not None and route is not self._operator_closed:
            # an inbound bidi stream already carries the pair
            route.write_stanza(local, self.remote, stanza)
            sender.delivered += 1
            return
        size = stanza_size(stanza)
        settings = sender.settings
        if len(self.queue) >= settings.max_stanzas or self.queued_bytes + size > settings.max_bytes:
            sender.bounce(stanza, BOUNCE["queue-full"], f"queue for {self.remote} is full")
            return
        self.queue.append(_Queued(local, stanza, size, sender.clock.seconds()))
        self.queued_bytes += size
        self._schedule_expiry()
        if self.state == IDLE:
            self._start(local)
        elif stream is not None:
            stream.authenticate(local)
        elif self.state == REVERSE:
            self._start(local)

    # -- choosing the stream: one place -------------------------------------
    def _route(self, local: str):
        """A bidi connection that may carry local -> remote, if any (cached
        per local domain, checked on every use)."""
        table = self.sender.ctx.table
        cached = self._routes.get(local)
        if cached is not None:
            record_id, route = cached
            record = table.get(record_id)
            if record is not None and record.can_send(local, self.remote):
                return route
            del self._routes[local]
        found = table.route_for(local, self.remote)
        if found is None:
            return None
        record, route = found
        self._routes[local] = (record.id, route)
        return route

    def _start(self, local: str) -> None:
        """Reuse a bidi stream on which the remote domain is proven (asking
        it to accept ``local`` in the reverse direction); else connect."""
        found = self.sender.ctx.table.reverse_route(self.remote) if self.sender.ctx.reverse_dialback else None
        if found is not None and found[1].authenticate_reverse(local, self.remote):
            self.state = REVERSE
            return
        self._connect(local)

    def pair_changed(self, local: str, usable: bool) -> None:
        """A pair for this destination became usable on a bidi stream, or a
        reverse request failed (then a connection of our own is the way)."""
        if usable:
            route = self._route(local)
            if route is None:
                return
            keep: deque[_Queued] = deque()
            for item in self.queue:
                if item.local == local:
                    route.write_stanza(local, self.remote, item.stanza)
                    self.sender.delivered += 1
                    self.queued_bytes -= item.size
                else:
                    keep.append(item)
            self.queue = keep
            if self.state == REVERSE and not self.queue:
                self.state = IDLE
        elif self.state == REVERSE:
            self._connect(local)

    # -- connection lifecycle ---------------------------------------------
    def _connect(self, local: str) -> None:
        self.state = CONNECTING
        stream = OutboundS2S(self.sender.ctx, self.remote, local, self)
        self.stream = stream
        for item in self.queue:
            stream.authenticate(item.local)
        d = self.sender.connector.connect(
            self.remote, lambda target=None: self.sender.make_stream(stream.for_target(target)))
        d.addErrback(self._connect_failed, stream)

    def _connect_failed(self, failure, stream: OutboundS2S) -> None:
        if self.stream is not stream:
            return
        self.stream = None
        if failure.check(ConnectError):
            text = failure.value.text
        else:
            text = f"could not connect to {self.remote}: {failure.getErrorMessage()}"
        self._failed(BOUNCE["connect"], text)

    def stream_open(self, stream: OutboundS2S) -> None:
        if stream is self.stream:
            self.state = OPEN

    def pair_result(self, stream: OutboundS2S, local: str, state: str, condition: str | None,
                    text: str | None = None) -> None:
        if stream is not self.stream:
            return
        if state == VALID:
            self.failures = 0
            self.last_error = None
            self._flush(local, stream)
            return
        if state == INVALID:
            self._bounce_local(local, BOUNCE["invalid"], f"{self.remote} rejected our dialback key")
        else:
            cond = condition if condition in _BOUNCEABLE_DB_ERRORS else BOUNCE["connect"]
            self._bounce_local(local, cond, f"{self.remote} answered dialback with {condition}"
                               + (f": {text}" if text else ""))
        self.last_error = condition or state

    def stream_closed(self, stream: OutboundS2S) -> None:
        if stream is not self.stream:
            return
        self.stream = None
        if stream is self._operator_closed:
            # An operator closed this stream (admin API): not a failure of the
            # peer, so keep what is queued and try again on a new connection.
            self._operator_closed = None
            if self.queue:
                self._connect(self.queue[0].local)
            else:
                self.state = IDLE
            return
        if self.queue:
            if stream.failure is not None:  # a refusal (policy, or TLS refused), with its reason
                condition = stream.failure.condition
                if condition == "not-authorized":
                    condition = BOUNCE["policy"]
                self._failed(condition, stream.failure.text)
                return
            what = stream.stream_error or "the connection closed"
            self._failed(BOUNCE["stream"], f"stream to {self.remote} failed: {what}")
        else:
            self.state = IDLE

    def keep_queue_on_close(self, stream: OutboundS2S) -> None:
        """``stream`` is about to be closed by an operator: when it is gone,
        reconnect for the queued stanzas instead of bouncing them."""
        if stream is self.stream:
            self._operator_closed = stream

    def bounce_queue(self, condition: str, text: str) -> None:
        """Bounce everything queued now (the peer was just blocked)."""
        self._bounce_all(condition, text)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()

    # -- queue handling ---------------------------------------------------
    def _flush(self, local: str, stream: OutboundS2S) -> None:
        keep: deque[_Queued] = deque()
        for item in self.queue:
            if item.local == local:
                stream.send_stanza(local, item.stanza)
                self.sender.delivered += 1
                self.queued_bytes -= item.size
            else:
                keep.append(item)
        self.queue = keep

    def _bounce_local(self, local: str, condition: str, text: str) -> None:
        keep: deque[_Queued] = deque()
        for item in self.queue:
            if item.local == local:
                self.queued_bytes -= item.size
                self.sender.bounce(item.stanza, condition, text)
            else:
                keep.append(item)
        self.queue = keep

    def _bounce_all(self, condition: str, text: str) -> None:
        queue, self.queue, self.queued_bytes = self.queue, deque(), 0
        for item in queue:
            self.sender.bounce(item.stanza, condition, text)

    def _failed(self, condition: str, text: str) -> None:
        log.info("Sending to {remote} failed: {text}", remote=self.remote, text=text)
        self.last_error = text
        self._last_condition = condition
        self._bounce_all(condition, text)
        self.failures += 1
        settings = self.sender.settings
        delay = min(settings.backoff_max, settings.backoff_initial * 2 ** (self.failures - 1))
        delay *= 0.5 + self.sender.rng.random() / 2
        self.state = BACKOFF
        self.retry_at = self.sender.clock.seconds() + delay
        self._retry_timer = self.sender.clock.callLater(delay, self._retry)

    def _retry(self) -> None:
        self._retry_timer = None
        self.retry_at = None
        if self.state != BACKOFF:
            return
        if self.queue:
            self._connect(self.queue[0].local)
        else:
            self.state = IDLE

    def reset(self) -> None:
        """Clear the backoff and try again now (an operator action)."""
        self.failures = 0
        if self._retry_timer is not None and self._retry_timer.active():
            self._retry_timer.cancel()
            self._retry()

    def _schedule_expiry(self) -> None:
        if self._expiry_timer is None and self.queue:
            due = self.queue[0].since + self.sender.settings.max_wait - self.sender.clock.seconds()
            self._expiry_timer = self.sender.clock.callLater(max(0.0, due), self._expire)

    def _expire(self) -> None:
        self._expiry_timer = None
        now = self.sender.clock.seconds()
        limit = self.sender.settings.max_wait
        condition = self._last_condition or BOUNCE["stream"]
        while self.queue and now - self.queue[0].since >= limit:
            item = self.queue.popleft()
            self.queued_bytes -= item.size
            self.sender.bounce(item.stanza, condition,
                               f"could not deliver to {self.remote} within {limit:g} s"
                               + (f" ({self.last_error})" if self.last_error else ""))
        self._schedule_expiry()

    def cancel_timers(self) -> None:
        for timer in (self._retry_timer, self._expiry_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._retry_timer = self._expiry_timer = None


_BOUNCEABLE_DB_ERRORS = frozenset({
    "remote-server-not-found", "remote-server-timeout", "remote-connection-failed",
    "policy-violation", "not-authorized", "forbidden", "resource-constraint", "item-not-found",
    "internal-server-error", "service-unavailable",
})


class S2SSender:
    """All destinations; the router hands it stanzas for remote domains."""

    def __init__(self, ctx, connector, make_stream, settings: SenderSettings = SenderSettings(),
                 rng: random.Random | None = None):
        self.ctx = ctx
        self.clock = ctx.clock
        self.connector = connector
        self.make_stream = make_stream
        self.settings = settings
        self.rng = rng or random.Random()
        self.destinations: dict[str, Destination] = {}
        self.accepted = self.delivered = self.bounced = 0
        ctx.table.on_pair_changed(self._pair_changed)

    def _pair_changed(self, local: str, remote: str, usable: bool) -> None:
        destination = self.destinations.get(remote)
        if destination is not None:
            destination.pair_changed(local, usable)

    def send(self, local: str, remote: str, stanza: domish.Element) -> None:
        destination = self.destinations.get(remote)
        if destination is None:
            destination = self.destinations[remote] = Destination(self, remote)
        if self.ctx.is_blocked(remote):
            self.accepted += 1
            self.bounce(stanza, BOUNCE["policy"], f"federation with {remote} is not allowed")
            return
        destination.send(local, stanza)

    def bounce(self, stanza: domish.Element, condition: str, text: str | None) -> None:
        self.bounced += 1
        self.ctx.router.bounce(stanza, condition, text)

    def stop(self) -> None:
        for destination in self.destinations.values():
            destination.cancel_timers()
            destination._bounce_all("remote-server-timeout", "the gateway is shutting down")
            destination.close()
