"""
Run a real ejabberd (Debian's package, 23.01) as the remote XMPP server of an
interop test.

Each L{EjabberdServer} owns a temporary directory holding its configuration,
Mnesia spool, logs and certificate, listens for s2s on a free loopback port
only, and never reads or writes a system path.  It is started in the
foreground by running C{erl} with ejabberd's application directly, the way
C{ejabberdctl foreground} does, but:

- as the current user (C{ejabberdctl} would C{su} to the C{ejabberd} user,
  who cannot read a root-owned temporary directory);
- without Erlang distribution (no C{-sname}): no node name, no cookie and no
  C{epmd}, so instances never clash with each other or with a system
  ejabberd; Mnesia runs on C{nonode@nohost} in the private spool;
- with C{ERL_INETRC} pointing at a private inet configuration that sends
  every DNS question to the test DNS server (C{dns_port}) and ignores
  C{/etc/resolv.conf}.  ejabberd 23.01 looks up its peers' SRV records
  through Erlang's C{inet_res}, which follows it, but the addresses of the
  SRV targets through C{net:getaddrinfo}, the C library's resolver, which
  does not: so the SRV targets of the domains ejabberd is to reach must be
  C{localhost} (or an IP literal), see L{SRV_TARGET}.

The configuration is what a hardened, certificate-only deployment looks
like: C{s2s_use_starttls: required}, a certificate from the test CA for the
virtual host (C{certfiles}), the test CA as the only trust root for peer
certificates (C{ca_file}), and I{no} C{mod_s2s_dialback}: in 23.01 that
module is what offers the C{urn:xmpp:features:dialback} feature and answers
C{<db:result/>}, so without it ejabberd authenticates servers only by SASL
EXTERNAL and ignores dialback requests.  C{mod_ping} and C{mod_disco} answer
iq sent to the server's own domain, which is how a test sees a stanza
arrive.

Usage from a trial test::

    server = EjabberdServer("ej.example", dns_port=dns_port, tls_issuer=ca)
    self.addCleanup(server.cleanup)
    server.start()      # blocks until the s2s listener is up
    ...                 # connect to server.s2s_port

Debian's package starts a system ejabberd on install, which takes port 5269;
C{scripts/bootstrap --test} keeps it from starting.  These servers never use
5269, so a system one running would not disturb them either.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support.prosody import _die_with_parent, free_ports

if TYPE_CHECKING:
    from tests.support.pki import TestCA

ERL = "erl"
EJABBERD_LIBS = "/usr/lib/x86_64-linux-gnu"  # where Debian puts ejabberd-*/ebin
KEEP_ENV = "FEDGATE_KEEP_EJABBERD"

# Modules for the virtual host: answers to iq for the server's own domain.
# mod_s2s_dialback is left out on purpose (see the module docstring).
MODULES = ("mod_disco", "mod_ping")
DIALBACK_MODULE = "mod_s2s_dialback"

_LISTENING = "Start accepting TCP connections at {address}:{port} for ejabberd_s2s_in"
_FATAL = re.compile(r"\[(?:critical|emergency)\].*|Failed to start|Kernel pid terminated.*")


#: The target to give the SRV records of domains ejabberd connects to (see
#: the module docstring); fedgate resolves it through the test DNS server.
SRV_TARGET = "localhost"


class EjabberdError(Exception):
    """ejabberd did not start or did not stop; the message has its log tail."""


def _ebin_dir() -> Path | None:
    libs = Path(EJABBERD_LIBS)
    found = sorted(libs.glob("ejabberd-*/ebin")) if libs.is_dir() else []
    return found[-1] if found else None


def ejabberd_available() -> bool:
    """Whether Debian's ejabberd (and Erlang) is installed."""
    return bool(shutil.which(ERL)) and _ebin_dir() is not None


def _yaml(value) -> str:
    """A value as YAML (JSON is a subset of YAML 1.2, which ejabberd's
    parser reads)."""
    return json.dumps(value)


class EjabberdServer:
    """One private ejabberd serving ``domain`` (see the module docstring)."""

    startup_timeout = 30.0
    stop_timeout = 10.0
    interface = "127.0.0.1"

    def __init__(self, domain: str, *, dns_port: int, tls_issuer: "TestCA",
                 trusted_cas: "tuple[TestCA, ...] | None" = None, dialback: bool = False,
                 workdir: str | None = None):
        self.domain = domain
        self.dns_port = dns_port
        self.dialback = dialback
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fedgate-ejabberd-"))
        self.spool = self.workdir / "spool"
        self.spool.mkdir(exist_ok=True)
        self.log_path = self.workdir / "ejabberd.log"
        self.stdout_path = self.workdir / "stdout.log"
        self.config_path = self.workdir / "ejabberd.yml"
        self.inetrc_path = self.workdir / "inetrc"
        [self.s2s_port] = free_ports(1, self.interface)
        issued = tls_issuer.issue(dns=(domain,))
        self.cert_path = self.workdir / "host.pem"
        self.cert_path.write_bytes(issued.cert_pem() + issued.key_pem())
        self.ca_path = self.workdir / "ca.pem"
        self.ca_path.write_bytes(b"".join(ca.root_pem() for ca in (trusted_cas or (tls_issuer,))))
        self.config_path.write_text(self.render_config(), encoding="utf-8")
        self.inetrc_path.write_text(self.render_inetrc(), encoding="utf-8")
        self._process: subprocess.Popen[bytes] | None = None

    def render_config(self) -> str:
        modules = list(MODULES) + ([DIALBACK_MODULE] if self.dialback else [])
        lines = [
            f"hosts: [{_yaml(self.domain)}]",
            "loglevel: info",
            "log_rotate_count: 0",
            f"certfiles: [{_yaml(str(self.cert_path))}]",
            f"ca_file: {_yaml(str(self.ca_path))}",
            "listen:",
            f"  - port: {self.s2s_port}",
            f"    ip: {_yaml(self.interface)}",
            "    module: ejabberd_s2s_in",
            "s2s_use_starttls: required",
            "s2s_access: all",
            "outgoing_s2s_families: [ipv4]",
            "s2s_dns_timeout: 5",
            "s2s_dns_retries: 1",
            "s2s_timeout: 60",
            "modules:",
        ] + [f"  {name}: {{}}" for name in modules]
        return "\n".join(lines) + "\n"

    def render_inetrc(self) -> str:
        # The machine's own name from the table here: ejabberd looks it up
        # at start, and asking the test DNS server for it costs seconds.
        return "\n".join([
            "{resolv_conf, \"\"}.",
            "{hosts_file, \"\"}.",
            f"{{host, {{127,0,0,1}}, [{json.dumps(socket.gethostname())}, \"localhost\"]}}.",
            f"{{nameserver, {{127,0,0,1}}, {self.dns_port}}}.",
            "{lookup, [file, dns]}.",
        ]) + "\n"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start ejabberd and wait until its s2s listener is up (its log
        says so); raise L{EjabberdError} if it exits or is not ready in time."""
        if self._process is not None:
            raise EjabberdError("this EjabberdServer was already started")
        env = dict(os.environ)
        env.update({
            "EJABBERD_CONFIG_PATH": str(self.config_path),
            "EJABBERD_LOG_PATH": str(self.log_path),
            "ERL_INETRC": str(self.inetrc_path),
            "ERL_LIBS": EJABBERD_LIBS,
            "ERL_CRASH_DUMP": str(self.workdir / "erl_crash.dump"),
            "ERL_CRASH_DUMP_BYTES": "0",
            "HOME": str(self.workdir),
        })
        with open(self.stdout_path, "wb") as out:
            self._process = subprocess.Popen(
                [ERL, "-noinput", "-mnesia", "dir", json.dumps(str(self.spool)), "-s", "ejabberd"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.workdir, env=env, preexec_fn=_die_with_parent)
        atexit.register(self.stop)
        ready = _LISTENING.format(address=self.interface, port=self.s2s_port)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._process.poll() is not None:
                self._fail(f"ejabberd exited with {self._process.returncode}")
            text = self.log_text()
            if ready in text:
                return
            fatal = _FATAL.search(text) or _FATAL.search(self._read(self.stdout_path))
            if fatal:
                self._fail(f"ejabberd failed: {fatal.group(0)}")
            if time.monotonic() > deadline:
                self._fail(f"ejabberd not ready within {self.startup_timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (Erlang stops cleanly), then SIGKILL; safe to call twice."""
        process = self._process
        if process is None:
            return
        atexit.unregister(self.stop)
        if process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(self.stop_timeout)

    def cleanup(self) -> None:
        """Stop the server and remove its directory (unless we were given
        it, or FEDGATE_KEEP_EJABBERD is set)."""
        self.stop()
        if self._own_workdir and not os.environ.get(KEEP_ENV):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_text(self) -> str:
        return self._read(self.log_path)

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for path in (self.stdout_path, self.log_path):
            text = self._read(path)
            if text.strip():
                parts.append(f"--- {path} ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts) or "(ejabberd wrote nothing)"

    def _fail(self, reason: str) -> None:
        self.stop()
        raise EjabberdError(f"{reason}; config {self.config_path}\n{self.log_tail()}")

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
