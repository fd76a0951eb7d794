"""In-memory streams for unit tests: a real XmppStream over a StringTransport
with a fake clock, and a peer-side parser to read what it wrote."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StreamFailure
from fedgate.stream.parser import Limits, StreamParser
from fedgate.stream.protocol import XmppStream

SERVER_HEADER = ("<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                 "xmlns:stream='http://etherx.jabber.org/streams' "
                 "xmlns:db='jabber:server:dialback' {attrs}>")


def server_header(**attrs) -> bytes:
    text = " ".join(f"{k}='{v}'" for k, v in attrs.items())
    return SERVER_HEADER.format(attrs=text).encode()


class MemoryStream:
    """Drive one handler through a real XmppStream without sockets."""

    def __init__(self, handler, clock: Clock | None = None, stream_ns: str = ns.SERVER,
                 limits: Limits = Limits(), stream: XmppStream | None = None,
                 peer_address=None, transport: StringTransport | None = None):
        self.clock = clock or Clock()
        self.transport = transport or StringTransport(peerAddress=peer_address)
        self.stream = stream or XmppStream(handler, self.clock, limits, stream_ns=stream_ns)
        self.header = None
        self.elements: list = []
        self.ended = False
        self._read = 0
        self._parser = StreamParser(self._got_header, self.elements.append, self._got_end)
        self.stream.makeConnection(self.transport)

    def _got_header(self, header):
        self.header = header

    def _got_end(self):
        self.ended = True

    def restart(self) -> None:
        """Restart the stream on both sides (as after STARTTLS or SASL)."""
        self.read()
        self.stream.restart()
        self._parser = StreamParser(self._got_header, self.elements.append, self._got_end)

    def feed(self, data) -> None:
        self.stream.dataReceived(data.encode() if isinstance(data, str) else data)
        self.read()

    def read(self) -> list:
        """Parse what the stream wrote since last time; returns new elements."""
        data = self.transport.value()
        new = data[self._read:]
        self._read = len(data)
        before = len(self.elements)
        if new:
            try:
                self._parser.feed(new)
            except StreamFailure:
                pass
        return self.elements[before:]

    def take(self) -> list:
        """All elements received so far, clearing the list."""
        self.read()
        items, self.elements[:] = list(self.elements), []
        return items

    @property
    def disconnecting(self) -> bool:
        return self.transport.disconnecting

    def stream_error(self) -> str | None:
        """The condition of the stream error we were sent, if any."""
        for element in self.elements:
            if element.uri == ns.STREAMS and element.name == "error":
                for child in element.elements():
                    if child.uri == ns.STREAM_ERRORS and child.name != "text":
                        return child.name
        return None


class RecordingRouter:
    """A router that records what it is given."""

    def __init__(self, fail_on_route: Exception | None = None):
        self.routed: list = []
        self.bounced: list = []
        self.reply_from: list = []  # the reply_from of each bounce
        self.fail_on_route = fail_on_route

    def route(self, stanza, to_domain=None, from_domain=None) -> None:
        if self.fail_on_route is not None:
            raise self.fail_on_route
        self.routed.append(stanza)

    def bounce(self, stanza, condition, text=None, reply_from=None) -> None:
        self.bounced.append((stanza, condition, text))
        self.reply_from.append(reply_from)
