"""What every S2S stream that carries domain pairs shares, whichever side
opened it: one receive path and one send path.

:class:`PairedStream` is the common base of the inbound stream and the
outbound stream.  It owns the stream's :class:`ConnectionRecord` (added to
the pair table on connect, removed on disconnect), the per-peer rate limit
(:class:`StreamThrottle`) and the three things both directions did twice
before: :meth:`write_stanza` (a route for the table, through the stream's
one guarded write path), :meth:`tls_established` and :meth:`reject_stanza`.  A stanza received on it, inbound or on an
outbound bidirectional stream (XEP-0288), goes through
:meth:`receive_stanza`: the RFC 6120 address checks against the pairs
proven here, the count, the rate limit, the router.

XEP-0198 (:mod:`fedgate.s2s.sm`) hooks in here for both roles: every
stanza written is counted (and kept until the peer acknowledges it); a
stanza goes out on an S2S stream only through :meth:`write_stanza` (what
the sender routed) or :meth:`send_own` (our pings), which count it in the
same step as the write (no observer: this is the relay's hot path); every
stanza received is counted handled, and past
``sm_max_unacked`` unacknowledged stanzas :meth:`write_stanza` refuses (the
destination holds them) until an ack makes room.  A clean close of ours
first asks for the peer's last ack (``sm_close_wait``).  When the connection
is gone, what the peer never acknowledged goes back to the sender's queue.
"""

from __future__ import annotations


from fedgate.domain import InvalidDomain
from fedgate.jid import domain_of, domain_part, is_valid_jid
from fedgate.s2s.pairs import ConnectionRecord
from fedgate.s2s.sm import StreamManagement
from fedgate.s2s.throttle import StreamThrottle
from fedgate.stream.errors import StanzaFailure, StreamFailure
from fedgate.stream.liveness import Liveness, close_dead, close_idle
from fedgate.stream.stanza import Stanza


def check_incoming(record, stanza: Stanza, local_domains) -> tuple[str, str]:
    """The RFC 6120 checks on a stanza arriving over S2S: (to, from) domains,
    or the error that the stanza deserves.

    A domain that is not authenticated on this stream is a stream error; a
    malformed address (RFC 7622) is a ``jid-malformed`` stanza error, because
    one remote user's bad address must not end a stream that carries other
    users' stanzas."""
    to, sender = stanza.to, stanza.sender
    if not to or not sender:
        raise StreamFailure("improper-addressing", "stanza without 'to' or 'from'")
    try:
        to_domain, from_domain = domain_of(to), domain_of(sender)
    except InvalidDomain:
        _malformed(record, to, sender, local_domains)
    _check_domains(record, to_domain, from_domain, local_domains)
    return to_domain, from_domain


def _check_domains(record, to_domain: str, from_domain: str, local_domains) -> None:
    if not record.can_receive(to_domain, from_domain):
        # Work out which rule failed only on the slow path.
        if not record.has_valid_remote(from_domain):
            raise StreamFailure("invalid-from", f"{from_domain} is not authenticated on this stream")
        raise StreamFailure("host-unknown", f"{to_domain} is not authenticated for {from_domain}")
    if to_domain not in local_domains:
        raise StreamFailure("host-unknown", f"{to_domain} is not served here")


def _malformed(record, to: str, sender: str, local_domains):
    """Raise the error for a stanza with a malformed 'to' or 'from': the
    stream errors still apply to whichever domainparts are well-formed."""
    to_domain, from_domain = domain_part(to), domain_part(sender)
    if from_domain is not None:
        if not record.has_valid_remote(from_domain):
            raise StreamFailure("invalid-from", f"{from_domain} is not authenticated on this stream")
        if to_domain is not None:
            _check_domains(record, to_domain, from_domain, local_domains)
    if from_domain is None or not is_valid_jid(sender):
        # The router will not answer a malformed address: it logs and drops.
        raise StanzaFailure("jid-malformed", "malformed 'from' address")
    # The 'from' is fine, so the 'to' is not: the reply comes from the
    # domain it named, or else from one of ours that the sender may hear from.
    reply_from = to_domain or min(local for local, remote in record.pairs
                                  if remote == from_domain and record.can_receive(local, remote))
    raise StanzaFailure("jid-malformed", "malformed 'to' address", reply_from=reply_from)


class PairedStream:
    """Base of the S2S roles whose stream carries domain pairs.  Subclasses
    set ``ctx`` and call :meth:`attach` from ``connected`` and
    :meth:`detach` from ``disconnected``."""

    ctx = None
    io = None
    record: ConnectionRecord | None = None
    throttle: StreamThrottle | None = None
    liveness: Liveness | None = None
    sm: StreamManagement | None = None
    #: did XEP-0198 refuse a stanza (too many unacknowledged)?
    _sm_full = False

    def attach(self, io, record: ConnectionRecord) -> None:
        """The connection is up: publish its record, set up the rate limit
        and the liveness watch (TCP keepalive, pings or whitespace, idle close)."""
        self.io = io
        self.record = self.ctx.table.add(record, closer=io.fail, route=self)
        self.throttle = StreamThrottle(io, self.ctx.clock)
        io.on_writable(self.writable_again)
        store = getattr(self.ctx, "sm", None)
        if store is not None and store.settings.enabled:
            self.sm = StreamManagement(self.ctx.clock, store.settings, io.write, self._sm_fail,
                                       on_acked=self._sm_acked)
            io.linger_with(self._sm_linger, self._sm_last_words)
            self.record._sm = self.sm
        settings = self.ctx.liveness
        if settings is not None and self.ctx.pings is not None:
            io.keep_alive(settings)
            self.liveness = Liveness(io, self.ctx.clock, settings, self.ctx.pings,
                                     ping_pair=self.ping_pair,
                                     authenticated=lambda: self.record.authenticated,
                                     on_dead=self._peer_gone, on_idle=self._idle,
                                     send_stanza=self.send_own)

    def detach(self) -> None:
        """The connection is gone: no timer left, no record in the table."""
        if self.liveness is not None:
            self.liveness.stop()
        if self.throttle is not None:
            self.throttle.stop()
        if self.record is not None:
            self.ctx.table.remove(self.record)

    # -- XEP-0198 -----------------------------------------------------------------
    def send_own(self, stanza) -> bool:
        """Write a stanza of our own (a ping), not one the sender routed:
        XEP-0198 counts it as the peer does, and no ack of it counts as a
        delivery.  With :meth:`write_stanza`, the only ways a stanza goes
        out on an S2S stream."""
        if not self.io.send_stanza(stanza):
            return False
        if self.sm is not None:
            self.sm.sent(stanza, routed=False)
        return True

    def _sm_linger(self, done) -> bool:
        """A clean close of ours begins: the final <a/> and <r/> (see
        :meth:`fedgate.s2s.sm.StreamManagement.linger`)."""
        return self.sm is not None and self.sm.linger(done)

    def _sm_last_words(self) -> None:
        if self.sm is not None:
            self.sm.last_words()

    def _sm_fail(self, element) -> None:
        """End the stream with ``element``, a stream error (handled-count-too-high)."""
        self.io.send(element)
        self.io.close()

    def _sm_acked(self, items) -> None:
        routed = len(items) - self.sm.out.own_in(items)
        if routed:
            self.ctx.sm.acked(self.record.remote_domain, routed)
        if self._sm_full and self.sm.writable():
            self._sm_full = False
            for pair in self.record.valid_pairs():  # the destinations flush what waits
                if self.record.can_send(pair.local, pair.remote):
                    self.ctx.table.pair_changed(pair.local, pair.remote, True)

    def sm_delivered(self, stanzas) -> None:
        """The peer acknowledged these routed stanzas: delivered now."""
        self.ctx.sm.acked(self.record.remote_domain, len(stanzas))

    def sm_lost(self) -> list:
        """The connection is gone: the routed stanzas the peer never
        acknowledged, in order (the caller puts them back in the queue)."""
        if self.sm is None:
            return []
        return [stanza for stanza, routed in self.sm.stop() if routed]

    # -- liveness -------------------------------------------------------------------
    def ping_pair(self) -> tuple[str, str] | None:
        """A (local, remote) pair valid for sending on this stream, preferring
        the gateway's own domains (their pings' answers stay with us), or
        None where the stream cannot send (a plain inbound stream)."""
        record = self.record
        usable = sorted((p.local, p.remote) for p in record.valid_pairs()
                        if record.can_send(p.local, p.remote))
        own = getattr(self.ctx.router, "own_domains", ())
        return next((pair for pair in usable if pair[0] in own), usable[0] if usable else None)

    def keep_queue(self) -> None:
        """This stream is about to close for liveness: what waits for it
        goes out over a new stream (outbound streams tell their destination)."""

    def _peer_gone(self, why: str) -> None:
        self.keep_queue()
        close_dead(self.io, why)

    def _idle(self, why: str) -> None:
        self.keep_queue()
        close_idle(self.io, why)

    # -- the stream asks ----------------------------------------------------------
    def tls_established(self, info) -> None:
        self.record.tls = info.describe()

    def reject_stanza(self, stanza: Stanza, failure: StanzaFailure) -> None:
        self.ctx.router.bounce(stanza, failure.condition, failure.text, reply_from=failure.reply_from)

    # -- receive: one path for both directions ------------------------------------
    def receive_stanza(self, stanza: Stanza) -> None:
        """A stanza over an authenticated pair: checked, counted,
        rate-limited per remote domain, routed.  Not while a clean close of
        ours waits for the peer's last ack (XEP-0198): a closing stream takes
        no new work, and the stanza, left out of the ``h`` we answer, is
        the peer's to send again or bounce."""
        if self.io.ending:
            return
        record = self.record
        to_domain, from_domain = check_incoming(record, stanza, self.ctx.local_domains)
        record.pairs[(to_domain, from_domain)].stanzas_in += 1
        if self.liveness is not None:
            self.liveness.stanza(stanza)
        self.throttle.stanza(from_domain, self.ctx.policy.rate_limit(from_domain))
        try:
            self.ctx.router.route(stanza, to_domain, from_domain)
        finally:
            if self.sm is not None:
                self.sm.handled()  # routed or bounced: handled either way

    # -- send: the route the pair table hands out ---------------------------------
    def is_writable(self) -> bool:
        """Does the stream take more stanzas now (its output is below the
        high-water mark)?  If not, the sender holds them in its queue."""
        return self.io is not None and self.io.writable

    def writable_again(self) -> None:
        """The stream's output drained: the destinations that send over it
        hand over what they held (as when a pair becomes usable)."""
        record = self.record
        for pair in list(record.valid_pairs()):
            if record.can_send(pair.local, pair.remote):
                self.ctx.table.pair_changed(pair.local, pair.remote, True)

    def write_stanza(self, local: str, remote: str, stanza: Stanza) -> bool:
        """Hand ``stanza`` to this stream: True if the open transport took
        it, False if the stream is closing (the caller requeues or bounces)."""
        sm = self.sm
        if sm is not None and sm.counting:
            if len(sm.out.unacked) >= sm.max_unacked:
                self._sm_full = True  # the destination holds it until an ack makes room
                return False
            if not self.io.send_stanza(stanza):
                return False
            sm.sent(stanza)  # in flight until acknowledged (counted delivered then)
        elif not self.io.send_stanza(stanza):
            return False
        self.record.pairs[(local, remote)].stanzas_out += 1
        if self.liveness is not None:
            self.liveness.stanza(stanza)
        return True
