"""Liveness of authenticated streams: notice a peer that vanished without
closing TCP, and close streams that carry nothing.

One :class:`Liveness` monitor watches one stream, with the clock injected
and no transport of its own: it reads the stream's ``last_received`` (any
bytes from the peer), hears of stanzas through :meth:`Liveness.stanza` and
of ping answers through :meth:`Liveness.answered`, and acts through the
stream interface.  Three bounds, all from :class:`LivenessSettings`:

- after ``ping_idle`` seconds without a byte from the peer, a stream that
  can send to the peer gets an XEP-0199 ping (from one of our domains to the
  remote one, over a pair valid for sending there); one that cannot (a plain
  inbound S2S stream) gets a whitespace keepalive, a single space, and
  relies on TCP keepalive to find a dead peer;
- a ping not answered within ``ping_timeout`` seconds, with nothing else
  heard from the peer meanwhile, means the peer is gone: ``on_dead`` (the
  roles close with ``connection-timeout`` and drop the connection);
- ``idle_close`` seconds without a stanza in either direction (pings,
  their answers and whitespace do not count; 0: never) close the stream
  cleanly through ``on_idle``; it reopens on demand.

A ping's answer comes back over whichever stream carries remote -> local:
the same one on a bidi stream, the peer's own inbound stream to us on a
plain outbound one.  So answers are matched by id in one
:class:`PingRegistry` per gateway, which the router asks first about every
iq result or error it routes.

States, and every move between them (:data:`TRANSITIONS`)::

    WATCHING --ping----> AWAITING   a ping went out; its answer is due
    AWAITING --alive---> WATCHING   the answer came, or bytes from the peer
    AWAITING --dead----> DONE       no answer in time
    WATCHING --idle----> DONE       no stanza for idle_close seconds
    (either) --stop----> DONE       the stream is gone

The monitor keeps one timer, set for the nearest deadline, and checks on
each firing what really happened since (bytes and stanzas only record a
time, so the hot paths cost one clock read).

TCP keepalive (:func:`tcp_keepalive`) is set on every S2S and component
socket, so a dead peer is found by the kernel too where we send nothing:
probes after ``ping_idle`` seconds idle, ``ping_timeout / 3`` apart, three
of them; on Linux ``TCP_USER_TIMEOUT`` bounds unacknowledged data to the
same ``ping_idle + ping_timeout``.
"""

from __future__ import annotations

import secrets
import socket
from dataclasses import dataclass
from typing import Callable

from twisted.logger import Logger
from twisted.words.xish import domish

from fedgate.stream.stanza import Stanza
from fedgate.jid import domain_of
from fedgate.domain import InvalidDomain
from fedgate.stream import namespaces as ns
from fedgate.stream.states import Machine

log = Logger(namespace="fedgate.stream.liveness")

#: every ping id we send starts with this
PING_PREFIX = "fg-ping-"
#: seconds a stream closed for a silent peer has to get its stream error out
#: (a peer that is alive but not answering reads why) before it is dropped
DEAD_GRACE = 1.0
#: probes TCP keepalive sends before the kernel gives up
KEEPALIVE_PROBES = 3

WATCHING, AWAITING, DONE = "watching", "awaiting", "done"

TRANSITIONS = {
    (WATCHING, "ping"): AWAITING,
    (AWAITING, "alive"): WATCHING,
    (AWAITING, "dead"): DONE,
    (WATCHING, "idle"): DONE,
    (WATCHING, "stop"): DONE,
    (AWAITING, "stop"): DONE,
}


@dataclass(frozen=True)
class LivenessSettings:
    """The bounds of one side (S2S, components); see the module docstring."""

    ping_idle: float = 60.0
    ping_timeout: float = 30.0
    #: seconds without a stanza before a clean close (0: never)
    idle_close: float = 600.0

    @property
    def keepalive_interval(self) -> float:
        return max(1.0, self.ping_timeout / KEEPALIVE_PROBES)


def is_keepalive(stanza: domish.Element) -> bool:
    """Is ``stanza`` a ping or the bare answer to one?  Such stanzas do not
    keep a stream from its idle close: an iq get whose only payload is a
    ping, an iq result without payload, or an error to one of our pings."""
    if stanza.name != "iq":
        return False
    kind = stanza.getAttribute("type")
    if kind == "error":
        return (stanza.getAttribute("id") or "").startswith(PING_PREFIX)
    if kind not in ("get", "result"):
        return False
    # Read the children through the DOM (a Stanza keeps its original bytes
    # for forwarding only while nothing asks to change it).
    element = stanza.element if isinstance(stanza, Stanza) else stanza
    children = [c for c in element.children if isinstance(c, domish.Element)]
    if kind == "get":
        return len(children) == 1 and children[0].uri == ns.PING and children[0].name == "ping"
    return not children  # a result


class PingRegistry:
    """Our pings in flight, by id, so that an answer arriving on any stream
    reaches the monitor that asked."""

    def __init__(self):
        self._waiting: dict[str, tuple["Liveness", str, str]] = {}

    def add(self, monitor: "Liveness", local: str, remote: str) -> str:
        ping_id = PING_PREFIX + secrets.token_urlsafe(12)
        self._waiting[ping_id] = (monitor, local, remote)
        return ping_id

    def forget(self, ping_id: str | None) -> None:
        if ping_id is not None:
            self._waiting.pop(ping_id, None)

    def answer(self, stanza: domish.Element) -> bool:
        """Take ``stanza`` if it answers one of our pings in flight (a result
        or an error, from the domain we pinged to the one we pinged from:
        either proves the peer alive).  True if it was one; it goes no
        further.  Anything else, a late answer included, is routed as usual
        (another fedgate's pings carry the same prefix)."""
        if stanza.getAttribute("type") not in ("result", "error"):
            return False
        ping_id = stanza.getAttribute("id") or ""
        waiting = self._waiting.get(ping_id) if ping_id.startswith(PING_PREFIX) else None
        if waiting is None:
            return False
        monitor, local, remote = waiting
        try:
            sender, to = domain_of(stanza.getAttribute("from") or ""), domain_of(stanza.getAttribute("to") or "")
        except InvalidDomain:
            return False
        if sender != remote or to != local:
            return False
        del self._waiting[ping_id]
        monitor.answered()
        return True

    def __len__(self) -> int:
        return len(self._waiting)


class Liveness:
    """The liveness monitor of one stream.

    ``io`` provides :class:`fedgate.stream.interfaces.IXmppStream`;
    ``ping_pair()`` gives the (local, remote) pair to ping over, or None
    where the stream cannot send (then whitespace); ``authenticated()``
    says whether the stream carries a pair yet (before that the
    authentication timeout is in charge); ``on_dead`` and ``on_idle`` close
    the stream.  ``stanza_ns`` is the namespace pings are written in."""

    def __init__(self, io, clock, settings: LivenessSettings, pings: PingRegistry, *,
                 ping_pair: Callable[[], tuple[str, str] | None],
                 authenticated: Callable[[], bool],
                 on_dead: Callable[[str], None], on_idle: Callable[[str], None],
                 stanza_ns: str = ns.SERVER, send_stanza: Callable | None = None):
        self.io = io
        #: how a ping goes out: the stream's stanza write path, or the
        #: handler's (which counts it for XEP-0198 on S2S)
        self.send_stanza = send_stanza or io.send
        self.clock = clock
        self.settings = settings
        self.pings = pings
        self.ping_pair = ping_pair
        self.authenticated = authenticated
        self.on_dead = on_dead
        self.on_idle = on_idle
        self.stanza_ns = stanza_ns
        self.machine = Machine("Liveness", TRANSITIONS, WATCHING)
        now = clock.seconds()
        self.last_stanza = now
        self._answered_at = now
        self._last_sent = now  # the last ping or whitespace
        self._ping_id: str | None = None
        self._ping_sent = 0.0
        self.pings_sent = self.whitespace_sent = 0
        self._timer = None
        self._schedule(now + settings.ping_idle)

    @property
    def state(self) -> str:
        return self.machine.state

    # -- what the role tells us ------------------------------------------------
    def stanza(self, stanza: domish.Element) -> None:
        """A stanza went either way on the stream."""
        if not is_keepalive(stanza):
            self.last_stanza = self.clock.seconds()

    def answered(self) -> None:
        """Our ping was answered (possibly over another stream)."""
        self._answered_at = self.clock.seconds()
        self._ping_id = None
        if self.state == AWAITING:
            self.machine.fire("alive")
            self._cancel()
            self._check()

    def stop(self) -> None:
        if self.state != DONE:
            self.machine.fire("stop")
        self.pings.forget(self._ping_id)
        self._ping_id = None
        self._cancel()

    # -- the timer --------------------------------------------------------------
    def _heard(self) -> float:
        """When we last heard from the peer: bytes on the stream, or an answer."""
        return max(getattr(self.io, "last_received", 0.0) or 0.0, self._answered_at)

    def _check(self) -> None:
        self._timer = None
        if self.state == DONE:
            return
        if getattr(self.io, "closed", False):
            self.stop()
            return
        now = self.clock.seconds()
        s = self.settings
        heard = self._heard()
        if self.state == AWAITING:
            if heard >= self._ping_sent:
                self.pings.forget(self._ping_id)
                self._ping_id = None
                self.machine.fire("alive")
            elif now >= self._ping_sent + s.ping_timeout:
                self.machine.fire("dead")
                self.pings.forget(self._ping_id)
                self._ping_id = None
                self.on_dead(f"no answer to a ping within {s.ping_timeout:g} s "
                             f"after {s.ping_idle:g} s of silence")
                # Not the usual wait for the peer's close: a dead peer never
                # sends it, and its destination waits for the connection to go.
                self._timer = self.clock.callLater(DEAD_GRACE, self._drop)
                return
        if self.state == WATCHING and s.idle_close and now >= self.last_stanza + s.idle_close:
            if self.authenticated():
                self.machine.fire("idle")
                self.on_idle(f"no stanza for {s.idle_close:g} s")
                return
            self.last_stanza = now  # the authentication timeout's stream: idle counts from now
        if self.state == WATCHING and now >= max(heard, self._last_sent) + s.ping_idle:
            self._keepalive(now)
        deadlines = [self.last_stanza + s.idle_close] if s.idle_close else []
        if self.state == AWAITING:
            deadlines.append(self._ping_sent + s.ping_timeout)
        else:
            deadlines.append(max(heard, self._last_sent) + s.ping_idle)
        self._schedule(min(deadlines))

    def _drop(self) -> None:
        self._timer = None
        if not getattr(self.io, "closed", False):
            self.io.abort()

    def _keepalive(self, now: float) -> None:
        self._last_sent = now
        if not self.authenticated() or not getattr(self.io, "header_sent", True):
            return  # negotiating still (or restarting): the auth timeout rules; look again later
        pair = self.ping_pair()
        if pair is None:
            self.whitespace_sent += 1
            self.io.send(" ")
            return
        local, remote = pair
        self._ping_id = self.pings.add(self, local, remote)
        self._ping_sent = now
        iq = domish.Element((None, "iq"))
        iq["type"] = "get"
        iq["id"] = self._ping_id
        iq["from"] = local
        iq["to"] = remote
        iq.addElement((ns.PING, "ping"))
        self.machine.fire("ping")
        self.pings_sent += 1
        # a stanza like any other on the one write path: XEP-0198 counts it
        # (the peer counts it handled), so that its acks number ours right
        self.send_stanza(Stanza.of(iq))

    def _schedule(self, when: float) -> None:
        self._cancel()
        delay = max(0.0, when - self.clock.seconds())
        self._timer = self.clock.callLater(delay, self._check)

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


@dataclass(frozen=True)
class ComponentWatch:
    """What component handlers need to watch their streams once bound:
    the bounds, the registry, and ``origin``, the gateway domain the pings
    come from (components answer iqs to their domain: XEP-0114, XEP-0225)."""

    settings: LivenessSettings
    pings: PingRegistry
    origin: str

    def watch(self, io, clock, ping_to: Callable[[], str | None], authenticated: Callable[[], bool],
              stanza_ns: str) -> Liveness:
        def pair():
            domain = ping_to()
            return (self.origin, domain) if domain else None
        return Liveness(io, clock, self.settings, self.pings, ping_pair=pair,
                        authenticated=authenticated, on_dead=lambda why: close_dead(io, why),
                        on_idle=lambda why: close_idle(io, why), stanza_ns=stanza_ns)


def close_dead(io, why: str) -> None:
    """Close a stream whose peer stopped answering: ``connection-timeout``
    (the monitor drops the connection :data:`DEAD_GRACE` seconds later)."""
    log.info("Peer {peer} stopped answering: {why}; closing", peer=io.peer, why=why)
    io.fail("connection-timeout", why)


def close_idle(io, why: str) -> None:
    """Close a stream that carried nothing for long, with a clean close."""
    log.info("Closing the idle stream with {peer}: {why}", peer=io.peer, why=why)
    io.close()


def tcp_keepalive(transport, settings: LivenessSettings) -> bool:
    """Turn on TCP keepalive for the socket under ``transport`` (and, where
    the platform has them, its idle time, interval, probe count and
    ``TCP_USER_TIMEOUT``).  False where there is no socket (memory
    transports in tests)."""
    sock = _socket_of(transport)
    if sock is None:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle = max(1, int(settings.ping_idle))
        interval = max(1, int(settings.keepalive_interval))
        for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval),
                            ("TCP_KEEPCNT", KEEPALIVE_PROBES),
                            ("TCP_USER_TIMEOUT", int((settings.ping_idle + settings.ping_timeout) * 1000))):
            option = getattr(socket, name, None)
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError as exc:
        log.debug("Could not set TCP keepalive: {error}", error=str(exc))
        return False
    return True


def tcp_no_delay(transport) -> bool:
    """Turn off Nagle's algorithm (``TCP_NODELAY``) on the socket under
    ``transport``: XMPP writes small elements and waits for the answer, and
    Nagle would hold each one until the peer's delayed ACK (about 40 ms per
    round trip of a STARTTLS or dialback handshake).  False where there is
    no socket (memory transports in tests) or the option cannot be set."""
    try:
        sock = _socket_of(transport)
    except AttributeError:  # a wrapper with nothing under it yet (memory transports)
        return False
    if sock is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        log.debug("Could not set TCP_NODELAY: {error}", error=str(exc))
        return False
    return True


def _socket_of(transport):
    """The socket under a TCP transport, also once TLS is on (where
    ``getHandle`` gives the TLS connection) or under a TLS wrapper."""
    for _ in range(4):
        if transport is None:
            return None
        sock = getattr(transport, "socket", None)
        if isinstance(sock, socket.socket):
            return sock
        get_handle = getattr(transport, "getHandle", None)
        handle = get_handle() if callable(get_handle) else None
        if isinstance(handle, socket.socket):
            return handle
        transport = getattr(transport, "transport", None)  # a TLS wrapping protocol
    return None
