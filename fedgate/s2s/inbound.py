"""Inbound S2S streams: the Receiving and the Authoritative Server roles.

States, and every move between them (:data:`TRANSITIONS`)::

    AWAIT_HEADER  --header----> OPEN           answered with our header (and features)
    AWAIT_HEADER  --tls-------> TLS_HANDSHAKE  Direct TLS (XEP-0368): TLS from the first byte
    OPEN          --starttls--> TLS_HANDSHAKE  <proceed/> sent, TLS starts, the stream restarts
    TLS_HANDSHAKE --header----> SECURE         the header over TLS
    OPEN, SECURE  --sasl------> SASL_RESTART   <success/> sent, the stream restarts
    SASL_RESTART  --header----> AUTHENTICATED  the header after SASL
    (any)         --lost------> CLOSED

STARTTLS is offered and taken only in OPEN; SASL EXTERNAL only before it
succeeded (OPEN or SECURE, over TLS).  In every open state (OPEN, SECURE,
AUTHENTICATED) the peer may ask us to verify keys (``<db:result>``,
Receiving Server), ask us to vouch for our own keys (``<db:verify>``,
Authoritative Server), ask for bidi (XEP-0288, :mod:`fedgate.s2s.bidi`), and
send stanzas over the pairs that became valid (the receive path of
:mod:`fedgate.s2s.paired`, shared with outbound streams).

With TLS: STARTTLS is offered before any authentication (required when the
peer's policy says so, and then alone); after the TLS restart, SASL EXTERNAL
is offered when the peer's certificate is valid for the stream's 'from'
(XEP-0178), and dialback stays available for further domain pairs; a
dialback request over TLS whose certificate is valid for the originating
domain is accepted without calling back (XEP-0344).

A dialback failure answers that one request (XEP-0220 section 2.4) and never
closes a stream that carries other pairs.  Verification happens over a
separate connection (the verifier), never over this one, and only answers to
requests made here are accepted.

XEP-0198 as the receiving entity: we accept ``<enable/>`` and ``<resume/>``
(never send them).  On a bidi stream we send too, and only the peer may
resume (XEP-0198 5: the initiating entity sends ``<resume/>``): when the
transport drops, what the peer had not acknowledged waits in the resumable
session; the ``h`` of the peer's ``<resume/>`` says how much of it arrived
(delivered), and the rest goes out again on the resumed stream, so nothing
is lost or sent twice.  Not resumed within the session's lifetime (or
not resumable, or closed cleanly, when the last ack made the count exact),
it goes back to the sender's queue.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.words.xish import domish
from zope.interface import implementer

from fedgate.logsafe import short, throttled
from fedgate.domain import InvalidDomain, normalize_domain
from fedgate.jid import domain_part
from fedgate.s2s import dialback
from fedgate.s2s.bidi import Bidi
from fedgate.s2s.context import S2SContext
from fedgate.s2s.dialback import Authoritative, StreamDialback
from fedgate.s2s.paired import PairedStream
from fedgate.s2s.pairs import INBOUND, PENDING, REMOTE, VALID, ConnectionRecord
from fedgate.s2s.policy_check import SASL_EXTERNAL, sasl_external_offer
from fedgate.s2s import sm as xep0198
from fedgate.stream.sasl import decode_external, sasl_failure, sasl_mechanisms
from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StreamFailure
from fedgate.stream.interfaces import IStreamHandler
from fedgate.stream.parser import StreamHeader
from fedgate.stream.protocol import new_stream_id
from fedgate.stream.states import Machine
from fedgate.tls.contexts import ALPN_S2S

log = Logger(namespace="fedgate.s2s.inbound")

AWAIT_HEADER = "await-header"
OPEN = "open"
TLS_HANDSHAKE = "tls-handshake"
SECURE = "secure"
SASL_RESTART = "sasl-restart"
AUTHENTICATED = "authenticated"
CLOSED = "closed"

TRANSITIONS = {
    (AWAIT_HEADER, "header"): OPEN,
    (AWAIT_HEADER, "tls"): TLS_HANDSHAKE,
    (OPEN, "starttls"): TLS_HANDSHAKE,
    (TLS_HANDSHAKE, "header"): SECURE,
    (OPEN, "sasl"): SASL_RESTART,
    (SECURE, "sasl"): SASL_RESTART,
    (SASL_RESTART, "header"): AUTHENTICATED,
    **{(state, "lost"): CLOSED for state in (AWAIT_HEADER, OPEN, TLS_HANDSHAKE, SECURE,
                                             SASL_RESTART, AUTHENTICATED)},
}
#: states in which the stream is open (our header answered the peer's)
OPEN_STATES = frozenset({OPEN, SECURE, AUTHENTICATED})


def check_version(header: StreamHeader) -> bool:
    """True for an XMPP 1.x stream, False for a pre-1.0 one; raises for others."""
    version = header.get("version")
    if version is None:
        return False
    major, _, minor = version.partition(".")
    if not major.isdigit() or (minor and not minor.isdigit()):
        raise StreamFailure("unsupported-version", f"cannot parse version {version!r}")
    if int(major) == 1:
        return True
    if int(major) == 0:
        return False
    raise StreamFailure("unsupported-version", "only XMPP 1.0 is supported")


@implementer(IStreamHandler)
class InboundS2S(PairedStream):
    """The handler of one inbound S2S connection."""

    def __init__(self, ctx: S2SContext, direct_tls: bool = False):
        self.ctx = ctx
        self.direct_tls = direct_tls
        self.io = None
        self.stream_id: str | None = None
        self.record: ConnectionRecord | None = None
        self._to: str | None = None
        self._from: str | None = None
        self.machine = Machine("InboundS2S", TRANSITIONS, AWAIT_HEADER)
        self.dialback: StreamDialback | None = None
        self.authoritative = Authoritative(ctx)
        self.bidi = Bidi(self)
        self._timer = None
        #: a pair proved by SASL on a bidi stream, announced as a route once
        #: the peer restarted the stream
        self._announce_after_restart = False

    @property
    def state(self) -> str:
        return self.machine.state

    # -- stream lifecycle -------------------------------------------------
    def connected(self, io) -> None:
        self.attach(io, ConnectionRecord(INBOUND, io.peer, self.ctx.clock.seconds()))
        self.dialback = StreamDialback(self)
        self._timer = self.ctx.clock.callLater(self.ctx.auth_timeout, self._auth_timeout)
        if self.direct_tls:
            # XEP-0368: TLS from the first byte; SNI picks the certificate.
            default = sorted(self.ctx.local_domains)[0]
            self.machine.fire("tls")
            io.start_tls(self.ctx.tls.server_creator(default, ALPN_S2S))

    @property
    def dialback_stream_id(self) -> str | None:
        return self.stream_id

    def error_header(self) -> dict:
        return {"id": self.stream_id or new_stream_id(), "from": self._to, "version": "1.0"}

    def header_received(self, header: StreamHeader) -> None:
        if header.default_ns != ns.SERVER:
            raise StreamFailure("invalid-namespace", "S2S streams use jabber:server")
        is_v1 = check_version(header)
        to = self._header_domain(header.get("to"), "host-unknown")
        sender = self._header_domain(header.get("from"), "invalid-from")
        restarted = self.stream_id is not None  # a header came before this one
        if restarted and (to != self._to or sender != self._from):
            raise StreamFailure("improper-addressing", "stream addresses changed on restart")
        if to is None:
            if ns.DIALBACK not in header.namespaces.values():
                raise StreamFailure("host-unknown", "no 'to' on the stream header")
        elif to not in self.ctx.local_domains:
            raise StreamFailure("host-unknown", f"{to} is not served here")
        self._to, self._from = to, sender
        if sender is not None and self.ctx.is_blocked(sender):
            raise StreamFailure("policy-violation", self.ctx.policy.why_blocked(sender))
        if sender is not None:
            limit = self.ctx.policy.for_peer(sender).max_stanza_bytes
            if limit:
                self.io.tighten_stanza_limit(limit)
        self.stream_id = new_stream_id()
        self.machine.fire("header")
        attrs = {"id": self.stream_id, "from": to, "to": sender}
        if is_v1:
            attrs["version"] = "1.0"
            self.io.open_stream(attrs, self._features())
        else:
            self.io.open_stream(attrs)
        if self._announce_after_restart:
            self._announce_after_restart = False
            if self.bidi.on and self.record.can_send(self._to, self._from):
                self.ctx.table.pair_changed(self._to, self._from, True)

    def _features(self) -> domish.Element:
        """What this stream offers now: STARTTLS first, then SASL EXTERNAL
        and dialback."""
        tls = self.io.tls
        extra = []
        if self.state == OPEN and tls is None and self.ctx.tls is not None:
            policy = self.ctx.policy.for_peer(self._from) if self._from else self.ctx.policy.default
            starttls = domish.Element((ns.TLS, "starttls"))
            if policy.requires_tls:
                starttls.addElement("required")
                features = domish.Element((ns.STREAMS, "features"))
                features.addChild(starttls)
                return features  # nothing else until the channel is encrypted
            extra.append(starttls)
        if self.state != AUTHENTICATED and sasl_external_offer(tls, self._from):
            extra.append(sasl_mechanisms(["EXTERNAL"]))
        bidi = self.bidi.feature()
        if bidi is not None:
            extra.append(bidi)
        # XEP-0198 on every open stream: after SASL on the restarted one,
        # and in the first features too, for dialback streams, which get no
        # restart after authentication (<enable/> waits for a valid pair).
        offer = self.sm.feature() if self.sm is not None else None
        if offer is not None:
            extra.append(offer)
        return dialback.features_element(extra)

    @staticmethod
    def _header_domain(value: str | None, condition: str) -> str | None:
        if value is None:
            return None
        try:
            return normalize_domain(value)
        except InvalidDomain:
            raise StreamFailure(condition, "malformed domain in stream header") from None

    def disconnected(self, reason) -> None:
        self.machine.fire("lost")
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.dialback is not None:
            self.dialback.close()
        self._sm_gone()
        self.detach()
        if self.record is not None:
            self._reverse_requests_failed()

    # -- XEP-0198: the receiving entity ----------------------------------------
    def _sm_pairs(self) -> tuple[str | None, frozenset]:
        """The remote domain authenticated here (None unless exactly one) and
        the valid pairs, which a resumption is bound to."""
        pairs = frozenset((p.local, p.remote) for p in self.record.valid_pairs())
        remotes = {remote for _, remote in pairs}
        return (remotes.pop() if len(remotes) == 1 else None), pairs

    def sm_enable(self, element) -> None:
        self.sm.accept_enable(element, self.record.authenticated)
        if self.sm.resumable and self.sm.id:
            self.ctx.sm.live[self.sm.id] = self

    def sm_session(self, hold: bool = True) -> xep0198.Session | None:
        """This stream's resumable session as it would be kept now."""
        sm = self.sm
        remote, pairs = self._sm_pairs()
        if sm is None or not (sm.enabled and sm.resumable and sm.id) or remote is None:
            return None
        return xep0198.Session(sm.id, remote, pairs, sm.inc.handled,
                               self.ctx.clock.seconds() + sm.settings.resume_timeout,
                               sm.out.acked, tuple(sm.out.unacked) if hold else (),
                               len(sm.out.unacked))

    def sm_hand_over(self) -> xep0198.Session:
        """The peer resumes this stream's session on a new one (it saw a
        drop we did not): the session moves there, this stream ends with
        'conflict' (XEP-0198 5)."""
        session = self.sm_session()
        self.ctx.sm.live.pop(session.id, None)
        self.sm.stop()
        log.info("{remote} resumed the session of a stream still up here: closing it",
                 remote=session.remote)
        self.io.fail("conflict", "the stream was resumed on another connection")
        return session

    def sm_resume(self, previd: str, h: int) -> None:
        remote, pairs = self._sm_pairs()
        session = None
        if self.record.authenticated and self.sm.state == xep0198.OFF:
            session = self.ctx.sm.take(previd, remote, pairs)
        if session is None:
            log.info("Refused to resume a stream management session for {remote} from {peer}",
                     remote=short(remote), peer=self.io.peer)
            self.sm.refuse_resume(self.record.authenticated)
            return
        handled = xep0198.distance(h, session.acked)
        if handled > max(session.sent, len(session.unacked)):
            # the peer says it handled more of ours than we ever sent it
            # (XEP-0198 6), whether or not the session holds any of it;
            # what it held goes back to the sender
            if session.unacked:
                self.ctx.sm.requeue(remote, [st for st, routed in session.unacked if routed])
            self.sm.failed = True
            self._sm_fail(xep0198.too_high_error(xep0198.HandledCountTooHigh(
                h, xep0198.add(session.acked, max(session.sent, len(session.unacked))))))
            return
        self.sm.accept_resume(session, h)
        self.ctx.sm.live[session.id] = self
        log.info("Resumed the stream of {remote} from {peer} at h={h}", remote=remote,
                 peer=self.io.peer, h=session.handled)
        if session.unacked:
            self._resend([st for st, routed in session.unacked[:handled] if routed],
                         [st for st, routed in session.unacked[handled:] if routed])

    def _resend(self, done, rest) -> None:
        """After a resumption: ``done`` arrived before the drop (delivered);
        ``rest`` goes out again on this stream, in order, where it may carry
        it (the sender's queue takes whatever it cannot)."""
        remote = self.record.remote_domain
        if done:
            self.ctx.sm.acked(remote, len(done))
        refused = []
        for stanza in rest:
            local, to = domain_part(stanza.sender or ""), domain_part(stanza.to or "")
            if refused or local is None or to is None or not self.record.can_send(local, to) \
                    or not self.write_stanza(local, to, stanza):
                refused.append(stanza)
        log.info("Resumed stream of {remote}: {done} of our unacknowledged stanzas had arrived, "
                 "{sent} sent again here, {queued} to the queue", remote=remote, done=len(done),
                 sent=len(rest) - len(refused), queued=len(refused))
        if refused:
            self.ctx.sm.requeue(remote, refused)

    def _sm_gone(self) -> None:
        """Keep a resumable session for ``sm_resume_timeout``.  What we sent
        here (bidi) and was not acknowledged waits in it for the peer's
        resumption if the transport dropped; after a clean close, or where
        the peer cannot resume, it goes back to the sender at once."""
        sm = self.sm
        if sm is None or self.record is None:
            return
        if sm.id is not None and self.ctx.sm.live.get(sm.id) is self:
            del self.ctx.sm.live[sm.id]
        remote, pairs = self._sm_pairs()
        resumable = sm.enabled and sm.resumable and remote is not None
        acked = sm.out.acked
        items = sm.stop()  # (stanza, routed), numbered from acked
        lost = [stanza for stanza, routed in items if routed]
        dropped = self.io is not None and not self.io.closing
        hold = tuple(items) if resumable and dropped and lost else ()
        if resumable:
            self.ctx.sm.keep(xep0198.Session(sm.id, remote, pairs, sm.inc.handled,
                                             self.ctx.clock.seconds() + sm.settings.resume_timeout,
                                             acked, hold, len(items)))
        if lost and not hold:
            self.ctx.sm.requeue(self.record.remote_domain, lost)

    def _reverse_requests_failed(self) -> None:
        """Reverse requests we made here can no longer succeed."""
        for pair in list(self.record.pairs.values()):
            if pair.origin != REMOTE and pair.state == PENDING:
                self.ctx.table.pair_changed(pair.local, pair.remote, False)

    def _forget_stream(self, keep: tuple[str, str] | None = None) -> None:
        """Before a stream restart (TLS, SASL): RFC 6120 5.4.3.3 and 6.4.6,
        the parties discard what they learnt from the old stream.  Every
        pair goes (but ``keep``, the one SASL has just proved), and
        verifications still running can no longer make a pair valid: they
        answer to a closed Receiving half, which ignores them."""
        old, self.dialback = self.dialback, StreamDialback(self)
        old.close()
        if self.sm is not None and self.sm.state != xep0198.OFF:
            # XEP-0198 state does not survive a restart either
            if self.sm.id is not None and self.ctx.sm.live.get(self.sm.id) is self:
                del self.ctx.sm.live[self.sm.id]
            lost = [stanza for stanza, routed in self.sm.restart() if routed]
            if lost:
                self.ctx.sm.requeue(self.record.remote_domain, lost)
        self._reverse_requests_failed()
        self.record.forget_pairs(keep)
        if keep is None:
            self.record.remote_domain = None
        if self._timer is None and not self.record.authenticated:
            # The authentication deadline had passed while pairs were valid:
            # the new stream gets one of its own.
            self._timer = self.ctx.clock.callLater(self.ctx.auth_timeout, self._auth_timeout)

    def _auth_timeout(self) -> None:
        self._timer = None
        if not self.record.authenticated and self.state != CLOSED:
            self.io.fail("connection-timeout", "no domain pair authenticated in time")

    # -- elements ---------------------------------------------------------
    def element_received(self, element: domish.Element) -> None:
        uri = element.uri
        if uri == ns.SERVER and element.name in ns.STANZA_NAMES:
            self._stanza(element)
        elif uri == ns.DIALBACK and element.name == "result":
            if element.getAttribute("type"):
                self.dialback.originating.answer(element)  # only answers to our own (reverse) requests
            else:
                self.dialback.receiving.request(element)
        elif uri == xep0198.NS and self.sm is not None:
            self.sm.element(element, self)
        elif uri == ns.BIDI and element.name == "bidi" and self.ctx.bidi:
            self.bidi.requested()
        elif uri == ns.DIALBACK and element.name == "verify":
            self.authoritative.verify(self.io, element)
        elif uri == ns.TLS and element.name == "starttls":
            self._starttls()
        elif uri == ns.SASL and element.name == "auth":
            self._sasl_auth(element)
        elif uri == ns.STREAMS and element.name == "error":
            # Never answered with a stream error of our own (RFC 6120
            # 4.9.1.1); the peer's </stream:stream> follows and closes.
            log.info("Stream error {condition} from {peer}", peer=self.io.peer,
                     condition=short(next((c.name for c in element.elements()
                                           if c.uri == ns.STREAM_ERRORS and c.name != "text"),
                                          "undefined-condition")))
        else:
            raise StreamFailure("unsupported-stanza-type", f"unexpected element {element.name}")

    def _starttls(self) -> None:
        if self.ctx.tls is None or self.state != OPEN:
            self.io.write(f"<failure xmlns='{ns.TLS}'/>")
            self.io.close()
            return
        self.io.write(f"<proceed xmlns='{ns.TLS}'/>")
        self.bidi.forget()  # a bidi request made before TLS does not survive it
        self.machine.fire("starttls")
        self._forget_stream()
        default = self._to or sorted(self.ctx.local_domains)[0]
        self.io.start_tls(self.ctx.tls.server_creator(default))
        self.io.restart()

    def _sasl_auth(self, element: domish.Element) -> None:
        policy = self.ctx.policy.for_peer(self._from) if self._from else self.ctx.policy.default
        condition = None
        if element.getAttribute("mechanism") != "EXTERNAL":
            condition = "invalid-mechanism"
        elif self.io.tls is None:
            condition = "encryption-required"
        elif self.state not in (OPEN, SECURE) or not sasl_external_offer(self.io.tls, self._from) or not self._to:
            condition = "not-authorized"
        else:
            authzid = decode_external(str(element))
            if authzid is None:
                condition = "incorrect-encoding"
            elif authzid not in ("", self._from):
                condition = "invalid-authzid"
        if condition is not None:
            throttled(log, self.io).info("SASL EXTERNAL refused ({condition}) for {remote} from {peer}",
                                         condition=condition, remote=short(self._from), peer=self.io.peer)
            self.io.write(sasl_failure(condition))
            if policy.requires_certificate:
                self.io.close()  # no dialback fallback under the certificate policy
            return
        self.machine.fire("sasl")
        self.record.remote_domain = self._from
        self.record.set_pair(self._to, self._from, VALID, SASL_EXTERNAL, self.ctx.clock.seconds())
        self.io.authenticated()
        # On a bidi stream the pair carries our stanzas too, but only once
        # the peer has restarted the stream after <success/> (anything we
        # wrote before would be discarded with the old stream): announced
        # when the new header is answered.
        self._announce_after_restart = self.bidi.on
        log.info("Authenticated {local} <- {remote} by SASL EXTERNAL from {peer}",
                 local=self._to, remote=self._from, peer=self.io.peer)
        self.io.write(f"<success xmlns='{ns.SASL}'/>")
        self._forget_stream(keep=(self._to, self._from))
        self.io.restart()

    # -- a route for our stanzas once bidi is on (write_stanza: PairedStream) ----
    def is_writable(self) -> bool:
        """Not between <success/> and the peer's restart: a stanza written
        then would go with the old stream (the sender holds it until the
        pair is announced again)."""
        return self.state != SASL_RESTART and super().is_writable()

    def authenticate_reverse(self, local: str, remote: str) -> bool:
        """Ask the peer to accept ``local`` in the reverse direction; only
        towards a domain the peer proved here (XEP-0288)."""
        if not self.bidi.may_prove_reverse(remote):
            return False
        if self.record.state_of(local, remote) in (PENDING, VALID):
            return True
        self.dialback.originating.ask(local, remote)
        return True

    def _stanza(self, stanza: domish.Element) -> None:
        if not self.record.authenticated:
            raise StreamFailure("not-authorized", "no domain pair is authenticated on this stream")
        self.receive_stanza(stanza)
