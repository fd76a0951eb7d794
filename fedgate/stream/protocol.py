"""The thin protocol shim under every XMPP stream fedgate runs.

Bytes go into a :class:`StreamParser`; the header, elements and end go to a
role handler (inbound S2S, outbound S2S, component).  The handler talks back
only through :class:`fedgate.stream.interfaces.IXmppStream` (``open_stream``,
``send``, ``fail``, ``restart``, ``close``, ``pause_reading`` ...), and the
stream calls the handler only through
:class:`fedgate.stream.interfaces.IStreamHandler`, so the handlers hold the
protocol logic and can be driven in tests without a transport.

Every stanza goes out through :meth:`XmppStream.send_stanza`, the one
guarded write path: it refuses (returns False) once the stream is closing or
closed, so that the caller puts the stanza back in its queue or bounces it,
and only a stanza an open transport took counts as delivered.  It writes a
stanza's original bytes where that is byte-for-byte correct
(:meth:`fedgate.stream.stanza.Stanza.encode`), and tells the observers added
with :meth:`XmppStream.observe_stanzas` about each stanza taken (the hook for
acknowledgements and output accounting).  Nothing at all is written after
our ``</stream:stream>``.

A clean close may linger (:meth:`XmppStream.linger_with`): when we close
(:meth:`XmppStream.close`, or :meth:`XmppStream.fail` with one of
:data:`LINGER_CONDITIONS`: an operator, a policy change, shutdown) outside
the handling of the peer's input, the handler may first ask the peer for
what it still owes (XEP-0198's final ``<r/>``), and the stream stays open
for reading, and for nonzas, until the handler says it is done (within a
bound of its own).  Meanwhile it is :attr:`XmppStream.ending`: stanzas are
refused as on a closing stream.  The peer's input ending or failing stops
the wait at once.  Every close, lingering or not, lets the handler write its
last words (the final ``<a/>``) before our ``</stream:stream>``.

Output is bounded: the stream registers an :class:`fedgate.stream.flow.OutputFlow`
as the streaming producer of its transport, and is :attr:`XmppStream.writable`
until the transport's write buffer holds about ``output_high_water`` bytes;
the stanza's owner then holds stanzas in its own bounded queue and hands them
over again when the callbacks added with :meth:`XmppStream.on_writable` say
the buffer has drained.  :meth:`XmppStream.send_stanza` itself keeps its
contract (it writes whenever the stream is open), so one stanza past the mark
still goes out.

Reading is paused per reason (a rate limit, backpressure): the transport
stays paused while any reason holds, so one reason's resume never undoes
another's pause.

Errors are values here: a :class:`StreamFailure` raised anywhere while
handling input becomes a ``<stream:error/>`` and a close (with our own header
first when we have not sent one yet, RFC 6120 4.9.1.2); any other exception
while handling a stanza becomes an ``internal-server-error`` reply to that
stanza, and anywhere else an ``internal-server-error`` stream error.  A link is
never left half dead.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import replace

from twisted.internet import defer, protocol, tcp
from twisted.internet.interfaces import IHandshakeListener
from zope.interface import implementer
from twisted.logger import Logger
from twisted.words.xish import domish

from fedgate.logsafe import short
from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StreamFailure, StanzaFailure, stream_error_element
from fedgate.stream.flow import DEFAULT_HIGH_WATER, OutputFlow
from fedgate.stream.interfaces import IStreamHandler, IXmppStream
from fedgate.stream.liveness import tcp_keepalive, tcp_no_delay
from fedgate.stream.parser import Limits, StreamHeader, StreamParser
from fedgate.stream.serialize import escape_attr, serialize
from fedgate.stream.stanza import Stanza
from fedgate.tls.contexts import TLSInfo, flush_tls_writes, tls_info

log = Logger(namespace="fedgate.stream")

CLOSE_GRACE = 10.0  # seconds we wait for the peer's </stream:stream>

#: stream errors of ours that end a stream in good order (an operator closing
#: it, a policy change, shutdown): a close with them may linger (see above).
#: An error about the peer's input never does.
LINGER_CONDITIONS = frozenset({"system-shutdown", "policy-violation"})


class _Restart(Exception):
    """Raised inside the parser to drop the rest of a chunk after a restart."""


def new_stream_id() -> str:
    """A unique, unpredictable stream id (RFC 6120 4.7.3)."""
    return secrets.token_urlsafe(18)


#: bytes a read's writes are kept for one transport write at most (see
#: :meth:`XmppStream._put`): Twisted's own write buffer threshold, past which
#: a TCP transport pauses its producer
COALESCE_MAX = 64 * 1024

_BODY = re.compile(r"(<body\b[^>]*>).*?(</body>)", re.S)


class _ReadBatch:
    """The read being handled now, and the other streams written to during it.

    One reactor thread handles one read at a time; what it makes other
    streams write (a ``<db:verify>`` on a verification connection, the
    ``<db:result>`` answer on the inbound stream when the verification's
    answer arrives, stanzas routed to a component) is kept by each of them
    and written and sent when the read ends, like the reading stream's own
    answer (:meth:`XmppStream._flush`): one write per stream per read, and
    no reactor turn between a read and the bytes it makes us send
    elsewhere."""

    __slots__ = ("reader", "joined")

    def __init__(self):
        #: the stream whose read is being handled (None between reads)
        self.reader = None
        #: other streams that wrote during it, in the order they first did
        self.joined: list = []

    def end(self) -> None:
        """The outer read is over: flush the streams written to meanwhile."""
        self.reader = None
        while self.joined:
            joined, self.joined = self.joined, []
            for stream in joined:
                try:
                    stream._flush(ending=True)
                except Exception:
                    log.failure("Unexpected error writing to {peer}", peer=stream.peer)


_batch = _ReadBatch()


@implementer(IHandshakeListener, IXmppStream)
class XmppStream(protocol.Protocol):
    """One TCP connection carrying one XMPP stream (restarted as needed)."""

    def __init__(self, handler: IStreamHandler, clock, limits: Limits = Limits(),
                 log_traffic: bool = False, log_bodies: bool = False,
                 stream_ns: str = ns.SERVER, on_tls_failure=None, admission=None,
                 output_high_water: int = DEFAULT_HIGH_WATER):
        self.handler = handler
        #: the producer the transport pauses when its write buffer fills
        self.flow = OutputFlow(output_high_water, self._writable_again)
        self._flow_registered = False
        self._writable_observers: list = []
        #: the listener's admission ticket (fedgate.stream.admission), None on
        #: outbound streams: given back on authentication and on close
        self.admission = admission
        self.clock = clock
        self.limits = limits
        self.stream_ns = stream_ns
        self.log_traffic = log_traffic
        self.log_bodies = log_bodies
        self.header_sent = False
        self.closing = False
        #: a clean close waits for the handler (XEP-0198's final ack): no
        #: stanza is taken, reading and nonzas go on (see linger_with)
        self.ending = False
        self._linger = None
        self._last_words = None
        #: the stream error (condition, text) the lingering close ends with
        self._end_error = None
        #: the peer closed its stream (``</stream:stream>``), as against a
        #: connection that was dropped or a stream we ended
        self.peer_ended = False
        self.closed = False
        self.peer = "?"
        #: when bytes last came from the peer (liveness: fedgate.stream.liveness)
        self.last_received = clock.seconds()
        self._parser: StreamParser | None = None
        self._parsing = False
        #: while a read is handled: the bytes written meanwhile, handed to
        #: the transport as one write at its end (see :meth:`_put`)
        self._out: list | None = None
        #: the bytes in ``_out``
        self._out_size = 0
        self._restart_pending = False
        self._close_timer = None
        self._close_waiters: list = []
        self.tls: TLSInfo | None = None
        self.tls_started = False
        #: called with (stanza, bytes written) for every stanza a transport took
        self._stanza_observers: list = []
        #: why reading is paused (empty: reading); a frozenset replaced on
        #: change, so the many streams that never pause share the empty one
        self._paused: frozenset = frozenset()
        #: called with a reason when TLS fails here (the metrics count them)
        self.on_tls_failure = on_tls_failure  # on_tls_failure(reason): the metrics count it

    def wait_closed(self):
        """A Deferred that fires once the connection is gone."""
        d = defer.Deferred()
        if self.closed:
            d.callback(None)
        else:
            self._close_waiters.append(d)
        return d

    # -- Twisted protocol -------------------------------------------------
    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        tcp_no_delay(self.transport)  # every S2S and component stream, both directions
        if self.admission is not None:
            self.admission.attach(self.fail)  # so that it can be evicted
        register = getattr(self.transport, "registerProducer", None)
        if register is not None and getattr(self.transport, "producer", None) is None:
            register(self.flow, True)  # streaming: pauseProducing/resumeProducing
            self._flow_registered = True
        self._new_parser()
        self._guard(self.handler.connected, self)

    def dataReceived(self, data: bytes) -> None:
        if self.closing or self.closed:
            return
        self.last_received = self.clock.seconds()
        if self.log_traffic:
            self._log_xml("in", data)
        batch = _batch
        outer = batch.reader is None  # else a read inside a read (in-memory transports)
        if outer:
            batch.reader = self
        self._parsing = True
        if self._out is None:  # (not None: written to earlier in an outer read)
            self._out, self._out_size = [], 0
        try:
            self._parser.feed(data)
        except _Restart:
            pass  # the rest of this chunk belongs to the old stream: dropped
        except StreamFailure as failure:
            self.fail(failure.condition, failure.text)
        except Exception:
            log.failure("Unexpected error handling input from {peer}", peer=self.peer)
            self.fail("internal-server-error")
        finally:
            self._parsing = False
            try:
                self._flush(ending=True)
            finally:
                if outer:
                    batch.end()

    def connectionLost(self, reason) -> None:
        self.closed = True
        self._out, self._out_size = None, 0
        self._writable_observers = []
        if self.admission is not None:
            self.admission.release()
        if self._parser is not None:
            self._parser.close()
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        if self.tls_started and self.tls is None and self.on_tls_failure is not None:
            self.on_tls_failure("handshake")  # the TLS handshake never completed
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)
        try:
            self.handler.disconnected(reason)
        except Exception:
            log.failure("Error in disconnect handling for {peer}", peer=self.peer)

    # -- the handler's interface ------------------------------------------
    def open_stream(self, attributes: dict, features: domish.Element | None = None) -> None:
        """Send our stream header (with jabber:server:dialback declared)."""
        parts = [f"<?xml version='1.0'?><stream:stream xmlns='{self.stream_ns}'"
                 f" xmlns:stream='{ns.STREAMS}'"]
        if self.stream_ns == ns.SERVER:
            parts.append(f" xmlns:db='{ns.DIALBACK}'")
        for key, value in attributes.items():
            if value is not None:
                parts.append(f" {key}='{escape_attr(value)}'")
        parts.append(">")
        self.header_sent = True
        self.write("".join(parts))
        if features is not None:
            self.send(features)

    def send(self, element) -> None:
        if self.closing or self.closed:
            return
        if isinstance(element, Stanza):
            self.send_stanza(element)  # stanzas go through the one write path
            return
        if isinstance(element, domish.Element):
            element = serialize(element, self.stream_ns)
        self.write(element)

    def write(self, text: str) -> bool:
        """Write serialised XML; refused (False) once the stream is closing
        or closed, so nothing follows our ``</stream:stream>``."""
        if self.closing or self.closed:
            return False
        if self.log_traffic:
            self._log_xml("out", text)
        data = text.encode("utf-8")
        self._put(data)
        self.flow.wrote(len(data))
        return True

    def _put(self, data: bytes) -> None:
        """Hand ``data`` to the transport, or, while a read is handled, keep
        it for the one write at the end of that read (:meth:`_flush`).

        A handshake step (a header and its features, an answer and what
        follows it) is written in several pieces within one read; each
        ``transport.write`` costs a TLS record and Twisted's write
        bookkeeping, so the pieces go out as one.  The same holds for a
        stream written to during another stream's read (:class:`_ReadBatch`).

        Past :data:`COALESCE_MAX` bytes what was kept goes to the transport
        at once: the transport pauses :attr:`flow` only once its buffer
        holds the bytes, and the stream's writability (which an owner with
        a long queue checks before each stanza) follows that pause; held
        back here for the whole read, a queue flushed inside a read (a
        ``<db:result type='valid'/>``, an ``<enabled/>``) would all be
        taken, past the high-water mark (counted delivered without
        XEP-0198)."""
        out = self._out
        if out is None:
            if _batch.reader is not None and not self.closed:
                # another stream's read is being handled: written at its end
                self._out, self._out_size = [data], len(data)
                _batch.joined.append(self)
                return
            self.transport.write(data)
        else:
            out.append(data)
            self._out_size += len(data)
            if self._out_size >= COALESCE_MAX:
                self._out, self._out_size = [], 0
                self.transport.write(b"".join(out))

    def _flush(self, ending: bool = False) -> None:
        """Write what :meth:`_put` kept (before TLS starts, the connection
        is closed, and at the end of each read: ``ending``), and send it.

        Twisted's TCP transport only buffers a write and sends it on the
        reactor's next turn; a handshake step answers a read, so it is sent
        here at once (:meth:`IWriteDescriptor.doWrite`), saving that turn.
        What the send makes happen (a producer resumed, more writes) goes
        through :meth:`_put` afresh."""
        out = self._out
        if out is not None:
            self._out, self._out_size = (None if ending else []), 0
        if out and not self.closed:
            data = out[0] if len(out) == 1 else b"".join(out)
            if not self._send_directly(data):
                self.transport.write(data)
                self._send_now()

    def _send_directly(self, data: bytes) -> bool:
        """On a plain TCP transport with nothing buffered, send ``data`` on
        the socket and hand Twisted only what the kernel did not take.

        ``transport.write`` followed by :meth:`_send_now` registers the
        socket for writing (an ``epoll_ctl``), sends, and unregisters it
        (another), around the same ``send``.  False (nothing sent): not
        Twisted's TCP connection itself (a TLS wrapper passes attribute
        lookups through to the TCP connection under it, so only the class
        tells), TLS started on it, bytes already waiting in the transport
        (order), a connection closing or aborted (``abortConnection`` drops
        what follows), or a send that failed, which is left for Twisted's
        write path to report."""
        transport = self.transport
        if (not isinstance(transport, tcp.Connection) or transport.TLS
                or transport.dataBuffer or transport._tempDataBuffer
                or not transport.connected or transport.disconnecting
                or transport._writeDisconnected or getattr(transport, "_aborting", False)):
            return False
        sent = transport.writeSomeData(data)
        if not isinstance(sent, int) or sent <= 0:
            return False
        if sent < len(data):
            transport.write(data[sent:])  # the rest when the socket can take it
        return True

    def _send_now(self) -> None:
        transport = self.transport
        flush_tls_writes(transport)  # (a TLS transport's own buffer first)
        do_write = getattr(transport, "doWrite", None)  # a TCP transport only
        if (do_write is None or not getattr(transport, "connected", False)
                or getattr(transport, "disconnecting", True)
                or getattr(transport, "_writeDisconnected", True)):
            return
        # A failure (the peer reset the connection) is left for the reactor:
        # the descriptor is still registered for writing, so its next turn
        # calls doWrite again and handles the loss.
        do_write()

    def send_stanza(self, stanza) -> bool:
        """The one write path for stanzas: True when the open transport took
        ``stanza``, False (nothing written) once the stream is ending (a
        lingering close of ours), closing or closed.  Only a True counts as
        delivered."""
        if self.closing or self.closed or self.ending:
            return False
        if not isinstance(stanza, Stanza):
            stanza = Stanza.of(stanza)
        data = stanza.encode(self.stream_ns)
        if self.log_traffic:
            self._log_xml("out", data)
        self._put(data)
        self.flow.wrote(len(data))
        for observer in self._stanza_observers:
            observer(stanza, len(data))
        return True

    def observe_stanzas(self, observer) -> None:
        """Call ``observer(stanza, size)`` for every stanza a transport takes."""
        self._stanza_observers.append(observer)

    @property
    def writable(self) -> bool:
        """Is the output below its high-water mark?  While it is not, the
        owner holds stanzas in its own bounded queue.  (A closing stream
        may be writable: :meth:`send_stanza` refuses, and the owner treats
        that refusal as it always did.)"""
        return self.flow.writable

    def on_writable(self, callback) -> None:
        """Call ``callback()`` each time the stream is writable again after
        it was not (the transport's buffer has drained)."""
        self._writable_observers.append(callback)

    def _writable_again(self) -> None:
        if self.closing or self.closed:
            return
        for callback in list(self._writable_observers):
            try:
                callback()
            except Exception:
                log.failure("Error flushing to {peer} after its output drained", peer=self.peer)

    def authenticated(self) -> None:
        """The peer has authenticated: the connection leaves its listener's
        count of unauthenticated connections (fedgate.stream.admission)."""
        if self.admission is not None:
            self.admission.authenticated()

    def abort(self) -> None:
        """Drop the connection at once (no closing handshake)."""
        if not self.closed:
            self._out = None if self._out is None else []  # dropped, like the transport's buffer
            self._out_size = 0
            self.transport.abortConnection()

    def pause_reading(self, reason: str) -> None:
        """Stop reading for ``reason`` until :meth:`resume_reading` with it."""
        if self.closed or reason in self._paused:
            return
        self._paused = self._paused | {reason}
        if len(self._paused) == 1:
            self.transport.pauseProducing()

    def resume_reading(self, reason: str) -> None:
        if reason not in self._paused:
            return
        self._paused = self._paused - {reason}
        if not self._paused and not self.closed:
            self.transport.resumeProducing()

    def keep_alive(self, settings) -> bool:
        """TCP keepalive on this connection (``settings``: a LivenessSettings);
        False where the transport has no socket."""
        return tcp_keepalive(self.transport, settings)

    @property
    def paused_for(self) -> frozenset:
        """The reasons reading is paused for now."""
        return self._paused

    def set_stanza_namespace(self, uri: str) -> None:
        self.stream_ns = uri

    def hand_over(self, handler: IStreamHandler) -> None:
        """Another handler takes over this stream from now on."""
        self.handler = handler
        handler.connected(self)

    def tighten_stanza_limit(self, max_bytes: int) -> None:
        """Lower the stanza size limit for this stream (a peer's policy)."""
        if max_bytes < self.limits.max_stanza_bytes:
            self.limits = replace(self.limits, max_stanza_bytes=max_bytes)
            self._parser.limits = self.limits

    def start_tls(self, creator) -> None:
        """Switch the transport to TLS (STARTTLS after <proceed/>, or at once
        for Direct TLS).  Writes from now on are encrypted; the handler hears
        ``tls_established`` once the handshake is done."""
        self.tls_started = True
        self._flush()  # what was written before (<proceed/>) goes in the clear
        self.transport.startTLS(creator)

    def handshakeCompleted(self) -> None:
        self.tls = tls_info(self.transport.getHandle())
        log.debug("TLS {version} {cipher} with {peer}", version=self.tls.version,
                  cipher=self.tls.cipher, peer=self.peer)
        self._guard(self.handler.tls_established, self.tls)

    def restart(self, send_header=None) -> None:
        """Expect a new stream header; drop any bytes already received.

        Our own next header is a new one too, so an error before it still
        gets a header first.  The initiating side passes ``send_header``,
        which writes its new header now (before the rest of the current read
        is dropped)."""
        self._new_parser()
        self.header_sent = False
        if send_header is not None:
            send_header()
        if self._parsing:
            raise _Restart()

    def linger_with(self, linger, last_words=None) -> None:
        """``linger(done) -> bool`` is asked at the start of a clean close of
        ours: True if the handler waits for something (it calls ``done()``,
        within a bound of its own, and the close goes on then); False to
        close now.  ``last_words()`` writes what goes just before our
        ``</stream:stream>`` on every close (stream error or not)."""
        self._linger = linger
        self._last_words = last_words

    def _start_linger(self, error) -> bool:
        """Start a lingering close (ours, outside input handling) if the
        handler wants one; False to close now."""
        if self._linger is None or self._parsing or not self.header_sent:
            return False
        self.ending = True
        self._end_error = error
        try:
            waiting = self._linger(self._end_lingering)
        except Exception:
            log.failure("Error starting a clean close with {peer}", peer=self.peer)
            waiting = False
        if not waiting:
            self.ending = False
            self._end_error = None
        return bool(waiting)

    def _end_lingering(self) -> None:
        """The handler is done (or its bound passed): close now."""
        if not self.ending or self.closing or self.closed:
            return
        error, self._end_error = self._end_error, None
        self.ending = False
        if error is not None:
            self._fail_now(*error)
        else:
            self._close_now()

    def fail(self, condition: str, text: str | None = None) -> None:
        """Send a stream error and close (RFC 6120 4.9)."""
        if self.closing or self.closed:
            return
        if self.ending:
            if not self._parsing:
                self._end_error = (condition, text)  # the close under way ends with it
                return
            self.ending = False  # the peer's input failed: no more waiting
            self._end_error = None
        elif condition in LINGER_CONDITIONS and self._start_linger((condition, text)):
            return
        self._fail_now(condition, text)

    def _fail_now(self, condition: str, text: str | None) -> None:
        log.info("Stream error {condition} to {peer}: {text}", condition=condition,
                 peer=self.peer, text=short(text) or "")
        if not self.header_sent:
            try:
                attrs = self.handler.error_header()
            except Exception:
                attrs = {}
            self.open_stream(attrs)
        self._say_last_words()
        self.send(stream_error_element(condition, text))
        self._close_now(last_words=False)

    def close(self) -> None:
        """Close our stream and the connection, waiting briefly for the peer
        (lingering first where the handler asks: see :meth:`linger_with`)."""
        if self.closing or self.closed:
            return
        if self.ending:
            if self._parsing:  # the peer ended its stream, or its input failed
                self._end_lingering()
            return
        if self._start_linger(None):
            return
        self._close_now()

    def _say_last_words(self) -> None:
        if self._last_words is not None and self.header_sent:
            try:
                self._last_words()
            except Exception:
                log.failure("Error writing the last words to {peer}", peer=self.peer)

    def _close_now(self, last_words: bool = True) -> None:
        if self.header_sent:
            if last_words:
                self._say_last_words()
            self.write("</stream:stream>")  # the last write: closing from here
        self.ending = False
        self.closing = True
        if self._parser is not None:
            self._parser.close()  # nothing more is parsed; free it now
        self._flush()
        self._unregister_flow()  # (TLS would hold the close while a producer is registered)
        self.transport.loseConnection()
        self._close_timer = self.clock.callLater(CLOSE_GRACE, self._abort)

    def _unregister_flow(self) -> None:
        if self._flow_registered:
            self._flow_registered = False
            self.transport.unregisterProducer()

    def _abort(self) -> None:
        self._close_timer = None
        if not self.closed:
            self.transport.abortConnection()

    # -- parser callbacks -------------------------------------------------
    def _new_parser(self) -> None:
        if self._parser is not None:
            self._parser.close()  # break its cycle with expat: freed at once
        self._parser = StreamParser(self._on_header, self._on_element, self._on_end, self.limits)

    def _on_header(self, header: StreamHeader) -> None:
        if self.closing:
            raise _Restart()
        self.handler.header_received(header)

    def _on_element(self, element: domish.Element) -> None:
        if self.closing:
            raise _Restart()  # nothing after a stream error is processed
        try:
            self.handler.element_received(element)
        except (StreamFailure, _Restart):
            raise
        except StanzaFailure as failure:
            self.handler.reject_stanza(element, failure)
        except Exception:
            if element.name in ns.STANZA_NAMES and element.uri in ns.STANZA_NAMESPACES:
                log.failure("Error handling a stanza from {peer}", peer=self.peer)
                self.handler.reject_stanza(element, StanzaFailure("internal-server-error"))
            else:
                raise

    def _on_end(self) -> None:
        log.debug("Peer {peer} closed its stream", peer=self.peer)
        self.peer_ended = True
        self.close()

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except StreamFailure as failure:
            self.fail(failure.condition, failure.text)
        except Exception:
            log.failure("Unexpected error in stream setup for {peer}", peer=self.peer)
            self.fail("internal-server-error")

    def _log_xml(self, direction: str, data) -> None:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        if not self.log_bodies:
            text = _BODY.sub(r"\1[redacted]\2", text)
        log.debug("XML {direction} {peer}: {xml}", direction=direction, peer=self.peer, xml=text)
