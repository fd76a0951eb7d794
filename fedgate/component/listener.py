"""One component listener for both protocols, told apart by the header:
``jabber:component:accept`` is XEP-0114, ``jabber:client`` is XEP-0225."""

from __future__ import annotations

from zope.interface import implementer

from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StreamFailure
from fedgate.stream.interfaces import IStreamHandler


@implementer(IStreamHandler)
class ComponentListenerStream:
    """Waits for the stream header, then hands the stream to the right
    protocol's handler and steps aside."""

    def __init__(self, make_accept, make_xep0225, keepalive=None):
        self.make_accept = make_accept
        self.make_xep0225 = make_xep0225
        #: LivenessSettings for TCP keepalive on the connection, if any
        self.keepalive = keepalive
        self.io = None

    def connected(self, io) -> None:
        self.io = io
        if self.keepalive is not None:
            io.keep_alive(self.keepalive)

    def error_header(self) -> dict:
        return {}

    def header_received(self, header) -> None:
        if header.default_ns == ns.COMPONENT_ACCEPT:
            handler = self.make_accept()
        elif header.default_ns == ns.CLIENT and self.make_xep0225 is not None:
            handler = self.make_xep0225()
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
        pass
