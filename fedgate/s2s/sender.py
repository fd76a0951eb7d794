"""All per-destination senders, and the bound on how many there are.

The router hands the sender every stanza for a remote domain; each remote
domain has a :class:`~fedgate.s2s.destination.Destination` (its queue, its
streams, its backoff).  The counters prove that every stanza accepted ends
delivered or bounced.

Destinations are bounded: one is created only for a domain policy allows,
forgotten after ``idle_timeout`` seconds with no queue, no stream and no
backoff to remember (one that failed is kept as long as its next backoff
would last, so forgetting never shortens a backoff), and there are at most
``max_destinations``; past that the longest idle goes first, and if none may
go the stanza bounces with ``resource-constraint``.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass


from fedgate.s2s.destination import (  # noqa: F401 (the states, for callers)
    BACKOFF, BOUNCE, CLOSING, CONNECTING, IDLE, OPEN, REVERSE, SHUTDOWN_TEXT, Destination,
    DestinationStatus, stanza_size)
from fedgate.jid import domain_part
from fedgate.stream.stanza import Stanza


@dataclass(frozen=True)
class SenderSettings:
    max_stanzas: int = 1000
    max_bytes: int = 4 * 1024 * 1024
    max_wait: float = 60.0
    backoff_initial: float = 2.0
    backoff_max: float = 600.0
    #: seconds a pair we asked for may stay pending
    pair_timeout: float = 30.0
    #: seconds before an idle destination (nothing queued, no stream, no
    #: backoff to remember) is forgotten
    idle_timeout: float = 300.0
    max_destinations: int = 10000


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
        #: remote -> when its destination became idle, oldest first
        self._idle: OrderedDict[str, float] = OrderedDict()
        self._sweep_timer = None
        self._stopped = False
        #: shutting down: no new connections; what cannot go out bounces
        self.draining = False
        self.accepted = self.delivered = self.bounced = 0
        #: taken by a stream with XEP-0198 and not yet acknowledged
        self.in_flight = 0
        self.evicted = 0
        ctx.table.on_pair_changed(self._pair_changed)
        if getattr(ctx, "sm", None) is not None:
            ctx.sm.acked = self._sm_acked
            ctx.sm.requeue = self._sm_requeue

    def _sm_acked(self, remote, count: int) -> None:
        """The peer acknowledged ``count`` stanzas in flight: delivered."""
        self.in_flight -= count
        self.delivered += count
        destination = self.destinations.get(remote)
        if destination is not None and count:
            destination.delivered_here()

    def _sm_requeue(self, remote, stanzas: list) -> None:
        """Unacknowledged stanzas of a stream we do not own (an inbound bidi
        stream, or one restarted): they go out again, after what waits."""
        self.in_flight -= len(stanzas)
        for stanza in stanzas:
            if self._stopped:
                self.bounce(stanza, BOUNCE["stream"], "the gateway is shutting down")
                continue
            local, to = domain_part(stanza.sender or ""), domain_part(stanza.to or "")
            if local is None or to is None:
                continue  # never routed like that: nothing to send again
            self.accepted -= 1  # counted again by send
            self.send(local, to, stanza)

    def _pair_changed(self, local: str, remote: str, usable: bool) -> None:
        destination = self.destinations.get(remote)
        if destination is not None:
            destination.pair_changed(local, usable)

    def send(self, local: str, remote: str, stanza) -> None:
        stanza = Stanza.of(stanza)
        if self.ctx.is_blocked(remote):
            # Checked first: a refused domain leaves nothing behind.
            self.accepted += 1
            self.bounce(stanza, BOUNCE["policy"], self.ctx.policy.why_blocked(remote))
            return
        destination = self.destinations.get(remote)
        if destination is None:
            if len(self.destinations) >= self.settings.max_destinations and not self._evict_one():
                self.accepted += 1
                self.bounce(stanza, BOUNCE["too-many-destinations"],
                            f"too many remote domains in use ({self.settings.max_destinations})")
                return
            destination = self.destinations[remote] = Destination(self, remote)
        else:
            self._idle.pop(remote, None)
        destination.send(local, stanza)
        self.note_idle(destination)

    # -- the bound on destinations ---------------------------------------------
    def note_idle(self, destination: Destination) -> None:
        """Remember when ``destination`` became idle, so it can be forgotten
        later (called wherever one may have become idle; cheap otherwise)."""
        remote = destination.remote
        if remote in self._idle or not destination.is_idle() or self.destinations.get(remote) is not destination:
            return  # idle since earlier (use takes it out), busy, or forgotten
        self._idle[remote] = self.clock.seconds()
        if self._sweep_timer is None and not self._stopped:
            self._sweep_timer = self.clock.callLater(self.settings.idle_timeout, self._sweep)

    def _backoff_memory(self, destination: Destination) -> float:
        """How long an idle destination that failed is kept beyond the idle
        time: the delay its next attempt would wait, so that forgetting it
        never shortens a backoff."""
        if not destination.failures:
            return 0.0
        s = self.settings
        return min(s.backoff_max, s.backoff_initial * 2 ** destination.failures)

    def _due(self, remote: str, since: float, at_capacity: bool) -> float | None:
        """When the idle destination ``remote`` may be forgotten (None if it
        is no longer idle)."""
        destination = self.destinations.get(remote)
        if destination is None or not destination.is_idle():
            return None
        due = since + self._backoff_memory(destination)
        return due if at_capacity else due + self.settings.idle_timeout

    def _evict(self, remote: str) -> None:
        self._idle.pop(remote, None)
        destination = self.destinations.pop(remote)
        destination.cancel_timers()
        self.evicted += 1

    def _evict_one(self) -> bool:
        """Make room for a new destination by forgetting the longest idle one
        (never one whose backoff still counts).  False if none may go."""
        now = self.clock.seconds()
        for remote, since in list(self._idle.items()):
            due = self._due(remote, since, at_capacity=True)
            if due is None:
                del self._idle[remote]
            elif now >= due:
                self._evict(remote)
                return True
        return False

    def _sweep(self) -> None:
        self._sweep_timer = None
        now = self.clock.seconds()
        limit = self.settings.idle_timeout
        next_due = None
        for remote, since in list(self._idle.items()):
            if since + limit > now:
                # The rest became idle later.
                next_due = since + limit if next_due is None else min(next_due, since + limit)
                break
            due = self._due(remote, since, at_capacity=False)
            if due is None:
                del self._idle[remote]
            elif now >= due:
                self._evict(remote)
            else:  # kept for its backoff
                next_due = due if next_due is None else min(next_due, due)
        if next_due is not None and not self._stopped:
            self._sweep_timer = self.clock.callLater(max(0.0, next_due - now), self._sweep)

    # -- narrow views: what the admin API and the metrics may ask and do ---------
    def outcomes(self) -> dict[str, int]:
        """Stanzas accepted, delivered (taken by an open transport, or with
        XEP-0198 acknowledged by the peer), in flight (taken, not yet
        acknowledged) and bounced so far; accepted = delivered + bounced +
        in_flight + queued."""
        return {"accepted": self.accepted, "delivered": self.delivered, "bounced": self.bounced,
                "in_flight": self.in_flight}

    def destination_count(self) -> int:
        return len(self.destinations)

    def streams_to(self, remote: str) -> list:
        """Our outbound streams to ``remote`` (the verifier sends
        ``<db:verify>`` over one where it can)."""
        destination = self.destinations.get(remote)
        return destination.streams() if destination is not None else []

    def remotes(self) -> list[str]:
        """The remote domains that have a destination now."""
        return list(self.destinations)

    def pending_stanza_count(self, remote: str | None = None) -> int:
        """Stanzas queued for ``remote`` (for every remote domain if None)."""
        if remote is not None:
            destination = self.destinations.get(remote)
            return len(destination.queue) if destination is not None else 0
        return sum(len(d.queue) for d in self.destinations.values())

    def pending_bytes(self) -> int:
        return sum(d.queued_bytes for d in self.destinations.values())

    def state_counts(self) -> dict[str, int]:
        """How many destinations are in each state."""
        counts: dict[str, int] = {}
        for destination in self.destinations.values():
            counts[destination.state] = counts.get(destination.state, 0) + 1
        return counts

    def status(self, remote: str) -> DestinationStatus | None:
        destination = self.destinations.get(remote)
        return destination.status() if destination is not None else None

    def statuses(self) -> list[DestinationStatus]:
        """Every destination's status, by domain."""
        return [self.destinations[remote].status() for remote in sorted(self.destinations)]

    def reset_destination(self, remote: str) -> DestinationStatus | None:
        """Clear ``remote``'s backoff and try again now (an operator action);
        its status after, or None if there is no such destination."""
        destination = self.destinations.get(remote)
        if destination is None:
            return None
        destination.reset()
        return destination.status()

    def bounce_queued(self, remote: str, condition: str, text: str) -> int:
        """Bounce what is queued for ``remote`` now; how many stanzas."""
        destination = self.destinations.get(remote)
        if destination is None or not destination.queue:
            return 0
        count = len(destination.queue)
        destination.bounce_queue(condition, text)
        return count

    def keep_queue_on_close(self, record) -> None:
        """The connection ``record`` is about to be closed by an operator: if
        it is one of our streams, reconnect for its queue when it is gone
        instead of bouncing it (a no-op for other connections)."""
        destination = self.destinations.get(record.remote_domain or "")
        if destination is None:
            return
        for stream in destination.streams():
            if stream.record is record:
                destination.keep_queue_on_close(stream)

    # ---------------------------------------------------------------------------
    def bounce(self, stanza, condition: str, text: str | None) -> None:
        self.bounced += 1
        self.ctx.router.bounce(stanza, condition, text)

    def drain(self) -> None:
        """Graceful shutdown begins: no new connection is made from now on;
        what has no open or connecting stream bounces now, the rest may
        still go out on the streams we have (see :meth:`pending_stanza_count`
        for what is left)."""
        self.draining = True
        for destination in list(self.destinations.values()):
            destination.drain()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stop(self) -> None:
        """Bounce everything still queued (``remote-server-timeout``: we
        stop before we could send it; type wait, so its sender may try again
        later) and stop every timer.  The streams stay up: the gateway ends
        them with ``system-shutdown`` after the bounces went out, and
        stanzas that arrive meanwhile go out on an open stream or bounce."""
        self.draining = True
        self._stopped = True
        if getattr(self.ctx, "sm", None) is not None:
            self.ctx.sm.release()  # stanzas held for a peer's resumption bounce too
        if self._sweep_timer is not None and self._sweep_timer.active():
            self._sweep_timer.cancel()
        self._sweep_timer = None
        for destination in self.destinations.values():
            destination.cancel_timers()
            destination._bounce_all(BOUNCE["shutdown"], SHUTDOWN_TEXT)
