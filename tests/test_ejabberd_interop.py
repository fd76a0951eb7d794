"""fedgate federating with a real ejabberd 23.01 (Debian's) set up for
certificates only: STARTTLS required, SASL EXTERNAL, no ``mod_s2s_dialback``.

Such an ejabberd never offers dialback (``urn:xmpp:features:dialback``).  A
``<db:result/>`` on a stream it has already authenticated by SASL EXTERNAL
it silently ignores (the security issue's interop report: the pair stayed
pending forever); on a stream not yet authenticated it answers with the
stream error ``not-authorized``.  So:

- a second local domain must not piggyback on the stream the first one
  authenticated by SASL EXTERNAL; it gets a stream of its own, authenticated
  by SASL EXTERNAL with its own certificate, and its stanzas (and ejabberd's
  answers) get through;
- a local domain whose certificate ejabberd does not trust gets its stream
  closed; its stanzas bounce then, and the other domains go on.

ejabberd answers iq ``urn:xmpp:ping`` to its own domain (``mod_ping``) over
its own stream back to fedgate, also authenticated by SASL EXTERNAL.

Since fedgate no longer sends a request this ejabberd would ignore, the
pending-pair timeout is tested end to end against a peer that ignores
dialback on purpose, in tests/test_sender_e2e.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import defer, reactor
from twisted.trial import unittest

from fedgate.s2s.pairs import OUTBOUND
from tests.support.admin import AdminClient
from tests.support.ejabberd import SRV_TARGET, EjabberdError, EjabberdServer, ejabberd_available
from tests.support.federation import add_component, start_dns
from tests.support.gateway import gateway_config, publish, shared_ca, start_gateway, temp_dir

if not ejabberd_available():
    pytest.skip("ejabberd is not installed (scripts/bootstrap --test installs it)",
                allow_module_level=True)

TIMEOUT = 15
PAIR_TIMEOUT = 4.0

EJ = "ej.example"
GW = "gw.example"
CHAT = "chat.gw.example"
NEWS = "news.gw.example"
# Its certificate is from a CA ejabberd does not trust: SASL EXTERNAL fails,
# and only dialback is left to it.
NOCERT = "untrusted.gw.example"


class _WithEjabberd:
    """The DNS server, ejabberd and fedgate with three components."""

    timeout = 120

    def ejabberd_issuer(self):
        """The CA that issues ejabberd's certificate."""
        return shared_ca()

    @defer.inlineCallbacks
    def setUp(self):
        self.dns, dns_port = start_dns(self)
        self.ejabberd = EjabberdServer(EJ, dns_port=dns_port, tls_issuer=self.ejabberd_issuer(),
                                       trusted_cas=(shared_ca(),))
        self.addCleanup(self.ejabberd.cleanup)
        self.dns.add_a("xmpp.ej.example", "127.0.0.1")
        self.dns.add_srv(f"_xmpp-server._tcp.{EJ}", 0, 0, self.ejabberd.s2s_port, "xmpp.ej.example")
        try:
            self.ejabberd.start()
        except EjabberdError as e:
            self.fail(str(e))

        state = temp_dir(self)
        config = gateway_config(state, [GW], {CHAT: "s-chat", NEWS: "s-news", NOCERT: "s-nocert"},
                                pair_timeout=PAIR_TIMEOUT, queue_max_wait=60)
        shared_ca().other_ca().issue(dns=(NOCERT,)).write(Path(state) / "certs", NOCERT)
        self.gateway = yield start_gateway(reactor, config, dns_port, self)
        publish(self.dns, self.gateway, [GW, CHAT, NEWS, NOCERT], SRV_TARGET)
        self.clients = {}
        for domain, secret in ((CHAT, "s-chat"), (NEWS, "s-news"), (NOCERT, "s-nocert")):
            client = yield add_component(self, self.gateway, domain, secret, timeout=TIMEOUT)
            self.clients[domain] = client

    def ping(self, local: str, n: int) -> None:
        self.clients[local].send(f"<iq from='bot@{local}' to='{EJ}' type='get' id='p{n}'>"
                                 "<ping xmlns='urn:xmpp:ping'/></iq>")

    @defer.inlineCallbacks
    def answer(self, local: str, what: str):
        try:
            got = yield self.clients[local].next_element(timeout=TIMEOUT)
        except defer.TimeoutError:
            self.fail(f"{local} got no {what} within {TIMEOUT} s\n{self.diagnostics()}")
        return got

    def diagnostics(self) -> str:
        records = [(r.id, r.direction, r.remote_domain, sorted((p.local, p.remote, p.state, p.method)
                                                               for p in r.pairs.values()))
                   for r in self.gateway.table]
        return (f"fedgate connections: {records}\nDNS queries: {self.dns.queries}\n"
                f"{self.ejabberd.log_tail(80)}")

    def outbound_pairs(self) -> list[tuple[int, str, str, str]]:
        return sorted((r.id, p.local, p.state, p.method) for r in self.gateway.table
                      if r.direction == OUTBOUND for p in r.pairs.values())


class CertificateOnlyEjabberd(_WithEjabberd, unittest.TestCase):
    @defer.inlineCallbacks
    def test_second_local_domain_gets_its_own_certificate_stream(self):
        self.ping(CHAT, 1)
        got = yield self.answer(CHAT, "ping result")
        self.assertEqual((got.name, got["type"], got["id"], got["from"]), ("iq", "result", "p1", EJ),
                         got.toXml())
        # The stream is open (authenticated by SASL EXTERNAL for chat); now
        # news, with ejabberd's features after that restart offering no dialback.
        self.ping(NEWS, 2)
        got = yield self.answer(NEWS, "ping result")
        self.assertEqual((got["type"], got["id"], got["from"]), ("result", "p2", EJ),
                         got.toXml() + self.diagnostics())
        pairs = self.outbound_pairs()
        self.assertEqual([(local, state, method) for _, local, state, method in pairs],
                         [(CHAT, "valid", "sasl-external"), (NEWS, "valid", "sasl-external")],
                         self.diagnostics())
        self.assertNotEqual(pairs[0][0], pairs[1][0], "two streams, one per local domain")
        admin = AdminClient(reactor, self.gateway)
        answer = yield admin.get(f"/api/v1/destinations/{EJ}")
        view = answer.json
        self.assertEqual((view["state"], view["pending_pairs"]), ("open", []), view)
        self.assertEqual(sorted(view["connection_ids"]), sorted(p[0] for p in pairs))
        # Both streams keep working.
        self.ping(CHAT, 3)
        self.ping(NEWS, 4)
        got = yield self.answer(CHAT, "second ping result")
        self.assertEqual(got["id"], "p3")
        got = yield self.answer(NEWS, "second ping result")
        self.assertEqual(got["id"], "p4")

    @defer.inlineCallbacks
    def test_refused_local_domain_bounces_at_once_and_others_go_on(self):
        """ejabberd refuses SASL EXTERNAL for a domain whose certificate it
        does not trust and closes that stream: the domain's stanzas bounce
        then (not after a queue timeout), and the first domain's stream is
        untouched."""
        self.ping(CHAT, 1)
        got = yield self.answer(CHAT, "ping result")
        self.assertEqual(got["type"], "result", got.toXml())
        started = reactor.seconds()
        self.ping(NOCERT, 2)
        got = yield self.answer(NOCERT, "bounce")
        self.assertEqual((got["type"], got["id"]), ("error", "p2"), got.toXml())
        self.assertLess(reactor.seconds() - started, PAIR_TIMEOUT)
        self.ping(CHAT, 3)
        got = yield self.answer(CHAT, "ping result")
        self.assertEqual((got["type"], got["id"]), ("result", "p3"))
