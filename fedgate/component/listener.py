"""One component listener for both protocols, told apart by the header:
``jabber:component:accept`` is XEP-0114, ``jabber:client`` is XEP-0225.

Both deadlines count from the moment of connection and are absolute (bytes
dripping in do not extend them): the stream header within
``header_timeout``, and authentication within the protocol handler's
``auth_timeout``, which gets the connection time from here.  A connection
that misses the header deadline gets ``connection-timeout`` (after a header
of ours: RFC 6120 4.9.1.1)."""

from __future__ import annotations

from zope.interface import implementer

from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StreamFailure
from fedgate.stream.interfaces import IStreamHandler

DEFAULT_HEADER_TIMEOUT = 10.0


@implementer(IStreamHandler)
class ComponentListenerStream:
    """Waits for the stream header, then hands the stream to the right
    protocol's handler and steps aside.  ``make_accept`` and
    ``make_xep0225`` take the connection time (the clock's seconds)."""

    def __init__(self, make_accept, make_xep0225, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                 keepalive=None):
        self.make_accept = make_accept
        self.make_xep0225 = make_xep0225
        self.header_timeout = header_timeout
        #: LivenessSettings for TCP keepalive on the connection, if any
        self.keepalive = keepalive
        self.io = None
        self.connected_at: float | None = None
        self._timer = None

    def connected(self, io) -> None:
        self.io = io
        self.connected_at = io.clock.seconds()
        self._timer = io.clock.callLater(self.header_timeout, self._header_timeout)
        if self.keepalive is not None:
            io.keep_alive(self.keepalive)

    def _header_timeout(self) -> None:
        self._timer = None
        self.io.fail("connection-timeout", "no stream header in time")

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def error_header(self) -> dict:
        return {}

    def header_received(self, header) -> None:
        self._stop_timer()
        if header.default_ns == ns.COMPONENT_ACCEPT:
            handler = self.make_accept(self.connected_at)
        elif header.default_ns == ns.CLIENT and self.make_xep0225 is not None:
            handler = self.make_xep0225(self.connected_at)
        else:
            raise StreamFailure("invalid-namespace",
                                "component streams use jabber:component:accept or jabber:client")
        self.io.hand_over(handler)
        handler.header_received(header)

    def element_received(self, element) -> None:  # pragma: no cover - replaced after the header
        raise StreamFailure("not-authorized")

    def reject_stanza(self, stanza, failure) -> None:  # pragma: no cover
        pass

    def tls_established(self, info) -> None:  # pragma: no cover - no TLS before the header
        pass

    def disconnected(self, reason) -> None:
        self._stop_timer()
