"""Outbound S2S streams: the Originating Server role (XEP-0220 2.1.1).

An outbound stream to a remote domain carries every local domain that has
authenticated on it.  The first local domain opens the stream and, over TLS
with a certificate the peer accepts, authenticates by SASL EXTERNAL; further
local domains piggyback with a ``<db:result>`` each (verified by certificate
under XEP-0344 where the peer supports it, or by the callback otherwise), but
only where the peer offered dialback after the last restart: a peer set up
for certificates only ignores the request, so the owner opens a stream of
that domain's own instead (:meth:`can_piggyback`).

Every pair we ask for has ``pair_timeout`` seconds to be answered; then it
counts as failed (``remote-server-timeout``) and this stream is not asked to
carry that domain again.

Negotiation (header, STARTTLS, bidi, SASL) and the states of this role are
in :mod:`fedgate.s2s.initiating` (the stream is open in READY); dialback's
Originating half (and, on a bidi stream, its Receiving half) in
:mod:`fedgate.s2s.dialback`; the receive path, shared with inbound streams,
in :mod:`fedgate.s2s.paired`.  The owner (a Destination in the sender) hears about every change through
``stream_open``, ``pair_result`` and ``stream_closed``.

XEP-0198: as the initiating entity we send ``<enable resume='true'/>`` as
soon as a pair is valid where the peer's current features offer it (after
the SASL restart, or in the first features on a dialback stream), and count
from then on; but we hold the pairs' results (so that no stanza is written)
until ``<enabled/>`` or ``<failed/>`` comes, since a stanza sent before
``<enabled/>`` belongs to no session that could be resumed.  Where the owner hands us a session to resume
(:attr:`resume_from`), we send ``<resume/>`` instead and hold the pair's
result (so that nothing is sent) until ``<resumed/>`` or ``<failed/>``: on
``<resumed h/>`` the owner drops what the peer had handled from its queue
and the rest goes out again; on ``<failed/>`` we enable afresh and the owner
sends the whole rest (:meth:`Destination.sm_resumed`), less what a
``<failed h/>`` says the peer had handled.  On a bidi stream the peer sends
to us too, and only we may resume: when such a stream drops, the owner
connects again to resume it even with nothing of ours to send, so that the
peer learns what arrived of its stanzas and sends only the rest again.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.words.xish import domish

from fedgate.logsafe import throttled
from fedgate.s2s.dialback import StreamDialback
from fedgate.s2s.initiating import READY, InitiatingStream
from fedgate.s2s.paired import PairedStream
from fedgate.s2s.pairs import INVALID, LOCAL, OUTBOUND, PENDING, VALID, ConnectionRecord
from fedgate.s2s.policy_check import DIALBACK, SASL_EXTERNAL
from fedgate.s2s import sm as xep0198
from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StreamFailure

log = Logger(namespace="fedgate.s2s.outbound")

#: the state reported to the owner for a pair whose request went unanswered
TIMEOUT = "timeout"


class OutboundS2S(PairedStream, InitiatingStream):
    """The handler of one outbound S2S connection to ``remote``.

    States: those of :data:`fedgate.s2s.initiating.TRANSITIONS`
    (AWAIT_FEATURES -> [STARTTLS | SASL] -> READY, or FAILED; CLOSED at the
    end); bidi's OFF/ON are in :mod:`fedgate.s2s.bidi`.  It is open (may
    carry pairs) exactly in READY."""

    use_sasl = True
    use_bidi = True
    #: the verifier's channel on this stream, once it sent a <db:verify> here
    #: (fedgate.s2s.verifier.StreamChannel)
    verify_channel = None

    def __init__(self, ctx, remote: str, first_local: str, owner, pair_timeout: float = 30.0):
        super().__init__(ctx, first_local, remote)
        self.owner = owner
        self.pair_timeout = pair_timeout
        self.record: ConnectionRecord | None = None
        self.dialback: StreamDialback | None = None
        self._wanted: list[str] = []
        self._timer = None
        self._pair_timers: dict = {}
        #: local domains whose request here went unanswered
        self.timed_out: set[str] = set()
        #: the session to resume (a Destination's ResumeToken), if any
        self.resume_from = None
        #: pair results held while <resume/> waits for its answer
        self._held: list = []

    @property
    def is_open(self) -> bool:
        """Negotiation is over: domains may be proved (and stanzas sent)."""
        return self.state == READY

    @property
    def first_local(self) -> str:
        return self.local

    @property
    def dialback_stream_id(self) -> str | None:
        return self.stream_id

    def connected(self, io) -> None:
        self.attach(io, ConnectionRecord(OUTBOUND, io.peer, self.ctx.clock.seconds(),
                                         remote_domain=self.remote))
        self.dialback = StreamDialback(self, may_accept=self._may_accept, on_result=self._pair_result)
        self._timer = self.ctx.clock.callLater(self.ctx.auth_timeout, self._auth_timeout)
        super().connected(io)

    def header_received(self, header) -> None:
        super().header_received(header)
        if not self.stream_id:
            raise StreamFailure("invalid-xml", "the stream header has no id")

    def sasl_succeeded(self) -> None:
        self.record.set_pair(self.local, self.remote, VALID, SASL_EXTERNAL, self.ctx.clock.seconds())
        log.info("Authenticated {local} -> {remote} by SASL EXTERNAL", local=self.local, remote=self.remote)
        self._cancel_timer()
        self._report(self.local, VALID, None, None)

    # -- XEP-0198: the initiating entity ----------------------------------------
    def _report(self, local: str, state: str, condition, text) -> None:
        """Tell the owner about a pair, starting stream management first on
        the first valid one (or holding the news while we resume)."""
        sm = self.sm
        if state == VALID and sm is not None and sm.state == xep0198.OFF and sm.offered(self.features):
            token, self.resume_from = self.resume_from, None
            if token is not None and token.usable(self.ctx.clock.seconds()):
                sm.resume(token.previd, token.handled, token.acked)
                self._resuming = token
            else:
                sm.enable(resume=sm.settings.resume_timeout > 0)
            self._sm_timer = self.ctx.clock.callLater(self.pair_timeout, self._sm_no_answer)
        if self._sm_pending():
            self._held.append((local, state, condition, text))
            return
        self.owner.pair_result(self, local, state, condition, text)

    def _sm_pending(self) -> bool:
        """Did we send ``<enable/>`` or ``<resume/>`` and wait for the answer?
        Until it comes the pairs' results are held and the stream takes no
        stanza: one written before ``<enabled/>`` belongs to no session that
        could be resumed, so a transport lost meanwhile would leave its fate
        unknown (sent again: perhaps twice).  They wait in the destination's
        queue instead (XEP-0198 lets the initiating entity send stanzas at
        any time after ``<enable/>``; waiting is its choice)."""
        sm = self.sm
        return sm is not None and sm.state in (xep0198.ENABLING, xep0198.RESUMING)

    def is_writable(self) -> bool:
        """Below the high-water mark, and not waiting for stream management's answer."""
        return super().is_writable() and not self._sm_pending()

    _sm_timer = None

    def _sm_no_answer(self) -> None:
        """``pair_timeout`` passed and the peer has not answered our
        ``<enable/>`` (or ``<resume/>``): the held stanzas would wait for
        ever, so the stream ends (``connection-timeout``) and the
        destination tries a new one; they bounce past ``max_wait``."""
        self._sm_timer = None
        if self._sm_pending() and self.io is not None:
            log.info("{remote} did not answer our stream management request within {timeout} s",
                     remote=self.remote, timeout=self.pair_timeout)
            self.io.fail("connection-timeout", "no answer to the stream management request")

    def _cancel_sm_timer(self) -> None:
        if self._sm_timer is not None and self._sm_timer.active():
            self._sm_timer.cancel()
        self._sm_timer = None

    def _release(self) -> None:
        self._cancel_sm_timer()
        held, self._held = self._held, []
        for local, state, condition, text in held:
            self.owner.pair_result(self, local, state, condition, text)

    _resuming = None

    def sm_resumed(self, h: int) -> None:
        token, self._resuming = self._resuming, None
        handled = xep0198.distance(h, token.acked)
        if handled > len(token.stanzas):
            self.sm.ack(h)  # more than we ever sent: handled-count-too-high
            return
        self.sm.out = xep0198.Outgoing(h)
        log.info("Resumed our stream to {remote}: {handled} of {count} unacknowledged stanzas "
                 "had arrived", remote=self.remote, handled=handled, count=len(token.stanzas))
        self.owner.sm_resumed(self, token, handled)
        self._release()

    def sm_failed(self, condition: str, items, resuming: bool) -> None:
        if resuming:
            token, self._resuming = self._resuming, None
            h = self.sm.failed_h
            handled = xep0198.distance(h, token.acked) if h is not None else 0
            if handled > len(token.stanzas):
                handled = 0  # an h that says nothing usable: send everything again
            log.info("{remote} did not resume our stream ({condition}): sending again what it "
                     "had not acknowledged ({handled} of {count} had arrived)", remote=self.remote,
                     condition=condition, handled=handled, count=len(token.stanzas))
            if handled:
                self.owner.sm_resumed(self, token, handled)
            self.sm.enable(resume=self.sm.settings.resume_timeout > 0)
            return  # the held pairs wait for <enabled/> (or <failed/>) again
        log.info("{remote} refused stream management ({condition})", remote=self.remote,
                 condition=condition)
        routed = [stanza for stanza, was_routed in items if was_routed]
        if routed:
            self.sm_delivered(routed)  # no ack will come: the transport took them
        self._release()  # stanzas go out without acks

    def _sm_keep_token(self) -> None:
        """The connection is gone before the peer answered our ``<resume/>``
        (or before we got as far as asking): the session is still the
        peer's to resume, so the owner keeps it for the next stream."""
        token = self._resuming or self.resume_from
        self._resuming = self.resume_from = None
        keep = getattr(self.owner, "sm_keep_resume", None)
        if token is not None and keep is not None:
            keep(token)

    def sm_enable(self, element) -> None:
        self.sm.refuse_resume(False)  # the initiating entity enables, not the peer

    def sm_resume(self, previd: str, h: int) -> None:
        self.sm.refuse_resume(False)

    def ready(self, features) -> None:
        wanted, self._wanted = self._wanted, []
        for local in wanted:
            self.authenticate(local)
        self.owner.stream_open(self)

    def authenticate(self, local: str) -> None:
        """Ask the peer to accept ``local`` on this stream (piggybacking)."""
        state = self.record.state_of(local, self.remote) if self.record else None
        if state in (PENDING, VALID):
            return
        if self.state != READY:
            if local not in self._wanted:
                self._wanted.append(local)
            return
        self.dialback.originating.ask(local, self.remote)
        self._pair_timers[local] = self.ctx.clock.callLater(self.pair_timeout, self._pair_timed_out, local)

    def can_piggyback(self, local: str) -> bool:
        """May ``local`` (not the domain this stream was opened for) ask to
        be accepted here?  Only once open, where the peer offered dialback
        after the last restart, and not again after it ignored a request."""
        return self.is_open and self.offers_dialback and local not in self.timed_out

    def pending_pairs(self) -> list:
        """Our pairs on this stream still waiting for an answer."""
        if self.record is None:
            return []
        return [p for p in self.record.pairs.values() if p.state == PENDING and p.origin == LOCAL]

    def is_valid(self, local: str) -> bool:
        return self.record is not None and self.record.can_send(local, self.remote)

    def send_stanza(self, local: str, stanza) -> bool:
        """True if the transport took ``stanza`` (see :meth:`write_stanza`)."""
        return self.write_stanza(local, self.remote, stanza)

    def writable_again(self) -> None:
        """Our output drained: the destination hands over what it held."""
        self.owner.stream_writable(self)

    # -- a route for other destinations once bidi allows (write_stanza: PairedStream)
    def authenticate_reverse(self, local: str, remote: str) -> bool:
        return False  # further remote domains get their own outbound stream

    def negotiated_element(self, element: domish.Element) -> None:
        uri, name = element.uri, element.name
        if uri == ns.DIALBACK and name == "result":
            if element.getAttribute("type"):
                self.dialback.originating.answer(element)
            elif self.bidi.on:
                self.dialback.receiving.request(element)  # the peer adds a domain in reverse
            else:
                raise StreamFailure("unsupported-stanza-type", "dialback requests need bidi here")
        elif uri == ns.DIALBACK and name == "verify":
            if element.getAttribute("type") and self.verify_channel is not None:
                # The answer to a verification we sent here (fedgate.s2s.verifier).
                self.verify_channel.answer(element, self.io)
            else:
                throttled(log, self.io).warn("Ignoring db:verify on an outbound stream from {remote}",
                                             remote=self.remote)
        elif uri == xep0198.NS and self.sm is not None:
            enabling = self.sm.state == xep0198.ENABLING
            self.sm.element(element, self)
            if enabling and self.sm.state == xep0198.ENABLED:
                self._release()  # <enabled/>: the held pairs may carry stanzas now
        elif uri == ns.SERVER and name in ns.STANZA_NAMES and self.bidi.on:
            self.receive_stanza(element)  # the same path, and rate limit, as inbound
        else:
            raise StreamFailure("unsupported-stanza-type",
                                "stanzas are not accepted on this stream (no bidi)")

    def _may_accept(self, receiving: str, originating: str) -> bool:
        """Reverse requests only towards our domains already proven here."""
        return self.record.proven_local(receiving)

    def _pair_result(self, local: str, state: str, condition, text) -> None:
        self._cancel_pair_timer(local)
        if state == VALID:
            self._cancel_timer()
        self._report(local, state, condition, text)

    def _pair_timed_out(self, local: str) -> None:
        self._pair_timers.pop(local, None)
        if self.record is None or self.record.state_of(local, self.remote) != PENDING:
            return
        self.record.set_pair(local, self.remote, INVALID, DIALBACK, self.ctx.clock.seconds(), LOCAL)
        self.timed_out.add(local)
        log.info("No dialback answer for {local} -> {remote} within {timeout} s", local=local,
                 remote=self.remote, timeout=self.pair_timeout)
        self.owner.pair_result(self, local, TIMEOUT, "remote-server-timeout",
                               f"{self.remote} did not answer dialback for {local} "
                               f"within {self.pair_timeout:g} s")

    def _cancel_pair_timer(self, local: str) -> None:
        timer = self._pair_timers.pop(local, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _auth_timeout(self) -> None:
        self._timer = None
        if not self.record.authenticated:
            self.io.fail("connection-timeout", "authentication did not complete in time")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def close(self) -> None:
        if self.io is not None:
            self.io.close()

    def keep_queue(self) -> None:
        """A liveness close is no failure of delivery: like an operator's
        close, the destination keeps its queue and connects again."""
        keep = getattr(self.owner, "keep_queue_on_close", None)
        if keep is not None:
            keep(self)

    def disconnected(self, reason) -> None:
        super().disconnected(reason)
        self._cancel_timer()
        self._cancel_sm_timer()
        for local in list(self._pair_timers):
            self._cancel_pair_timer(local)
        if self.dialback is not None:
            self.dialback.close()
        if self.verify_channel is not None:
            self.verify_channel.lost()
        sm = self.sm
        acking = sm is not None and (sm.counting or self._resuming is not None)
        self._sm_keep_token()
        lost = self.sm_lost()
        if acking:  # a stream with acks: a lost transport means try again
            self.owner.sm_requeue(self, lost, sm)
        self.detach()
        self.owner.stream_closed(self)
