"""Dialback verification reuses connections, over real loopback sockets.

Gateway ``gw.example`` is the Receiving Server; gateway ``b.example`` the
Authoritative Server.  Raw peers claim ``b.example`` (with keys made from
b.example's secret) and gw.example verifies each claim with b.example.
Every TCP connection b.example accepts leaves an inbound record in its pair
table, so counting those counts the verification connections.
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from fedgate.s2s.dialback import dialback_key
from fedgate.s2s.pairs import INBOUND
from tests.support.federation import add_component, start_dns
from tests.support.gateway import gateway_config, publish, start_gateway, temp_dir
from tests.support.rawpeer import RawPeer, Reply
from tests.support.s2speer import s2s_header, wait_until
from tests.test_dialback_bounds_e2e import results

GW = "gw.example"
B = "b.example"


class Case(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.dns, dns_port = start_dns(self)
        self.gateway = yield start_gateway(reactor, gateway_config(
            temp_dir(self), [GW], {"chat.gw.example": "sc"}, policy={"encryption": "optional"}),
            dns_port, self)
        publish(self.dns, self.gateway, [GW, "chat.gw.example"], "xmpp.gw.example")
        self.b = yield start_gateway(reactor, gateway_config(temp_dir(self), [B], {"chat.b.example": "sb"}),
                                     dns_port, self)
        publish(self.dns, self.b, [B, "chat.b.example"], "xmpp.b.example")
        self.removed = []
        self.b.table.on_removed(self.removed.append)

    def connections_into_b(self) -> int:
        """TCP connections b.example accepted so far."""
        return len({id(r) for r in [*self.removed, *self.b.table] if r.direction == INBOUND})

    @defer.inlineCallbacks
    def dialback(self, receiving: str = GW) -> str:
        """A raw peer claims b.example towards ``receiving`` with a good key;
        returns the gateway's answer type."""
        peer = RawPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.gateway.port_of("s2s")), peer)
        self.addCleanup(lambda: peer.transport.abortConnection() if not peer.lost.called else None)
        peer.transport.write(s2s_header(B, receiving))
        yield wait_until(lambda: b"</stream:features>" in peer.data, "features")
        stream_id = Reply(bytes(peer.data)).root["id"]
        key = dialback_key(self.b.ctx.secret, receiving, B, stream_id)
        peer.transport.write(f"<db:result from='{B}' to='{receiving}'>{key}</db:result>".encode())
        yield wait_until(lambda: results(bytes(peer.data)), "the dialback answer", timeout=20)
        [answer] = results(bytes(peer.data))
        peer.transport.loseConnection()
        return answer["type"]


class PooledVerificationTests(Case):
    @defer.inlineCallbacks
    def test_many_dialback_sessions_few_verification_connections(self):
        sequential = []
        for _ in range(15):
            answer = yield self.dialback()
            sequential.append(answer)
        concurrent = yield defer.gatherResults([self.dialback() for _ in range(10)])
        self.assertEqual(sequential + concurrent, ["valid"] * 25)
        opened = self.gateway.verifier.connections_opened
        into_b = self.connections_into_b()
        print(f"25 dialback sessions: {opened} verification connections opened, "
              f"{into_b} accepted by the authoritative server")
        # One connection for the sequential ones; at most one more while the
        # ten concurrent requests fill the pipeline (10 a connection).
        self.assertLessEqual(opened, 2)
        self.assertLessEqual(into_b, 2)
        self.assertGreaterEqual(into_b, 1)


class OutboundStreamVerificationTests(Case):
    @defer.inlineCallbacks
    def test_verify_goes_over_our_authenticated_outbound_stream(self):
        # gw.example has a stream to b.example (SASL EXTERNAL, b.example
        # offering dialback after the restart as fedgate does).
        component = yield add_component(self, self.gateway, "chat.gw.example", "sc")
        cb = yield add_component(self, self.b, "chat.b.example", "sb")
        component.send("<message from='a@chat.gw.example' to='x@chat.b.example' id='open'/>")
        got = yield cb.next_element(timeout=20)
        self.assertEqual(got["id"], "open")
        # Its stream is to chat.b.example; the claim is for chat.b.example too.
        before = self.connections_into_b()
        self.assertEqual(before, 1)
        answers = []
        for _ in range(5):
            peer = RawPeer()
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.gateway.port_of("s2s")),
                                  peer)
            self.addCleanup(lambda p=peer: p.transport.abortConnection() if not p.lost.called else None)
            peer.transport.write(s2s_header("chat.b.example", GW))
            yield wait_until(lambda: b"</stream:features>" in peer.data, "features")
            stream_id = Reply(bytes(peer.data)).root["id"]
            key = dialback_key(self.b.ctx.secret, GW, "chat.b.example", stream_id)
            peer.transport.write(f"<db:result from='chat.b.example' to='{GW}'>{key}</db:result>".encode())
            yield wait_until(lambda: results(bytes(peer.data)), "the dialback answer", timeout=20)
            answers.append(results(bytes(peer.data))[0]["type"])
            peer.transport.loseConnection()
        self.assertEqual(answers, ["valid"] * 5)
        self.assertEqual(self.gateway.verifier.connections_opened, 0, "no verification connection")
        self.assertEqual(self.connections_into_b(), before, "b.example accepted no further connection")


class PolicyChangeTests(Case):
    """Review finding 5: a pooled verification connection follows a change
    of the peer policy for its domain."""

    @defer.inlineCallbacks
    def test_a_policy_change_retires_the_pooled_connection(self):
        from fedgate.policy import PeerPolicy
        first = yield self.dialback()
        self.assertEqual(first, "valid")
        self.assertEqual(self.gateway.verifier.connections_opened, 1)
        yield self.dialback()
        self.assertEqual(self.gateway.verifier.connections_opened, 1, "reused while the policy holds")
        self.assertEqual(self.gateway.verifier.idle_count(), 1)
        # The operator tightens the terms for b.example (what the admin API does).
        self.gateway.policy.set_peer(PeerPolicy(B, encryption="optional", max_stanza_bytes=128 * 1024))
        answer = yield self.dialback()
        self.assertEqual(answer, "valid")
        self.assertEqual(self.gateway.verifier.connections_opened, 2, "a new connection on the new terms")
        yield wait_until(lambda: self.connections_into_b() == 2 and len(self.removed) >= 1,
                         "the old verification connection closed", timeout=10)
        self.assertEqual(self.gateway.verifier.idle_count(), 1)


class PoolLeakE2ETests(Case):
    """Review finding 2 over loopback: dialback requests claiming IP-literal
    domains (refused at once by the connector) leave no pool entries."""

    @defer.inlineCallbacks
    def test_ip_literal_claims_leave_the_pool_empty(self):
        peer = RawPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.gateway.port_of("s2s")), peer)
        self.addCleanup(lambda: peer.transport.abortConnection() if not peer.lost.called else None)
        peer.transport.write(s2s_header("10.0.0.1", GW))
        yield wait_until(lambda: b"</stream:features>" in peer.data, "features")
        count = 300
        peer.transport.write("".join(f"<db:result from='10.0.{n // 256}.{n % 256}' to='{GW}'>key</db:result>"
                                     for n in range(count)).encode())
        yield wait_until(lambda: len(results(bytes(peer.data))) == count, "every answer", timeout=30)
        answers = results(bytes(peer.data))
        self.assertEqual({a["type"] for a in answers}, {"error"})
        self.assertFalse(peer.lost.called)
        verifier = self.gateway.verifier
        self.assertEqual(verifier.connections_opened, count)
        self.assertEqual(verifier.pool, {}, "no entry per failed attempt")
        self.assertEqual(self.gateway.ctx.budget.in_use, 0)
