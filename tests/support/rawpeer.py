"""A raw TCP peer for end-to-end tests: collect what the gateway writes and
parse it back with Twisted's own domish parser (independent of ours)."""

from __future__ import annotations

from twisted.internet import defer, protocol
from twisted.words.xish import domish

from fedgate.stream import namespaces as ns


class RawPeer(protocol.Protocol):
    """Collects every byte the gateway sends until it closes."""

    def __init__(self):
        self.data = bytearray()
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        if not self.lost.called:
            self.lost.callback(None)


class Reply:
    """The gateway's output parsed back."""

    def __init__(self, data: bytes):
        self.data = data
        self.root = None
        self.elements: list[domish.Element] = []
        self.ended = False
        parser = domish.elementStream()
        parser.DocumentStartEvent = lambda root: setattr(self, "root", root)
        parser.ElementEvent = self.elements.append
        parser.DocumentEndEvent = lambda: setattr(self, "ended", True)
        parser.parse(data)

    def error_condition(self) -> str | None:
        error = self.elements[-1]
        if (error.uri, error.name) != (ns.STREAMS, "error"):
            return None
        names = [c.name for c in error.elements() if c.uri == ns.STREAM_ERRORS and c.name != "text"]
        return names[0] if len(names) == 1 else None

    def stream_errors(self) -> list[str]:
        return [child.name for e in self.elements if (e.uri, e.name) == (ns.STREAMS, "error")
                for child in e.elements() if child.uri == ns.STREAM_ERRORS and child.name != "text"]
