"""XEP-0198 stream management on S2S streams, without a transport.

One :class:`StreamManagement` per stream.  XEP-0198 counts per direction on
one stream, and one ``<enable/>`` (sent by the initiating entity) turns on
both directions at once: each side keeps an :class:`Outgoing` part (the
stanzas it sent, numbered modulo 2^32, and those the peer has not yet
acknowledged) and an :class:`Incoming` part (how many stanzas it handled,
the ``h`` it answers an ``<r/>`` with).  On a plain S2S stream only one of
the two moves (the outbound side sends, the inbound side handles); on a
bidirectional stream (XEP-0288) both do, with the same single enable.

States, and every move (:data:`TRANSITIONS`)::

    OFF       --enable----> ENABLING  we sent <enable/> (counting starts now, XEP-0198 4)
    OFF       --resume----> RESUMING  we sent <resume/>; nothing is sent until the answer
    OFF       --enabled---> ENABLED   the peer's <enable/> accepted (receiving entity)
    OFF       --resumed---> ENABLED   the peer's <resume/> accepted (receiving entity)
    ENABLING  --enabled---> ENABLED   <enabled/> came
    ENABLING  --failed----> OFF       <failed/> came: acks are off on this stream
    RESUMING  --resumed---> ENABLED   <resumed/> came
    RESUMING  --failed----> OFF       <failed/> came: the caller falls back to <enable/>
    (any)     --stop------> STOPPED   the connection is gone

The receiving entity accepts ``<enable/>`` and ``<resume/>`` only once a
domain pair is valid on the stream (XEP-0198 counts XEP-0220 as
authentication), and answers too early with ``<failed><unexpected-request/>``.
A resumable session is bound to the remote domain that authenticated it and
to its domain pairs (:class:`ResumeStore`): a ``previd`` presented on a
stream authenticated by another domain is refused as if unknown, with no
``h`` (XEP-0198 section 7 warns that a stolen id hijacks a stream).

An ``h`` that acknowledges more than was sent is the ``undefined-condition``
stream error with ``<handled-count-too-high/>`` (XEP-0198 section 6).

Closing cleanly (:meth:`StreamManagement.linger`, called by the stream as a
close of ours begins): we send ``<a/>`` with what we handled (XEP-0198 4
recommends it before a graceful close, so that the peer does not send again
what we had), and, while anything of ours is unacknowledged, a last ``<r/>``;
the close waits for the peer's ``<a/>`` at most ``close_wait`` seconds, so
that what the peer handled counts as delivered instead of going out again.
Every close of the stream, ours or answering the peer's, ends with an
``<a/>`` if we handled anything since the last one we sent
(:meth:`StreamManagement.last_words`).
"""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass

from twisted.logger import Logger
from twisted.words.xish import domish

from fedgate.stream.errors import StreamFailure, stream_error_element
from fedgate.stream.serialize import escape_attr as _attr
from fedgate.stream.states import Machine
from fedgate.s2s.sm_sessions import ResumeStore, Session

log = Logger(namespace="fedgate.s2s.sm")

NS = "urn:xmpp:sm:3"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
MOD = 2 ** 32

OFF, ENABLING, RESUMING, ENABLED, STOPPED = "off", "enabling", "resuming", "enabled", "stopped"
TRANSITIONS = {
    (OFF, "enable"): ENABLING,
    (OFF, "resume"): RESUMING,
    (OFF, "enabled"): ENABLED,
    (OFF, "resumed"): ENABLED,
    (ENABLING, "enabled"): ENABLED,
    (ENABLING, "failed"): OFF,
    (RESUMING, "resumed"): ENABLED,
    (RESUMING, "failed"): OFF,
    **{(state, "stop"): STOPPED for state in (OFF, ENABLING, RESUMING, ENABLED, STOPPED)},
}


@dataclass(frozen=True)
class SMSettings:
    """``s2s.stream_management`` and the ``s2s.sm_*`` keys."""

    enabled: bool = True
    #: ask for an ack after this many stanzas (unless an <r/> is still
    #: unanswered), and at the end of every burst ...
    ack_every: int = 10
    #: ... or this many seconds after the oldest unacknowledged one
    ack_interval: float = 5.0
    #: seconds a dropped stream stays resumable (0: no resumption)
    resume_timeout: float = 60.0
    #: unacknowledged stanzas on one stream; past it the stream takes no more
    #: (they wait in the destination's queue)
    max_unacked: int = 5000
    #: seconds a clean close of ours waits for the answer to its final <r/>
    close_wait: float = 1.0


def add(h: int, n: int) -> int:
    """``h + n`` in XEP-0198's arithmetic (modulo 2^32)."""
    return (h + n) % MOD


def distance(new: int, old: int) -> int:
    """How many stanzas ``new`` acknowledges beyond ``old`` (modulo 2^32)."""
    return (new - old) % MOD


def parse_h(element: domish.Element) -> int:
    """The ``h`` attribute: an xs:unsignedInt, or the stream error the
    schema violation deserves."""
    raw = element.getAttribute("h")
    if raw is None or not raw.isdigit() or int(raw) >= MOD:
        raise StreamFailure("invalid-xml", f"<{element.name}/> needs an 'h' between 0 and 2^32-1")
    return int(raw)


class HandledCountTooHigh(Exception):
    def __init__(self, h: int, send_count: int):
        super().__init__(f"You acknowledged {h} stanzas, but I only sent you {send_count} so far.")
        self.h = h
        self.send_count = send_count


def too_high_error(error: HandledCountTooHigh) -> domish.Element:
    """The stream error of XEP-0198 section 6."""
    element = stream_error_element("undefined-condition", str(error))
    app = element.addElement((NS, "handled-count-too-high"))
    app["h"] = str(error.h)
    app["send-count"] = str(error.send_count)
    return element


class Outgoing:
    """The stanzas we sent, numbered from ``acked`` (the peer's last ``h``)."""

    def __init__(self, acked: int = 0):
        self.acked = acked
        #: (stanza, routed) not yet acknowledged, oldest first
        self.unacked: deque = deque()
        #: how many of them are our own (routed False: pings), so that the
        #: usual ack, of routed stanzas only, needs no look at each one
        self.own = 0

    @property
    def sent(self) -> int:
        """Our counter: stanzas sent on this session, modulo 2^32."""
        return add(self.acked, len(self.unacked))

    def append(self, item, own: bool = False) -> None:
        self.unacked.append(item)
        if own:
            self.own += 1

    def own_in(self, items) -> int:
        """How many of ``items`` (just acknowledged) were our own."""
        if not self.own:
            return 0
        count = sum(1 for _, routed in items if not routed)
        self.own -= count
        return count

    def ack(self, h: int) -> list:
        """The peer handled everything up to ``h``: what that acknowledges."""
        n = distance(h, self.acked)
        if n > len(self.unacked):
            raise HandledCountTooHigh(h, self.sent)
        unacked = self.unacked
        if n == len(unacked):
            done = list(unacked)
            unacked.clear()
        else:
            popleft = unacked.popleft
            done = [popleft() for _ in range(n)]
        self.acked = h
        return done


class Incoming:
    """How many stanzas we handled from the peer, modulo 2^32."""

    def __init__(self, handled: int = 0):
        self.handled = handled

    def stanza(self) -> None:
        self.handled = add(self.handled, 1)


class StreamManagement:
    """XEP-0198 on one stream.  ``write(text)`` writes a nonza, ``fail(element)``
    ends the stream with a stream error; ``on_acked(items)`` hears each
    acknowledged (stanza, routed) item."""

    def __init__(self, clock, settings: SMSettings, write, fail, on_acked=lambda items: None):
        self.clock = clock
        self.settings = settings
        self._write = write
        self._fail = fail
        self.on_acked = on_acked
        self._reset()

    def restart(self) -> list:
        """A stream restart (TLS, SASL): XEP-0198 state does not survive it
        (RFC 6120 discards what the old stream negotiated).  What was sent
        and never acknowledged; the same object starts afresh (the stream's
        observer stays)."""
        items = self.stop()
        self._reset()
        return items

    def _reset(self) -> None:
        self.machine = Machine("sm", TRANSITIONS, OFF)
        #: read for every stanza written
        self.max_unacked = self.settings.max_unacked
        self._ack_every = self.settings.ack_every
        #: an <r/> of ours not answered yet: the count of ack_every asks
        #: again only once an <a/> came (the end of a burst always asks)
        self._asked = False
        self.counting = False
        self.out = Outgoing()
        self.inc = Incoming()
        #: the session id (given or taken), and whether it may be resumed
        self.id: str | None = None
        self.resumable = False
        self.max: int | None = None
        self._since_request = 0
        self._timer = None
        self._burst = None
        #: the h of the last <a/> we sent, and whether a stream error ended
        #: the stream (then no <a/> follows it)
        self._answered = 0
        self.failed = False
        #: a clean close waiting for the answer to its final <r/>
        self._closing = None
        self._close_timer = None
        self.failed_h: int | None = None

    @property
    def state(self) -> str:
        return self.machine.state

    def _fire(self, event: str) -> None:
        self.machine.fire(event)
        #: are stanzas counted (from our <enable/> or the peer's)?  An
        #: attribute, read for every stanza written
        self.counting = self.machine.state in (ENABLING, ENABLED)

    @property
    def enabled(self) -> bool:
        return self.state == ENABLED

    def writable(self) -> bool:
        """May another stanza go out (fewer than ``max_unacked`` unacknowledged)?"""
        return not self.counting or len(self.out.unacked) < self.settings.max_unacked

    # -- initiating entity ---------------------------------------------------
    @staticmethod
    def offered(features: domish.Element | None) -> bool:
        return features is not None and any(c.uri == NS and c.name == "sm" for c in features.elements())

    def enable(self, resume: bool) -> None:
        self._fire("enable")
        self._write(f"<enable xmlns='{NS}'" + (" resume='true'" if resume else "") + "/>")

    def resume(self, previd: str, handled: int, acked: int) -> None:
        """Ask to resume ``previd``; we handled ``handled`` of the peer's
        stanzas, and the peer had acknowledged ``acked`` of ours."""
        self._fire("resume")
        self.id = previd
        self.inc = Incoming(handled)
        self._answered = handled
        self.out = Outgoing(acked)
        self._write(f"<resume xmlns='{NS}' previd='{_attr(previd)}' h='{handled}'/>")

    # -- receiving entity ---------------------------------------------------
    def feature(self) -> domish.Element | None:
        if self.settings.enabled and self.state == OFF:
            return domish.Element((NS, "sm"))
        return None

    def accept_enable(self, element: domish.Element, authenticated: bool) -> None:
        if not authenticated:
            self._write(_failed("unexpected-request"))
            return
        if self.state != OFF:
            raise StreamFailure("policy-violation", "stream management is enabled once per stream")
        self._fire("enabled")
        self.resumable = (element.getAttribute("resume") in ("true", "1")
                          and self.settings.resume_timeout > 0)
        attrs = ""
        if self.resumable:
            self.id = secrets.token_urlsafe(24)
            self.max = int(self.settings.resume_timeout)
            attrs = f" id='{self.id}' resume='true' max='{self.max}'"
        self._write(f"<enabled xmlns='{NS}'{attrs}/>")

    def accept_resume(self, session: Session, h: int) -> None:
        """Resume ``session`` (the store checked it): our counter of handled
        stanzas continues, and ``h`` acknowledges what we had sent."""
        self._fire("resumed")
        self.id, self.resumable, self.max = session.id, True, int(self.settings.resume_timeout)
        self.inc = Incoming(session.handled)
        self._answered = session.handled
        self.out = Outgoing(h)
        self._write(f"<resumed xmlns='{NS}' previd='{_attr(session.id)}' h='{session.handled}'/>")

    def refuse_resume(self, authenticated: bool) -> None:
        self._write(_failed("item-not-found" if authenticated else "unexpected-request"))

    # -- both --------------------------------------------------------------
    def element(self, element: domish.Element, role) -> None:
        """An element in the SM namespace; ``role`` answers enable and resume."""
        name = element.name
        if name == "r":
            if not self.enabled:
                raise StreamFailure("unsupported-stanza-type", "<r/> without stream management")
            self.answer()
        elif name == "a":
            if not self.counting:
                raise StreamFailure("unsupported-stanza-type", "<a/> without stream management")
            self.ack(parse_h(element))
        elif name == "enabled" and self.state == ENABLING:
            self._fire("enabled")
            self.resumable = element.getAttribute("resume") in ("true", "1") and bool(element.getAttribute("id"))
            self.id = element.getAttribute("id") if self.resumable else None
            raw_max = element.getAttribute("max") or ""
            self.max = int(raw_max) if raw_max.isdigit() else None
        elif name == "failed" and self.state in (ENABLING, RESUMING):
            resuming = self.state == RESUMING
            #: a failed resumption may still say what the peer had handled
            self.failed_h = parse_h(element) if element.getAttribute("h") is not None else None
            self._fire("failed")
            self._stop_timer()
            condition = next((c.name for c in element.elements() if c.uri == STANZAS), "undefined-condition")
            items = list(self.out.unacked)
            self.out.unacked.clear()
            self.out.own = 0
            self.resumable = False
            role.sm_failed(condition, items, resuming)
        elif name == "resumed" and self.state == RESUMING:
            if element.getAttribute("previd") != self.id:
                raise StreamFailure("invalid-xml", "<resumed/> for another session")
            h = parse_h(element)
            self._fire("resumed")
            self.resumable = True
            role.sm_resumed(h)
        elif name == "enable":
            role.sm_enable(element)
        elif name == "resume":
            previd = element.getAttribute("previd")
            if not previd:
                raise StreamFailure("invalid-xml", "<resume/> needs a 'previd'")
            role.sm_resume(previd, parse_h(element))
        else:
            raise StreamFailure("unsupported-stanza-type", f"unexpected <{name}/> in {NS}")

    def ack(self, h: int) -> None:
        self._asked = False
        try:
            done = self.out.ack(h)
        except HandledCountTooHigh as error:
            log.info("Peer acknowledged {h} stanzas of {sent}", h=error.h, sent=error.send_count)
            self._stop_timer()
            self.failed = True
            self._fail(too_high_error(error))
            return
        if not self.out.unacked:
            self._stop_timer()
        if done:
            self.on_acked(done)
        if self._closing is not None and not self.out.unacked:
            self._close_done()

    def answer(self) -> None:
        """Send <a/> with what we handled (an <r/> came, or we close)."""
        self._answered = self.inc.handled
        self._write(f"<a xmlns='{NS}' h='{self.inc.handled}'/>")

    # -- closing cleanly -----------------------------------------------------
    def linger(self, done) -> bool:
        """A clean close of ours begins: tell the peer what we handled, and
        if it has not acknowledged all we sent, ask once more; True if the
        close waits (``done()`` comes with the answer, or after
        ``close_wait`` seconds at most), False to close now."""
        if not self.enabled or self.failed:
            return False
        self.last_words()
        if not self.out.unacked or self.settings.close_wait <= 0:
            return False
        self._closing = done
        self.request()
        self._close_timer = self.clock.callLater(self.settings.close_wait, self._close_waited)
        return True

    def _close_waited(self) -> None:
        self._close_timer = None
        if self._closing is not None:
            log.info("No answer to our last <r/> within {wait} s: {count} stanzas unacknowledged",
                     wait=self.settings.close_wait, count=len(self.out.unacked))
        self._close_done()

    def _close_done(self) -> None:
        done, self._closing = self._closing, None
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        if done is not None:
            done()

    def last_words(self) -> None:
        """Just before our </stream:stream>: an <a/> if we handled anything
        since the last one we sent (never after a stream error of ours)."""
        if self.enabled and not self.failed and self._answered != self.inc.handled:
            self.answer()

    def sent(self, stanza, routed: bool = True) -> None:
        """A stanza went out on the stream: one the sender routed, or our
        own (a ping).  Called for every stanza written: kept cheap."""
        if not self.counting:
            return
        if routed:
            self.out.unacked.append((stanza, True))
        else:
            self.out.append((stanza, False), own=True)
        count = self._since_request = self._since_request + 1
        if count >= self._ack_every and not self._asked:
            self.request()
        elif self._burst is None:
            self._burst = self.clock.callLater(0, self._burst_end)
        if self._timer is None:
            self._timer = self.clock.callLater(self.settings.ack_interval, self._interval)

    def _burst_end(self) -> None:
        """The reactor turn that wrote stanzas is over: one <r/> for what it
        wrote, so that a quiet stream's stanzas are not left unacknowledged
        (their fate unknown) until the interval passes."""
        self._burst = None
        if self.counting and self._since_request:
            self.request()

    def handled(self) -> None:
        """We handled a stanza from the peer."""
        if self.enabled:
            self.inc.stanza()

    def request(self) -> None:
        """Send <r/>; the interval timer, if running, asks again later."""
        self._since_request = 0
        self._asked = True
        self._write(_R)

    def _interval(self) -> None:
        """``ack_interval`` after the oldest unacknowledged stanza (or the
        last request): ask (again) while anything is unacknowledged."""
        self._timer = None
        if self.counting and self.out.unacked:
            self.request()
            self._timer = self.clock.callLater(self.settings.ack_interval, self._interval)

    def _stop_timer(self) -> None:
        for timer in (self._timer, self._burst):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._burst = None

    def stop(self) -> list:
        """The connection is gone: what was sent and never acknowledged."""
        self._stop_timer()
        # a close waiting for our last ack goes on now (a stream restart
        # must not leave it waiting with no bound)
        self._close_done()
        self._fire("stop")
        items = list(self.out.unacked)
        self.out.unacked.clear()
        self.out.own = 0
        return items

    def describe(self) -> dict:
        """The admin API's view."""
        return {"enabled": self.enabled, "unacked": len(self.out.unacked),
                "resumable": self.resumable, "h_in": self.inc.handled, "h_out": self.out.sent}


_R = f"<r xmlns='{NS}'/>"


def _failed(condition: str) -> str:
    return f"<failed xmlns='{NS}'><{condition} xmlns='{STANZAS}'/></failed>"


NOT_ENABLED = {"enabled": False, "unacked": 0, "resumable": False, "h_in": 0, "h_out": 0}

__all__ = ["NS", "MOD", "SMSettings", "StreamManagement", "ResumeStore", "Session", "Outgoing",
           "Incoming", "HandledCountTooHigh", "add", "distance", "NOT_ENABLED"]
