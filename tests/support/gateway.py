"""Run real fedgate gateways on loopback for end-to-end tests."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer

from fedgate.config import load_config, parse_config
from fedgate.service import Gateway
from fedgate.tap import choose_storage, cluster_dialback_secret
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
    # Test peers resolve to 127.0.0.1 through the test DNS server, which the
    # outbound address rule refuses unless loopback is allowed.
    s2s_table = {"listen": ["tcp:0:interface=127.0.0.1"], "allow_private_ranges": ["loopback"]}
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


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def to_toml(table: dict, prefix: tuple = ()) -> str:
    """A config dict as TOML (scalars and lists first, then sub-tables)."""
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for key, value in table.items():
        if isinstance(value, dict):
            name = prefix + (key,)
            lines += ["", "[" + ".".join(json.dumps(part) for part in name) + "]", to_toml(value, name)]
    return "\n".join(lines)


def write_config(path, config_dict: dict) -> Path:
    """Write ``config_dict`` as the TOML file an operator would edit."""
    path = Path(path)
    path.write_text(to_toml(config_dict) + "\n", encoding="utf-8")
    return path


@defer.inlineCallbacks
def start_gateway(reactor, config_dict: dict, dns_port: int, testcase=None, config_file=None):
    """Start a Gateway whose DNS questions go to the test DNS server.  With
    ``config_file``, the config is written there and loaded from it (what
    :meth:`Gateway.reload` re-reads)."""
    if config_file is not None:
        config = load_config(write_config(config_file, config_dict))
    else:
        config = parse_config(config_dict, "<test>")
    gateway = Gateway(config, reactor, make_client_resolver(reactor, dns_port),
                      choose_storage(config, reactor), dialback_secret=cluster_dialback_secret(config))
    yield gateway.startService()
    if testcase is not None:
        testcase.addCleanup(gateway.stopService)
    return gateway


def publish(dns, gateway, domains, host: str) -> None:
    """Point the _xmpp-server SRV records of ``domains`` at ``gateway``."""
    dns.add_a(host, "127.0.0.1")
    for domain in domains:
        dns.add_srv(f"_xmpp-server._tcp.{domain}", 0, 0, gateway.port_of("s2s"), host)
