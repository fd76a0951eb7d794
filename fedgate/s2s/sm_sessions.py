"""XEP-0198 resumption state kept by the receiving entity (see
:mod:`fedgate.s2s.sm`): the sessions a dropped stream leaves behind, each
bound to the remote domain and the pairs that authenticated it, and what
a bidi stream had sent unacknowledged, held for the peer's ``<resume/>``."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.logger import Logger

log = Logger(namespace="fedgate.s2s.sm")


@dataclass
class Session:
    """What a resumable session leaves behind when its connection drops.

    On a bidirectional stream (XEP-0288) the receiving entity sends too, but
    only the initiating entity may ask to resume (XEP-0198 5): what we sent
    and the peer never acknowledged waits here (``unacked``, numbered from
    ``acked``) for the peer's ``<resume h/>``, which says how much of it the
    peer handled; the rest goes out again on the resumed stream.  If no
    resumption comes within the session's lifetime it goes back to the
    sender (XEP-0198 4: "before the session state is discarded ...")."""

    id: str
    remote: str
    pairs: frozenset
    handled: int
    expires: float
    #: our side, on a bidi stream: the peer's last ack, and what it had not
    #: acknowledged as (stanza, routed), held while the transport dropped
    acked: int = 0
    unacked: tuple = ()
    #: how many we had sent beyond ``acked`` (held or not): a ``<resume h/>``
    #: beyond ``acked + sent`` is handled-count-too-high (XEP-0198 6)
    sent: int = 0


class ResumeStore:
    """The receiving side's resumable sessions, by id, each bound to its
    remote domain and pairs, each forgotten after ``resume_timeout``.  It
    also carries the delivery hooks the sender registers (acks and
    unacknowledged stanzas of streams the sender does not own).  Stanzas a
    forgotten session still held go back through ``requeue``."""

    def __init__(self, clock, settings, max_sessions: int = 10000):
        self.clock = clock
        self.settings = settings
        self.max_sessions = max_sessions
        self.sessions: dict[str, Session] = {}
        #: acked(remote, count) and requeue(remote, stanzas): the sender's
        self.acked = lambda remote, count: None
        self.requeue = lambda remote, stanzas: None
        self._timer = None
        #: resumable sessions whose stream is still up, by id: the stream's
        #: hand_over() -> Session (a <resume/> for one of them means the
        #: peer saw a drop we have not seen yet: XEP-0198 5, 'conflict')
        self.live: dict = {}

    def keep(self, session: Session) -> None:
        self._expire()
        if len(self.sessions) >= self.max_sessions:
            self._forget(next(iter(self.sessions)))  # the oldest goes
        self.sessions[session.id] = session
        if session.unacked:
            self._schedule()

    def take(self, previd: str, remote: str | None, pairs) -> Session | None:
        """The session ``previd`` if the stream asking for it authenticated
        the same remote domain and one of its pairs; None otherwise (unknown,
        expired, or someone else's: the id is not given away either way)."""
        self._expire()
        session = self.sessions.get(previd)
        live = self.live.get(previd) if session is None else None
        if live is not None:
            session = live.sm_session()
        if session is None or remote is None or session.remote != remote:
            return None
        if not set(pairs) or not set(pairs) <= session.pairs:
            return None
        if live is not None:
            # the old stream is still up here: it ends with 'conflict' and
            # hands its session over (what it sent unacknowledged included)
            return live.sm_hand_over()
        return self.sessions.pop(previd)

    def release(self) -> None:
        """Shutting down: every held stanza goes back to the sender now."""
        for key in list(self.sessions):
            self._forget(key)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def held(self) -> int:
        """Stanzas held for a resumption."""
        return sum(1 for s in self.sessions.values() for _, routed in s.unacked if routed)

    def _forget(self, key: str) -> None:
        session = self.sessions.pop(key)
        if session.unacked:
            log.info("Stream of {remote} not resumed: {count} stanzas it never acknowledged go "
                     "out again", remote=session.remote, count=len(session.unacked))
            self.requeue(session.remote, [stanza for stanza, routed in session.unacked if routed])

    def _expire(self) -> None:
        now = self.clock.seconds()
        for key in [k for k, s in self.sessions.items() if s.expires <= now]:
            self._forget(key)

    def _schedule(self) -> None:
        """One timer, for the earliest session that holds stanzas."""
        due = min((s.expires for s in self.sessions.values() if s.unacked), default=None)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if due is not None:
            self._timer = self.clock.callLater(max(0.0, due - self.clock.seconds()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._expire()
        self._schedule()
