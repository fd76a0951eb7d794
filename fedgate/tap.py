"""twistd plugin options and service construction.

The only module that touches the global reactor, the system resolver and
process signals (SIGHUP reloads the configuration: see Gateway.reload), and
the one that chooses the storage backend (:func:`choose_storage`); the
Gateway gets all of them as arguments.
"""

from __future__ import annotations

import signal
import sys

from twisted.python import usage

from fedgate.config import ConfigError, load_config


class Options(usage.Options):
    synopsis = "--config PATH"
    longdesc = ("Run fedgate, an XMPP federation gateway: S2S with Server Dialback "
                "on one side, XEP-0114 components on the other.  Every setting lives "
                "in the TOML file given with --config; see etc/fedgate.toml.")
    optParameters = [
        ["config", "c", "/etc/fedgate/fedgate.toml", "Path to the TOML configuration file."],
    ]


def makeService(options):
    from twisted.internet import reactor
    from twisted.names import client

    from fedgate.service import Gateway
    from fedgate.tls.certs import CertificateError

    try:
        config = load_config(options["config"])
    except ConfigError as exc:
        sys.stderr.write(f"fedgate: configuration error: {exc}\n")
        sys.exit(78)  # EX_CONFIG
    if config.s2s.dns_servers:
        # Only the configured servers: createResolver would add resolv.conf's.
        resolver = client.Resolver(servers=list(config.s2s.dns_servers), reactor=reactor)
    else:
        resolver = client.createResolver()
    try:
        gateway = Gateway(config, reactor, resolver, choose_storage(config, reactor))
    except CertificateError as exc:
        sys.stderr.write(f"fedgate: certificate error: {config.path}: {exc}\n")
        sys.exit(78)
    reload_on_sighup(reactor, gateway.reload)
    return gateway


def choose_storage(config, reactor):
    """The admin side's storage backend: SQLite in ``state_dir`` (the
    embedded default; a shared backend for clusters is chosen here)."""
    from fedgate.storage.sqlite import SQLiteStorage

    return SQLiteStorage.in_state_dir(config.state_dir, reactor)


def reload_on_sighup(reactor, reload, signals=signal) -> None:
    """SIGHUP (``systemctl reload``) runs ``reload`` on the reactor thread.

    The handler only queues the call: a signal lands between any two
    bytecodes, and the gateway's tables must change between events.
    (twistd rotates its log file on SIGUSR1, so SIGHUP is free.)"""
    signals.signal(signals.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))
