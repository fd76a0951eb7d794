"""Run real fedgate gateways on loopback for end-to-end tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer

from fedgate.config import parse_config
from fedgate.service import Gateway
from tests.support.dnsserver import make_client_resolver
from tests.support.pki import TestCA


def temp_dir(testcase) -> str:
    """A fresh directory removed after the test (trial's mktemp would leave
    directories in the working directory under pytest)."""
    path = tempfile.mkdtemp(prefix="fedgate-test-")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


_CA: TestCA | None = None


def shared_ca() -> TestCA:
    """One test CA for the whole run (every gateway trusts it)."""
    global _CA
    if _CA is None:
        _CA = TestCA()
    return _CA


test_ca = shared_ca  # old name, kept while callers move over
test_ca.__test__ = False  # a helper, not a test, wherever it is imported


def gateway_config(state_dir: str, domains, components: dict, *, certificates: bool = True,
                   extra_hosted=(), **s2s) -> dict:
    """A config dict for a gateway listening on ephemeral loopback ports.

    Each hosted domain gets a certificate from the shared test CA, which the
    gateway trusts (instead of the system store)."""
    s2s_table = {"listen": ["tcp:0:interface=127.0.0.1"]}
    s2s_table.update(s2s)
    tls_table = {}
    if certificates:
        ca = shared_ca()
        cert_dir = Path(state_dir) / "certs"
        for domain in list(domains) + list(components) + list(extra_hosted):
            ca.issue(dns=(domain,)).write(cert_dir, domain)
        tls_table = {"certificates": str(cert_dir),
                     "trust_roots": str(ca.write_root(Path(state_dir) / "ca.pem"))}
    return {
        "state_dir": state_dir,
        "domains": list(domains),
        "s2s": s2s_table,
        "tls": tls_table,
        "logging": {"xml_traffic": bool(os.environ.get("FEDGATE_TEST_LOG"))},
        # The admin API on an ephemeral port, with the token generated into
        # state_dir/admin.token as on a fresh install.
        "admin": {"listen": ["tcp:0:interface=127.0.0.1"]},
        "components": {
            "listen": ["tcp:0:interface=127.0.0.1"],
            "domains": {d: {"secret": secret} for d, secret in components.items()},
        },
    }


@defer.inlineCallbacks
def start_gateway(reactor, config_dict: dict, dns_port: int, testcase=None):
    """Start a Gateway whose DNS questions go to the test DNS server."""
    config = parse_config(config_dict, "<test>")
    gateway = Gateway(config, reactor, make_client_resolver(reactor, dns_port))
    yield gateway.startService()
    if testcase is not None:
        testcase.addCleanup(gateway.stopService)
    return gateway


def publish(dns, gateway, domains, host: str) -> None:
    """Point the _xmpp-server SRV records of ``domains`` at ``gateway``."""
    dns.add_a(host, "127.0.0.1")
    for domain in domains:
        dns.add_srv(f"_xmpp-server._tcp.{domain}", 0, 0, gateway.port_of("s2s"), host)
