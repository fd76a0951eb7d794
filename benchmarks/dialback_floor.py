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

With ``--cert``, ``--key`` and ``--ca`` it also offers STARTTLS (pyOpenSSL
through Twisted's TLS, TLS 1.3, a client certificate requested and its
chain checked by OpenSSL against ``--ca``, as both servers do) and, to a
client that presented a certificate, SASL EXTERNAL, answered with success
without looking at the certificate's names.

Its session rate is what the reactor, CPython and the kernel cost for the
same reads, writes, accept and close as a real server's session: an upper
bound for any server on Twisted and CPython.  It is not a server: it
checks nothing and must never face a real peer.

Run as ``python -m benchmarks.dialback_floor --remote-port P [--cert C --key K
--ca A]``; prints its
port and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import itertools
import re
import socket

from twisted.internet import protocol, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString

from fedgate.tls.contexts import flush_tls_writes

LOCAL = "gw.example"
HEADER = ("<?xml version='1.0'?><stream:stream xmlns='jabber:server'"
          " xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback'"
          " from='{from_}' to='{to}' id='{id}' version='1.0'>")
DIALBACK = "<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
FEATURES = f"<stream:features>{DIALBACK}</stream:features>".encode()
STARTTLS_FEATURES = ("<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
                     f"{DIALBACK}</stream:features>").encode()
EXTERNAL_FEATURES = ("<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                     f"<mechanism>EXTERNAL</mechanism></mechanisms>{DIALBACK}</stream:features>").encode()
PROCEED = b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
SUCCESS = b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"
RESULT = re.compile(rb"<db:result\s+from='([^']*)'\s+to='([^']*)'\s*>([^<]*)</db:result>")
VERIFY_TAG = re.compile(rb"<db:verify\s[^>]*>")
ID = re.compile(rb"\sid='([^']*)'")
TYPE = re.compile(rb"\stype='([a-z]*)'")
FOOTER = b"</stream:stream>"
AUTH = re.compile(rb"<auth\s[^>]*/>|<auth\s[^>]*>[^<]*</auth>")


def send(transport, data: bytes) -> None:
    """Write ``data`` and send it at once, as fedgate does (so the floor
    bounds fedgate's write path too): straight to a plain TCP socket with
    nothing buffered, else through Twisted, with a TLS layer's held writes
    flushed and the socket written now rather than on the next turn."""
    if (isinstance(transport, tcp.Connection) and not transport.TLS and transport.connected
            and not (transport.dataBuffer or transport._tempDataBuffer or transport.disconnecting)):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            if sent < len(data):
                transport.write(data[sent:])
            return
    transport.write(data)
    flush_tls_writes(transport)
    if isinstance(transport, tcp.Connection) and transport.connected and not transport.disconnecting:
        transport.doWrite()


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
        send(self.transport, HEADER.format(from_=LOCAL, to="remote.example", id="floor").encode())

    def ask(self, session: "Session", originating: bytes, receiving: bytes, key: bytes) -> None:
        stream_id = session.stream_id
        self.waiting[stream_id] = session
        request = (b"<db:verify from='%s' to='%s' id='%s'>%s</db:verify>"
                   % (receiving, originating, stream_id, key))
        if self.ready:
            send(self.transport, request)
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
                send(self.transport, b"".join(self.queued))
                self.queued = []
        end = self.buffer.rfind(b">")
        if end < 0:
            return
        complete, self.buffer = self.buffer[:end + 1], self.buffer[end + 1:]
        for tag in VERIFY_TAG.findall(complete):
            stream_id, answer = ID.search(tag), TYPE.search(tag)
            session = self.waiting.pop(stream_id.group(1), None) if stream_id else None
            if session is not None:
                session.verified(answer is not None and answer.group(1) == b"valid")


class Session(protocol.Protocol):
    """One inbound stream: header, ``<db:result>``, answer, end."""

    ids = itertools.count(1)

    def __init__(self, verifier, tls=None):
        self.verifier = verifier
        self.tls = tls
        self.secured = False
        self.authenticated = False
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
            send(self.transport, HEADER.format(from_=LOCAL, to="remote.example",
                                               id=self.stream_id.decode()).encode() + self._features())
        if self.stage == "result" and self.tls is not None:
            if not self.secured and b"<starttls" in self.buffer:
                self.secured, self.stage, self.buffer = True, "header", b""
                send(self.transport, PROCEED)
                self.transport.startTLS(self.tls)
                return
            auth = AUTH.search(self.buffer) if self.secured and not self.authenticated else None
            if auth is not None:
                self.authenticated, self.stage = True, "header"
                self.buffer = self.buffer[auth.end():]
                send(self.transport, SUCCESS)
                return
        if self.stage == "result" and not self.authenticated:
            match = RESULT.search(self.buffer)
            if match is not None:
                self.buffer = self.buffer[match.end():]
                self.stage = "verifying"
                originating, receiving, key = match.groups()
                self.peer = originating
                self.verifier().ask(self, originating, receiving, key)
        if FOOTER in self.buffer:
            send(self.transport, FOOTER)
            self.transport.loseConnection()

    def _features(self) -> bytes:
        if self.tls is None or self.authenticated:
            return FEATURES
        if not self.secured:
            return STARTTLS_FEATURES
        if self.transport.getPeerCertificate() is not None:
            return EXTERNAL_FEATURES
        return FEATURES

    def verified(self, valid: bool) -> None:
        self.stage = "authenticated"
        if self.transport.connected:
            send(self.transport, b"<db:result from='%s' to='%s' type='%s'/>"
                                 % (LOCAL.encode(), self.peer, b"valid" if valid else b"invalid"))


class Floor(protocol.Factory):
    noisy = False

    def __init__(self, reactor, remote_port: int, tls=None):
        self.reactor = reactor
        self.remote_port = remote_port
        self.tls = tls
        self.verification: Verification | None = None

    def verifier(self) -> Verification:
        if self.verification is None:
            self.verification = Verification()
            endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.remote_port)
            endpoint.connect(protocol.Factory.forProtocol(lambda: self.verification))
        return self.verification

    def buildProtocol(self, addr):
        return Session(self.verifier, self.tls)


class ServerTLS:
    """The server side's context (Twisted's ``getContext`` interface)."""

    def __init__(self, cert: str, key: str, ca: str):
        from OpenSSL import SSL
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.use_certificate_chain_file(cert)
        ctx.use_privatekey_file(key)
        ctx.load_verify_locations(ca)
        # ask for a client certificate and have OpenSSL check its chain, but
        # accept a client without one (STARTTLS + dialback)
        ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_options(SSL.OP_NO_TICKET)
        self.context = ctx

    def getContext(self):
        return self.context


def main(argv=None) -> None:
    from twisted.internet import reactor

    parser = argparse.ArgumentParser(prog="python -m benchmarks.dialback_floor",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--remote-port", type=int, required=True,
                        help="the authoritative server's port on 127.0.0.1")
    parser.add_argument("--cert", help="PEM: certificate and chain (offers STARTTLS)")
    parser.add_argument("--key", help="PEM: its private key")
    parser.add_argument("--ca", help="PEM: the roots a client certificate is checked against")
    args = parser.parse_args(argv)
    tls = None
    if args.cert or args.key or args.ca:
        if not (args.cert and args.key and args.ca):
            parser.error("--cert, --key and --ca go together")
        tls = ServerTLS(args.cert, args.key, args.ca)

    def listening(port) -> None:
        print(f"dialback floor listening on 127.0.0.1:{port.getHost().port}", flush=True)

    def failed(failure) -> None:
        print(f"dialback floor could not listen: {failure.getErrorMessage()}", flush=True)
        reactor.stop()

    d = serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Floor(reactor, args.remote_port, tls))
    d.addCallbacks(listening, failed)
    reactor.run()


if __name__ == "__main__":
    main()
