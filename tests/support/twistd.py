"""Run fedgate as an operator does: a real ``twistd`` process on loopback."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from fedgate.tls.devcert import write_self_signed

REPO = Path(__file__).resolve().parent.parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held open at once while chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def loopback_config(directory: Path, s2s: int, comp: int, admin: int, domains=("gw.example",),
                    extra: str = "") -> str:
    """A config on the given loopback ports with a self-signed certificate
    for ``domains`` (made in directory/certs); ``extra`` TOML goes at the end."""
    write_self_signed(directory / "certs", list(domains))
    own = ", ".join(f'"{d}"' for d in domains[:1])
    return f'''
state_dir = "{directory / 'state'}"
domains = [{own}]
[s2s]
listen = ["tcp:{s2s}:interface=127.0.0.1"]
dns_servers = ["127.0.0.1:1"]
allow_private_ranges = ["loopback"]
[tls]
certificates = "{directory / 'certs'}"
[components]
listen = ["tcp:{comp}:interface=127.0.0.1"]
[admin]
listen = ["tcp:{admin}:interface=127.0.0.1"]
{extra}'''
