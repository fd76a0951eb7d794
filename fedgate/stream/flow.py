"""Output flow control: a high-water mark on each stream's output, and the
bounded queue a component session holds while its stream is not writable.

What grows when a peer stops reading is the transport's write buffer: every
``transport.write`` is accepted and kept in memory until the socket takes
it.  Twisted tells a registered streaming producer when that buffer passes
its own small threshold (``pauseProducing``) and when it has drained
(``resumeProducing``); TLS forwards both.  :class:`OutputFlow` is that
producer for one :class:`fedgate.stream.protocol.XmppStream`.  It lets the
stream go on writing for ``high_water`` more bytes after the transport's
pause (so one maximum-size stanza still goes out), and then the stream is
no longer *writable*: the stanza's owner (an S2S destination, a component
session's :class:`StanzaQueue`) holds stanzas in its own bounded queue
instead of handing them over, and flushes them in order once the transport
has drained and the stream says it is writable again.  Without a transport
that can take a producer (in-memory tests) a stream is always writable.

Reading is never paused for backpressure (the ``BACKPRESSURE`` reason of
:meth:`XmppStream.pause_reading` stays unused): what one stream reads goes
to many targets (the pairs multiplexed on an S2S stream, the many domains a
component writes to), so pausing it for one slow target would stall the
others; and a pause long enough to matter would race the liveness checks.
A slow target costs its own bounded queue and then bounces, nothing more.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from fedgate.stream.errors import StanzaFailure
from fedgate.stream.stanza import Stanza

log = Logger(namespace="fedgate.stream.flow")

#: bytes a stream may write past the transport's own pause: about one
#: maximum-size stanza fits
DEFAULT_HIGH_WATER = 1024 * 1024


@implementer(IPushProducer)
class OutputFlow:
    """The streaming producer of one stream's output.

    ``on_writable()`` is called once each time the stream becomes writable
    again after it was not."""

    def __init__(self, high_water: int = DEFAULT_HIGH_WATER, on_writable=None):
        self.high_water = high_water
        self.on_writable = on_writable
        #: the transport asked us to stop (its buffer is past its threshold)
        self.paused = False
        #: bytes written since the transport paused us
        self.over = 0
        #: times the stream stopped being writable (for tests and metrics)
        self.stalls = 0

    @property
    def writable(self) -> bool:
        return not self.paused or self.over < self.high_water

    def wrote(self, size: int) -> None:
        """``size`` bytes went to the transport."""
        if self.paused:
            was = self.writable
            self.over += size
            if was and not self.writable:
                self.stalls += 1

    # -- IPushProducer: the transport calls these ------------------------------
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        was = self.writable
        self.paused = False
        self.over = 0
        if not was and self.on_writable is not None:
            self.on_writable()

    def stopProducing(self) -> None:
        self.paused = False
        self.over = 0


@dataclass
class _Held:
    stanza: Stanza
    size: int


class StanzaQueue:
    """A component session's output: stanzas go straight to the stream while
    it is writable and nothing waits; otherwise they wait here, bounded by
    ``max_stanzas`` and ``max_bytes``, and go out in order when the stream
    is writable again.  Past the bound a stanza fails with
    ``resource-constraint``.

    ``send(stanza)`` is the stream's guarded write path (True: taken);
    ``writable()`` whether the stream takes more now.  The counters hold
    ``accepted = delivered + bounced + queued`` (bounced: refused here;
    what is still queued when the session ends is given back by
    :meth:`drain` for rerouting, and counted as bounced)."""

    def __init__(self, send, writable, max_stanzas: int, max_bytes: int, on_delivered=None):
        self._send = send
        self._writable = writable
        self.max_stanzas = max_stanzas
        self.max_bytes = max_bytes
        self.on_delivered = on_delivered
        self.held: deque[_Held] = deque()
        self.held_bytes = 0
        self.accepted = self.delivered = self.bounced = 0

    def __len__(self) -> int:
        return len(self.held)

    def put(self, stanza) -> bool:
        """Send or hold ``stanza``: True when taken; False when the stream
        refused it (closing: the caller bounces it or tries another
        session).  Raises ``StanzaFailure('resource-constraint')`` when the
        queue is full."""
        stanza = Stanza.of(stanza)
        if not self.held and self._writable():
            if not self._send(stanza):
                return False
            self.accepted += 1
            self._delivered(stanza)
            return True
        size = stanza.size()
        if len(self.held) >= self.max_stanzas or self.held_bytes + size > self.max_bytes:
            self.accepted += 1
            self.bounced += 1
            raise StanzaFailure("resource-constraint", "the component's queue is full")
        self.accepted += 1
        self.held.append(_Held(stanza, size))
        self.held_bytes += size
        return True

    def flush(self) -> None:
        """Hand what waits to the stream, in order, while it is writable."""
        while self.held and self._writable():
            item = self.held[0]
            if not self._send(item.stanza):
                return  # closing: what is left is given back by drain()
            self.held.popleft()
            self.held_bytes -= item.size
            self._delivered(item.stanza)

    def drain(self) -> list:
        """Everything still held, taken out (the session is gone: the
        caller reroutes or bounces each), counted as bounced."""
        items = [item.stanza for item in self.held]
        self.held.clear()
        self.held_bytes = 0
        self.bounced += len(items)
        return items

    def outcomes(self) -> dict[str, int]:
        return {"accepted": self.accepted, "delivered": self.delivered,
                "bounced": self.bounced, "queued": len(self.held)}

    def _delivered(self, stanza) -> None:
        self.delivered += 1
        if self.on_delivered is not None:
            self.on_delivered(stanza)
