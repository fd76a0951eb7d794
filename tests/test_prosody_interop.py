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

Besides: Prosody shutting down mid-session.  Direct TLS (XEP-0368) and
fedgate's certificate policy refusing a Prosody whose certificate it does
not trust are in test_prosody_tls_interop.py; the shared setup is in
tests/support/prosody_federation.py.

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
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from fedgate.s2s.pairs import INBOUND, OUTBOUND
from tests.support.gateway import shared_ca
from tests.support.pki import TestCA
from tests.support.prosody import prosody_available
from tests.support.prosody_federation import (
    DIALBACK, GW, GW_COMPONENT, GW_OFFLINE, GW_UNKNOWN, PROSODY, PROSODY_COMPONENT, SASL_EXTERNAL,
    ProsodyFederation, connect_user, untrusted_ca)

if not prosody_available():
    pytest.skip("prosody is not installed (scripts/bootstrap --test installs it)",
                allow_module_level=True)


class _Scenarios(ProsodyFederation):
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
