"""One remote domain's sender: a bounded queue, our streams to it, backoff.

Stanzas for a remote domain go straight onto our outbound stream when the
(local, remote) pair is valid there; otherwise they wait in the domain's
queue while the stream is set up.  The queue is bounded by count and bytes;
stanzas wait at most ``max_wait`` seconds.  After a failure the destination
backs off for a jittered, exponentially growing, capped delay before the
next attempt (reset on success), so a dead peer costs us one attempt per
backoff period, not one per stanza.

Every stanza accepted ends delivered or bounced with the condition from
:data:`BOUNCE`.  Delivered means an open transport took it: a stream hands
a stanza over through its one guarded write path, which refuses once the
stream is closing; a refused stanza stays in (or goes to) the queue in its
place, and waits there for the stream that replaces the closing one, or
bounces when there is none (the counters: accepted = delivered + bounced +
queued).  A stream whose output is past its high-water mark (a peer that
reads slowly: :mod:`fedgate.stream.flow`) is not handed stanzas either: they
wait in the same bounded queue, in order, until :meth:`Destination.stream_writable`
(or, for a bidi route, the pair-changed hook) says it drained; past the
queue's bound they bounce with ``resource-constraint``.

The shared stream carries further local domains by dialback (piggybacking)
only where the peer offered dialback after the last restart; otherwise such
a domain gets a stream of its own to the same remote domain, authenticated
by SASL EXTERNAL with that domain's certificate (or dialback where policy
allows).  :meth:`Destination._stream_for` and :meth:`Destination._authenticate`
are the one place that chooses.  Every pair we wait for has a timeout
(``pair_timeout``); stanzas waiting on a pair that failed, timed out or got
a dialback error bounce at once.

States
------
A destination is in one of six named states, about its shared stream; every
change goes through :meth:`Destination._move`, which accepts only the moves
listed in :data:`TRANSITIONS`::

    state       event              next state
    ----------  -----------------  ----------------------------------------------
    idle        need-stream        reverse (a peer's bidi stream asked) | connecting
    reverse     need-stream        reverse (asked again, for another domain) | connecting
    reverse     reverse-done       idle (the bidi route took the whole queue)
    reverse     reverse-failed     connecting | idle (shutting down: the queue bounced)
    reverse     expired            idle (nothing waits for the request any more)
    connecting  opened             open
    connecting  connect-failed     backoff (everything queued bounces)
    connecting  closed             idle (nothing queued) | backoff (queue bounces) | connecting (XEP-0198: a lost transport, see _sm_lost_transport)
    connecting  operator-close     closing
    open        closed             idle (nothing queued, or shutting down) | backoff (queue bounces) | connecting (closed cleanly with a queue)
    open        operator-close     closing
    closing     connect-failed     backoff
    closing     closed             connecting (something queued) | idle (nothing queued, or shutting down)
    backoff     retry              connecting (something queued) | idle (nothing queued, or shutting down)

``idle``, ``reverse`` and ``backoff`` have no shared stream; ``connecting``,
``open`` and ``closing`` have one.  ``closing`` is an operator closing it
(admin API), or the stream closing for liveness (a peer that stopped
answering pings, or a stream idle for long: :mod:`fedgate.stream.liveness`):
not a failure of delivery, so the queue is kept for a new connection.  So is
a stream that refused stanzas because it was closing (its peer ended it,
say) and then closed without an error: the remote domain was just
reachable, so what it refused goes out on a new connection (once per
refusing stream: a new stream that fails bounces as usual).  An ``opened``
event while ``closing`` changes nothing.

Streams of their own (one local domain each, see above) have two states
(:data:`SIDE_OPEN`, :data:`SIDE_CLOSING`): when one an operator closed is
gone, a new one opens for what is queued; when any other one is gone, what
waits for its local domain bounces (the backoff is the shared stream's).

Closing paths
-------------
Every way a stream ends gives each stanza queued for it (or refused by it)
a fate: requeued for a new stream, or bounced with the condition that fits
(:data:`BOUNCE`, :data:`STREAM_ERROR_BOUNCE`).  Stanzas written but not yet
acknowledged by XEP-0198 are not covered here: they are requeued through the
destination by the stream management code.  Tests: tests/test_closing_paths.py,
tests/test_write_path.py, tests/test_sender.py (OperatorCloseTests),
tests/test_liveness.py, tests/test_shutdown_e2e.py::

    path                               queued / refused stanzas
    ---------------------------------  --------------------------------------------------
    (a) our outbound streams (the shared one; one of its own behaves alike per local domain)
    peer close (</stream:stream>)      reconnect once (until something is delivered
                                       again), then bounce remote-server-timeout
    connection dropped, no close       a new connection if it refused stanzas while
                                       closing; else bounce remote-server-timeout;
                                       with XEP-0198 on, kept: a new connection at
                                       once, then (dropped again before a pair was
                                       valid) after a backoff; bounce past max_wait
    stream error from the peer         bounce: host-unknown, host-gone ->
                                       remote-server-not-found; policy-violation,
                                       not-authorized -> policy-violation; else
                                       remote-server-timeout (the condition in the text)
    our stream error (bad peer input,  bounce remote-server-timeout (a new connection
      auth timeout)                    if it refused stanzas while closing)
    refused by our policy / TLS        bounce with the refusal's condition
                                       (not-authorized -> policy-violation)
    connect failure                    bounce remote-server-not-found, back off
    dialback invalid / error / timeout bounce internal-server-error / remote-server-timeout
    policy block (admin API, reload)   bounce policy-violation first, then the streams
                                       end with policy-violation; later stanzas bounce
                                       at once (S2SSender.send)
    policy requirement changed         the stream ends with policy-violation; the queue
      (TLS or certificate now needed)  is kept and a new connection tries the new terms
    operator close (admin API)         kept; a new connection at once (state closing)
    liveness (dead or idle stream)     kept; a new connection at once (state closing)
    graceful shutdown                  see below
    (b) a peer's inbound bidi stream used as a route: a stanza it refuses is
        queued here and goes out on a stream of our own; a reverse request
        that fails (the stream closed) falls back to a connection of ours
    (c) component sessions (fedgate.router): nothing is queued in them; a
        stanza a closing session refuses goes to another session of a shared
        domain, else bounces service-unavailable; stanzas a component sent
        before it left stay queued here and their bounces, if any, are
        errors to a domain no longer served (dropped, never answered)
    (d) in the router: routing is synchronous, so a stanza is never held
        between streams; it is taken by a stream, queued here, or bounced
    (e) dialback verification streams carry no stanzas: a close before the
        answer fails the verification (fedgate.s2s.verifier)

Graceful shutdown (:meth:`S2SSender.drain`, then :meth:`S2SSender.stop`,
driven by :meth:`fedgate.service.Gateway.stopService`): no new connection
is made; what has no stream that is open or connecting bounces at once
(backoff, a reverse request, a stream an operator is closing); the rest
may still go out within ``shutdown_flush`` seconds, then bounces.  Both
bounce with ``remote-server-timeout``, type wait (RFC 6120 8.3.3: the
remote domain was resolved but "communications could not be established
within a reasonable amount of time" -- here, the time the gateway had
left), so that the sender may try again once the gateway is back;
``service-unavailable`` is type cancel and says the service is not
provided, which tells a client not to try again.

The owner interface the outbound streams call: :meth:`Destination.stream_open`,
:meth:`Destination.pair_result`, :meth:`Destination.stream_closed`.

XEP-0198 (:mod:`fedgate.s2s.sm`)
--------------------------------
On a stream with stream management, a stanza the transport took is in
flight until the peer acknowledges it, and only then delivered
(:meth:`Destination._taken`).  When such a stream dies, what the peer never
acknowledged goes back to the head of the queue in order
(:meth:`Destination.sm_requeue`) and the destination connects again, as for a
stream that refused stanzas: it goes out on the next stream, or bounces like
the rest of the queue (past ``max_wait``, or when the next attempt fails).
Where the dead stream was resumable, the next stream for the same local
domain tries ``<resume/>`` first; the peer's ``h`` says how many of those
stanzas it had handled, and they leave the queue as delivered
(:meth:`Destination.sm_resumed`), so nothing arrives twice.  A stream lost
before the peer answered that ``<resume/>`` hands the session back
(:meth:`Destination.sm_keep_resume`) for the next one.  With stream
management on, a transport lost before stream management was up on the
stream (while it negotiated, or before ``<enabled/>``: the stream takes no
stanza until then) does not bounce the queue either
(:meth:`Destination._sm_lost_transport`): it waits for the next stream, and
bounces only past ``max_wait``.
A bidi stream
that drops is resumed even when nothing of ours waits (:func:`_peer_holds`):
the peer, the receiving entity, may not resume it and holds what it sent us
until we do.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.logger import Logger

from fedgate.jid import domain_part
from fedgate.s2s.connect import ConnectError
from fedgate.s2s.outbound import TIMEOUT, OutboundS2S
from fedgate.s2s.pairs import INVALID, VALID
from fedgate.stream.stanza import Stanza

if TYPE_CHECKING:
    from fedgate.s2s.sender import S2SSender

log = Logger(namespace="fedgate.s2s.sender")

#: Why a stanza could not be sent -> the stanza error it bounces with.
BOUNCE = {
    "connect": "remote-server-not-found",       # could not resolve or connect
    "stream": "remote-server-timeout",          # connected, but the stream failed or timed out
    "invalid": "internal-server-error",         # dialback invalid (XEP-0220 2.1.1)
    "policy": "policy-violation",               # blocked by policy
    "queue-full": "resource-constraint",
    "pair-timeout": "remote-server-timeout",    # a pending pair got no answer in time
    "dialback-error": "remote-server-timeout",  # db:result type='error' (XEP-0220: MUST)
    "too-many-destinations": "resource-constraint",
    "shutdown": "remote-server-timeout",        # the gateway stops before it could send
}

#: a stream error the peer sent -> the stanza error queued stanzas bounce
#: with, where one fits better than ``remote-server-timeout``
STREAM_ERROR_BOUNCE = {
    "host-unknown": "remote-server-not-found",  # the peer does not serve the domain
    "host-gone": "remote-server-not-found",
    "policy-violation": "policy-violation",     # the peer refuses us by its policy
    "not-authorized": "policy-violation",
}

SHUTDOWN_TEXT = "the gateway is shutting down"

IDLE, CONNECTING, OPEN, BACKOFF = "idle", "connecting", "open", "backoff"
REVERSE = "reverse"  # authenticating in the reverse direction on a bidi stream
CLOSING = "closing"  # an operator closes the shared stream; the queue waits for a new one
STATES = (IDLE, REVERSE, CONNECTING, OPEN, CLOSING, BACKOFF)

#: (state, event) -> the states it may lead to; the module docstring explains
#: each.  :meth:`Destination._move` refuses anything not listed.
TRANSITIONS: dict[tuple[str, str], tuple[str, ...]] = {
    (IDLE, "need-stream"): (REVERSE, CONNECTING),
    (REVERSE, "need-stream"): (REVERSE, CONNECTING),
    (REVERSE, "reverse-done"): (IDLE,),
    (REVERSE, "reverse-failed"): (CONNECTING, IDLE),
    (REVERSE, "expired"): (IDLE,),
    (CONNECTING, "opened"): (OPEN,),
    (CONNECTING, "connect-failed"): (BACKOFF,),
    (CONNECTING, "closed"): (IDLE, BACKOFF, CONNECTING),
    (CONNECTING, "operator-close"): (CLOSING,),
    (OPEN, "closed"): (IDLE, BACKOFF, CONNECTING),
    (OPEN, "operator-close"): (CLOSING,),
    (CLOSING, "connect-failed"): (BACKOFF,),
    (CLOSING, "closed"): (CONNECTING, IDLE),
    (BACKOFF, "retry"): (CONNECTING, IDLE),
}

#: the states of a stream of its own for one local domain
SIDE_OPEN, SIDE_CLOSING = "open", "closing"


class InvalidTransition(RuntimeError):
    """A move :data:`TRANSITIONS` does not list: a bug in this module."""


@dataclass
class _Queued:
    local: str
    stanza: Stanza
    size: int
    since: float


def stanza_size(stanza) -> int:
    """A stanza's size for queue accounting: its bytes as received, or a
    cheap estimate for one built here."""
    return Stanza.of(stanza).size()


@dataclass(frozen=True)
class ResumeToken:
    """A dead stream's XEP-0198 session, for the next stream to resume."""
    local: str
    previd: str
    #: stanzas we had handled from the peer, and the peer's last ack of ours
    handled: int
    acked: int
    #: what the peer had not acknowledged, in order (now at the queue's head)
    stanzas: tuple
    expires: float

    def usable(self, now: float) -> bool:
        return now < self.expires


@dataclass(frozen=True)
class DestinationStatus:
    """What the admin API and the metrics may know of one destination: a
    snapshot, so that they never hold the queue or a stream."""

    domain: str
    state: str
    queued_stanzas: int
    queued_bytes: int
    oldest_since: float | None
    failures: int
    last_error: str | None
    retry_at: float | None
    #: the shared stream's connection, then every one of ours
    connection_id: int | None
    connection_ids: tuple[int, ...]
    #: (local domain, connection id, since) of every pair we still wait on
    pending_pairs: tuple[tuple[str, int, float], ...]


@dataclass(eq=False)
class _Side:
    """A stream of its own for one local domain, and its state."""
    stream: OutboundS2S
    state: str = SIDE_OPEN


class Destination:
    """Everything about sending to one remote domain."""

    def __init__(self, sender: "S2SSender", remote: str):
        self.sender = sender
        self.remote = remote
        self.state = IDLE
        #: the shared stream: opened for the first local domain, carrying
        #: further ones where the peer allows piggybacking
        self.stream: OutboundS2S | None = None
        #: streams of their own for local domains that could not piggyback
        self.side: dict[str, _Side] = {}
        self.queue: deque[_Queued] = deque()
        self.queued_bytes = 0
        self.failures = 0
        self.last_error: str | None = None
        self.retry_at: float | None = None
        self._last_condition: str | None = None
        self._routes: dict = {}
        #: our streams that refused a stanza because they were closing
        self._refused_by: set = set()
        #: reconnected once after a clean close with a queue (see _reconnect_once)
        self._reconnected = False
        self._retry_timer = None
        self._expiry_timer = None
        #: XEP-0198: streams that died with stanzas unacknowledged, and the
        #: session the next stream may resume
        self._requeued_by: set = set()
        self._resume: ResumeToken | None = None
        #: transports lost in a row with XEP-0198 on (see _sm_lost_transport);
        #: reset once something of ours is delivered (acknowledged, with
        #: XEP-0198), not when a pair is valid: a peer that authenticates
        #: and then drops the connection every time costs a backoff each
        self._sm_losses = 0

    def _move(self, event: str, new: str) -> None:
        """The one place the state changes, and only as :data:`TRANSITIONS` allows."""
        if new not in TRANSITIONS.get((self.state, event), ()):
            raise InvalidTransition(f"{self.remote}: {event!r} cannot lead from {self.state!r} to {new!r}")
        self.state = new

    # -- entry ------------------------------------------------------------
    def send(self, local: str, stanza: Stanza) -> None:
        sender = self.sender
        sender.accepted += 1
        congested = False  # a stream carries the pair but its output is past the mark
        if not self.queue or not any(item.local == local for item in self.queue):
            # (never ahead of stanzas for the same pair that wait already)
            stream = self._stream_for(local)
            if stream is not None and stream.is_valid(local):
                if not stream.is_writable():
                    congested = True
                elif stream.send_stanza(local, stanza):
                    self._taken(stream, stanza, sender.clock.seconds())
                    return
                else:
                    self._refused_by.add(stream)
            route = None if congested else self._route(local)
            if route is not None and not self._closing(route):
                # an inbound bidi stream already carries the pair
                if not route.is_writable():
                    congested = True
                elif route.write_stanza(local, self.remote, stanza):
                    self._taken(route, stanza, sender.clock.seconds())
                    return
        else:
            congested = True  # waits behind its pair's queue either way
        # No open stream took it (none yet, the one we have is closing, or its
        # output is past the high-water mark): it waits in the bounded queue
        # for the next stream or for the output to drain, or bounces.
        if sender.draining and self._stream_for(local) is None:
            # Shutting down: no new connection will be made for it.
            sender.bounce(stanza, BOUNCE["shutdown"], SHUTDOWN_TEXT)
            return
        size = stanza.size()
        settings = sender.settings
        if len(self.queue) >= settings.max_stanzas or self.queued_bytes + size > settings.max_bytes:
            sender.bounce(stanza, BOUNCE["queue-full"], f"queue for {self.remote} is full")
            return
        self.queue.append(_Queued(local, stanza, size, sender.clock.seconds()))
        self.queued_bytes += size
        self._schedule_expiry()
        if congested and self._carried(local):
            return  # goes out when the stream's output drains (stream_writable)
        if local not in self.side and self.state in (IDLE, REVERSE):
            self._start(local)
        else:
            self._authenticate(local)

    def _carried(self, local: str) -> bool:
        """Does an open stream carry local -> remote (writable or not)?"""
        stream = self._stream_for(local)
        if stream is not None and stream.is_valid(local):
            return True
        route = self._route(local)
        return route is not None and not self._closing(route)

    def is_idle(self) -> bool:
        """Nothing to remember but the domain: no queue, no stream, no backoff
        timer running, no reverse request waiting."""
        return (self.state == IDLE and not self.queue and self.stream is None and not self.side
                and self._retry_timer is None)

    def _closing(self, stream) -> bool:
        """Is ``stream`` one of ours that an operator is closing?"""
        if stream is self.stream:
            return self.state == CLOSING
        side = self._side_of(stream) if self.side else None
        return side is not None and side.state == SIDE_CLOSING

    # -- choosing the stream: one place -------------------------------------
    def _stream_for(self, local: str) -> OutboundS2S | None:
        """The stream of ours that carries, or will carry, ``local``: its own
        stream if it has one, else the shared one (None while closing)."""
        side = self.side.get(local)
        if side is not None:
            return side.stream if side.state == SIDE_OPEN else None
        return self.stream if self.state != CLOSING else None

    def _authenticate(self, local: str) -> None:
        """Get ``local`` authenticated to the remote domain: on the shared
        stream when it was opened for ``local`` or the peer lets further
        domains piggyback; otherwise on a stream of its own.  Until the
        shared stream is open the choice waits (see :meth:`stream_open`)."""
        if local in self.side:
            return  # its own stream authenticates it as it opens
        main = self.stream
        if main is None or self.state == CLOSING:
            return
        if local in main.timed_out:
            self._open_side(local)  # the peer ignored our request there
        elif local == main.first_local:
            main.authenticate(local)
        elif not main.is_open:
            return
        elif main.can_piggyback(local):
            main.authenticate(local)
        else:
            self._open_side(local)

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
            self._move("need-stream", REVERSE)
            return
        self._connect("need-stream", local)

    def pair_changed(self, local: str, usable: bool) -> None:
        """A pair for this destination became usable on a bidi stream, or a
        reverse request failed (then a connection of our own is the way)."""
        if usable:
            route = self._route(local)
            if route is None:
                return
            self._flush_to(local, lambda stanza: route.write_stanza(local, self.remote, stanza), route)
            if self.state == REVERSE and not self.queue:
                self._move("reverse-done", IDLE)
                self.sender.note_idle(self)
        elif self.state == REVERSE:
            self._connect("reverse-failed", local)

    # -- connection lifecycle ---------------------------------------------
    def _new_stream(self, local: str) -> OutboundS2S:
        stream = OutboundS2S(self.sender.ctx, self.remote, local, self,
                             pair_timeout=self.sender.settings.pair_timeout)
        stream.authenticate(local)
        token, self._resume = self._resume, None
        if token is not None and token.local == local:
            stream.resume_from = token
        d = self.sender.connector.connect(
            self.remote, lambda target=None: self.sender.make_stream(stream.for_target(target)))
        d.addErrback(self._connect_failed, stream)
        return stream

    def _connect(self, event: str, local: str) -> None:
        if self.sender.draining:
            self._shutdown_bounce(event)
            return
        self._move(event, CONNECTING)
        self.stream = self._new_stream(local)

    def _open_side(self, local: str) -> None:
        if self.sender.draining:
            self._bounce_local(local, BOUNCE["shutdown"], SHUTDOWN_TEXT)
            return
        log.info("Opening a stream of its own for {local} -> {remote}", local=local, remote=self.remote)
        self.side[local] = _Side(self._new_stream(local))

    def _side_of(self, stream: OutboundS2S) -> _Side | None:
        for side in self.side.values():
            if side.stream is stream:
                return side
        return None

    def _owns(self, stream: OutboundS2S) -> bool:
        return stream is self.stream or self._side_of(stream) is not None

    def _connect_failed(self, failure, stream: OutboundS2S) -> None:
        if failure.check(ConnectError):
            text = failure.value.text
        else:
            text = f"could not connect to {self.remote}: {failure.getErrorMessage()}"
        if stream is self.stream:
            self.stream = None
            self._failed("connect-failed", BOUNCE["connect"], text)
        elif self._side_of(stream) is not None:
            self._side_failed(stream, BOUNCE["connect"], text)

    def stream_open(self, stream: OutboundS2S) -> None:
        if stream is not self.stream or self.state == CLOSING:
            return
        if self.state == CONNECTING:
            self._move("opened", OPEN)
        # Now the peer's features tell whether further domains may piggyback.
        for local in dict.fromkeys(item.local for item in self.queue):
            self._authenticate(local)

    def pair_result(self, stream: OutboundS2S, local: str, state: str, condition: str | None,
                    text: str | None = None) -> None:
        if not self._owns(stream):
            return
        if state == VALID:
            self.failures = 0
            self._reconnected = False
            self.last_error = None
            self._flush(local, stream)
            return
        if state == INVALID:
            cond, why = BOUNCE["invalid"], f"{self.remote} rejected our dialback key"
        elif state == TIMEOUT:
            cond, why = BOUNCE["pair-timeout"], text or f"{self.remote} did not answer dialback"
        else:
            # XEP-0220: queued stanzas bounce with remote-server-timeout;
            # the peer's own condition goes into the text.
            cond = BOUNCE["dialback-error"]
            why = f"{self.remote} answered dialback with {condition}" + (f": {text}" if text else "")
        self._bounce_local(local, cond, why)
        self.last_error = why if state == TIMEOUT else (condition or state)
        if stream is not self.stream and not stream.is_valid(local):
            stream.close()  # a stream of its own that cannot carry its domain

    def _retry_refused(self, stream: OutboundS2S) -> bool:
        """Did ``stream`` refuse stanzas while closing and then close without
        an error?  (Then they go out on a new connection, not bounce.)"""
        if stream not in self._refused_by:
            return False
        self._refused_by.discard(stream)
        return _closed_cleanly(stream)

    def _reconnect_once(self, stream: OutboundS2S) -> bool:
        """The shared stream, open, closed by the peer with
        ``</stream:stream>`` and no error (an idle close of its own, say)
        while stanzas still wait for a pair:
        the remote domain was just reachable, so they wait for one new
        connection.  Only once until something is delivered again, so a peer
        that keeps closing cannot keep them forever (they bounce then)."""
        if (self._reconnected or self.state != OPEN or not _closed_cleanly(stream)
                or not getattr(stream.io, "peer_ended", False)):
            return False
        self._reconnected = True
        return True

    def stream_closed(self, stream: OutboundS2S) -> None:
        retry = self._retry_refused(stream)
        requeued = False
        if stream in self._requeued_by:  # XEP-0198: unacknowledged stanzas wait
            self._requeued_by.discard(stream)
            requeued = (stream.failure is None and stream.stream_error is None
                        and not self.sender.ctx.is_blocked(self.remote))
        keep = self._sm_lost_transport(stream)
        # at once after the first loss only (since something was delivered):
        # a peer that takes our stanzas and drops every connection without
        # acknowledging them waits out a backoff each time
        retry = retry or keep == "reconnect" or (requeued and keep != "back-off")
        if stream is not self.stream:
            side = self._side_of(stream)
            if side is not None:
                if retry and side.state == SIDE_OPEN:
                    side.state = SIDE_CLOSING  # reopened for what it refused
                self._side_closed(side)
            return
        self.stream = None
        if self.state == CLOSING:
            # An operator closed this stream (admin API): not a failure of the
            # peer, so keep what is queued and try again on a new connection.
            if self.queue:
                self._connect("closed", self.queue[0].local)
            else:
                self._move("closed", IDLE)
                self.sender.note_idle(self)
            return
        if (not self.queue and self.state == OPEN and self._resume is not None
                and not self._resume.stanzas and self._resume.local == stream.first_local):
            # nothing of ours waits, but the dropped bidi stream's peer holds
            # stanzas for us until we resume it (XEP-0198: only we may)
            if keep == "back-off":
                # dropped again before anything of ours was delivered: one
                # attempt per (growing) backoff period, not a tight loop
                log.info("Bidi stream to {remote} dropped again: resuming it after a backoff",
                         remote=self.remote)
                self._lost_again(stream)
            else:
                log.info("Bidi stream to {remote} dropped: connecting to resume it", remote=self.remote)
                self._connect("closed", self._resume.local)
        elif self.queue and ((retry and self.state in (OPEN, CONNECTING)) or self._reconnect_once(stream)):
            log.info("Stream to {remote} closed while sending: {count} stanzas wait for a new one",
                     remote=self.remote, count=len(self.queue))
            self._connect("closed", self.queue[0].local)
        elif self.queue and keep == "back-off":
            condition, text = self._close_reason(stream)
            log.info("Stream to {remote} lost again: {count} stanzas wait (backing off)",
                     remote=self.remote, count=len(self.queue))
            self._lost_again(stream)
        elif self.queue:
            condition, text = self._close_reason(stream)
            self._failed("closed", condition, text)
        else:
            self._move("closed", IDLE)
            self.sender.note_idle(self)

    def _lost_again(self, stream: OutboundS2S) -> None:
        """Back off after a repeated transport loss (what waits stays
        queued): the delay grows with the losses in a row, even though each
        stream got as far as a valid pair (which resets ``failures``)."""
        condition, text = self._close_reason(stream)
        self.failures = max(self.failures, self._sm_losses - 2)
        self._back_off("closed", condition, text)

    def _close_reason(self, stream: OutboundS2S) -> tuple[str, str]:
        if stream.failure is not None:  # a refusal (policy, or TLS refused), with its reason
            condition = stream.failure.condition
            if condition == "not-authorized":
                condition = BOUNCE["policy"]
            return condition, stream.failure.text
        what = stream.stream_error or "the connection closed"
        condition = STREAM_ERROR_BOUNCE.get(stream.stream_error or "", BOUNCE["stream"])
        return condition, f"stream to {self.remote} failed: {what}"

    def _side_closed(self, side: _Side) -> None:
        local = side.stream.first_local
        if side.state == SIDE_CLOSING:
            del self.side[local]
            if any(item.local == local for item in self.queue):
                self._open_side(local)
            return
        condition, text = self._close_reason(side.stream)
        self._side_failed(side.stream, condition, text)

    def _side_failed(self, stream: OutboundS2S, condition: str, text: str) -> None:
        """A stream of its own for one local domain failed: bounce what waits
        for that domain; the destination's backoff is for the shared stream."""
        del self.side[stream.first_local]
        log.info("Sending {local} -> {remote} failed: {text}", local=stream.first_local,
                 remote=self.remote, text=text)
        self.last_error = text
        self._bounce_local(stream.first_local, condition, text)
        self.sender.note_idle(self)

    def keep_queue_on_close(self, stream: OutboundS2S) -> None:
        """``stream`` is about to be closed by an operator: when it is gone,
        reconnect for the queued stanzas instead of bouncing them."""
        if stream is self.stream:
            if self.state != CLOSING:
                self._move("operator-close", CLOSING)
            return
        side = self._side_of(stream)
        if side is not None:
            side.state = SIDE_CLOSING

    def streams(self) -> list[OutboundS2S]:
        """Our outbound streams to this domain, the shared one first."""
        return ([self.stream] if self.stream is not None else []) + [s.stream for s in self.side.values()]

    def status(self) -> DestinationStatus:
        record = self.stream.record if self.stream is not None else None
        return DestinationStatus(
            domain=self.remote, state=self.state, queued_stanzas=len(self.queue),
            queued_bytes=self.queued_bytes, oldest_since=self.queue[0].since if self.queue else None,
            failures=self.failures, last_error=self.last_error, retry_at=self.retry_at,
            connection_id=record.id if record is not None else None,
            connection_ids=tuple(s.record.id for s in self.streams() if s.record is not None),
            pending_pairs=tuple((pair.local, stream.record.id, pair.since)
                                for stream, pair in self.pending_pairs()))

    def pending_pairs(self) -> list:
        """(stream, pair) for every pair we asked for and still wait on."""
        return [(stream, pair) for stream in self.streams() for pair in stream.pending_pairs()]

    def bounce_queue(self, condition: str, text: str) -> None:
        """Bounce everything queued now (the peer was just blocked)."""
        self._bounce_all(condition, text)

    def close(self) -> None:
        for stream in self.streams():
            stream.close()

    # -- graceful shutdown ------------------------------------------------
    def drain(self) -> None:
        """The gateway is shutting down: what has no stream that is open or
        connecting bounces now (no new connection will be made; a reverse
        request cannot be answered on a stream no longer read); the rest
        stays for the streams we have, for the flush time."""
        for local in dict.fromkeys(item.local for item in self.queue):
            if self._stream_for(local) is None and local not in self.side:
                self._bounce_local(local, BOUNCE["shutdown"], SHUTDOWN_TEXT)
        if self._retry_timer is not None and self._retry_timer.active():
            self._retry_timer.cancel()
            self._retry()  # from backoff to idle (what was queued bounced above)
        if self.state == REVERSE and not self.queue:
            self._move("expired", IDLE)
        self.sender.note_idle(self)

    def _shutdown_bounce(self, event: str) -> None:
        """Instead of a new connection while shutting down: bounce the queue."""
        self._bounce_all(BOUNCE["shutdown"], SHUTDOWN_TEXT)
        self._move(event, IDLE)
        self.sender.note_idle(self)

    # -- queue handling ---------------------------------------------------
    def _flush(self, local: str, stream: OutboundS2S) -> None:
        if not self._flush_to(local, lambda stanza: stream.send_stanza(local, stanza), stream):
            self._refused_by.add(stream)

    def stream_writable(self, stream: OutboundS2S) -> None:
        """``stream``'s output drained below the high-water mark: hand it
        what waits for the local domains it carries, in order, while it
        stays writable."""
        if not self._owns(stream):
            return
        for local in dict.fromkeys(item.local for item in self.queue):
            if self._stream_for(local) is stream and stream.is_valid(local):
                self._flush(local, stream)
                if not stream.is_writable():
                    break

    def _taken(self, route, stanza: Stanza, since: float) -> None:
        """A stream took ``stanza`` (queued at ``since``): delivered, or in
        flight until the peer acknowledges it (XEP-0198); requeued
        unacknowledged, it keeps ``since`` for ``max_wait``."""
        sm = getattr(route, "sm", None)
        if sm is not None and sm.counting:
            self.sender.in_flight += 1
            stanza.queued_since = since
        else:
            self.sender.delivered += 1
            self.delivered_here()

    def delivered_here(self) -> None:
        """Something of ours was delivered to the remote domain (taken
        without XEP-0198, or acknowledged): transport losses count afresh
        (see :meth:`_sm_lost_transport`)."""
        self._sm_losses = 0

    def sm_requeue(self, stream: OutboundS2S, lost: list, sm) -> None:
        """``stream`` is gone with ``lost`` unacknowledged (routed) stanzas:
        back to the head of the queue, in order, and a new stream for them
        (resuming the session where the peer offered that)."""
        if not lost:
            self._requeued_by.add(stream)
            if _peer_holds(stream, sm) and not self.sender.draining:
                # a bidi stream dropped: the peer's stanzas wait for our <resume/>
                keep = sm.settings.resume_timeout if sm.max is None else min(sm.max, sm.settings.resume_timeout)
                self._resume = ResumeToken(stream.first_local, sm.id, sm.inc.handled, sm.out.acked,
                                           (), self.sender.clock.seconds() + keep)
            return
        self.sender.in_flight -= len(lost)
        if self.sender.stopped or self.sender.ctx.is_blocked(self.remote):
            # no next stream: shutting down, or the peer was just blocked
            blocked = not self.sender.stopped
            for stanza in lost:
                self.sender.bounce(stanza, BOUNCE["policy"] if blocked else BOUNCE["stream"],
                                   self.sender.ctx.policy.why_blocked(self.remote) if blocked
                                   else "the gateway is shutting down")
            return
        self._requeued_by.add(stream)
        now = self.sender.clock.seconds()
        items = []
        for stanza in lost:
            size = stanza.size()
            local = domain_part(stanza.sender or "") or stream.first_local
            # when it was first queued (taken at once: when it was sent), so
            # that max_wait bounces it even if every stream to the peer dies
            since = getattr(stanza, "queued_since", None)
            items.append(_Queued(local, stanza, size, now if since is None else min(since, now)))
            self.queued_bytes += size
        self.queue.extendleft(reversed(items))
        self._schedule_expiry()
        settings = sm.settings
        if sm.resumable and sm.id and settings.resume_timeout > 0:
            keep = settings.resume_timeout if sm.max is None else min(sm.max, settings.resume_timeout)
            self._resume = ResumeToken(stream.first_local, sm.id, sm.inc.handled, sm.out.acked,
                                       tuple(lost), now + keep)
        log.info("Stream to {remote} gone with {count} stanzas unacknowledged: queued again",
                 remote=self.remote, count=len(lost))

    def sm_keep_resume(self, token: ResumeToken) -> None:
        """A stream that was to resume ``token`` is gone before the peer
        answered (or before it asked): the next stream tries it again, while
        it is usable.  Its stanzas are still at the head of the queue."""
        if self._resume is None and token.usable(self.sender.clock.seconds()):
            self._resume = token

    def _sm_lost_transport(self, stream: OutboundS2S) -> str | None:
        """With XEP-0198 on, ``stream`` lost its transport (no stream error
        from the peer, no refusal): the queue waits rather than bounces.  A
        stanza that was in flight is requeued (or resumed) by the stream
        management code, but a loss before stream management was up on the
        stream (while it negotiated, or before ``<enabled/>``) came here and
        bounced everything queued; the peer may even hold some of it already
        (a session to resume), so a bounce could be a lie, and an iq result
        cannot bounce at all.  XEP-0198 (and issue 12): what the peer did not
        acknowledge goes out on the next stream, and bounces only once the
        destination stays unreachable past the queue's ``max_wait``.

        "reconnect" (at once) for the first loss since something of ours was
        last delivered there: the remote domain was just reachable;
        "back-off" (keeping the queue, so a peer that keeps dropping
        connections, even after authenticating, costs one attempt per
        growing backoff period) after that; None where this does not apply (the
        usual paths decide).  A peer that is down fails to connect
        (:meth:`_connect_failed`) and bounces as before."""
        store = getattr(self.sender.ctx, "sm", None)
        if (store is None or not store.settings.enabled or not _closed_cleanly(stream)
                or self.sender.draining or self.sender.ctx.is_blocked(self.remote)):
            return None
        self._sm_losses += 1
        return "reconnect" if self._sm_losses == 1 else "back-off"

    def sm_resumed(self, stream: OutboundS2S, token: ResumeToken, handled: int) -> None:
        """The peer resumed ``token`` and had handled its first ``handled``
        stanzas: they leave the queue as delivered; the rest go out again."""
        done = {id(stanza) for stanza in token.stanzas[:handled]}
        if not done:
            return
        self.delivered_here()
        keep: deque[_Queued] = deque()
        for item in self.queue:
            if id(item.stanza) in done:
                self.queued_bytes -= item.size
                self.sender.delivered += 1
            else:
                keep.append(item)
        self.queue = keep

    def _flush_to(self, local: str, send, route=None) -> bool:
        """Hand what waits for ``local`` to ``send`` in order; once it refuses
        one (its stream is closing), that one and the rest stay queued in
        their places (for the next stream, or a bounce).  False if refused.
        Once ``route.is_writable()`` says its output is past its high-water
        mark, the rest stay queued too, until it drains."""
        writable = route.is_writable if route is not None else None
        keep: deque[_Queued] = deque()
        refused = stalled = False
        for item in self.queue:
            if item.local == local and not refused and not stalled:
                if writable is not None and not writable():
                    stalled = True
                    keep.append(item)
                    continue
                if send(item.stanza):
                    self._taken(route, item.stanza, item.since)
                    self.queued_bytes -= item.size
                    continue
                refused = True
            keep.append(item)
        self.queue = keep
        return not refused

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

    def _failed(self, event: str, condition: str, text: str) -> None:
        log.info("Sending to {remote} failed: {text}", remote=self.remote, text=text)
        self._bounce_all(condition, text)
        self._back_off(event, condition, text)

    def _back_off(self, event: str, condition: str, text: str) -> None:
        """Wait a jittered, growing delay before the next attempt (what is
        still queued waits for it, or for ``max_wait``)."""
        self.last_error = text
        self._last_condition = condition
        self.failures += 1
        settings = self.sender.settings
        delay = min(settings.backoff_max, settings.backoff_initial * 2 ** (self.failures - 1))
        delay *= 0.5 + self.sender.rng.random() / 2
        self._move(event, BACKOFF)
        if self.sender.draining:
            # Shutting down (the sender's timers may already be cancelled):
            # no retry will come, so what waits bounces now.
            self._shutdown_bounce("retry")
            return
        self.retry_at = self.sender.clock.seconds() + delay
        self._retry_timer = self.sender.clock.callLater(delay, self._retry)

    def _retry(self) -> None:
        self._retry_timer = None
        self.retry_at = None
        if self.state != BACKOFF:
            return
        if self.queue:
            self._connect("retry", self.queue[0].local)
        elif (self._resume is not None and not self._resume.stanzas
              and self._resume.usable(self.sender.clock.seconds())):
            self._connect("retry", self._resume.local)  # the peer holds stanzas for us
        else:
            self._move("retry", IDLE)
            self.sender.note_idle(self)

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
        if not self.queue and self.state == REVERSE:
            self._move("expired", IDLE)  # nothing waits for the reverse request any more
        self.sender.note_idle(self)

    def cancel_timers(self) -> None:
        for timer in (self._retry_timer, self._expiry_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._retry_timer = self._expiry_timer = None


def _peer_holds(stream: OutboundS2S, sm) -> bool:
    """Did a resumable bidi stream drop (no close, no error), so that the
    peer holds what it sent us and never saw acknowledged until we resume?"""
    io = stream.io
    return (sm.resumable and bool(sm.id) and sm.settings.resume_timeout > 0 and stream.bidi.on
            and io is not None and not io.closing and not io.peer_ended)


def _closed_cleanly(stream: OutboundS2S) -> bool:
    """Did ``stream`` end without a refusal or a stream error from the peer?"""
    return stream.failure is None and stream.stream_error is None
