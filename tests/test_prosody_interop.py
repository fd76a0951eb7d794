"""fedgate federating with a real Prosody 0.12 (Debian's 0.12.3), TLS required
on both sides.

Both servers find each other through one loopback DNS server: fedgate asks
it through twisted.names, Prosody through libunbound forwarding.  A
component on each side (XEP-0114) exchanges messages and iq with the other,
so every role is played by both implementations: each is the initiating
server on its outbound stream and the receiving server on its inbound one.

Every stream is encrypted: fedgate's default policy requires TLS, Prosody
runs with ``s2s_require_encryption = true``.  Two ways to authenticate:

- ``SecureAuthInterop``: Prosody with ``s2s_secure_auth = true`` and a
  certificate from the shared test CA, fedgate with ``authentication =
  "certificate"`` for the Prosody domains.  Every first stream in either
  direction authenticates by SASL EXTERNAL (XEP-0178); a second local
  domain piggybacking on fedgate's stream uses dialback, which Prosody
  verifies over its own (SASL-authenticated) stream back to fedgate.
- ``DialbackOverTLSInterop``: Prosody with ``s2s_secure_auth = false`` and
  a certificate from a CA fedgate does not trust, so SASL EXTERNAL is
  impossible in both directions (fedgate neither offers it to, nor tries
  it with, a peer whose certificate fails) while TLS still encrypts: every
  pair authenticates by dialback, with fedgate calling Prosody back over a
  TLS connection of its own.

Besides: Direct TLS (XEP-0368) both ways, each side preferring the other's
``_xmpps-server`` records; fedgate's certificate policy refusing a Prosody
whose certificate it does not trust; and Prosody shutting down mid-session.

What Prosody 0.12 does that a peer must cope with: it opens its streams
with an empty ``id``; it tries SASL EXTERNAL whenever it is offered over
TLS, whether or not the peer's certificate passed its own checks; each
(local, remote) pair gets its own Prosody stream, so Prosody never
piggybacks; it sends its ``<db:verify>`` over its own outbound stream
(fedgate's inbound); it queues stanzas until its stream is authenticated;
and it adds ``xml:lang``.  It never sends a ``<db:result>`` where SASL
EXTERNAL was offered, so fedgate's XEP-0344 shortcut (dialback accepted on
a valid certificate without calling back) is not reached with Prosody.
"""

from __future__ import annotations

import re

import pytest
from twisted.internet import defer, reactor, ssl, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.words.protocols.jabber import client, jid

from fedgate.s2s.pairs import INBOUND, OUTBOUND
from tests.support.component_client import ComponentClient, connect_component
from tests.support.federation import add_component, start_dns
from tests.support.gateway import gateway_config, publish, start_gateway, temp_dir
from tests.support.gateway import shared_ca
from tests.support.pki import TestCA
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

SASL_EXTERNAL = "sasl-external"
DIALBACK = "dialback"
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")

_untrusted_ca: TestCA | None = None


def untrusted_ca() -> TestCA:
    """A CA nobody in these tests trusts (made once: key generation is cheap,
    but not free)."""
    global _untrusted_ca
    if _untrusted_ca is None:
        _untrusted_ca = shared_ca().other_ca()
    return _untrusted_ca


@defer.inlineCallbacks
def connect_user(port: int, user_jid: str, password: str, ca: TestCA):
    """Log a Prosody user in over c2s with STARTTLS (required; Prosody's
    certificate checked against ``ca``), SASL, bind and session.  Fires
    with a client that has the same interface as the component client
    (``send``, ``next_element``, ``close``) and ``jid``, the bound full JID."""
    user = ComponentClient(reactor, user_jid, password)
    trust = ssl.Certificate.loadPEM(ca.root_pem())
    authenticator = client.XMPPAuthenticator(
        jid.JID(user_jid), password,
        configurationForTLS=ssl.optionsForClientTLS(jid.JID(user_jid).host, trustRoot=trust))
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


class _Federation:
    """Starts the DNS server, fedgate with two components, and Prosody with
    one; subclasses say how each side is configured for TLS."""

    timeout = 90

    #: ProsodyServer keyword arguments for TLS and authentication
    def prosody_options(self) -> dict:
        raise NotImplementedError

    #: extra [s2s] settings for fedgate
    def gateway_s2s(self) -> dict:
        return {}

    @defer.inlineCallbacks
    def setUp(self):
        self.dns, dns_port = start_dns(self)

        self.prosody = ProsodyServer(PROSODY, components={PROSODY_COMPONENT: "secret-p"},
                                     dns_port=dns_port, s2s_require_encryption=True,
                                     **self.prosody_options())
        self.addCleanup(self.prosody.cleanup)
        self.dns.add_a("xmpp.prosody.example", "127.0.0.1")
        for domain in (PROSODY, PROSODY_COMPONENT):
            self.dns.add_srv(f"_xmpp-server._tcp.{domain}", 0, 0, self.prosody.s2s_port,
                             "xmpp.prosody.example")
        try:
            self.prosody.start()
        except ProsodyError as e:
            self.fail(str(e))

        # fedgate starts after Prosody so that it stops first: Prosody sent
        # SIGTERM with s2s sessions still open lingers for a second (its
        # main loop retries closing them on a one-second timer).
        self.gateway = yield start_gateway(reactor, gateway_config(
            temp_dir(self), [GW], {GW_COMPONENT: "secret-gw", GW_OFFLINE: "secret-off"},
            **self.gateway_s2s()), dns_port, self)
        publish(self.dns, self.gateway, [GW, GW_COMPONENT, GW_OFFLINE, GW_UNKNOWN],
                "xmpp.gw.example")
        self.publish_more()

        self.gw_comp = yield add_component(self, self.gateway, GW_COMPONENT, "secret-gw", timeout=TIMEOUT)
        self.prosody_comp = yield connect_component(
            reactor, "127.0.0.1", self.prosody.component_port,
            PROSODY_COMPONENT, "secret-p", timeout=TIMEOUT)
        self.addCleanup(self.prosody_comp.close)

    def publish_more(self) -> None:
        """Further DNS records, once both servers listen."""

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
        records = [(r.direction, r.remote_domain, r.remote_address, r.tls,
                    sorted((p.local, p.remote, p.state, p.method) for p in r.pairs.values()))
                   for r in self.gateway.table]
        return (f"fedgate connections: {records}\n"
                f"DNS queries: {self.dns.queries}\n{self.prosody.log_tail(150)}")

    def assertAttrs(self, element, expected: dict):
        got = {k: element.getAttribute(k) for k in expected}
        self.assertEqual(got, expected, f"{element.toXml()}\n{self.diagnostics()}")

    def valid_pairs(self, direction: str) -> list[tuple[str, str, str]]:
        """(local, remote, method) of every valid pair fedgate has in one
        direction, after checking that each stream carrying one is
        encrypted and that its certificate check came out as expected."""
        found = []
        for record in self.gateway.table:
            if record.direction != direction or not record.valid_pairs():
                continue
            self.assertIsNotNone(record.tls, f"unencrypted {direction} stream\n{self.diagnostics()}")
            self.assertIn(record.tls["version"], TLS_VERSIONS, self.diagnostics())
            self.assertEqual(record.tls["chain_ok"], self.chain_ok, self.diagnostics())
            found += [(p.local, p.remote, p.method) for p in record.valid_pairs()]
        return sorted(found)

    @staticmethod
    def conditions(stanza) -> list[str]:
        """The defined conditions of an error stanza."""
        return [c.name for c in stanza.error.elements()
                if c.uri == "urn:ietf:params:xml:ns:xmpp-stanzas" and c.name != "text"]

    @defer.inlineCallbacks
    def exchange_messages(self):
        """One message each way between the components."""
        self.gw_comp.send(f"<message from='a@{GW_COMPONENT}' to='b@{PROSODY_COMPONENT}' "
                          "id='x1'><body>1</body></message>")
        got = yield self.receive(self.prosody_comp, "message from fedgate")
        self.assertAttrs(got, {"id": "x1"})
        self.prosody_comp.send(f"<message from='b@{PROSODY_COMPONENT}' to='a@{GW_COMPONENT}' "
                               "id='x2'><body>2</body></message>")
        got = yield self.receive(self.gw_comp, "message from Prosody")
        self.assertAttrs(got, {"id": "x2"})

    def assert_prosody_logged(self, pattern: str) -> None:
        self.assertRegex(self.prosody.log_text(), pattern, self.prosody.log_tail(150))


class _Scenarios(_Federation):
    """What must work whatever the authentication method: ``method`` is the
    one expected on each first stream, in both directions."""

    method: str
    chain_ok: bool

    @defer.inlineCallbacks
    def test_messages_both_ways(self):
        """Messages between the two components, over one encrypted stream
        each way, both authenticated by ``method``."""
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

        pair = [(GW_COMPONENT, PROSODY_COMPONENT, self.method)]
        self.assertEqual(self.valid_pairs(OUTBOUND), pair, self.diagnostics())
        self.assertEqual(self.valid_pairs(INBOUND), pair, self.diagnostics())
        outbound = [r for r in self.gateway.table if r.direction == OUTBOUND]
        self.assertEqual([r.remote_domain for r in outbound], [PROSODY_COMPONENT],
                         self.diagnostics())
        self.assert_prosody_logged(r"Stream encrypted \(TLSv1\.[23] with ")

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

        pair = [(GW_COMPONENT, PROSODY_COMPONENT, self.method)]
        self.assertEqual(self.valid_pairs(OUTBOUND), pair, self.diagnostics())
        self.assertEqual(self.valid_pairs(INBOUND), pair, self.diagnostics())

    @defer.inlineCallbacks
    def test_ping_to_gateway_domain(self):
        """fedgate answers XEP-0199 ping for its own domain, over a second
        pair (gw.example -> svc.prosody.example) it authenticates itself on
        a stream of its own."""
        self.prosody_comp.send(f"<iq from='bot@{PROSODY_COMPONENT}' to='{GW}' type='get' "
                               "id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
        got = yield self.receive(self.prosody_comp, "ping result")
        self.assertAttrs(got, {"type": "result", "id": "p1", "from": GW,
                               "to": f"bot@{PROSODY_COMPONENT}"})
        pair = [(GW, PROSODY_COMPONENT, self.method)]
        self.assertEqual(self.valid_pairs(INBOUND), pair, self.diagnostics())
        self.assertEqual(self.valid_pairs(OUTBOUND), pair, self.diagnostics())

    @defer.inlineCallbacks
    def test_prosody_user(self):
        """A user on Prosody's VirtualHost (c2s over TLS) and the fedgate
        component exchange messages; the user pings the gateway's domain.
        Prosody opens one stream per (local, remote) pair."""
        self.prosody.add_user("alice", "wonderland")
        try:
            alice = yield connect_user(self.prosody.c2s_port, f"alice@{PROSODY}/interop",
                                       "wonderland", self.prosody_ca)
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

        self.assertEqual(self.valid_pairs(INBOUND),
                         sorted([(GW, PROSODY, self.method), (GW_COMPONENT, PROSODY, self.method)]),
                         self.diagnostics())
        inbound = [r for r in self.gateway.table if r.direction == INBOUND and r.valid_pairs()]
        self.assertEqual(len(inbound), 2, self.diagnostics())

    @defer.inlineCallbacks
    def test_burst_queued_during_authentication_keeps_order(self):
        """Stanzas sent before either stream is authenticated wait in each
        server's queue (through DNS, TCP, STARTTLS and authentication) and
        arrive complete and in order."""
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
        <db:result> (XEP-0220 section 2.5), which Prosody accepts after
        checking the key with fedgate over a stream of its own."""
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
        self.assertEqual(self.valid_pairs(OUTBOUND),
                         sorted([(GW, PROSODY_COMPONENT, DIALBACK),
                                 (GW_COMPONENT, PROSODY_COMPONENT, self.method)]),
                         self.diagnostics())

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
        self.assertEqual(self.conditions(got), ["service-unavailable"], got.toXml())
        pair = [(GW_OFFLINE, PROSODY_COMPONENT, self.method)]
        self.assertEqual(self.valid_pairs(INBOUND), pair, self.diagnostics())
        self.assertEqual(self.valid_pairs(OUTBOUND), pair, self.diagnostics())

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


class SecureAuthInterop(_Scenarios, unittest.TestCase):
    """Prosody with s2s_secure_auth and a trusted certificate; fedgate
    requires certificate authentication from the Prosody domains: SASL
    EXTERNAL both ways."""

    method = SASL_EXTERNAL
    chain_ok = True

    @property
    def prosody_ca(self) -> TestCA:
        return shared_ca()

    def prosody_options(self) -> dict:
        return {"s2s_secure_auth": True, "tls_issuer": shared_ca(), "trusted_cas": [shared_ca()]}

    def gateway_s2s(self) -> dict:
        return {"peers": {d: {"authentication": "certificate"}
                          for d in (PROSODY, PROSODY_COMPONENT)}}

    @defer.inlineCallbacks
    def test_prosody_sees_sasl_external_both_ways(self):
        """Prosody's own account of the same exchange: it accepted fedgate's
        EXTERNAL identity on its inbound stream, and its EXTERNAL succeeded
        on its outbound one, after both certificates checked out."""
        yield self.exchange_messages()
        log = self.prosody.log_text()
        for pattern in (
                rf"Accepting SASL EXTERNAL identity from {re.escape(GW_COMPONENT)}",
                rf"SASL EXTERNAL with {re.escape(GW_COMPONENT)} succeeded",
                r"certificate chain validation result: valid",
                r"certificate identity validation result: valid"):
            self.assertRegex(log, pattern, self.prosody.log_tail(150))
        self.assertNotRegex(log, r"validation result: invalid", self.prosody.log_tail(150))
        self.assertNotRegex(log, r"Initiating dialback", self.prosody.log_tail(150))

    @defer.inlineCallbacks
    def test_prosody_shutdown_closes_streams_cleanly(self):
        """Prosody going down ends both streams with a system-shutdown
        stream error; fedgate drops them without answering with a stream
        error of its own (RFC 6120 4.9.1.1) and forgets their pairs."""
        yield self.exchange_messages()
        self.assertEqual(len(list(self.gateway.table)), 2, self.diagnostics())
        errors_sent = []

        def observe(event):
            if event.get("log_namespace") == "fedgate.stream" and \
                    event.get("log_format", "").startswith("Stream error {condition} to"):
                errors_sent.append(event.get("condition"))
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

        self.prosody.stop()
        for _ in range(100):
            if not list(self.gateway.table):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(list(self.gateway.table), [], self.diagnostics())
        self.assertEqual(errors_sent, [])
        self.assertRegex(self.prosody.log_text(), r"system-shutdown")


class DialbackOverTLSInterop(_Scenarios, unittest.TestCase):
    """Prosody with s2s_secure_auth off and a certificate fedgate does not
    trust: dialback over TLS both ways."""

    method = DIALBACK
    chain_ok = False

    @property
    def prosody_ca(self) -> TestCA:
        return untrusted_ca()

    def prosody_options(self) -> dict:
        return {"s2s_secure_auth": False, "tls_issuer": untrusted_ca(),
                "trusted_cas": [shared_ca()]}

    @defer.inlineCallbacks
    def test_prosody_sees_dialback_over_tls(self):
        """Prosody's account: fedgate's certificate is fine, but fedgate
        never tries SASL EXTERNAL with a server it cannot authenticate, so
        Prosody verifies fedgate's dialback key; and fedgate offers Prosody
        no EXTERNAL, so Prosody's own stream uses dialback too."""
        yield self.exchange_messages()
        log = self.prosody.log_text()
        for pattern in (r"Offering SASL EXTERNAL", r"Initiating dialback",
                        r"verified dialback key\.\.\. it is valid"):
            self.assertRegex(log, pattern, self.prosody.log_tail(150))
        self.assertNotRegex(log, r"Accepting SASL EXTERNAL|Initiating SASL EXTERNAL",
                            self.prosody.log_tail(150))


class DirectTLSInterop(_Federation, unittest.TestCase):
    """XEP-0368 both ways: each side publishes ``_xmpps-server`` SRV records
    for a Direct TLS port, which the other prefers over STARTTLS; SASL
    EXTERNAL as with STARTTLS (Prosody sends SNI, fedgate SNI and ALPN)."""

    chain_ok = True

    def prosody_options(self) -> dict:
        return {"s2s_secure_auth": True, "tls_issuer": shared_ca(), "trusted_cas": [shared_ca()],
                "s2s_direct_tls": True}

    def gateway_s2s(self) -> dict:
        return {"direct_tls_listen": ["tcp:0:interface=127.0.0.1"],
                "peers": {d: {"authentication": "certificate"}
                          for d in (PROSODY, PROSODY_COMPONENT)}}

    def publish_more(self) -> None:
        gateway_port = self.gateway.port_of("s2s_direct_tls")
        for domain in (GW, GW_COMPONENT):
            self.dns.add_srv(f"_xmpps-server._tcp.{domain}", 0, 0, gateway_port, "xmpp.gw.example")
        for domain in (PROSODY, PROSODY_COMPONENT):
            self.dns.add_srv(f"_xmpps-server._tcp.{domain}", 0, 0,
                             self.prosody.s2s_direct_tls_port, "xmpp.prosody.example")

    @defer.inlineCallbacks
    def test_messages_both_ways_over_direct_tls(self):
        yield self.exchange_messages()
        pair = [(GW_COMPONENT, PROSODY_COMPONENT, SASL_EXTERNAL)]
        self.assertEqual(self.valid_pairs(OUTBOUND), pair, self.diagnostics())
        self.assertEqual(self.valid_pairs(INBOUND), pair, self.diagnostics())
        outbound = [r for r in self.gateway.table if r.direction == OUTBOUND]
        self.assertEqual([r.remote_address for r in outbound],
                         [f"127.0.0.1:{self.prosody.s2s_direct_tls_port}"], self.diagnostics())
        self.assertIn((f"_xmpps-server._tcp.{GW_COMPONENT}", "SRV"), self.dns.queries)
        self.assertIn((f"_xmpps-server._tcp.{PROSODY_COMPONENT}", "SRV"), self.dns.queries)
        # Neither side asked the other for STARTTLS.
        self.assertNotRegex(self.prosody.log_text(), r"TLS negotiation started|offering TLS",
                            self.prosody.log_tail(150))


class UntrustedCertificateRefused(_Federation, unittest.TestCase):
    """fedgate requires certificate authentication from the Prosody domains,
    whose certificate it does not trust: nothing gets through, and each
    side's sender gets an error back."""

    chain_ok = False

    def prosody_options(self) -> dict:
        return {"s2s_secure_auth": False, "tls_issuer": untrusted_ca(),
                "trusted_cas": [shared_ca()]}

    def gateway_s2s(self) -> dict:
        return {"peers": {d: {"authentication": "certificate"}
                          for d in (PROSODY, PROSODY_COMPONENT)}}

    @defer.inlineCallbacks
    def test_both_directions_bounce(self):
        """fedgate's sender bounces with the policy's reason after STARTTLS;
        fedgate answers Prosody's dialback request (it never offers SASL
        EXTERNAL to such a peer) with an error, and Prosody bounces."""
        self.gw_comp.send(f"<message from='a@{GW_COMPONENT}' to='b@{PROSODY_COMPONENT}' "
                          "id='r1'><body>1</body></message>")
        got = yield self.receive(self.gw_comp, "bounce from fedgate")
        self.assertAttrs(got, {"type": "error", "id": "r1", "from": f"b@{PROSODY_COMPONENT}"})
        self.assertEqual(self.conditions(got), ["policy-violation"], got.toXml())
        self.assertIn(f"policy requires a valid certificate from {PROSODY_COMPONENT}",
                      str(got.error.text))

        self.prosody_comp.send(f"<message from='b@{PROSODY_COMPONENT}' to='a@{GW_COMPONENT}' "
                               "id='r2'><body>2</body></message>")
        got = yield self.receive(self.prosody_comp, "bounce from Prosody")
        self.assertAttrs(got, {"type": "error", "id": "r2", "from": f"a@{GW_COMPONENT}"})
        # Prosody 0.12 reports any failed s2s stream as remote-server-timeout.
        self.assertIn("dialback authentication failed", str(got.error.text), got.toXml())
        self.assertEqual(self.valid_pairs(INBOUND), [], self.diagnostics())
        self.assertEqual(self.valid_pairs(OUTBOUND), [], self.diagnostics())
        self.assertNotRegex(self.prosody.log_text(), r"Initiating SASL EXTERNAL",
                            self.prosody.log_tail(150))


def test_unloadable_certificate_is_reported():
    """The harness does not start a Prosody that silently runs without TLS:
    a key Prosody cannot load fails start() with certmanager's words."""
    server = ProsodyServer(PROSODY, components={PROSODY_COMPONENT: "s"}, tls_issuer=shared_ca(),
                           trusted_cas=[shared_ca()])
    try:
        (server.cert_dir / f"{PROSODY_COMPONENT}.key").write_text("not a key\n")
        with pytest.raises(ProsodyError, match=rf"could not set up TLS: .*{PROSODY_COMPONENT}"):
            server.start()
        assert not server.running
    finally:
        server.cleanup()
