"""Dialback bounds and rules over real loopback sockets: verifications in
flight are capped and end with the stream that asked for them; pairs per
connection are capped (also pairs proven by a wildcard certificate,
XEP-0344); "invalid" closes a stream without other valid pairs and is a
<forbidden/> error on one with them (XEP-0220 2.2.1); every failed
verification gets a XEP-0220 2.5 answer; an unknown incoming condition
fails one pair, never our stream."""

from __future__ import annotations

import time

from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from fedgate.s2s.dialback import dialback_key
from fedgate.stream import namespaces as ns
from tests.support.federation import add_component, start_dns
from tests.support.gateway import gateway_config, publish, shared_ca, start_gateway, temp_dir
from tests.support.rawpeer import RawPeer, Reply
from tests.support.s2speer import PROCEED, STARTTLS, TLSPeer, s2s_header, wait_until

GW = "gw.example"


def results(data: bytes) -> list:
    return [e for e in Reply(data).elements if (e.uri, e.name) == (ns.DIALBACK, "result")]


def condition(result) -> str | None:
    return next((c.name for e in result.elements() if e.name == "error" for c in e.elements()
                 if c.uri == ns.STANZA_ERRORS and c.name != "text"), None)


class SlowAuthority(protocol.Factory):
    """An Authoritative Server that accepts and never answers; records how
    many connections are open at once."""

    noisy = False

    def __init__(self):
        self.open = 0
        self.most = 0
        self.accepted = 0

    def buildProtocol(self, addr):
        factory = self

        class Silent(protocol.Protocol):
            def connectionMade(self):
                factory.accepted += 1
                factory.open += 1
                factory.most = max(factory.most, factory.open)

            def connectionLost(self, reason):
                factory.open -= 1
        return Silent()


class ClosingAuthority(protocol.Factory):
    """An Authoritative Server that hangs up at once."""

    noisy = False

    def buildProtocol(self, addr):
        class Hangup(protocol.Protocol):
            def connectionMade(self):
                self.transport.loseConnection()
        return Hangup()


class Case(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def start(self, **s2s):
        self.dns, self.dns_port = start_dns(self)
        s2s.setdefault("policy", {"encryption": "optional"})
        config = gateway_config(temp_dir(self), [GW], {"chat.gw.example": "sc"}, **s2s)
        self.gateway = yield start_gateway(reactor, config, self.dns_port, self)
        publish(self.dns, self.gateway, [GW, "chat.gw.example"], "xmpp.gw.example")

    def listen(self, factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def point(self, domains, port: int, host: str = "authority.example") -> None:
        self.dns.add_a(host, "127.0.0.1")
        for domain in domains:
            self.dns.add_srv(f"_xmpp-server._tcp.{domain}", 0, 0, port, host)

    @defer.inlineCallbacks
    def peer(self, sender: str):
        peer = RawPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.gateway.port_of("s2s")), peer)
        self.addCleanup(lambda: peer.transport.abortConnection() if not peer.lost.called else None)
        peer.transport.write(s2s_header(sender, GW))
        yield wait_until(lambda: b"</stream:features>" in peer.data, "features")
        return peer


class VerificationBudgetTests(Case):
    """Item 4: 30 quick, overlapping streams asking for 10 verifications
    each against a silent Authoritative Server, with a global cap of 12."""

    CAP = 12

    @defer.inlineCallbacks
    def test_cap_holds_and_verifications_end_with_their_stream(self):
        yield self.start(max_pending_verifications=self.CAP, max_pending_verifications_per_stream=10)
        authority = SlowAuthority()
        origins = [f"r{n}.example" for n in range(300)]
        self.point(origins, self.listen(authority))
        peers = []
        for n in range(30):
            peer = yield self.peer(f"r{n * 10}.example")
            peer.transport.write("".join(
                f"<db:result from='r{n * 10 + k}.example' to='{GW}'>key</db:result>"
                for k in range(10)).encode())
            peers.append(peer)
            # Each stream lets its verifications connect, then goes away;
            # several streams overlap, so the global cap is what binds.
            reactor.callLater(0.4, peer.transport.loseConnection)
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield wait_until(lambda: all(p.lost.called for p in peers), "all requesting streams closed")
        print(f"verification connections: {authority.accepted} made, {authority.most} at once "
              f"(cap {self.CAP}), {authority.open} open after the streams closed")
        self.assertGreaterEqual(authority.accepted, self.CAP, "the budget was used in full")
        self.assertLessEqual(authority.most, self.CAP,
                             f"{authority.most} verification connections at once, cap {self.CAP}")
        # Every verification ends with the stream that asked for it.
        yield wait_until(lambda: authority.open == 0, "verification connections closed", timeout=10)
        yield wait_until(lambda: self.gateway.ctx.budget.in_use == 0, "budget released")
        self.assertEqual(authority.open, 0)


class PairCapTests(Case):
    """Item 5: a wildcard certificate proves any number of domains
    (XEP-0344); the connection still carries at most the configured pairs."""

    @defer.inlineCallbacks
    def test_wildcard_certificate_cannot_add_unbounded_pairs(self):
        yield self.start(max_pairs_per_connection=5, policy={"encryption": "required"})
        ca = shared_ca()
        wildcard = ca.issue(dns=("*.wild.example",), issuer=ca.root)
        peer = TLSPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.gateway.port_of("s2s")), peer)
        self.addCleanup(lambda: peer.transport.abortConnection() if not peer.lost.called else None)
        peer.transport.write(s2s_header("a0.wild.example", GW) + STARTTLS)
        yield wait_until(lambda: PROCEED in peer.plain, "<proceed/>")
        client = ssl.PrivateCertificate.loadPEM(wildcard.cert_pem() + wildcard.key_pem())
        trust = ssl.Certificate.loadPEM(ca.root_pem())
        peer.start_tls(ssl.optionsForClientTLS(GW, trustRoot=trust, clientCertificate=client))
        peer.handshake.addTimeout(10, reactor)
        yield peer.handshake
        peer.transport.write(s2s_header("a0.wild.example", GW))
        yield wait_until(lambda: b"</stream:features>" in peer.secure, "features over TLS")
        started = time.monotonic()
        peer.transport.write("".join(f"<db:result from='a{n}.wild.example' to='{GW}'>k</db:result>"
                                     for n in range(40)).encode())
        yield wait_until(lambda: len(results(bytes(peer.secure))) == 40, "40 answers")
        answers = results(bytes(peer.secure))
        self.assertEqual([a["type"] for a in answers[:5]], ["valid"] * 5)
        self.assertEqual({(a["type"], condition(a)) for a in answers[5:]}, {("error", "resource-constraint")})
        [record] = [r for r in self.gateway.table if r.authenticated]
        self.assertEqual(len(record.pairs), 5)
        self.assertEqual({p.method for p in record.valid_pairs()}, {"dialback-with-valid-cert"})
        self.assertFalse(peer.lost.called, "the connection stays, with its five pairs")
        self.assertLess(time.monotonic() - started, 10)


class InvalidTests(Case):
    """Item 6: a real Authoritative Server (a second gateway for b.example)
    answers "invalid" for a wrong key."""

    @defer.inlineCallbacks
    def setUp(self):
        yield self.start()
        config = gateway_config(temp_dir(self), ["b.example"], {"chat.b.example": "sb"})
        self.b = yield start_gateway(reactor, config, self.dns_port, self)
        publish(self.dns, self.b, ["b.example", "chat.b.example"], "xmpp.b.example")

    @defer.inlineCallbacks
    def test_invalid_on_the_first_pair_closes_the_stream(self):
        peer = yield self.peer("b.example")
        peer.transport.write(f"<db:result from='b.example' to='{GW}'>{'0' * 64}</db:result>".encode())
        yield wait_until(lambda: peer.lost.called, "the gateway closing the stream")
        [answer] = results(bytes(peer.data))
        self.assertEqual((answer["type"], answer["from"], answer["to"]), ("invalid", GW, "b.example"))
        self.assertTrue(Reply(bytes(peer.data)).ended, "closed with </stream:stream>")

    @defer.inlineCallbacks
    def test_invalid_with_a_valid_pair_is_forbidden_and_the_stream_stays(self):
        component = yield add_component(self, self.gateway, "chat.gw.example", "sc")
        peer = yield self.peer("b.example")
        stream_id = Reply(bytes(peer.data)).root["id"]
        good = dialback_key(self.b.ctx.secret, "chat.gw.example", "b.example", stream_id)
        peer.transport.write(f"<db:result from='b.example' to='chat.gw.example'>{good}</db:result>".encode())
        yield wait_until(lambda: len(results(bytes(peer.data))) == 1, "the first answer")
        self.assertEqual(results(bytes(peer.data))[0]["type"], "valid")
        peer.transport.write(f"<db:result from='chat.b.example' to='chat.gw.example'>{'0' * 64}</db:result>"
                             .encode())
        yield wait_until(lambda: len(results(bytes(peer.data))) == 2, "the second answer")
        second = results(bytes(peer.data))[1]
        self.assertEqual((second["type"], condition(second), second["to"]),
                         ("error", "forbidden", "chat.b.example"))
        # The valid pair still carries stanzas.
        peer.transport.write(b"<message from='x@b.example' to='y@chat.gw.example' id='after'/>")
        got = yield component.next_element(timeout=10)
        self.assertEqual(got["id"], "after")
        self.assertFalse(peer.lost.called)


class FailedVerificationTests(Case):
    """Item 6: an Authoritative Server that hangs up without answering used
    to make the gateway build remote-connection-failed (KeyError) and say
    nothing; now the requester gets a XEP-0220 2.5 condition."""

    @defer.inlineCallbacks
    def test_every_failure_is_answered(self):
        yield self.start()
        self.point(["hangup.example"], self.listen(ClosingAuthority()))
        closed = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        closed_port = closed.getHost().port
        yield closed.stopListening()  # nothing listens there any more
        self.point(["nobody.example"], closed_port, host="nobody-host.example")
        self.dns.add_srv("_xmpp-server._tcp.declined.example", 0, 0, 0, ".")
        expected = {"hangup.example": "remote-server-timeout", "nobody.example": "remote-server-not-found",
                    "declined.example": "remote-server-not-found"}
        for domain, wanted in expected.items():
            peer = yield self.peer(domain)
            peer.transport.write(f"<db:result from='{domain}' to='{GW}'>key</db:result>".encode())
            yield wait_until(lambda: results(bytes(peer.data)), f"an answer for {domain}", timeout=20)
            [answer] = results(bytes(peer.data))
            self.assertEqual((answer["type"], condition(answer)), ("error", wanted), domain)
            self.assertNotIn(str(closed_port).encode(), bytes(peer.data))
            self.assertFalse(peer.lost.called, "a dialback error never closes the stream")
        yield wait_until(lambda: self.gateway.ctx.budget.in_use == 0, "budget released")


class FakeRemote(protocol.Factory):
    """A remote server that answers our dialback request with a condition
    we do not know (a stream error condition, remote-connection-failed)."""

    noisy = False

    def __init__(self):
        self.peers: list = []

    def buildProtocol(self, addr):
        factory = self

        class Remote(RawPeer):
            opened = answered = False

            def connectionMade(self):
                factory.peers.append(self)

            def dataReceived(self, data):
                RawPeer.dataReceived(self, data)
                if not self.opened and b"<stream:stream" in self.data:
                    self.opened = True
                    self.transport.write(
                        s2s_header("far.example", GW, stream_id="S1")
                        + b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'>"
                          b"<errors/></dialback></stream:features>")
                if not self.answered and b"</db:result>" in self.data:
                    self.answered = True
                    self.transport.write(
                        b"<db:result from='far.example' to='chat.gw.example' type='error'>"
                        b"<error type='cancel'><remote-connection-failed "
                        b"xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></db:result>")
        return Remote()


class UnknownConditionTests(Case):
    @defer.inlineCallbacks
    def test_unknown_condition_fails_the_pair_not_the_stream(self):
        yield self.start(bidi=False)
        remote = FakeRemote()
        self.point(["far.example"], self.listen(remote), host="far-host.example")
        component = yield add_component(self, self.gateway, "chat.gw.example", "sc")
        component.send("<message from='u@chat.gw.example' to='v@far.example' id='m1'><body>hi</body></message>")
        bounce = yield component.next_element(timeout=10)
        self.assertEqual((bounce["id"], bounce["type"]), ("m1", "error"))
        [far] = remote.peers
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(Reply(bytes(far.data)).stream_errors(), [], "no stream error to the peer")
        self.assertFalse(far.lost.called, "our stream to the peer stays up")
