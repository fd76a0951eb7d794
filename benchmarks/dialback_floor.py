"""The floor for a dialback handshake on Twisted: the same bytes, no work.

A Receiving Server reduced to what a plaintext dialback session needs on the
wire, and nothing else: no XML parser, no stream state, no policy, no logs.
It answers the generator's stream header with a canned header and dialback
feature, cuts ``from``, ``to`` and the key out of ``<db:result>`` with a
regular expression, asks the authoritative server with ``<db:verify>`` over
one verification connection it keeps open (as fedgate and Prosody do after
their first session), writes ``<db:result type='valid'/>`` when the answer is
valid, and ends the stream when the generator does.  Every socket has Nagle
off, like both servers in :mod:`benchmarks.vs_prosody`.

Its session rate is what the reactor, CPython and the kernel cost for the
same reads, writes, accept and close as a real server's session: an upper
bound for any server on Twisted and CPython.  It is not a server: it
checks nothing and must never face a real peer.

Run as ``python -m benchmarks.dialback_floor --remote-port P``; prints its
port and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import itertools
import re
import socket

from twisted.internet import protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString

LOCAL = "gw.example"
HEADER = ("<?xml version='1.0'?><stream:stream xmlns='jabber:server'"
          " xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback'"
          " from='{from_}' to='{to}' id='{id}' version='1.0'>")
FEATURES = ("<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
            "</stream:features>")
RESULT = re.compile(rb"<db:result\s+from='([^']*)'\s+to='([^']*)'\s*>([^<]*)</db:result>")
VERIFIED = re.compile(rb"<db:verify\s[^>]*?id='([^']*)'[^>]*?type='([a-z]*)'")
FOOTER = b"</stream:stream>"


def no_delay(transport) -> None:
    transport.getHandle().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Verification(protocol.Protocol):
    """The one kept-open connection to the authoritative server."""

    def __init__(self):
        self.ready = False
        self.queued: list[bytes] = []
        self.waiting: dict[bytes, "Session"] = {}
        self.buffer = b""

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self.transport.write(HEADER.format(from_=LOCAL, to="remote.example", id="floor").encode())

    def ask(self, session: "Session", originating: bytes, receiving: bytes, key: bytes) -> None:
        stream_id = session.stream_id
        self.waiting[stream_id] = session
        request = (b"<db:verify from='%s' to='%s' id='%s'>%s</db:verify>"
                   % (receiving, originating, stream_id, key))
        if self.ready:
            self.transport.write(request)
        else:
            self.queued.append(request)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if not self.ready:
            if b"</stream:features>" not in self.buffer:
                return
            self.ready = True
            self.buffer = self.buffer.partition(b"</stream:features>")[2]
            if self.queued:
                self.transport.write(b"".join(self.queued))
                self.queued = []
        end = self.buffer.rfind(b">")
        if end < 0:
            return
        complete, self.buffer = self.buffer[:end + 1], self.buffer[end + 1:]
        for stream_id, answer in VERIFIED.findall(complete):
            session = self.waiting.pop(stream_id, None)
            if session is not None:
                session.verified(answer == b"valid")


class Session(protocol.Protocol):
    """One inbound stream: header, ``<db:result>``, answer, end."""

    ids = itertools.count(1)

    def __init__(self, verifier):
        self.verifier = verifier
        self.stream_id = b"floor-%d" % next(self.ids)
        self.buffer = b""
        self.stage = "header"
        self.peer = b""

    def connectionMade(self) -> None:
        no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.stage == "header":
            start = self.buffer.find(b"<stream:stream")
            end = self.buffer.find(b">", start)
            if start < 0 or end < 0:
                return
            self.buffer = self.buffer[end + 1:]
            self.stage = "result"
            self.transport.write(HEADER.format(from_=LOCAL, to="remote.example",
                                               id=self.stream_id.decode()).encode() + FEATURES.encode())
        if self.stage == "result":
            match = RESULT.search(self.buffer)
            if match is None:
                return
            self.buffer = self.buffer[match.end():]
            self.stage = "verifying"
            originating, receiving, key = match.groups()
            self.peer = originating
            self.verifier().ask(self, originating, receiving, key)
        if FOOTER in self.buffer:
            self.transport.write(FOOTER)
            self.transport.loseConnection()

    def verified(self, valid: bool) -> None:
        self.stage = "authenticated"
        if self.transport.connected:
            self.transport.write(b"<db:result from='%s' to='%s' type='%s'/>"
                                 % (LOCAL.encode(), self.peer, b"valid" if valid else b"invalid"))


class Floor(protocol.Factory):
    noisy = False

    def __init__(self, reactor, remote_port: int):
        self.reactor = reactor
        self.remote_port = remote_port
        self.verification: Verification | None = None

    def verifier(self) -> Verification:
        if self.verification is None:
            self.verification = Verification()
            endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.remote_port)
            endpoint.connect(protocol.Factory.forProtocol(lambda: self.verification))
        return self.verification

    def buildProtocol(self, addr):
        return Session(self.verifier)


def main(argv=None) -> None:
    from twisted.internet import reactor

    parser = argparse.ArgumentParser(prog="python -m benchmarks.dialback_floor",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--remote-port", type=int, required=True,
                        help="the authoritative server's port on 127.0.0.1")
    args = parser.parse_args(argv)

    def listening(port) -> None:
        print(f"dialback floor listening on 127.0.0.1:{port.getHost().port}", flush=True)

    def failed(failure) -> None:
        print(f"dialback floor could not listen: {failure.getErrorMessage()}", flush=True)
        reactor.stop()

    d = serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Floor(reactor, args.remote_port))
    d.addCallbacks(listening, failed)
    reactor.run()


if __name__ == "__main__":
    main()
