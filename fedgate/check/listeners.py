"""The listener check: every configured listener's port is free, or held
by this gateway.

With the gateway's admin API answering, its own listeners come from
``GET /api/v1/status`` and count as held by it; otherwise each port is
bound for a moment (as Twisted does: SO_REUSEADDR, so a port in TIME_WAIT
is free) and the reason a bind fails is the finding.
"""

from __future__ import annotations

import errno
import socket

from fedgate.check import ERROR, OK, WARNING, Finding

KINDS = (("s2s", "listen", "s2s"), ("s2s_direct_tls", "direct_tls_listen", "s2s"),
         ("components", "listen", "components"), ("admin", "listen", "admin"))


def _split(description: str) -> tuple[str, str | None, int | None]:
    from fedgate.cli import _split_endpoint
    kind, args, kwargs = _split_endpoint(description)
    port = kwargs.get("port") or (args[0] if args else None)
    host = kwargs.get("interface")
    return kind, host, int(port) if port and port.isdigit() else None


def configured(config) -> list[tuple[str, str]]:
    """[(kind, endpoint description)] as the gateway names its listeners."""
    out = []
    for kind, key, section in KINDS:
        for description in getattr(getattr(config, section), key):
            out.append((kind, description))
    return out


def try_bind(host: str | None, port: int) -> str | None:
    """None if ``host:port`` could be bound now, else why not."""
    family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    except OSError as exc:
        return {errno.EADDRINUSE: "in use by another program",
                errno.EADDRNOTAVAIL: f"this host has no address {host}",
                errno.EACCES: "permission denied (ports below 1024 need privileges)"}.get(
                    exc.errno, exc.strerror or str(exc))
    finally:
        sock.close()
    return None


def _held(live: list[dict] | None, kind: str, host: str | None, port: int) -> bool:
    for listener in live or ():
        if listener.get("port") == port and listener.get("kind") == kind \
                and (host is None or listener.get("host") in (host, "0.0.0.0", "::")):
            return True
    return False


def check_listeners(config, live: list[dict] | None = None) -> list[Finding]:
    """``live``: the running gateway's listeners (GET /status), or None."""
    out = []
    for kind, description in configured(config):
        endpoint, host, port = _split(description)
        subject = f"{kind} {description}"
        if endpoint not in ("tcp", "tcp6", "ssl"):
            out.append(Finding("listeners", WARNING, subject, f"a {endpoint} listener: not checked"))
            continue
        if port is None or port == 0:
            out.append(Finding("listeners", OK, subject, "an ephemeral port: always free"))
            continue
        facts = {"kind": kind, "host": host, "port": port}
        if _held(live, kind, host, port):
            out.append(Finding("listeners", OK, subject, "held by this gateway", facts))
            continue
        why = try_bind(host, port)
        if why is None and live:
            out.append(Finding("listeners", WARNING, subject, "free, but the running gateway does "
                               "not listen there: restart it to apply the configuration", facts))
        elif why is None:
            out.append(Finding("listeners", OK, subject, "free", facts))
        else:
            out.append(Finding("listeners", ERROR, subject, why
                               + ("" if live is None else " (not this gateway)"), facts))
    return out
