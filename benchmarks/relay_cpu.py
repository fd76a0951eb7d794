"""The relay's own CPU cost, in one process: stanzas per CPU second.

    PYTHONPATH=. python -m benchmarks.relay_cpu [N]

The socket benchmark (:mod:`benchmarks.run`) measures the gateway and the
load generator together on a shared machine; this one drives the gateway's
own code (parser, component and S2S handlers' receive paths, router, S2S
sender, the write path) over in-memory transports with the test support's
streams, and times it with ``time.process_time``, so other processes on the
machine disturb it much less.  ``s2s_to_component`` feeds an S2S stream
(the inbound address checks and the route, without authentication) and
writes to an XEP-0114 component; ``component_to_s2s`` feeds a component
and writes to an authenticated outbound S2S stream.  The best of three
rounds is printed, in stanzas per CPU second.  ``component_to_s2s_acks``
is the same with XEP-0198 on the S2S stream (the peer offers it, and
acknowledges after each read: an ``<r/>`` per burst, an ``<a/>`` back), run
side by side with it; ``acks_ratio`` is acks on / acks off (target >= 0.9).
"""

import json
import random
import sys
import time

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from fedgate.component.accept import ComponentAccept, handshake_digest
from fedgate.router import Router
from fedgate.s2s.pairs import ConnectionTable
from fedgate.s2s.sender import S2SSender, SenderSettings
from fedgate.s2s.sm import NS as SM, ResumeStore, SMSettings
from fedgate.stream.protocol import XmppStream
from fedgate.stream import namespaces as ns
from fedgate.jid import domain_of

from tests.support.memory import MemoryStream, server_header
from tests.support.s2s import FakeConnector, make_context

N = int(sys.argv[1]) if len(sys.argv) > 1 else 30000
BODY = "The quick brown fox jumps over the lazy dog; fedgate load generator payload."
clock = Clock()


def component(router):
    comp = MemoryStream(ComponentAccept({"chat.gw.example": "pw"}, router, clock), clock, stream_ns=ns.COMPONENT_ACCEPT)
    comp.stream.dataReceived(b"<stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' to='chat.gw.example'>")
    comp.read()
    sid = comp.header.get("id")
    comp.stream.dataReceived(f"<handshake>{handshake_digest(sid, 'pw')}</handshake>".encode())
    return comp


class Inbound:
    """The inbound S2S handler's receive path, minus authentication: the
    address checks and the route."""

    def __init__(self, router):
        self.router = router

    def connected(self, io):
        self.io = io

    def header_received(self, header):
        pass

    def element_received(self, el):
        to, frm = el.getAttribute("to"), el.getAttribute("from")
        self.router.route(el, domain_of(to), domain_of(frm))

    def reject_stanza(self, el, failure):
        raise AssertionError(failure)

    def error_header(self):
        return {}

    def disconnected(self, reason):
        pass


def chunks(data, size=16384):
    return [data[i:i + size] for i in range(0, len(data), size)]


def s2s_to_component():
    router = Router({"gw.example"}, {"chat.gw.example"})
    comp = component(router)
    s2s = XmppStream(Inbound(router), clock)
    s2s.makeConnection(StringTransport())
    s2s.dataReceived(server_header(to="chat.gw.example", **{"from": "remote.example"}))
    data = b"".join(f"<message from='user{i % 16}@remote.example/load' to='bot@chat.gw.example' type='chat' id='s2c-{i}'><body>{BODY} {i}</body></message>".encode() for i in range(N))
    t = time.process_time()
    for chunk in chunks(data):
        s2s.dataReceived(chunk)
        comp.transport.clear()
    elapsed = time.process_time() - t
    assert comp.stream.handler.stanzas_out == N, comp.stream.handler.stanzas_out
    return elapsed


def component_to_s2s(acks=False):
    table = ConnectionTable()
    connector = FakeConnector(clock)
    router = Router({"gw.example"}, {"chat.gw.example"})
    ctx = make_context(clock, secret="s", table=table, router=router, auth_timeout=30.0,
                       sm=ResumeStore(clock, SMSettings()) if acks else None)
    sender = S2SSender(ctx, connector, lambda h: XmppStream(h, clock), SenderSettings(), rng=random.Random(1))
    router.sender = sender
    comp = component(router)
    comp.stream.dataReceived(b"<message from='bot@chat.gw.example/load' to='u@remote.example' id='w'/>")
    peer = connector.succeed()
    peer.read()
    peer.stream.dataReceived(server_header(id="SID", **{"from": "remote.example"}, version="1.0")
        + b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
        + (f"<sm xmlns='{SM}'/>".encode() if acks else b"") + b"</stream:features>")
    peer.read()
    peer.stream.dataReceived(b"<db:result from='remote.example' to='chat.gw.example' type='valid'/>")
    handler = peer.stream.handler
    if acks:
        peer.stream.dataReceived(f"<enabled xmlns='{SM}' id='x' resume='true'/><a xmlns='{SM}' h='1'/>".encode())
        assert handler.sm.enabled, handler.sm.state
    assert sender.delivered == 1, sender.outcomes()
    data = b"".join(f"<message from='bot@chat.gw.example/load' to='user{i % 16}@remote.example' type='chat' id='c2s-{i}'><body>{BODY} {i}</body></message>".encode() for i in range(N))
    t = time.process_time()
    for chunk in chunks(data):
        comp.stream.dataReceived(chunk)
        if acks:
            clock.advance(0)  # the burst is over: its <r/> goes out
            peer.stream.dataReceived(f"<a xmlns='{SM}' h='{handler.sm.out.sent}'/>".encode())
        peer.transport.clear()
    elapsed = time.process_time() - t
    assert sender.delivered == N + 1, sender.outcomes()
    return elapsed


def main() -> None:
    report = {}
    rounds = {"component_to_s2s": [], "component_to_s2s_acks": []}
    s2c = min(s2s_to_component() for _ in range(3))
    report["s2s_to_component"] = round(N / s2c)
    for _ in range(5):  # side by side, alternating
        rounds["component_to_s2s"].append(component_to_s2s())
        rounds["component_to_s2s_acks"].append(component_to_s2s(acks=True))
    for name, times in rounds.items():
        report[name] = round(N / min(times))
    ratio = round(report["component_to_s2s_acks"] / report["component_to_s2s"], 3)
    print(json.dumps({"stanzas": N, "stanzas_per_cpu_second": report, "acks_ratio": ratio}))


if __name__ == "__main__":
    main()
