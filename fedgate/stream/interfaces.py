"""The declared interface between the stream shim and the role handlers.

Two sides, as in the transit relay's ``ITransitClient``:

- :class:`IXmppStream` is everything a handler may ask of its stream
  (:class:`fedgate.stream.protocol.XmppStream` provides it);
- :class:`IStreamHandler` is everything the stream asks of its handler
  (inbound and outbound S2S, the dialback verification stream, the
  component roles).

A handler uses nothing else: no transport, no attribute set from outside.
That keeps the roles transport-free and lets tests drive them in memory.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

#: reasons a handler pauses reading (each reason holds its own pause)
RATE_LIMIT = "rate-limit"
BACKPRESSURE = "backpressure"
#: the gateway is shutting down: no new work from this stream (held until it closes)
SHUTDOWN = "shutdown"


class IXmppStream(Interface):
    """What a role handler may ask of the stream it runs on."""

    peer = Attribute("'host:port' of the other end, for logs")
    clock = Attribute("the IReactorTime this stream's timers run on")
    tls = Attribute("the TLSInfo once a TLS handshake has completed, else None")
    tls_started = Attribute("True once TLS has been started on this connection")
    closed = Attribute("True once the connection is gone")
    peer_ended = Attribute("True once the peer closed its stream with </stream:stream>")
    header_sent = Attribute("True once our header of the current stream is written")
    last_received = Attribute("clock time of the last bytes from the peer")
    writable = Attribute("True while the stream's output is below its high-water mark "
                         "(else the owner holds stanzas in its bounded queue)")

    def open_stream(attributes, features=None):
        """Send our stream header (and features, when given)."""

    def send(element):
        """Send an element (or serialised text); nothing once closing."""

    def write(text):
        """Write serialised XML as it is; False (nothing written) once closing."""

    def send_stanza(stanza):
        """The one write path for stanzas (a Stanza, or an element): True when
        the open transport took it, False when refused because the stream is
        closing or closed; then the caller requeues or bounces it.  Only a
        True counts as delivered."""

    def observe_stanzas(observer):
        """Call ``observer(stanza, size)`` for every stanza a transport took."""

    def on_writable(callback):
        """Call ``callback()`` each time the stream becomes writable again
        (its transport's write buffer drained below the mark)."""

    def start_tls(creator):
        """Switch the connection to TLS; ``tls_established`` follows."""

    def restart(send_header=None):
        """Expect a new stream header; the rest of the current read is dropped."""

    def close():
        """Close our stream and then the connection."""

    def fail(condition, text=None):
        """Send a stream error and close (RFC 6120 4.9)."""

    def linger_with(linger, last_words=None):
        """Let a clean close of ours wait for the handler (``linger(done)``
        True), and let it write last words before our stream end."""

    def authenticated():
        """The peer has proved who it is (a first valid domain pair, a
        component's handshake or SASL): the connection stops counting
        against the listener's caps on unauthenticated connections."""

    def abort():
        """Drop the connection at once, without the closing handshake."""

    def pause_reading(reason):
        """Stop reading for ``reason``; reading resumes once every reason
        that paused it has been resumed."""

    def resume_reading(reason):
        """Take back the pause held for ``reason``."""

    def set_stanza_namespace(uri):
        """The default namespace of our header and of the stanzas we send."""

    def tighten_stanza_limit(max_bytes):
        """Lower the stanza size limit for this stream (never raises it)."""

    def hand_over(handler):
        """Give the stream to another handler (its ``connected`` is called)."""

    def keep_alive(settings):
        """TCP keepalive on the connection (a LivenessSettings); False
        where there is no socket."""

    def wait_closed():
        """A Deferred that fires once the connection is gone."""


class IStreamHandler(Interface):
    """What the stream asks of its role handler."""

    def connected(stream):
        """The connection is up; ``stream`` provides :class:`IXmppStream`."""

    def header_received(header):
        """The peer's stream header (again after every restart)."""

    def element_received(element):
        """One top-level element; a StreamFailure or StanzaFailure raised
        here becomes a stream error or a bounce."""

    def tls_established(info):
        """The TLS handshake completed (``info`` is a TLSInfo)."""

    def reject_stanza(stanza, failure):
        """A stanza failed with a StanzaFailure: answer or bounce it."""

    def error_header():
        """Attributes of our header when a stream error comes before it."""

    def disconnected(reason):
        """The connection is gone."""
