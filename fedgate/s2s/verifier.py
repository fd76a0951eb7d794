"""The Receiving Server's check with the Authoritative Server (XEP-0220 2.1.2).

A ``<db:verify>`` goes to the originating domain's servers over a *channel*,
never over the connection the request came in on:

1. an outbound stream of ours to that domain that is open, has a pair
   authenticated on it and whose peer offered dialback after its last
   restart (a peer without dialback, such as ejabberd without
   ``mod_s2s_dialback``, silently ignores ``db:*``); else
2. a verification connection from the pool: one to the same domain pair
   (our domain, theirs) with room for another request, or a new one.  A
   verification connection is negotiated like any stream we open (TLS when
   offered, the certificate and TLS policy of the peer, the address rules
   of :mod:`fedgate.s2s.connect`), carries up to ``pipeline`` requests at
   once and stays open ``idle_timeout`` seconds after its last answer for
   the next one (0: it closes after its last answer).  At most ``max_idle``
   idle connections are kept in all; past it the longest idle one closes.
   A pooled connection takes new requests only while the peer policy for
   its domain is unchanged and for at most ``MAX_LIFETIME`` (600) seconds;
   then it finishes its requests and closes.

Answers are matched by (id, from, to) as XEP-0220 2.1.2 says, and only on
the channel the request went out on: an answer on any other stream, or for
a request not made on this channel, is ignored.  A channel never carries
two requests with the same (id, from, to) at once.

A verification is in flight from the request until its answer, its failure
or its cancellation, which is what the caller's budgets count (the
``finished`` callback); a request cancelled before its connection is up
counts until that connection is up or gone, so that cancelling and asking
again makes no more connect attempts than the budget allows.  Cancelling
the Deferred (the requesting stream went away) drops the request, never a
channel other requests still need; a verification connection left with
cancelled requests only is closed, and they count until it is gone (a
cancelled request already sent counts until its answer, its deadline or the
end of its connection, whichever comes first).  A
request already sent keeps its place on its channel until its answer (taken
silently) or its deadline, so that a late answer is never taken for a later
request with the same (id, from, to).
A request unanswered after ``timeout`` seconds fails; its verification
connection is then taken as broken and aborted (its other requests fail
too); an outbound stream is left alone.

Failures become the dialback error conditions of XEP-0220 section 2.5:
``remote-server-not-found`` when the Authoritative Server cannot be reached
(or says the domain is unknown), ``remote-server-timeout`` when the
connection to it fails or stays silent.  Their texts name no address and
carry no internal error: they go to the remote server; the details go to
the log.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.words.xish import domish

from fedgate.logsafe import short, throttled
from fedgate.s2s import dialback
from fedgate.s2s.connect import ConnectError
from fedgate.s2s.dialback import DialbackError
from fedgate.stream import namespaces as ns
from fedgate.s2s.initiating import READY, InitiatingStream
from fedgate.stream.errors import StreamFailure, error_condition

log = Logger(namespace="fedgate.s2s.verifier")

NOT_FOUND = "remote-server-not-found"
TIMEOUT = "remote-server-timeout"


def _answer_value(element: domish.Element):
    """True/False for valid/invalid, a DialbackError for type='error', None
    for anything else."""
    kind = element.getAttribute("type")
    if kind == "valid":
        return True
    if kind == "invalid":
        return False
    if kind == "error":
        condition = error_condition(element)
        return DialbackError(
            NOT_FOUND if condition in ("item-not-found", "host-unknown", None) else TIMEOUT,
            "the authoritative server could not verify the key", f"db:verify error {condition}")
    return None


def _writable(io) -> bool:
    return io is not None and not io.closed and not io.closing


class _Request:
    """One verification: its Deferred, its timer, the channel it is on."""

    __slots__ = ("verifier", "receiving", "originating", "stream_id", "key", "finished", "done",
                 "timer", "channel", "released", "cancelled")

    def __init__(self, verifier: "DialbackVerifier", receiving: str, originating: str,
                 stream_id: str, key: str, finished: Callable[[], None] | None):
        self.verifier = verifier
        self.receiving, self.originating = receiving, originating
        self.stream_id, self.key = stream_id, key
        self.finished = finished
        self.released = self.cancelled = False
        self.channel = None
        self.done = defer.Deferred(self._cancel)
        self.timer = verifier.clock.callLater(verifier.timeout, self._timed_out)

    @property
    def match(self) -> tuple:
        """What its answer carries: (id, from, to)."""
        return (self.stream_id, self.originating, self.receiving)

    def element(self) -> str:
        return dialback.verify_request(self.receiving, self.originating, self.stream_id, self.key)

    def answered(self, result) -> None:
        """The answer (True/False or a DialbackError); once only."""
        if self.timer.active():
            self.timer.cancel()
        if not self.done.called:
            if isinstance(result, Exception):
                log.info("Dialback verification with {domain} failed: {condition} ({detail})",
                         domain=self.originating, condition=result.condition, detail=short(result.detail))
                self.done.errback(result)
            else:
                self.done.callback(result)
        self.release()

    def release(self) -> None:
        """It counts against no budget any more."""
        if self.released:
            return
        self.released = True
        if self.timer.active():
            self.timer.cancel()
        if self.finished is not None:
            self.finished()

    def _timed_out(self) -> None:
        channel = self.channel
        self.answered(DialbackError(TIMEOUT, "no answer from the authoritative server in time",
                                    "verification timed out"))
        if channel is not None:
            channel.timed_out(self)

    def _cancel(self, _d) -> None:
        # Deferred calls this, then errbacks ``done`` with CancelledError.
        log.debug("Dialback verification with {domain} cancelled", domain=self.originating)
        self.cancelled = True
        if self.channel is None or self.channel.cancel(self):
            self.release()


class _Channel:
    """What every channel does with requests: send, match answers, fail the rest."""

    def __init__(self, pipeline: int):
        self.pipeline = pipeline
        #: requests sent, by (id, from, to) of their answer
        self.outstanding: dict[tuple, _Request] = {}

    @property
    def load(self) -> int:
        return len(self.outstanding)

    def has_room(self, request: _Request) -> bool:
        return self.load < self.pipeline and request.match not in self.outstanding

    def answer(self, element: domish.Element, io) -> None:
        """A typed ``<db:verify>`` on this channel: the answer to one of
        ours, or ignored."""
        request = self.outstanding.get((element.getAttribute("id"), element.getAttribute("from"),
                                        element.getAttribute("to")))
        result = _answer_value(element)
        if request is None or result is None:
            throttled(log, io).warn("Ignoring db:verify answer we did not ask for from {peer}",
                                    peer=io.peer)
            return
        del self.outstanding[request.match]
        request.answered(result)
        self.answered()

    def fail_all(self, error: DialbackError) -> None:
        requests = list(self.outstanding.values())
        self.outstanding.clear()
        for request in requests:
            request.answered(error)

    def cancel(self, request: _Request) -> bool:
        """``request`` is cancelled.  True when it counts no more (else
        :meth:`_Request.release` comes later).  A request already sent keeps
        its place until its answer (taken silently) or its deadline, so that
        a late answer can never be taken for a later request with the same
        (id, from, to)."""
        return True

    def answered(self) -> None:
        """A request left: the channel may be idle now."""

    def timed_out(self, request: _Request) -> None:
        self.outstanding.pop(request.match, None)
        self.answered()


class StreamChannel(_Channel):
    """Verification over an outbound stream of ours to the authoritative
    domain (:class:`fedgate.s2s.outbound.OutboundS2S` hands its answers
    here and calls :meth:`lost` when it goes)."""

    def __init__(self, stream, pipeline: int):
        super().__init__(pipeline)
        self.stream = stream

    @property
    def usable(self) -> bool:
        stream = self.stream
        return (_writable(stream.io) and stream.is_open
                and stream.offers_dialback and stream.record is not None and stream.record.authenticated)

    def submit(self, request: _Request) -> None:
        request.channel = self
        self.outstanding[request.match] = request
        self.stream.io.write(request.element())

    def lost(self) -> None:
        self.fail_all(DialbackError(TIMEOUT, "the connection to the authoritative server ended "
                                             "without an answer", "outbound stream closed"))

    def timed_out(self, request: _Request) -> None:
        super().timed_out(request)  # the stream carries stanzas too: it stays


class VerifyStream(InitiatingStream):
    """Handler of one verification connection: negotiate (TLS when offered),
    then hand over to its :class:`PooledConnection`."""

    def __init__(self, ctx, receiving: str, originating: str, owner: "PooledConnection"):
        super().__init__(ctx, receiving, originating)
        self.owner = owner

    def ready(self, features) -> None:
        self.owner.ready()

    def element_received(self, element: domish.Element) -> None:
        super().element_received(element)
        if element.uri == ns.STREAMS and element.name == "error":
            condition = NOT_FOUND if self.stream_error == "host-unknown" else TIMEOUT
            self.owner.fail_all(DialbackError(
                condition, "the authoritative server ended the stream",
                f"stream error {self.stream_error}"))

    def negotiated_element(self, element: domish.Element) -> None:
        if element.uri == ns.DIALBACK and element.name == "verify":
            if self.state == READY:
                self.owner.answer(element, self.io)
            return
        # A verification connection is one-way (no bidi): the peer has
        # nothing else to send on it.  Ending it with a stream error, as
        # the outbound stream does, keeps a peer from holding a pooled
        # connection open with elements (or a never-ending child element)
        # that we would otherwise ignore.
        raise StreamFailure("unsupported-stanza-type",
                            f"unexpected element {element.name} on a verification connection")

    def disconnected(self, reason) -> None:
        super().disconnected(reason)
        detail = self.failure.text if self.failure else "closed without an answer"
        self.owner.gone(DialbackError(
            TIMEOUT, "the connection to the authoritative server ended without an answer", detail))


#: The longest a verification connection serves new requests, in seconds
#: (from its connect attempt); past it, it finishes what it carries and
#: closes, however busy it has been, so that nothing negotiated under old
#: terms (policy, certificates, DNS) lives on indefinitely.
MAX_LIFETIME = 600.0


class PooledConnection(_Channel):
    """A verification connection: requests wait in ``queued`` until it is
    ready, then go out; idle, it waits in the pool for the next ones.

    It takes new requests only while the peer policy for its domain is the
    one it was negotiated under (the operator may have started requiring
    TLS or a certificate since, :mod:`fedgate.admin.enforce`) and for at
    most :data:`MAX_LIFETIME` seconds; after that it finishes its requests
    and closes."""

    def __init__(self, verifier: "DialbackVerifier", receiving: str, originating: str):
        super().__init__(verifier.pipeline)
        self.verifier = verifier
        self.pair = (receiving, originating)
        self.born = verifier.clock.seconds()
        self.policy = verifier.policy_for(originating)
        self.queued: list[_Request] = []
        #: cancelled before the connection was up: counted until it is
        self.held: list[_Request] = []
        self.is_ready = self.closed = False
        #: why it is gone (for a request that comes too late)
        self.error: DialbackError | None = None
        self.idle_timer = None
        self.handler = VerifyStream(verifier.ctx, receiving, originating, self)
        self.connecting = verifier.connector.connect(
            originating, lambda target=None: verifier.make_stream(self.handler.for_target(target)))
        self.connecting.addCallbacks(self._connected, self._connect_failed)

    @property
    def load(self) -> int:
        return len(self.outstanding) + len(self.queued)

    @property
    def stale(self) -> bool:
        """Past its lifetime, or negotiated under a policy since changed."""
        verifier = self.verifier
        return (verifier.clock.seconds() - self.born >= verifier.max_lifetime
                or verifier.policy_for(self.pair[1]) != self.policy)

    def has_room(self, request: _Request) -> bool:
        if self.closed or (self.is_ready and not _writable(self.handler.io)):
            return False  # gone, or going (the peer ended its stream)
        if self.stale:
            if self.is_ready and self.load == 0:
                self.close()  # idle: nothing to finish
            return False
        return super().has_room(request) and all(q.match != request.match for q in self.queued)

    def submit(self, request: _Request) -> None:
        request.channel = self
        if self.closed:  # the connect attempt failed at once
            request.answered(self.error)
            return
        self._not_idle()
        if self.is_ready:
            self.outstanding[request.match] = request
            self.handler.io.write(request.element())
        else:
            self.queued.append(request)

    def ready(self) -> None:
        self.is_ready = True
        self._release_held()
        queued, self.queued = self.queued, []
        if queued:
            for request in queued:
                self.outstanding[request.match] = request
            self.handler.io.write("".join(request.element() for request in queued))
        self.answered()

    @property
    def live(self) -> bool:
        """Does a request not cancelled still need it?"""
        return bool(self.queued) or any(not r.cancelled for r in self.outstanding.values())

    def cancel(self, request: _Request) -> bool:
        if self.closed:
            return True
        if request in self.queued:
            self.queued.remove(request)
            if self.is_ready:
                return True
            self.held.append(request)  # counted until the attempt is up or gone
        elif self.outstanding.get(request.match) is not request:
            return True
        elif self.live:
            # Others need the connection: only the request goes, but it
            # keeps its place (and counts) until its answer, its deadline or
            # the connection's end; when the last live request is answered
            # and the connection closes, it still counts until it is gone.
            return False
        if not self.live:
            # Nobody needs it any more: close it; the cancelled requests
            # count until it is gone (no connection outlives its budget).
            self.close()
            return False
        return False

    def answered(self) -> None:
        if not self.is_ready or self.closed:
            return
        if self.load == 0:
            self.verifier._idle(self)
        elif not self.live:
            self.close()  # only cancelled requests wait here

    def timed_out(self, request: _Request) -> None:
        if request in self.queued:
            self.queued.remove(request)
        super().timed_out(request)
        if self.is_ready or self.load == 0:
            # Silent past the deadline: take the connection as broken.
            self.abort()

    def _not_idle(self) -> None:
        if self.idle_timer is not None:
            if self.idle_timer.active():
                self.idle_timer.cancel()
            self.idle_timer = None
            self.verifier._busy(self)

    def _release_held(self) -> None:
        held, self.held = self.held, []
        for request in held:
            request.release()

    def fail_all(self, error: DialbackError) -> None:
        queued, self.queued = self.queued, []
        super().fail_all(error)
        for request in queued:
            request.answered(error)

    def close(self) -> None:
        """Close it (idle, or the pool is full)."""
        self.verifier._forget(self)
        io = self.handler.io
        if io is not None:
            io.close()
        else:
            self.connecting.cancel()

    def abort(self) -> None:
        self.verifier._forget(self)
        io = self.handler.io
        if io is not None:
            # A peer silent past the deadline gets a stream error (RFC 6120
            # 4.9.3.4), not a dropped connection without our close.
            io.fail("connection-timeout", "no answer to a dialback verification in time")
        else:
            self.connecting.cancel()

    def gone(self, error: DialbackError) -> None:
        """The connection is gone (or none was made)."""
        if self.closed:
            return
        self.closed = True
        self.error = error
        self.verifier._forget(self)
        self._not_idle()
        self.fail_all(error)
        self._release_held()

    def _connected(self, protocol) -> None:
        if self.closed:
            self.close()  # timed out while the connection came up

    def _connect_failed(self, failure) -> None:
        if failure.check(ConnectError):
            error = DialbackError(NOT_FOUND, "could not connect to the authoritative server",
                                  failure.value.detail or failure.value.text)
        elif failure.check(defer.CancelledError):
            error = DialbackError(TIMEOUT, "no answer from the authoritative server in time",
                                  "connect attempt cancelled")
        else:
            log.failure("Unexpected error connecting to {domain}", failure, domain=self.pair[1])
            error = DialbackError(NOT_FOUND, "could not connect to the authoritative server",
                                  failure.getErrorMessage())
        self.gone(error)


class DialbackVerifier:
    """Asks the Authoritative Server whether a key is valid.

    ``outbound(domain)`` lists our outbound streams to ``domain`` (the
    sender's); ``idle_timeout``, ``pipeline`` and ``max_idle`` shape the
    pool of verification connections (see the module docstring)."""

    def __init__(self, connector, clock, make_stream, timeout: float = 30.0, ctx=None,
                 idle_timeout: float = 30.0, pipeline: int = 10, max_idle: int = 1000,
                 outbound: Callable[[str], list] | None = None, max_lifetime: float = MAX_LIFETIME):
        self.connector = connector
        self.clock = clock
        self.ctx = ctx  # the S2S context for its verification streams (no verifier in it)
        self.make_stream = make_stream
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.pipeline = pipeline
        self.max_idle = max_idle
        self.outbound = outbound
        self.max_lifetime = max_lifetime
        #: (receiving, originating) -> its verification connections
        self.pool: dict[tuple, list[PooledConnection]] = {}
        #: idle connections, longest idle first
        self._idle_order: OrderedDict[PooledConnection, None] = OrderedDict()
        #: verification connections opened since start (for tests and /metrics)
        self.connections_opened = 0

    def verify(self, receiving: str, originating: str, stream_id: str, key: str,
               finished: Callable[[], None] | None = None) -> defer.Deferred:
        """Fires with True (valid) or False (invalid), or fails with a
        :class:`DialbackError`.  ``finished()`` is called once, when the
        verification counts no more (see the module docstring)."""
        request = _Request(self, receiving, originating, stream_id, key, finished)
        why = dialback.key_refusal(key)
        if why is None and len(stream_id or "") > dialback.MAX_KEY_LENGTH:
            why = "stream id too long"  # the peer's, on an outbound bidi stream
        if why is not None:
            # Never written anywhere: the <db:verify> on a channel (maybe
            # our outbound stream to that domain) stays small.
            request.answered(DialbackError("not-acceptable", "the dialback key is not acceptable", why))
            return request.done
        channel = self._stream_channel(request) or self._pooled(request)
        channel.submit(request)
        return request.done

    def _stream_channel(self, request: _Request) -> StreamChannel | None:
        if self.outbound is None:
            return None
        for stream in self.outbound(request.originating):
            channel = getattr(stream, "verify_channel", None)
            if channel is None:
                channel = StreamChannel(stream, self.pipeline)
            if channel.usable and channel.has_room(request):
                stream.verify_channel = channel
                return channel
        return None

    def _pooled(self, request: _Request) -> PooledConnection:
        pair = (request.receiving, request.originating)
        # A copy: has_room closes an idle connection gone stale (which
        # takes it out of the pool list).
        connections = list(self.pool.get(pair, ()))
        # Ready ones first, then the one coming up; the least loaded.
        best = min((c for c in connections if c.has_room(request)),
                   key=lambda c: (not c.is_ready, c.load), default=None)
        if best is not None:
            return best
        connection = PooledConnection(self, *pair)
        self.connections_opened += 1
        # A connect attempt that failed at once (an IP literal, a cached DNS
        # answer) is gone already: it gets no pool entry, not even an empty
        # list (one per such request would grow without bound).
        if not connection.closed:
            self.pool.setdefault(pair, []).append(connection)
        return connection

    def policy_for(self, domain: str):
        """The terms of the current peer policy for ``domain`` a connection
        is negotiated under (None without a context); its note and stanza
        rate limit do not matter to a verification connection."""
        policy = getattr(self.ctx, "policy", None)
        if policy is None:
            return None
        peer = policy.for_peer(domain)
        return (policy.is_blocked(domain), peer.encryption, peer.authentication, peer.addresses,
                peer.max_stanza_bytes)

    # -- the pool ----------------------------------------------------------------
    def _idle(self, connection: PooledConnection) -> None:
        if self.idle_timeout <= 0 or connection.stale:
            connection.close()
            return
        if connection.idle_timer is not None:
            return
        connection.idle_timer = self.clock.callLater(self.idle_timeout, self._expire, connection)
        self._idle_order[connection] = None
        while len(self._idle_order) > self.max_idle:
            oldest = next(iter(self._idle_order))
            log.debug("Closing the longest idle verification connection: {count} idle",
                      count=len(self._idle_order))
            oldest.close()

    def _busy(self, connection: PooledConnection) -> None:
        self._idle_order.pop(connection, None)

    def _expire(self, connection: PooledConnection) -> None:
        connection.idle_timer = None
        connection.close()

    def _forget(self, connection: PooledConnection) -> None:
        """Out of the pool: no new request goes to it."""
        if connection.idle_timer is not None:
            if connection.idle_timer.active():
                connection.idle_timer.cancel()
            connection.idle_timer = None
        self._idle_order.pop(connection, None)
        connections = self.pool.get(connection.pair)
        if connections is not None:
            if connection in connections:
                connections.remove(connection)
            if not connections:  # never an empty entry left behind
                del self.pool[connection.pair]

    def idle_count(self) -> int:
        return len(self._idle_order)

    def close(self) -> None:
        """Close every pooled connection (shutdown)."""
        for connections in list(self.pool.values()):
            for connection in list(connections):
                connection.close()
