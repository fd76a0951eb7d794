"""Two real fedgate gateways federating over loopback through dialback.

DNS is real too: a twisted.names server on loopback serves the SRV records,
so the gateways take the same resolution path as in production.
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor, task, utils
from twisted.trial import unittest

from fedgate.s2s.pairs import INBOUND, OUTBOUND, VALID
from tests.support.federation import TwoGatewaysFixture
from tests.support.gateway import gateway_config, temp_dir

TIMEOUT = 15


class TwoGateways(TwoGatewaysFixture, unittest.TestCase):
    """Without bidi: each side opens its own outbound stream."""

    timeout = 60
    bidi = False

    @defer.inlineCallbacks
    def setUp(self):
        yield self.start_two_gateways(
            gateway_config(temp_dir(self), ["a.example"], {"chat.a.example": "secret-a"}, bidi=self.bidi),
            gateway_config(temp_dir(self), ["b.example"], {"chat.b.example": "secret-b"}, bidi=self.bidi))
        self.ca = yield self.add_component(self.a, "chat.a.example", "secret-a")
        self.cb = yield self.add_component(self.b, "chat.b.example", "secret-b")

    @defer.inlineCallbacks
    def test_messages_both_ways(self):
        self.ca.send("<message from='alice@chat.a.example/r' to='bob@chat.b.example' "
                     "type='chat' id='m1'><body>hello &amp; welcome</body></message>")
        got = yield self.cb.next_element(timeout=TIMEOUT)
        self.assertEqual((got.name, got["from"], got["to"], got["id"]),
                         ("message", "alice@chat.a.example/r", "bob@chat.b.example", "m1"))
        self.assertEqual(str(got.body), "hello & welcome")
        self.assertEqual(got.uri, "jabber:component:accept")

        self.cb.send("<message from='bob@chat.b.example' to='alice@chat.a.example/r' "
                     "type='chat' id='m2'><body>hi back</body></message>")
        got = yield self.ca.next_element(timeout=TIMEOUT)
        self.assertEqual((got["from"], got["to"], str(got.body)),
                         ("bob@chat.b.example", "alice@chat.a.example/r", "hi back"))

        # Each side now has an outbound stream, encrypted, whose pair was
        # authenticated with SASL EXTERNAL; the other side sees it inbound.
        out_a = [r for r in self.a.table if r.direction == OUTBOUND]
        self.assertEqual(len(out_a), 1)
        self.assertEqual(out_a[0].state_of("chat.a.example", "chat.b.example"), VALID)
        self.assertIn(out_a[0].tls["version"], ("TLSv1.2", "TLSv1.3"))
        self.assertTrue(out_a[0].tls["chain_ok"])
        in_b = [r for r in self.b.table if r.direction == INBOUND and r.authenticated]
        self.assertEqual([(p.local, p.remote, p.method) for r in in_b for p in r.valid_pairs()],
                         [("chat.b.example", "chat.a.example", "sasl-external")])

    @defer.inlineCallbacks
    def test_payload_in_the_dialback_namespace_reaches_the_component(self):
        """A payload in the dialback namespace crosses S2S (where the header
        binds ``db``) and reaches the remote component, whose stream does
        not bind it, intact; the component's stream stays usable."""
        self.ca.send("<message from='alice@chat.a.example' to='bob@chat.b.example' id='d1'>"
                     "<x xmlns='jabber:server:dialback'>payload</x></message>")
        got = yield self.cb.next_element(timeout=TIMEOUT)
        self.assertEqual(got["id"], "d1")
        payload = got.firstChildElement()
        self.assertEqual((payload.uri, payload.name, str(payload)), ("jabber:server:dialback", "x", "payload"))
        self.ca.send("<message from='alice@chat.a.example' to='bob@chat.b.example' id='d2'/>")
        got = yield self.cb.next_element(timeout=TIMEOUT)
        self.assertEqual(got["id"], "d2")

    @defer.inlineCallbacks
    def test_iq_round_trip_and_piggyback(self):
        self.ca.send("<iq from='svc@chat.a.example' to='chat.b.example' type='get' id='q1'>"
                     "<query xmlns='urn:example:q'/></iq>")
        got = yield self.cb.next_element(timeout=TIMEOUT)
        self.assertEqual((got.name, got["type"], got["id"]), ("iq", "get", "q1"))
        self.assertEqual(got.query.uri, "urn:example:q")
        self.cb.send("<iq from='chat.b.example' to='svc@chat.a.example' type='result' id='q1'>"
                     "<query xmlns='urn:example:q'><item/></query></iq>")
        got = yield self.ca.next_element(timeout=TIMEOUT)
        self.assertEqual((got["type"], got["id"], got["from"]), ("result", "q1", "chat.b.example"))

        # The gateway's own domain answers ping across federation; its answer
        # comes from a second local domain of B (b.example) and piggybacks on
        # B's existing outbound stream to chat.a.example.
        self.ca.send("<iq from='svc@chat.a.example' to='b.example' type='get' id='p1'>"
                     "<ping xmlns='urn:xmpp:ping'/></iq>")
        got = yield self.ca.next_element(timeout=TIMEOUT)
        self.assertEqual((got["type"], got["id"], got["from"]), ("result", "p1", "b.example"))
        out_b = [r for r in self.b.table if r.direction == OUTBOUND]
        self.assertEqual([r.remote_domain for r in out_b], ["chat.a.example"],
                         "one outbound stream per remote domain")
        # SASL authenticated the stream's own pair; the piggybacked one used
        # dialback with a callback, since B's certificate on that stream
        # names chat.b.example only (tests/test_tls_e2e.py covers XEP-0344).
        self.assertEqual(sorted((p.local, p.method) for p in out_b[0].valid_pairs()),
                         [("b.example", "dialback"), ("chat.b.example", "sasl-external")])
        [in_a] = [r for r in self.a.table if r.direction == INBOUND and r.authenticated]
        self.assertEqual(sorted((p.remote, p.method) for p in in_a.valid_pairs()),
                         [("b.example", "dialback"), ("chat.b.example", "sasl-external")])

    @defer.inlineCallbacks
    def test_unknown_remote_bounces(self):
        # No SRV and no A record: remote-server-not-found comes back.
        self.ca.send("<message from='alice@chat.a.example' to='x@nowhere.example' id='m3'>"
                     "<body>anyone?</body></message>")
        got = yield self.ca.next_element(timeout=TIMEOUT)
        self.assertEqual((got["type"], got["id"], got["from"]), ("error", "m3", "x@nowhere.example"))
        self.assertEqual(got.error.firstChildElement().name, "remote-server-not-found")
        self.assertEqual(self.a.sender.accepted, self.a.sender.delivered + self.a.sender.bounced)


class TwoGatewaysBidi(TwoGatewaysFixture, unittest.TestCase):
    """With bidi (the default): one long-lived TCP connection carries both
    directions, and B adds a further domain in the reverse direction instead
    of opening a connection of its own (XEP-0288's conference.montague.lit)."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        # A's verification connections close after their answer (no idle
        # pool), so that the count below sees the streams alone.
        yield self.start_two_gateways(
            gateway_config(temp_dir(self), ["a.example"], {"chat.a.example": "secret-a"},
                           verification_idle_timeout=0),
            gateway_config(temp_dir(self), ["b.example"], {"chat.b.example": "secret-b", "muc.b.example": "secret-m"},
                           reverse_dialback=True))
        self.ca = yield self.add_component(self.a, "chat.a.example", "secret-a")
        self.cb = yield self.add_component(self.b, "chat.b.example", "secret-b")
        self.muc = yield self.add_component(self.b, "muc.b.example", "secret-m")

    @defer.inlineCallbacks
    def test_both_directions_over_one_connection(self):
        self.ca.send("<message from='alice@chat.a.example' to='bob@chat.b.example' id='m1'>"
                     "<body>one</body></message>")
        got = yield self.cb.next_element(timeout=TIMEOUT)
        self.assertEqual(got["id"], "m1")
        self.cb.send("<message from='bob@chat.b.example' to='alice@chat.a.example' id='m2'>"
                     "<body>two</body></message>")
        got = yield self.ca.next_element(timeout=TIMEOUT)
        self.assertEqual((got["id"], got["from"]), ("m2", "bob@chat.b.example"))
        # B's second component writes to A: B proves muc.b.example on A's
        # stream in the reverse direction (A verifies it by callback).
        for n in range(3):
            self.muc.send(f"<message from='room@muc.b.example' to='alice@chat.a.example' id='r{n}'>"
                          "<body>from the room</body></message>")
        for n in range(3):
            got = yield self.ca.next_element(timeout=TIMEOUT)
            self.assertEqual((got["id"], got["from"]), (f"r{n}", "room@muc.b.example"))
        # And A answers the room over the same connection.
        self.ca.send("<message from='alice@chat.a.example' to='room@muc.b.example' id='back'/>")
        got = yield self.muc.next_element(timeout=TIMEOUT)
        self.assertEqual(got["id"], "back")

        self.assertEqual([r for r in self.b.table if r.direction == OUTBOUND], [],
                         "B never needed a connection of its own")
        [out_a] = [r for r in self.a.table if r.direction == OUTBOUND]
        self.assertTrue(out_a.bidi)
        self.assertEqual(sorted((p.local, p.remote, p.origin, p.method) for p in out_a.valid_pairs()), [
            ("chat.a.example", "chat.b.example", "local", "sasl-external"),
            ("chat.a.example", "muc.b.example", "remote", "dialback"),
        ])
        [in_b] = [r for r in self.b.table if r.direction == INBOUND and r.bidi]
        self.assertEqual(in_b.pairs[("chat.b.example", "chat.a.example")].stanzas_out, 1)
        self.assertEqual(in_b.pairs[("muc.b.example", "chat.a.example")].stanzas_out, 3)
        self.assertEqual(in_b.pairs[("muc.b.example", "chat.a.example")].stanzas_in, 1)

        # From the OS: once the short-lived verification connections are
        # gone, exactly one TCP connection joins A and B's S2S port.
        port = self.b.port_of("s2s")
        for _ in range(100):
            established = yield established_to(port)
            if established == 1:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(established, 1)
        established_to_a = yield established_to(self.a.port_of("s2s"))
        self.assertEqual(established_to_a, 0, "B opened no connection to A")


@defer.inlineCallbacks
def established_to(port: int):
    """Established TCP connections to 127.0.0.1:port, as `ss` sees them."""
    out = yield utils.getProcessOutput("ss", ["-Htn", "state", "established", f"( dport = :{port} )"],
                                       env=os.environ, reactor=reactor)
    return len([line for line in out.decode().splitlines() if line.strip()])
