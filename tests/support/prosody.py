"""
Run a real Prosody (Debian's package) as the remote XMPP server of an
interop test.

Each L{ProsodyServer} owns a temporary directory holding its configuration,
data, pidfile and logs, listens on 127.0.0.1 only, and never reads or writes
a system path: the interop tests run as root on CI, so the configuration
says C{run_as_root = true}, and the process is started in the foreground
with C{-F}.

Prosody resolves DNS with libunbound (Debian's C{lua-unbound}, which ships
the binding for every Lua version, Prosody's 5.4 included).  Its options
come from the global C{unbound} table: with a C{dns_port} every query is
forwarded to C{127.0.0.1@dns_port} (C{forward}), C{/etc/resolv.conf} and
C{/etc/hosts} are ignored (C{resolvconf}, C{hoststxt}).  Without one, every
name is answered REFUSED at once (C{local-zone: ". refuse"}), so Prosody
never queries the root servers.  libunbound answers the C{.test} zone
locally (NXDOMAIN) whatever the forwarders say; tests use C{.example}.

Usage from a trial test::

    server = ProsodyServer("prosody.example",
                           components={"svc.prosody.example": "s3cret"})
    self.addCleanup(server.cleanup)
    server.start()
    ...  # connect to server.component_port, server.s2s_port

C{start} and C{stop} block, each for a bounded time (Prosody is ready in
about 0.15 s on an idle machine); call them from the reactor thread.

TLS: by default Prosody has no certificate and offers no STARTTLS.  Pass
C{tls_issuer} (a L{tests.support.pki.TestCA}) to give the VirtualHost and
every component a certificate with a DNS-ID for its own name, and
C{trusted_cas} for the roots Prosody accepts peer certificates from (and
only those: the system store is not consulted)::

    server = ProsodyServer("prosody.example", tls_issuer=ca, trusted_cas=[ca],
                           s2s_require_encryption=True, s2s_secure_auth=True)

Prosody 0.12 facts this relies on: C{mod_tls} is not loaded automatically
(it is added to C{modules_enabled} here, and components inherit it); the
certificate manager finds C{<certificates>/<host>.crt} with the key beside
it as C{<host>.key}, the file holding the leaf and then its chain;
the global C{ssl} table's C{cafile} and C{capath} feed OpenSSL's trust
store for every context, and s2s contexts request the peer's certificate
(C{verify = peer}) but continue past errors, which C{mod_s2s_auth_certs}
then records as the session's chain and identity status.  With a valid
chain and identity C{mod_saslauth} offers and uses SASL EXTERNAL on s2s;
otherwise C{mod_dialback} runs.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.support.pki import Issued, TestCA

PROSODY = "prosody"
PROSODYCTL = "prosodyctl"

# The module that answers and asks for server dialback (XEP-0220).
DIALBACK_MODULE = "dialback"

# Loaded besides Prosody's automatic ones (posix, presence, message, iq,
# offline, c2s, s2s, s2s_auth_certs): dialback for s2s without
# certificates, saslauth so that registered users can log in on c2s.
BASE_MODULES = (DIALBACK_MODULE, "saslauth")

# STARTTLS on c2s and s2s; loaded only when the server has certificates,
# since without one Prosody would still offer STARTTLS and fail it.
TLS_MODULE = "tls"

# Bidirectional s2s streams (XEP-0288); shipped with 0.12 but not loaded
# unless listed in modules_enabled.  With s2s_require_encryption (its
# default) it offers and requests bidi only once the stream is encrypted.
BIDI_MODULE = "s2s_bidi"

# What Prosody's portmanager logs when a listener could not be set up.
_PORT_ERROR = re.compile(r"\bportmanager\terror\t(.*)")

# What the certificate manager and mod_tls log when a certificate, key or
# trust store could not be loaded (Prosody then runs on without TLS).
_TLS_ERROR = re.compile(r"\s(?:certmanager|\S+:tls)\terror\t(.*)")
# How long after its ports are up a Prosody with certificates may still log
# that it cannot load one (seconds).
TLS_SETTLE = 0.4

# Set FEDGATE_KEEP_PROSODY=1 to keep each server's directory for a post-mortem.
KEEP_ENV = "FEDGATE_KEEP_PROSODY"


class ProsodyError(Exception):
    """
    Prosody did not start, did not stop, or refused a command; the message
    carries the tail of its log.
    """


def prosody_available() -> bool:
    """
    Whether Debian's prosody and prosodyctl are on C{PATH}.
    """
    return bool(shutil.which(PROSODY) and shutil.which(PROSODYCTL))


def free_ports(count: int, interface: str = "127.0.0.1") -> list[int]:
    """
    C{count} distinct TCP ports nobody listens on right now.  Racy by
    nature; good enough on a test machine, and L{ProsodyServer.start}
    fails loudly if it loses.
    """
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind((interface, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def lua_literal(value: object) -> str:
    """
    Render a Python value as a Lua literal for Prosody's configuration.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        escaped = (
            value.replace("\\", "\\\\")
            .replace('"', '\\"')
            .replace("\n", "\\n")
            .replace("\r", "\\r")
            .replace("\0", "\\0")
        )
        return f'"{escaped}"'
    if isinstance(value, Mapping):
        items = "; ".join(
            f"[{lua_literal(str(k))}] = {lua_literal(v)}" for k, v in value.items()
        )
        return "{ " + items + " }"
    if isinstance(value, (list, tuple)):
        return "{ " + "; ".join(lua_literal(v) for v in value) + " }"
    raise TypeError(f"no Lua literal for {value!r}")


def _die_with_parent() -> None:
    """
    Runs in the child before exec: ask Linux to SIGTERM Prosody when the
    test process dies, so a killed test run leaves no server behind.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ProsodyServer:
    """
    One Prosody process with a generated, self-contained configuration.

    @ivar domain: the VirtualHost, e.g. C{prosody.example}.
    @ivar components: external components (XEP-0114), domain -> secret.
    @ivar s2s_port: @ivar c2s_port: @ivar component_port: the TCP ports
        Prosody listens on, all on C{interface}.
    @ivar s2s_direct_tls_port: the XEP-0368 Direct TLS port, or None.
    @ivar certificates: the certificate of each host that has one, by
        host; empty without TLS.
    @ivar workdir: the directory holding everything below.
    @ivar config_path: @ivar log_path: @ivar stdout_path: @ivar pid_path:
        files in C{workdir}; print C{log_path} (or L{log_tail}) on failure.
    @ivar cert_dir: @ivar cafile_path: where the certificates (as
        C{<host>.crt} and C{<host>.key}) and the trusted roots are.
    """

    def __init__(
        self,
        domain: str = "prosody.example",
        *,
        components: Mapping[str, str] | None = None,
        s2s_port: int | None = None,
        c2s_port: int | None = None,
        component_port: int | None = None,
        interface: str = "127.0.0.1",
        s2s_require_encryption: bool = False,
        s2s_secure_auth: bool = False,
        dns_port: int | None = None,
        modules_enabled: Iterable[str] = (),
        modules_disabled: Iterable[str] = (),
        extra_config: str = "",
        extra_sections: str = "",
        log_level: str = "debug",
        startup_timeout: float = 20.0,
        stop_timeout: float = 10.0,
        workdir: str | os.PathLike[str] | None = None,
        tls_issuer: TestCA | None = None,
        certificates: Mapping[str, Issued] | None = None,
        trusted_cas: Iterable[TestCA] = (),
        s2s_direct_tls: bool = False,
    ) -> None:
        """
        @param dns_port: a DNS server on 127.0.0.1 (UDP and TCP) that
            answers every query Prosody makes, or None for no DNS at all.
        @param modules_enabled: modules loaded besides Prosody's automatic
            ones and L{BASE_MODULES}, e.g. C{["s2s_bidi"]}.
        @param extra_config: Lua text added to the global section, before
            the first VirtualHost, where options like C{s2s_timeout} go.
        @param log_level: the lowest level logged; C{info} or lower, since
            L{start} reads Prosody's "Activated service" lines.
        @param extra_sections: Lua text appended after every host, for
            further C{VirtualHost} or C{Component} sections.
        @param workdir: an existing empty directory to use; by default a
            fresh temporary one, removed by L{cleanup}.
        @param tls_issuer: a CA that issues a certificate (DNS-ID, both
            EKUs) for C{domain} and for every component; enables TLS.
        @param certificates: certificates by host, used instead of issued
            ones (e.g. one from a CA the peer does not trust); enables TLS.
        @param trusted_cas: the CAs whose roots Prosody trusts for peer
            certificates; none means every peer certificate fails its chain.
        @param s2s_direct_tls: also listen for XEP-0368 Direct TLS s2s on
            C{s2s_direct_tls_port} (needs certificates).
        """
        self.domain = domain
        self.components = dict(components or {})
        self.interface = interface
        spare = free_ports(4, interface)
        self.s2s_port = s2s_port or spare[0]
        self.c2s_port = c2s_port or spare[1]
        self.component_port = component_port or spare[2]
        self.s2s_direct_tls_port = spare[3] if s2s_direct_tls else None
        self.s2s_require_encryption = s2s_require_encryption
        self.s2s_secure_auth = s2s_secure_auth
        self.dns_port = dns_port
        self.modules_enabled = list(BASE_MODULES) + [
            m for m in modules_enabled if m not in BASE_MODULES
        ]
        self.modules_disabled = list(modules_disabled)
        self.extra_config = extra_config
        self.extra_sections = extra_sections
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout

        self._own_workdir = workdir is None
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="fedgate-prosody-")
        self.workdir = Path(workdir).resolve()
        self.data_path = self.workdir / "data"
        self.config_path = self.workdir / "prosody.cfg.lua"
        self.log_path = self.workdir / "prosody.log"
        self.stdout_path = self.workdir / "prosody.stdout"
        self.pid_path = self.workdir / "prosody.pid"
        self.data_path.mkdir(mode=0o750, exist_ok=True)
        self.cert_dir = self.workdir / "certs"
        self.cafile_path = self.workdir / "trusted-roots.pem"
        # Prosody's capath: empty, so only the cafile is trusted.
        self.capath = self.workdir / "capath"
        # Without certificates certs/ stays empty: Prosody offers no TLS.
        self.cert_dir.mkdir(exist_ok=True)
        self.capath.mkdir(exist_ok=True)
        (self.workdir / "plugins").mkdir(exist_ok=True)
        self.certificates: dict[str, Issued] = {}
        if tls_issuer is not None:
            for host in [domain, *self.components]:
                self.certificates[host] = tls_issuer.issue(dns=(host,))
        self.certificates.update(certificates or {})
        for host, issued in self.certificates.items():
            issued.write(self.cert_dir, host)
        self.trusted_cas = list(trusted_cas)
        self.cafile_path.write_bytes(b"".join(ca.root_pem() for ca in self.trusted_cas))
        if self.tls and TLS_MODULE not in self.modules_enabled:
            self.modules_enabled.append(TLS_MODULE)
        self.config_path.write_text(self.render_config())
        self._process: subprocess.Popen[bytes] | None = None

    # Configuration

    @property
    def tls(self) -> bool:
        """
        Whether Prosody has certificates, and so offers STARTTLS.
        """
        return bool(self.certificates)

    def ssl_options(self) -> dict[str, object]:
        """
        The global C{ssl} table: trust exactly C{trusted_cas}.  The
        certificates themselves are found by name in C{cert_dir}.
        """
        return {"cafile": str(self.cafile_path), "capath": str(self.capath)}

    @property
    def ports(self) -> dict[str, int]:
        """
        The ports Prosody listens on once started, by service name; the
        component port only opens when there is a component.
        """
        ports = {"c2s": self.c2s_port, "s2s": self.s2s_port}
        if self.components:
            ports["component"] = self.component_port
        if self.s2s_direct_tls_port is not None:
            ports["s2s_direct_tls"] = self.s2s_direct_tls_port
        return ports

    def unbound_options(self) -> dict[str, object]:
        """
        The global C{unbound} table: libunbound asks only our test DNS
        server, or nobody.
        """
        options: dict[str, object] = {"resolvconf": False, "hoststxt": False}
        if self.dns_port is None:
            options["options"] = {"local-zone": ". refuse"}
        else:
            options["forward"] = [f"127.0.0.1@{self.dns_port}"]
        return options

    def render_config(self) -> str:
        """
        The whole configuration file, as Lua text.
        """
        lit = lua_literal
        iface = [self.interface]
        lines = [
            "-- Written by tests/support/prosody.py for one interop test run.",
            f"run_as_root = {lit(True)}",
            f"data_path = {lit(str(self.data_path))}",
            f"pidfile = {lit(str(self.pid_path))}",
            f"installer_plugin_path = {lit(str(self.workdir / 'plugins'))}",
            f"certificates = {lit(str(self.cert_dir))}",
            "log = { { levels = { min = "
            f"{lit(self.log_level)} }}; to = \"file\"; "
            f"filename = {lit(str(self.log_path))} }} }}",
            "",
            f"interfaces = {lit(iface)}",
            f"local_interfaces = {lit(iface)}",
            f"c2s_interfaces = {lit(iface)}",
            f"s2s_interfaces = {lit(iface)}",
            f"component_interfaces = {lit(iface)}",
            f"c2s_ports = {lit([self.c2s_port])}",
            f"s2s_ports = {lit([self.s2s_port])}",
            f"component_ports = {lit([self.component_port])}",
            f"use_ipv6 = {lit(False)}",
            f"unbound = {lit(self.unbound_options())}",
        ]
        if self.tls:
            lines.append(f"ssl = {lit(self.ssl_options())}")
        if self.s2s_direct_tls_port is not None:
            lines += [
                f"s2s_direct_tls_interfaces = {lit(iface)}",
                f"s2s_direct_tls_ports = {lit([self.s2s_direct_tls_port])}",
            ]
        lines += [
            "",
            f"modules_enabled = {lit(self.modules_enabled)}",
            f"modules_disabled = {lit(self.modules_disabled)}",
            'authentication = "internal_hashed"',
            'storage = "internal"',
            f"c2s_require_encryption = {lit(False)}",
            f"allow_unencrypted_plain_auth = {lit(True)}",
            f"s2s_require_encryption = {lit(self.s2s_require_encryption)}",
            f"s2s_secure_auth = {lit(self.s2s_secure_auth)}",
            "",
            self.extra_config,
            "",
            f"VirtualHost {lit(self.domain)}",
        ]
        for name, secret in self.components.items():
            lines += [
                "",
                f"Component {lit(name)}",
                f"    component_secret = {lit(secret)}",
            ]
        lines += ["", self.extra_sections, ""]
        return "\n".join(lines)

    # Accounts

    def add_user(self, user: str, password: str, host: str | None = None) -> str:
        """
        Create an account with C{prosodyctl register}; works whether or not
        the server runs.  Returns the bare JID.
        """
        host = host or self.domain
        result = subprocess.run(
            [PROSODYCTL, "--config", str(self.config_path),
             "register", user, host, password],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            cwd=self.workdir,
        )
        if result.returncode != 0:
            raise ProsodyError(
                f"prosodyctl register {user} {host} failed "
                f"({result.returncode}): {result.stdout!r} {result.stderr!r}"
            )
        return f"{user}@{host}"

    # Process

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """
        Start Prosody and wait until it has bound every port: its log says
        "Activated service" for each.  Readiness is read from the log rather
        than probed with connections, which Prosody would log as sessions
        and which another process on the port could answer.

        Prosody gets SIGTERM if the calling thread dies (PR_SET_PDEATHSIG),
        so call this from the thread that lives as long as the server: the
        reactor's, or the test's.

        @raise ProsodyError: it exited, logged a port it could not bind or a
            certificate it could not load, or was not ready within
            C{startup_timeout}; it is stopped first.
        """
        if self._process is not None:
            raise ProsodyError("this ProsodyServer was already started")
        self.log_path.touch()
        with open(self.stdout_path, "wb") as out:
            self._process = subprocess.Popen(
                [PROSODY, "--config", str(self.config_path), "-F"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                preexec_fn=_die_with_parent,
            )
        atexit.register(self.stop)
        deadline = time.monotonic() + self.startup_timeout
        waiting = set(self.ports.values())
        settle_until = None
        while True:
            if self._process.poll() is not None:
                self._fail(f"prosody exited with {self._process.returncode}")
            log = self._read(self.log_path)
            port_error = _PORT_ERROR.search(log)
            if port_error:
                self._fail(f"prosody could not listen: {port_error.group(1)}")
            tls_error = _TLS_ERROR.search(log)
            if tls_error:
                self._fail(f"prosody could not set up TLS: {tls_error.group(1)}")
            if not waiting:
                if self.certificates and settle_until is None:
                    # Prosody builds each host's TLS contexts (and logs any
                    # certificate it cannot load) just after its ports come
                    # up: give those lines a moment before calling it ready.
                    settle_until = time.monotonic() + TLS_SETTLE
                if settle_until is None or time.monotonic() >= settle_until:
                    return
                time.sleep(0.05)
                continue
            if time.monotonic() > deadline:
                self._fail(f"prosody not ready within {self.startup_timeout}s")
            for name, port in self.ports.items():
                if port in waiting and self._activated(log, name, port):
                    waiting.discard(port)
            if waiting:
                time.sleep(0.05)

    def stop(self) -> None:
        """
        SIGTERM, then SIGKILL after C{stop_timeout}; safe to call twice.
        """
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
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                raise ProsodyError(f"prosody pid {process.pid} survived SIGKILL") from None

    def cleanup(self) -> None:
        """
        Stop the server and remove its directory (unless we were given it,
        or C{FEDGATE_KEEP_PROSODY} is set).
        """
        self.stop()
        if self._own_workdir and not os.environ.get(KEEP_ENV):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ProsodyServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # Diagnostics

    def log_tail(self, lines: int = 60) -> str:
        """
        The end of Prosody's log and of its own output, for failure messages.
        """
        parts = []
        for path in (self.stdout_path, self.log_path):
            text = self._read(path)
            if text.strip():
                tail = "\n".join(text.splitlines()[-lines:])
                parts.append(f"--- {path} ---\n{tail}")
        return "\n".join(parts) or "(Prosody wrote nothing)"

    def log_text(self) -> str:
        """
        Prosody's whole log so far.
        """
        return self._read(self.log_path)

    def _fail(self, reason: str) -> None:
        self.stop()
        raise ProsodyError(f"{reason}; config {self.config_path}\n{self.log_tail()}")

    def _activated(self, log: str, service: str, port: int) -> bool:
        address = re.escape(f"[{self.interface}]:{port}")
        return re.search(
            rf"\bportmanager\tinfo\tActivated service '{service}' on .*{address}\b", log
        ) is not None

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
