"""fedgate federating with a real Prosody 0.12 over Server Dialback, no TLS.

Both servers find each other through one loopback DNS server: fedgate asks
it through twisted.names, Prosody through libunbound forwarding.  A
component on each side (XEP-0114) exchanges messages and iq with the other,
so every dialback role is played by both implementations: each is the
Originating Server on its outbound stream, the Receiving Server on its
inbound one, and the Authoritative Server for the other's check.

What Prosody 0.12 does that a peer must cope with: it opens its streams
with an empty ``id``; it sends its ``<db:verify>`` over its own outbound
stream (fedgate's inbound), often while that stream's own ``<db:result>``
is still pending; it accepts fedgate's unprefixed dialback answers and a
second, piggybacked ``<db:result>`` for another local domain; it queues
stanzas until its stream is authenticated; and it adds ``xml:lang``.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest
from twisted.words.protocols.jabber import client, jid, xmlstream

from fedgate.s2s.pairs import INBOUND, OUTBOUND
from tests.support.component_client import ComponentClient, connect_component
from tests.support.dnsserver import TestDNSServer
from tests.support.gateway import gateway_config, publish, start_gateway, temp_dir
from tests.support.prosody import ProsodyError, ProsodyServer, prosody_available

if not prosody_available():
    pytest.skip("prosody is not installed (scripts/bootstrap --test installs it)",
                allow_module_level=True)

TIMEOUT = 15

GW = "gw.example"
GW_COMPONENT = "chat.gw.example"
GW_OFFLINE = "offline.gw.example"  # configured, but no component connects
GW_UNKNOWN = "elsewhere.gw.example"  # its SRV points at fedgate, which does not serve it
PROSODY = "prosody.example"
PROSODY_COMPONENT = "svc.prosody.example"


class _NoTLSAuthenticator(client.XMPPAuthenticator):
    """Twisted's c2s authenticator (SASL, bind, session) with STARTTLS
    optional: the test Prosody has no certificate and offers none."""

    def associateWithStream(self, xs):
        super().associateWithStream(xs)
        for initializer in xs.initializers:
            if isinstance(initializer, xmlstream.TLSInitiatingInitializer):
                initializer.required = False


@defer.inlineCallbacks
def connect_user(port: int, user_jid: str, password: str):
    """Log a Prosody user in over plaintext c2s.  Fires with a client that
    has the same interface as the component client (``send``,
    ``next_element``, ``close``) and ``jid``, the bound full JID."""
    user = ComponentClient(reactor, user_jid, password)
    authenticator = _NoTLSAuthenticator(jid.JID(user_jid), password)
    user.factory.args = (authenticator,)  # XmlStreamFactoryMixin builds streams with these
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=TIMEOUT)
    connecting = endpoint.connect(user.factory)
    connecting.addErrback(user._fail_authentication)
    try:
        yield user.when_authenticated().addTimeout(TIMEOUT, reactor)
    except Exception:
        if user.xmlstream is not None and user.xmlstream.transport is not None:
            user.xmlstream.transport.abortConnection()
        raise
    user.jid = authenticator.jid.full()
    return user


class ProsodyInterop(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.dns = TestDNSServer(reactor)
        dns_port = self.dns.start()
        self.addCleanup(self.dns.stop)

        self.gateway = yield start_gateway(reactor, gateway_config(
            temp_dir(self), [GW], {GW_COMPONENT: "secret-gw", GW_OFFLINE: "secret-off"}),
            dns_port, self)
        publish(self.dns, self.gateway, [GW, GW_COMPONENT, GW_OFFLINE, GW_UNKNOWN],
                "xmpp.gw.example")

        self.prosody = ProsodyServer(PROSODY, components={PROSODY_COMPONENT: "secret-p"},
                                     dns_port=dns_port)
        self.addCleanup(self.prosody.cleanup)
        self.dns.add_a("xmpp.prosody.example", "127.0.0.1")
        for domain in (PROSODY, PROSODY_COMPONENT):
            self.dns.add_srv(f"_xmpp-server._tcp.{domain}", 0, 0, self.prosody.s2s_port,
                             "xmpp.prosody.example")
        try:
            self.prosody.start()
        except ProsodyError as e:
            self.fail(str(e))

        self.gw_comp = yield connect_component(
            reactor, "127.0.0.1", self.gateway.port_of("components"),
            GW_COMPONENT, "secret-gw", timeout=TIMEOUT)
        self.addCleanup(self.gw_comp.close)
        self.prosody_comp = yield connect_component(
            reactor, "127.0.0.1", self.prosody.component_port,
            PROSODY_COMPONENT, "secret-p", timeout=TIMEOUT)
        self.addCleanup(self.prosody_comp.close)

    @defer.inlineCallbacks
    def receive(self, peer, what: str):
        """The next element ``peer`` receives; on timeout fail with both
        sides' state and Prosody's log."""
        try:
            element = yield peer.next_element(timeout=TIMEOUT)
        except defer.TimeoutError:
            self.fail(f"{peer.domain} received no {what} within {TIMEOUT} s\n"
                      + self.diagnostics())
        return element

    def diagnostics(self) -> str:
        records = [(r.direction, r.remote_domain, r.remote_address,
                    sorted((p.local, p.remote, p.state) for p in r.pairs.values()))
                   for r in self.gateway.table]
        return (f"fedgate connections: {records}\n"
                f"DNS queries: {self.dns.queries}\n{self.prosody.log_tail(120)}")

    def assertAttrs(self, element, expected: dict):
        got = {k: element.getAttribute(k) for k in expected}
        self.assertEqual(got, expected, f"{element.toXml()}\n{self.diagnostics()}")

    # -- tests --------------------------------------------------------------
    @defer.inlineCallbacks
    def test_messages_both_ways(self):
        """Messages between the two components, and the dialback pairs fedgate
        records for them: valid on one outbound and one inbound stream."""
        self.gw_comp.send(f"<message from='alice@{GW_COMPONENT}/r' to='bob@{PROSODY_COMPONENT}' "
                          "type='chat' id='m1'><body>hello &amp; welcome</body></message>")
        got = yield self.receive(self.prosody_comp, "message from fedgate")
        self.assertEqual(got.name, "message")
        self.assertAttrs(got, {"from": f"alice@{GW_COMPONENT}/r", "to": f"bob@{PROSODY_COMPONENT}",
                               "id": "m1", "type": "chat"})
        self.assertEqual(str(got.body), "hello & welcome")

        self.prosody_comp.send(f"<message from='bob@{PROSODY_COMPONENT}' "
                               f"to='alice@{GW_COMPONENT}/r' type='chat' id='m2'>"
                               "<body>hi back</body></message>")
        got = yield self.receive(self.gw_comp, "message from Prosody")
        self.assertEqual(got.name, "message")
        self.assertAttrs(got, {"from": f"bob@{PROSODY_COMPONENT}", "to": f"alice@{GW_COMPONENT}/r",
                               "id": "m2", "type": "chat"})
        self.assertEqual(str(got.body), "hi back")
        self.assertEqual(got.uri, "jabber:component:accept")

        # fedgate's outbound stream to Prosody and Prosody's inbound one to
        # fedgate both carry the pair, valid by dialback.
        def valid(direction):
            return sorted((p.local, p.remote, p.method)
                          for r in self.gateway.table if r.direction == direction
                          for p in r.valid_pairs())
        pair = [(GW_COMPONENT, PROSODY_COMPONENT, "dialback")]
        self.assertEqual(valid(OUTBOUND), pair, self.diagnostics())
        self.assertEqual(valid(INBOUND), pair, self.diagnostics())
        outbound = [r for r in self.gateway.table if r.direction == OUTBOUND]
        self.assertEqual([r.remote_domain for r in outbound], [PROSODY_COMPONENT],
                         self.diagnostics())

    @defer.inlineCallbacks
    def test_iq_both_ways(self):
        """iq get/set and their results, each way; payloads keep their namespaces."""
        # fedgate -> Prosody, and the result back.
        self.gw_comp.send(f"<iq from='svc@{GW_COMPONENT}' to='{PROSODY_COMPONENT}' type='get' "
                          "id='q1'><query xmlns='urn:example:q'/></iq>")
        got = yield self.receive(self.prosody_comp, "iq get from fedgate")
        self.assertEqual(got.name, "iq")
        self.assertAttrs(got, {"type": "get", "id": "q1", "from": f"svc@{GW_COMPONENT}",
                               "to": PROSODY_COMPONENT})
        self.assertEqual(got.query.uri, "urn:example:q")
        self.prosody_comp.send(f"<iq from='{PROSODY_COMPONENT}' to='svc@{GW_COMPONENT}' "
                               "type='result' id='q1'><query xmlns='urn:example:q'><item/>"
                               "</query></iq>")
        got = yield self.receive(self.gw_comp, "iq result from Prosody")
        self.assertAttrs(got, {"type": "result", "id": "q1", "from": PROSODY_COMPONENT,
                               "to": f"svc@{GW_COMPONENT}"})
        self.assertEqual(got.query.uri, "urn:example:q")
        self.assertEqual([c.name for c in got.query.elements()], ["item"])

        # Prosody -> fedgate, and the result back.
        self.prosody_comp.send(f"<iq from='bot@{PROSODY_COMPONENT}/x' to='{GW_COMPONENT}' "
                               "type='set' id='q2'><cmd xmlns='urn:example:c'>go</cmd></iq>")
        got = yield self.receive(self.gw_comp, "iq set from Prosody")
        self.assertAttrs(got, {"type": "set", "id": "q2", "from": f"bot@{PROSODY_COMPONENT}/x",
                               "to": GW_COMPONENT})
        self.assertEqual((got.cmd.uri, str(got.cmd)), ("urn:example:c", "go"))
        self.gw_comp.send(f"<iq from='{GW_COMPONENT}' to='bot@{PROSODY_COMPONENT}/x' "
                          "type='result' id='q2'/>")
        got = yield self.receive(self.prosody_comp, "iq result from fedgate")
        self.assertAttrs(got, {"type": "result", "id": "q2", "from": GW_COMPONENT,
                               "to": f"bot@{PROSODY_COMPONENT}/x"})

    @defer.inlineCallbacks
    def test_ping_to_gateway_domain(self):
        """fedgate answers XEP-0199 ping for its own domain, over a second
        pair (gw.example -> svc.prosody.example) it authenticates itself."""
        self.prosody_comp.send(f"<iq from='bot@{PROSODY_COMPONENT}' to='{GW}' type='get' "
                               "id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
        got = yield self.receive(self.prosody_comp, "ping result")
        self.assertAttrs(got, {"type": "result", "id": "p1", "from": GW,
                               "to": f"bot@{PROSODY_COMPONENT}"})
        inbound = [(p.local, p.remote) for r in self.gateway.table if r.direction == INBOUND
                   for p in r.valid_pairs()]
        outbound = [(p.local, p.remote) for r in self.gateway.table if r.direction == OUTBOUND
                    for p in r.valid_pairs()]
        self.assertIn((GW, PROSODY_COMPONENT), inbound, self.diagnostics())
        self.assertIn((GW, PROSODY_COMPONENT), outbound, self.diagnostics())

    @defer.inlineCallbacks
    def test_prosody_user(self):
        """A user on Prosody's VirtualHost (c2s) and the fedgate component
        exchange messages; the user pings the gateway's domain."""
        self.prosody.add_user("alice", "wonderland")
        try:
            alice = yield connect_user(self.prosody.c2s_port, f"alice@{PROSODY}/interop",
                                       "wonderland")
        except Exception as e:
            self.fail(f"c2s login failed: {e!r}\n{self.diagnostics()}")
        self.addCleanup(alice.close)

        alice.send(f"<message to='bob@{GW_COMPONENT}' type='chat' id='u1'>"
                   "<body>from a user</body></message>")
        got = yield self.receive(self.gw_comp, "message from the Prosody user")
        self.assertAttrs(got, {"from": alice.jid, "to": f"bob@{GW_COMPONENT}", "id": "u1"})
        self.assertEqual(str(got.body), "from a user")

        self.gw_comp.send(f"<message from='bob@{GW_COMPONENT}' to='{alice.jid}' type='chat' "
                          "id='u2'><body>to a user</body></message>")
        got = yield self.receive(alice, "message from fedgate")
        self.assertAttrs(got, {"from": f"bob@{GW_COMPONENT}", "to": alice.jid, "id": "u2"})
        self.assertEqual(str(got.body), "to a user")

        alice.send(f"<iq to='{GW}' type='get' id='u3'><ping xmlns='urn:xmpp:ping'/></iq>")
        got = yield self.receive(alice, "ping result")
        self.assertAttrs(got, {"type": "result", "id": "u3", "from": GW, "to": alice.jid})

        inbound = sorted((p.local, p.remote) for r in self.gateway.table
                         if r.direction == INBOUND for p in r.valid_pairs())
        self.assertEqual(inbound, sorted([(GW, PROSODY), (GW_COMPONENT, PROSODY)]),
                         self.diagnostics())

    @defer.inlineCallbacks
    def test_burst_queued_during_dialback_keeps_order(self):
        """Stanzas sent before either stream is authenticated wait in each
        server's queue and arrive complete and in order."""
        count = 25
        for i in range(count):
            self.gw_comp.send(f"<message from='a@{GW_COMPONENT}' to='b@{PROSODY_COMPONENT}' "
                              f"id='g{i}'><body>{i}</body></message>")
            self.prosody_comp.send(f"<message from='b@{PROSODY_COMPONENT}' to='a@{GW_COMPONENT}' "
                                   f"id='p{i}'><body>{i}</body></message>")
        to_prosody = []
        to_gateway = []
        for _ in range(count):
            to_prosody.append((yield self.receive(self.prosody_comp, "burst message")))
        for _ in range(count):
            to_gateway.append((yield self.receive(self.gw_comp, "burst message")))
        self.assertEqual([m.getAttribute("id") for m in to_prosody],
                         [f"g{i}" for i in range(count)])
        self.assertEqual([m.getAttribute("id") for m in to_gateway],
                         [f"p{i}" for i in range(count)])
        self.assertEqual(self.gateway.sender.bounced, 0)
        self.assertEqual(self.gateway.sender.delivered, count)

    @defer.inlineCallbacks
    def test_second_local_domain_piggybacks(self):
        """Once chat.gw.example has a stream to Prosody, the ping answer from
        gw.example authenticates on that same stream with a second
        <db:result> (XEP-0220 section 2.5), which Prosody accepts."""
        self.gw_comp.send(f"<message from='alice@{GW_COMPONENT}' to='bob@{PROSODY_COMPONENT}' "
                          "id='m4'><body>first</body></message>")
        got = yield self.receive(self.prosody_comp, "message from fedgate")
        self.assertAttrs(got, {"id": "m4", "from": f"alice@{GW_COMPONENT}"})

        self.prosody_comp.send(f"<iq from='bot@{PROSODY_COMPONENT}' to='{GW}' type='get' "
                               "id='p2'><ping xmlns='urn:xmpp:ping'/></iq>")
        got = yield self.receive(self.prosody_comp, "ping result")
        self.assertAttrs(got, {"type": "result", "id": "p2", "from": GW})
        outbound = [r for r in self.gateway.table if r.direction == OUTBOUND]
        self.assertEqual(len(outbound), 1, self.diagnostics())
        self.assertEqual(sorted(p.local for p in outbound[0].valid_pairs()),
                         sorted([GW, GW_COMPONENT]), self.diagnostics())

    @defer.inlineCallbacks
    def test_offline_component_bounces(self):
        """A configured component domain with no component connected answers
        service-unavailable, which travels back to Prosody."""
        self.prosody_comp.send(f"<message from='bot@{PROSODY_COMPONENT}' to='x@{GW_OFFLINE}' "
                               "id='m3'><body>anyone?</body></message>")
        got = yield self.receive(self.prosody_comp, "bounce")
        self.assertEqual(got.name, "message")
        self.assertAttrs(got, {"type": "error", "id": "m3", "from": f"x@{GW_OFFLINE}",
                               "to": f"bot@{PROSODY_COMPONENT}"})
        self.assertIsNotNone(got.error, got.toXml())
        conditions = [c.name for c in got.error.elements()
                      if c.uri == "urn:ietf:params:xml:ns:xmpp-stanzas" and c.name != "text"]
        self.assertEqual(conditions, ["service-unavailable"], got.toXml())

    @defer.inlineCallbacks
    def test_unserved_domain_refused(self):
        """A domain whose DNS points at fedgate but which fedgate does not
        serve: fedgate refuses the stream with host-unknown, and Prosody
        bounces the stanza to its sender, quoting that stream error."""
        self.prosody_comp.send(f"<message from='bot@{PROSODY_COMPONENT}' to='x@{GW_UNKNOWN}' "
                               "id='m5'><body>hello?</body></message>")
        got = yield self.receive(self.prosody_comp, "bounce")
        self.assertAttrs(got, {"type": "error", "id": "m5", "from": f"x@{GW_UNKNOWN}",
                               "to": f"bot@{PROSODY_COMPONENT}"})
        self.assertIsNotNone(got.error, got.toXml())
        # Prosody 0.12 reports a failed s2s stream as remote-server-timeout
        # and quotes the peer's stream error condition in the text.
        self.assertIn("host-unknown", str(got.error.text), got.toXml())
        self.assertFalse(any(p.local == GW_UNKNOWN for r in self.gateway.table
                             for p in r.pairs.values()), self.diagnostics())
