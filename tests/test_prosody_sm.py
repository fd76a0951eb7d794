"""XEP-0198 with a real Prosody 0.12 (mod_smacks, S2S on by default):
Prosody offers stream management after SASL EXTERNAL and fedgate enables it;
Prosody enables it on its own stream to us; a transport aborted mid-flood
loses nothing (Prosody does not resume S2S streams, so what it had not
acknowledged goes out again on a new stream; duplicates are counted)."""

from __future__ import annotations

import pytest
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from fedgate.s2s.pairs import INBOUND, OUTBOUND
from tests.support.gateway import shared_ca
from tests.support.prosody import prosody_available
from tests.support.prosody_federation import (
    GW_COMPONENT, PROSODY, PROSODY_COMPONENT, SASL_EXTERNAL, ProsodyFederation)

if not prosody_available():
    pytest.skip("prosody is not installed (scripts/bootstrap --test installs it)",
                allow_module_level=True)

FLOOD = 1000
BATCH = 50


def sleep(seconds: float):
    return task.deferLater(reactor, seconds, lambda: None)


class ProsodyStreamManagement(ProsodyFederation, unittest.TestCase):
    chain_ok = True

    def prosody_options(self) -> dict:
        return {"s2s_secure_auth": True, "tls_issuer": shared_ca(), "trusted_cas": [shared_ca()],
                "modules_enabled": ["smacks"]}

    def gateway_s2s(self) -> dict:
        return {"queue_max_stanzas": 5000,
                "peers": {d: {"authentication": "certificate"} for d in (PROSODY, PROSODY_COMPONENT)}}

    def outbound(self):
        [record] = [r for r in self.gateway.table
                    if r.direction == OUTBOUND and r.remote_domain == PROSODY_COMPONENT]
        return record

    @defer.inlineCallbacks
    def test_enabled_both_ways_after_sasl_external(self):
        yield self.exchange_messages()
        out = self.outbound()
        self.assertEqual([p.method for p in out.valid_pairs()], [SASL_EXTERNAL], self.diagnostics())
        self.assertTrue(out.stream_management()["enabled"], self.diagnostics())
        self.assertFalse(out.stream_management()["resumable"], "Prosody gives no id to resume")

        def inbound_enabled():
            inbound = [r for r in self.gateway.table if r.direction == INBOUND and r.authenticated]
            return bool(inbound) and all(r.stream_management()["enabled"] for r in inbound)

        # Prosody answers our <r/>: what we sent is acknowledged, delivered;
        # and it enables stream management on its own stream to us.
        for _ in range(100):
            if out.stream_management()["unacked"] == 0 and inbound_enabled():
                break
            yield sleep(0.05)
        self.assertTrue(inbound_enabled(), self.diagnostics())
        self.assertEqual(out.stream_management()["unacked"], 0, self.diagnostics())
        outcomes = self.gateway.sender.outcomes()
        self.assertEqual((outcomes["delivered"], outcomes["in_flight"]), (1, 0))

    @defer.inlineCallbacks
    def test_abort_mid_flood_loses_nothing(self):
        yield self.exchange_messages()
        sender = self.gateway.sender
        destination = sender.destinations[PROSODY_COMPONENT]
        first = destination.stream
        aborted_with = None
        for start in range(0, FLOOD, BATCH):
            for n in range(start, start + BATCH):
                self.gw_comp.send(f"<message from='a@{GW_COMPONENT}' to='b@{PROSODY_COMPONENT}' "
                                  f"id='p{n}'><body>{n}</body></message>")
            yield sleep(0.01)
            if aborted_with is None and start >= FLOOD // 3 and first.sm.out.unacked:
                aborted_with = len(first.sm.out.unacked)
                first.io.transport.abortConnection()
        self.assertIsNotNone(aborted_with, "aborted while stanzas were unacknowledged")
        ids = []
        while True:
            try:
                got = yield self.prosody_comp.next_element(timeout=2.0 if len(ids) >= FLOOD else 20)
            except defer.TimeoutError:
                break
            ids.append(got.getAttribute("id"))
        expected = {f"p{n}" for n in range(FLOOD)}
        lost = len(expected - set(ids))
        duplicated = len(ids) - len(set(ids))
        print(f"\nXEP-0198 with Prosody 0.12, abort mid-flood: {FLOOD} sent, {aborted_with} "
              f"unacknowledged at the abort, {lost} lost, {duplicated} duplicated (Prosody does "
              f"not resume S2S: what it had not acknowledged was sent again)")
        self.assertEqual(lost, 0, self.diagnostics())
        self.assertIsNot(destination.stream, first)

    @defer.inlineCallbacks
    def test_clean_close_mid_flood_asks_for_the_last_ack(self):
        """An operator closes our stream mid-flood: the last <r/> before our
        </stream:stream> gets Prosody's <a/>, so what it had counts
        delivered, and nothing goes out twice or bounces."""
        yield self.exchange_messages()
        sender = self.gateway.sender
        destination = sender.destinations[PROSODY_COMPONENT]
        first = destination.stream
        closed_with = None
        for start in range(0, FLOOD, BATCH):
            for n in range(start, start + BATCH):
                self.gw_comp.send(f"<message from='a@{GW_COMPONENT}' to='b@{PROSODY_COMPONENT}' "
                                  f"id='c{n}'><body>{n}</body></message>")
            yield sleep(0.01)
            if closed_with is None and start >= FLOOD // 3 and first.sm.out.unacked:
                closed_with = len(first.sm.out.unacked)
                destination.keep_queue_on_close(first)
                destination.close()
        self.assertIsNotNone(closed_with, "closed while stanzas were unacknowledged")
        ids = []
        while True:
            try:
                got = yield self.prosody_comp.next_element(timeout=2.0 if len(ids) >= FLOOD else 20)
            except defer.TimeoutError:
                break
            ids.append(got.getAttribute("id"))
        expected = {f"c{n}" for n in range(FLOOD)}
        lost = len(expected - set(ids))
        duplicated = len(ids) - len(set(ids))
        outcomes = sender.outcomes()
        print(f"\nXEP-0198 with Prosody 0.12, clean close mid-flood: {FLOOD} sent, {closed_with} "
              f"unacknowledged at the close, {lost} lost, {duplicated} duplicated, "
              f"{outcomes['bounced']} bounced")
        self.assertEqual((lost, duplicated, outcomes["bounced"]), (0, 0, 0), self.diagnostics())
        self.assertIsNot(destination.stream, first)
