"""Real gateways federating on loopback, set up for a trial TestCase.

The test DNS server, the gateways and their components are started here and
stopped by the test's cleanups, in reverse order: components first, then
the gateways, then DNS.  Gateway A is published as gw-a.example and B as
gw-b.example, as in every two-gateway test.
"""

from __future__ import annotations

from twisted.internet import defer, reactor

from tests.support.component_client import connect_component
from tests.support.dnsserver import TestDNSServer
from tests.support.gateway import publish, start_gateway


def start_dns(testcase) -> tuple[TestDNSServer, int]:
    """Start the test DNS server for ``testcase``; returns it and its port."""
    dns = TestDNSServer(reactor)
    port = dns.start()
    testcase.addCleanup(dns.stop)
    return dns, port


def hosted(config: dict) -> list:
    """The domains a gateway config hosts: its domains, then its components."""
    return list(config["domains"]) + list(config["components"]["domains"])


@defer.inlineCallbacks
def add_component(testcase, gateway, domain: str, secret: str, **kwargs):
    """An XEP-0114 component connected to ``gateway``, closed after the test."""
    client = yield connect_component(reactor, "127.0.0.1", gateway.port_of("components"),
                                     domain, secret, **kwargs)
    testcase.addCleanup(client.close)
    return client


class TwoGatewaysFixture:
    """A mixin for trial TestCases: ``self.dns``, gateway ``self.a`` and
    gateway ``self.b``, each published in DNS."""

    @defer.inlineCallbacks
    def start_two_gateways(self, a_config: dict, b_config: dict, a_published=None, b_published=None):
        """Start DNS, then A from ``a_config`` and B from ``b_config``, and
        publish the SRV records of what each hosts (or of the domains given
        in ``a_published``/``b_published``)."""
        self.dns, dns_port = start_dns(self)
        self.a = yield start_gateway(reactor, a_config, dns_port, self)
        self.b = yield start_gateway(reactor, b_config, dns_port, self)
        publish(self.dns, self.a, hosted(a_config) if a_published is None else a_published, "gw-a.example")
        publish(self.dns, self.b, hosted(b_config) if b_published is None else b_published, "gw-b.example")

    def add_component(self, gateway, domain: str, secret: str, **kwargs):
        """An XEP-0114 component connected to ``gateway`` (a Deferred)."""
        return add_component(self, gateway, domain, secret, **kwargs)
