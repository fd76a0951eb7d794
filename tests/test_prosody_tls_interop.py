"""fedgate and a real Prosody 0.12 over TLS beyond STARTTLS with a trusted
certificate (the rest of test_prosody_interop.py's setting):

- ``DirectTLSInterop``: Direct TLS (XEP-0368) both ways, each side
  preferring the other's ``_xmpps-server`` records;
- ``UntrustedCertificateRefused``: fedgate's certificate policy refusing a
  Prosody whose certificate it does not trust, in both directions;
- the harness refusing to start a Prosody that would run without TLS.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.trial import unittest

from fedgate.s2s.pairs import INBOUND, OUTBOUND
from tests.support.gateway import shared_ca
from tests.support.prosody import ProsodyError, ProsodyServer, prosody_available
from tests.support.prosody_federation import (
    GW, GW_COMPONENT, PROSODY, PROSODY_COMPONENT, SASL_EXTERNAL, ProsodyFederation, untrusted_ca)

if not prosody_available():
    pytest.skip("prosody is not installed (scripts/bootstrap --test installs it)",
                allow_module_level=True)


class DirectTLSInterop(ProsodyFederation, unittest.TestCase):
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


class UntrustedCertificateRefused(ProsodyFederation, unittest.TestCase):
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
