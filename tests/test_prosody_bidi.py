"""fedgate and a real Prosody 0.12 sharing bidirectional streams (XEP-0288).

Prosody ships ``mod_s2s_bidi`` but loads it only when asked: here it is in
``modules_enabled``, and both sides require TLS.  A component on each side
talks to the other; whichever side sends first opens the stream, and the
answers must come back over that same TCP connection.  We check fedgate's
connection table, Prosody's log, and the kernel's view (``ss``).

How Prosody 0.12.3 does bidi (``/usr/lib/prosody/modules/``):

- ``mod_s2s_bidi.lua`` offers ``<bidi xmlns='urn:xmpp:features:bidi'/>`` on
  unauthenticated inbound streams and accepts ``<bidi xmlns='urn:xmpp:bidi'/>``
  there; on its outbound streams it sends that request as soon as the
  feature is seen, before SASL or dialback (hook priority 200).  With
  ``s2s_require_encryption`` (the default) only once the stream is encrypted.
- Routing (``mod_s2s.lua``, ``mark_connected``): an inbound bidi stream
  becomes Prosody's route for the inverse of the stream's own pair only,
  and only if Prosody has no outbound stream for that pair yet; on its own
  outbound bidi streams it accepts stanzas from the domain it authenticated.
  Prosody never authenticates further pairs in the reverse direction.
- Dialback (``mod_dialback.lua``): Prosody checks a key by routing a
  ``<db:verify>`` to the other server (as XEP-0288 requires, never on the
  stream the request came in on).  With no stream there yet it opens a
  full outbound stream, with the ``<db:verify>`` queued until that stream is
  authenticated (``route_to_new_session``).  That stream stays open and,
  being Prosody's outbound stream for the pair, is the one Prosody routes
  its stanzas over.  So when fedgate opens the first stream and
  authenticates by dialback, two long-lived connections remain, one each
  way (see ``DialbackBidi.test_fedgate_first``).
- An untyped ``<db:result>`` arriving on one of Prosody's outbound streams
  is read as the answer to its own request: it closes the stream with
  ``invalid-id`` (see ``SaslExternalBidi.test_reverse_dialback_...``).
"""

from __future__ import annotations

import os
import re

import pytest
from twisted.internet import defer, reactor, task, utils
from twisted.trial import unittest

from fedgate.s2s.pairs import INBOUND, LOCAL, OUTBOUND, REMOTE
from tests.support.component_client import connect_component
from tests.support.federation import add_component, start_dns
from tests.support.gateway import gateway_config, publish, shared_ca, start_gateway, temp_dir
from tests.support.prosody import BIDI_MODULE, prosody_available
from tests.support.prosody_federation import start_prosody

if not prosody_available():
    pytest.skip("prosody is not installed (scripts/bootstrap --test installs it)",
                allow_module_level=True)

TIMEOUT = 15
ROUNDS = 3

GW = "gw.example"
GW_COMPONENT = "chat.gw.example"
GW_ROOM = "muc.gw.example"
PROSODY = "prosody.example"
PROSODY_COMPONENT = "svc.prosody.example"

SASL_EXTERNAL = "sasl-external"
DIALBACK = "dialback"


@defer.inlineCallbacks
def client_ends(port: int):
    """The connecting ends ("address:port") of established TCP connections
    to 127.0.0.1:port, as ``ss`` sees them: one per connection."""
    out = yield utils.getProcessOutput(
        "ss", ["-Htn", "state", "established", f"( dport = :{port} )"], env=os.environ,
        reactor=reactor)
    return sorted(line.split()[2] for line in out.decode().splitlines() if line.strip())


class StreamLost(AssertionError):
    """Prosody closed its bidi stream after fedgate's reverse-direction request."""


class _BidiFederation:
    """DNS, Prosody with mod_s2s_bidi and one component, fedgate with two."""

    timeout = 60

    def prosody_options(self) -> dict:
        raise NotImplementedError

    def gateway_s2s(self) -> dict:
        # Verification connections close after their answer (no idle pool):
        # these tests count the long-lived streams.
        return {"verification_idle_timeout": 0}

    @defer.inlineCallbacks
    def setUp(self):
        self.dns, dns_port = start_dns(self)
        self.prosody = start_prosody(self, self.dns, dns_port, modules_enabled=[BIDI_MODULE],
                                     **self.prosody_options())
        # fedgate starts after Prosody so that it stops first (see
        # test_prosody_interop).
        self.gateway = yield start_gateway(reactor, gateway_config(
            temp_dir(self), [GW], {GW_COMPONENT: "secret-gw", GW_ROOM: "secret-room"},
            **self.gateway_s2s()), dns_port, self)
        publish(self.dns, self.gateway, [GW, GW_COMPONENT, GW_ROOM], "xmpp.gw.example")
        self.gone = []  # every S2S record that left fedgate's table during the test
        self.gateway.table.on_removed(self.gone.append)
        self.gw_comp = yield add_component(self, self.gateway, GW_COMPONENT, "secret-gw", timeout=TIMEOUT)
        self.prosody_comp = yield connect_component(
            reactor, "127.0.0.1", self.prosody.component_port, PROSODY_COMPONENT, "secret-p",
            timeout=TIMEOUT)
        self.addCleanup(self.prosody_comp.close)

    # -- helpers ---------------------------------------------------------------
    def diagnostics(self) -> str:
        records = [(r.direction, r.bidi, r.remote_address,
                    sorted((p.local, p.remote, p.state, p.method, p.origin, p.stanzas_in,
                            p.stanzas_out) for p in r.pairs.values()))
                   for r in self.gateway.table]
        return f"fedgate connections: {records}\n{self.prosody.log_tail(150)}"

    @defer.inlineCallbacks
    def receive(self, peer, what: str, timeout: float = TIMEOUT):
        try:
            element = yield peer.next_element(timeout=timeout)
        except defer.TimeoutError:
            self.fail(f"{peer.domain} received no {what} within {timeout} s\n" + self.diagnostics())
        return element

    @defer.inlineCallbacks
    def converse(self, first, second, rounds: int = ROUNDS):
        """``first`` writes, ``second`` answers, ``rounds`` times; the first
        message opens the stream."""
        for n in range(rounds):
            first.send(f"<message from='a@{first.domain}' to='b@{second.domain}' id='q{n}'>"
                       f"<body>{n}</body></message>")
            got = yield self.receive(second, f"message q{n}")
            self.assertEqual(got.getAttribute("id"), f"q{n}", got.toXml())
            second.send(f"<message from='b@{second.domain}' to='a@{first.domain}' id='r{n}'>"
                        f"<body>{n}</body></message>")
            got = yield self.receive(first, f"answer r{n}")
            self.assertEqual(got.getAttribute("id"), f"r{n}", got.toXml())

    @defer.inlineCallbacks
    def links(self):
        """(connections fedgate -> Prosody's S2S port, Prosody -> fedgate's)
        as lists of their connecting ends."""
        out = yield client_ends(self.prosody.s2s_port)
        into = yield client_ends(self.gateway.port_of("s2s"))
        return out, into

    @defer.inlineCallbacks
    def settled_links(self, expected: tuple[int, int], ready=lambda: True):
        """``links()`` once the counts are ``expected`` (short-lived dialback
        callback connections have closed) and ``ready()``, or after 5 s
        whatever they are."""
        for _ in range(100):
            got = yield self.links()
            if (len(got[0]), len(got[1])) == expected and ready():
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        return got

    def completed_streams(self) -> list[str]:
        """Prosody's "... s2s connection A->B complete" lines, in order."""
        return re.findall(r"(\w+ s2s connection \S+->\S+) complete", self.prosody.log_text())

    @defer.inlineCallbacks
    def assert_one_bidi_connection(self, direction: str, method: str):
        """After ``converse``: one TCP connection, opened by the side
        ``direction`` says, carries everything both ways on the one pair."""
        fedgate_first = direction == OUTBOUND
        out, into = yield self.settled_links((1, 0) if fedgate_first else (0, 1))
        self.assertEqual((len(out), len(into)), (1, 0) if fedgate_first else (0, 1),
                         f"connections out {out}, in {into}\n{self.diagnostics()}")
        [record] = list(self.gateway.table)
        self.assertEqual((record.direction, record.bidi), (direction, True), self.diagnostics())
        self.assertIsNotNone(record.tls, self.diagnostics())
        if not fedgate_first:  # the kernel's connection is the one in the table
            self.assertEqual(into, [record.remote_address])
        [pair] = record.valid_pairs()
        self.assertEqual((pair.local, pair.remote, pair.method, pair.origin),
                         (GW_COMPONENT, PROSODY_COMPONENT, method,
                          LOCAL if fedgate_first else REMOTE), self.diagnostics())
        self.assertEqual((pair.stanzas_in, pair.stanzas_out), (ROUNDS, ROUNDS), self.diagnostics())
        self.assertEqual(self.gone, [], "no other S2S stream came and went")
        if fedgate_first:
            expected = f"Incoming s2s connection {GW_COMPONENT}->{PROSODY_COMPONENT}"
            evidence = (r"Requested bidirectional stream",
                        rf"Setting up to handle route from {PROSODY_COMPONENT} to {GW_COMPONENT}")
        else:
            expected = f"Outgoing s2s connection {PROSODY_COMPONENT}->{GW_COMPONENT}"
            evidence = (r"Requesting bidirectional stream",)
        self.assertEqual(self.completed_streams(), [expected], self.prosody.log_tail(150))
        for pattern in evidence:
            self.assertRegex(self.prosody.log_text(), pattern, self.prosody.log_tail(150))

    # -- common scenarios ---------------------------------------------------------
    @defer.inlineCallbacks
    def test_prosody_first(self):
        """Prosody's component writes first: Prosody connects, requests
        bidi, authenticates; fedgate answers over Prosody's stream and opens
        no stream of its own (with dialback, only the short-lived callback
        connection to Prosody, closed once it has answered)."""
        yield self.converse(self.prosody_comp, self.gw_comp)
        yield self.assert_one_bidi_connection(INBOUND, self.method)


class SaslExternalBidi(_BidiFederation, unittest.TestCase):
    """Prosody with s2s_secure_auth and a certificate from the shared CA;
    fedgate requires certificates from the Prosody domains: each stream is
    authenticated by SASL EXTERNAL, after TLS and the bidi request."""

    method = SASL_EXTERNAL

    def prosody_options(self) -> dict:
        return {"s2s_secure_auth": True, "tls_issuer": shared_ca(), "trusted_cas": [shared_ca()]}

    def gateway_s2s(self) -> dict:
        return {"peers": {d: {"authentication": "certificate"} for d in (PROSODY, PROSODY_COMPONENT)}}

    @defer.inlineCallbacks
    def test_fedgate_first(self):
        """fedgate's component writes first: fedgate connects and requests
        bidi; Prosody makes that stream its route back (so its log says it
        set up the route) and never connects to fedgate."""
        yield self.converse(self.gw_comp, self.prosody_comp)
        yield self.assert_one_bidi_connection(OUTBOUND, SASL_EXTERNAL)

    @defer.inlineCallbacks
    def test_second_domain_keeps_prosody_stream(self):
        """A second fedgate domain writing to Prosody while Prosody's bidi
        stream is the only one.  Reverse-direction dialback on it (XEP-0288)
        would make Prosody 0.12 close the stream (its mod_dialback reads the
        request as an answer: invalid-id), so fedgate leaves it off by default
        (s2s.reverse_dialback) and opens a connection of its own instead;
        Prosody's stream survives."""
        room = yield add_component(self, self.gateway, GW_ROOM, "secret-room", timeout=TIMEOUT)
        yield self.converse(self.prosody_comp, self.gw_comp, rounds=1)
        [prosody_stream] = list(self.gateway.table)
        room.send(f"<message from='r@{GW_ROOM}' to='b@{PROSODY_COMPONENT}' id='room'/>")
        got = yield self.receive(self.prosody_comp, "message from the second domain")
        self.assertEqual(got.getAttribute("id"), "room")
        if prosody_stream in self.gone:
            closed = re.search(r"s2s stream \S+ closed: (\S+)", self.prosody.log_text())
            raise StreamLost(f"Prosody closed its stream ({closed and closed[1]})\n"
                             + self.diagnostics())
        self.assertEqual(self.gone, [], self.diagnostics())
        own = [r for r in self.gateway.table if r.direction == "outbound"]
        self.assertEqual([r.remote_domain for r in own], [PROSODY_COMPONENT], self.diagnostics())


class DialbackBidi(_BidiFederation, unittest.TestCase):
    """Prosody with s2s_secure_auth off and a certificate fedgate does not
    trust: every pair authenticates by dialback over TLS, each callback over
    a connection of its own."""

    method = DIALBACK

    def prosody_options(self) -> dict:
        return {"s2s_secure_auth": False, "tls_issuer": shared_ca().other_ca(),
                "trusted_cas": [shared_ca()]}

    @defer.inlineCallbacks
    def test_fedgate_first(self):
        """fedgate connects first and asks for dialback.  Prosody verifies
        the key over a new outbound stream of its own (bidi too), queues the
        <db:verify> until that stream is authenticated (fedgate calls
        Prosody back for it, over a short-lived connection), and from then
        on routes its stanzas over it: mark_connected leaves fedgate's
        stream aside since Prosody already has an outbound stream for the
        pair.  Two long-lived connections, one each way: the most Prosody
        0.12 allows here.  fedgate's first message leaves over Prosody's
        stream, usable first; once fedgate's own stream is authenticated,
        fedgate writes on its own (the switch point depends on timing)."""
        yield self.converse(self.gw_comp, self.prosody_comp)
        out, into = yield self.settled_links(
            (1, 1), lambda: sorted(bool(r.valid_pairs()) for r in self.gateway.table) == [True, True])
        self.assertEqual((len(out), len(into)), (1, 1),
                         f"connections out {out}, in {into}\n{self.diagnostics()}")
        records = {r.direction: r for r in self.gateway.table}
        self.assertEqual(sorted(records), [INBOUND, OUTBOUND], self.diagnostics())
        self.assertEqual(into, [records[INBOUND].remote_address])
        pairs = {}
        for direction, record in records.items():
            self.assertTrue(record.bidi, self.diagnostics())
            [pairs[direction]] = record.valid_pairs()
        self.assertEqual(
            {d: (p.local, p.remote, p.method, p.origin, p.stanzas_in) for d, p in pairs.items()},
            {OUTBOUND: (GW_COMPONENT, PROSODY_COMPONENT, DIALBACK, LOCAL, 0),
             INBOUND: (GW_COMPONENT, PROSODY_COMPONENT, DIALBACK, REMOTE, ROUNDS)},
            self.diagnostics())
        self.assertGreaterEqual(pairs[INBOUND].stanzas_out, 1, self.diagnostics())
        self.assertEqual(pairs[INBOUND].stanzas_out + pairs[OUTBOUND].stanzas_out, ROUNDS)
        before = pairs[OUTBOUND].stanzas_out
        self.gw_comp.send(f"<message from='a@{GW_COMPONENT}' to='b@{PROSODY_COMPONENT}' id='z'/>")
        got = yield self.receive(self.prosody_comp, "message z")
        self.assertEqual(got.getAttribute("id"), "z")
        self.assertEqual(pairs[OUTBOUND].stanzas_out, before + 1, self.diagnostics())
        self.assertEqual(self.gone, [], self.diagnostics())
        log = self.prosody.log_text()
        self.assertEqual(sorted(self.completed_streams()), [
            f"Incoming s2s connection {GW_COMPONENT}->{PROSODY_COMPONENT}",
            f"Outgoing s2s connection {PROSODY_COMPONENT}->{GW_COMPONENT}"],
            self.prosody.log_tail(150))
        for pattern in (r"Requested bidirectional stream", r"Requesting bidirectional stream",
                        r"opening a new outgoing connection for this stanza"):
            self.assertRegex(log, pattern, self.prosody.log_tail(150))
        self.assertNotRegex(log, r"Setting up to handle route", self.prosody.log_tail(150))
