"""One inbound plaintext dialback handshake, in one process: its CPU cost.

    PYTHONPATH=. python -m benchmarks.handshake_cpu [N] [--profile FILE]

The socket benchmarks (:mod:`benchmarks.vs_prosody`) time the gateway and
the generator together on a shared machine; this drives the gateway's own
code for the whole of an inbound dialback session over in-memory transports
and times it with ``time.process_time``: the inbound stream (header,
features, ``<db:result>``), the real :class:`DialbackVerifier` with its
pooled verification connection (negotiated once, then reused as in the
socket benchmark), the answer, the peer's close and the connection's end.
Log events go through the same level filter and text file observer as
under twistd (to ``/dev/null``).  Prints the best of three rounds in
handshakes per CPU second, and the reactor-visible steps of one handshake:
the transport writes of each stream.  With ``--profile FILE`` the last
round runs under cProfile and its pstats are saved to FILE.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import time

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogBeginner, textFileLogObserver

from fedgate.s2s.dialback import dialback_key
from fedgate.s2s.inbound import InboundS2S
from fedgate.s2s.verifier import DialbackVerifier
from fedgate.stream.protocol import XmppStream
from fedgate.tap import LevelFilter

from tests.support.memory import server_header
from tests.support.s2s import make_context

REMOTE = "remote.example"
LOCAL = "gw.example"
REMOTE_SECRET = "bench-remote-secret"


class CountingTransport(StringTransport):
    """A StringTransport that counts writes (each one a send on a socket)."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, data):
        self.writes += 1
        super().write(data)


class Connector:
    """Verification connections come up at once, over a CountingTransport."""

    def __init__(self):
        self.streams: list[XmppStream] = []

    def connect(self, domain, factory):
        stream = factory(None)
        stream.makeConnection(CountingTransport())
        self.streams.append(stream)
        return defer.succeed(stream)


class Authoritative:
    """remote.example's side of the verification connection."""

    def __init__(self, stream: XmppStream):
        self.stream = stream
        stream.transport.clear()
        stream.dataReceived(server_header(id="auth-1", **{"from": REMOTE, "to": LOCAL}, version="1.0")
                            + b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'>"
                              b"<errors/></dialback></stream:features>")

    def answer(self, stream_id: str) -> None:
        self.stream.transport.clear()
        self.stream.dataReceived(f"<db:verify from='{REMOTE}' to='{LOCAL}' id='{stream_id}'"
                                 f" type='valid'/>".encode())


def setup():
    clock = Clock()
    connector = Connector()
    ctx = make_context(clock, local_domains={LOCAL}, secret="gw-secret", auth_timeout=30.0)

    def make_stream(handler, stream_ns=None, admission=None):
        return XmppStream(handler, clock, ctx.limits)
    verifier = DialbackVerifier(connector, clock, make_stream, timeout=35.0, ctx=ctx,
                                idle_timeout=30.0, pipeline=10, max_idle=100)
    from dataclasses import replace
    ctx = replace(ctx, verifier=verifier)
    return clock, connector, ctx


HEADER = server_header(**{"from": REMOTE, "to": LOCAL}, version="1.0")


def handshake(clock, connector, ctx, state) -> tuple[int, int]:
    """One session; returns the transport writes of (inbound, verification)."""
    inbound = XmppStream(InboundS2S(ctx), clock, ctx.limits)
    transport = CountingTransport()
    inbound.makeConnection(transport)
    inbound.dataReceived(HEADER)
    stream_id = inbound.handler.stream_id
    key = dialback_key(REMOTE_SECRET, LOCAL, REMOTE, stream_id)
    inbound.dataReceived(f"<db:result from='{REMOTE}' to='{LOCAL}'>{key}</db:result>".encode())
    if state.get("auth") is None:
        state["auth"] = Authoritative(connector.streams[-1])
    auth = state["auth"]
    verify_writes = auth.stream.transport.writes
    auth.answer(stream_id)
    assert transport.value().endswith(b'type="valid"/>'), transport.value()
    inbound.dataReceived(b"</stream:stream>")
    inbound.connectionLost(None)
    return transport.writes, auth.stream.transport.writes - verify_writes + 1


def run(n: int) -> tuple[float, tuple]:
    clock, connector, ctx = setup()
    state: dict = {}
    writes = handshake(clock, connector, ctx, state)  # negotiates the verification connection
    start = time.process_time()
    for _ in range(n):
        handshake(clock, connector, ctx, state)
    elapsed = time.process_time() - start
    assert len(connector.streams) == 1, "the verification connection was not reused"
    return elapsed, writes


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.handshake_cpu")
    parser.add_argument("n", nargs="?", type=int, default=3000)
    parser.add_argument("--profile", metavar="FILE")
    args = parser.parse_args()
    devnull = open(os.devnull, "w")
    dropped = frozenset({LogLevel.debug})
    globalLogBeginner.beginLoggingTo([LevelFilter(textFileLogObserver(devnull), dropped)],
                                     redirectStandardIO=False)
    try:  # as fedgate.tap does under twistd (absent from older checkouts)
        from fedgate.logformat import speed_up_text_files
    except ImportError:
        pass
    else:
        speed_up_text_files()
    times = [run(args.n)[0] for _ in range(3)]
    profile = None
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        run(args.n)
        profile.disable()
        profile.dump_stats(args.profile)
    _, writes = run(1)
    print(json.dumps({"handshakes": args.n, "handshakes_per_cpu_second": round(args.n / min(times)),
                      "transport_writes_per_handshake": {"inbound": writes[0], "verification": writes[1]},
                      **({"profile": args.profile} if profile else {})}))


if __name__ == "__main__":
    main()
