"""The S2S port as a TLS scanner sees it: ``openssl s_client -starttls
xmpp-server`` against a real gateway on loopback.

The client runs with an empty OpenSSL configuration and, where it matters,
``@SECLEVEL=0``, so that it offers old protocol versions and weak ciphers
itself; each refusal is then checked to be the server's alert
(``protocol_version``, 70, or ``handshake_failure``, 40), not the client
declining to try.  A second hosted domain has an RSA certificate so that
static-RSA and RSA-signed cipher suites are really possible for the server
to choose, and refused only by its cipher list.

Suites this client cannot offer at all (RC4 and 3DES are not built into
Debian's OpenSSL 3) are checked on the server's own cipher list instead.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import defer, error, protocol, reactor
from twisted.trial import unittest

from tests.support.federation import start_dns
from tests.support.gateway import gateway_config, start_gateway, temp_dir, test_ca
from tests.support.pki import DAY, NOW, Issued

OPENSSL = shutil.which("openssl")
RUN_TIMEOUT = 20.0  # seconds for one openssl run

ALERT_PROTOCOL_VERSION = 70
ALERT_HANDSHAKE_FAILURE = 40
TLS13_SUITES = {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"}
#: TLS 1.2 suites with an ephemeral key exchange and an AEAD cipher
FS_AEAD_12 = re.compile(r"^(ECDHE|DHE)-(ECDSA|RSA)-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)$")


class Scan:
    """One s_client run, its output taken apart."""

    def __init__(self, args: list, exit_code: int, out: bytes, err: bytes):
        self.args = args
        self.exit_code = exit_code
        self.out = out.decode("utf-8", "replace")
        self.err = err.decode("utf-8", "replace")

    def _first(self, pattern: str) -> str | None:
        match = re.search(pattern, self.out, re.M)
        return match.group(1).strip() if match else None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.cipher not in (None, "(NONE)")

    @property
    def protocol(self) -> str | None:
        """The version negotiated ("(NONE)" when the handshake failed)."""
        return self._first(r"^New, (\S+), Cipher is ")

    @property
    def attempted(self) -> str | None:
        """The version of the session s_client tried (also after a failure)."""
        return self._first(r"^\s*Protocol\s*:\s*(\S+)")

    @property
    def cipher(self) -> str | None:
        return self._first(r"Cipher is (\S+)")

    @property
    def temp_key(self) -> str | None:
        return self._first(r"^Server Temp Key: (.+)$")

    @property
    def verify_code(self) -> int | None:
        code = self._first(r"Verify return code: (\d+)")
        return int(code) if code is not None else None

    @property
    def alert(self) -> int | None:
        match = re.search(r"SSL alert number (\d+)", self.err)
        return int(match.group(1)) if match else None

    @property
    def leaf(self) -> x509.Certificate:
        match = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n", self.out, re.S)
        if match is None:
            raise AssertionError(f"no certificate in the output of {self}")
        return x509.load_pem_x509_certificate(match.group(0).encode("ascii"))

    def dns_names(self) -> list:
        san = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return san.get_values_for_type(x509.DNSName)

    def __str__(self) -> str:
        return f"openssl {' '.join(self.args)} (exit {self.exit_code})\n{self.err[-600:]}"


class _Collect(protocol.ProcessProtocol):
    def __init__(self):
        self.out, self.err = bytearray(), bytearray()
        self.ended = defer.Deferred()

    def connectionMade(self):
        self.transport.closeStdin()  # s_client ends after the handshake on EOF

    def outReceived(self, data):
        self.out += data

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode if reason.check(error.ProcessTerminated) else 0)


def run_openssl(args: list, timeout: float = RUN_TIMEOUT) -> defer.Deferred:
    """Run ``openssl *args`` without blocking the reactor; fires with
    (exit code, stdout, stderr), or fails after ``timeout`` (process killed)."""
    collect = _Collect()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OPENSSL_CONF": os.devnull}
    process = reactor.spawnProcess(collect, OPENSSL, [OPENSSL, *args], env=env)

    def kill(failure):
        failure.trap(defer.TimeoutError)
        try:
            process.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass
        raise AssertionError(f"openssl {' '.join(args)} did not finish within {timeout}s")

    d = collect.ended
    d.addTimeout(timeout, reactor)
    d.addCallbacks(lambda code: (code, bytes(collect.out), bytes(collect.err)), kill)
    return d


def rsa_certificate(domain: str) -> Issued:
    """An RSA server certificate from the test CA's intermediate (the test CA
    itself issues EC certificates only)."""
    ca = test_ca()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedgate rsa test server")]))
            .issuer_name(ca.intermediate.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca.intermediate.key, hashes.SHA256()))
    return Issued(cert, key, (ca.intermediate.cert,) + ca.intermediate.chain)


class ScannerTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        if OPENSSL is None:
            raise unittest.SkipTest("the openssl command-line tool is not installed")
        self.dns, dns_port = start_dns(self)
        state = temp_dir(self)
        config = gateway_config(state, ["a.example", "rsa.a.example"], {"chat.a.example": "secret-a"})
        cert, key = rsa_certificate("rsa.a.example").write(Path(state) / "rsa", "rsa.a.example")
        config["tls"]["domains"] = {"rsa.a.example": {"certificate": str(cert), "key": str(key)}}
        self.root = config["tls"]["trust_roots"]
        self.gateway = yield start_gateway(reactor, config, dns_port, self)

    @defer.inlineCallbacks
    def scan(self, *options, xmpphost="a.example", servername="a.example") -> Scan:
        args = ["s_client", "-starttls", "xmpp-server", "-xmpphost", xmpphost,
                "-connect", f"127.0.0.1:{self.gateway.port_of('s2s')}", "-CAfile", self.root]
        args += ["-noservername"] if servername is None else ["-servername", servername]
        args += list(options)
        code, out, err = yield run_openssl(args)
        return Scan(args, code, out, err)

    @defer.inlineCallbacks
    def client_offers(self, spec: str) -> bool:
        """Can this openssl offer ``spec`` for TLS 1.2 at all?"""
        code, out, _ = yield run_openssl(["ciphers", "-s", "-tls1_2", spec])
        return code == 0 and bool(out.strip())

    def assert_refused(self, scan: Scan, alert: int) -> None:
        self.assertNotEqual(scan.exit_code, 0, str(scan))
        self.assertFalse(scan.ok, str(scan))
        self.assertEqual(scan.alert, alert, f"not refused by the server: {scan}")

    def assert_strong(self, scan: Scan, protocol_name: str) -> None:
        self.assertTrue(scan.ok, str(scan))
        self.assertEqual(scan.protocol, protocol_name, str(scan))
        if protocol_name == "TLSv1.3":
            self.assertIn(scan.cipher, TLS13_SUITES)
        else:
            self.assertRegex(scan.cipher, FS_AEAD_12)
        # An ephemeral (EC)DH share was used: forward secrecy.
        self.assertRegex(scan.temp_key or "", r"^(X25519|X448|ECDH|DH)\b", str(scan))
        self.assertEqual(scan.verify_code, 0, "the chain to the test CA did not verify")

    @defer.inlineCallbacks
    def test_tls_1_0_and_1_1_refused_by_the_server(self):
        for option, name in (("-tls1", "TLSv1"), ("-tls1_1", "TLSv1.1")):
            scan = yield self.scan(option, "-cipher", "DEFAULT@SECLEVEL=0")
            self.assert_refused(scan, ALERT_PROTOCOL_VERSION)
            self.assertEqual(scan.attempted, name, "the client did try this version")

    @defer.inlineCallbacks
    def test_tls_1_2_and_1_3_with_forward_secrecy_and_aead(self):
        for domain in ("a.example", "rsa.a.example"):
            for option, name in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
                scan = yield self.scan(option, servername=domain, xmpphost=domain)
                self.assert_strong(scan, name)
        # The client's own preference for a weak suite does not win either:
        # offered everything (at SECLEVEL=0), the server picks a strong one.
        scan = yield self.scan("-tls1_2", "-cipher", "ALL:COMPLEMENTOFALL@SECLEVEL=0")
        self.assert_strong(scan, "TLSv1.2")
        scan = yield self.scan("-tls1_2", "-cipher", "ALL:COMPLEMENTOFALL@SECLEVEL=0",
                               servername="rsa.a.example", xmpphost="rsa.a.example")
        self.assert_strong(scan, "TLSv1.2")
        self.assertIn("-RSA-", scan.cipher, "the RSA certificate was not the one used")

    @defer.inlineCallbacks
    def test_weak_cipher_suites_refused_by_the_server(self):
        # (certificate's domain, what the client offers alone, why it is weak)
        cases = [
            ("a.example", "ECDHE-ECDSA-AES128-SHA", "CBC with SHA-1, no AEAD"),
            ("a.example", "ECDHE-ECDSA-AES256-SHA384", "CBC, no AEAD"),
            ("a.example", "ECDHE-ECDSA-NULL-SHA", "no encryption"),
            ("a.example", "aNULL", "no authentication"),
            ("rsa.a.example", "AES128-SHA", "static RSA: no forward secrecy; SHA-1"),
            ("rsa.a.example", "AES256-GCM-SHA384", "AEAD but static RSA: no forward secrecy"),
            ("rsa.a.example", "ECDHE-RSA-AES128-SHA", "CBC with SHA-1, no AEAD"),
            ("rsa.a.example", "NULL-SHA256", "no encryption"),
            ("rsa.a.example", "RC4", "RC4"),
            ("rsa.a.example", "3DES", "3DES (Sweet32)"),
            ("rsa.a.example", "EXPORT:LOW", "export and low-grade ciphers"),
        ]
        scanned = []
        for domain, spec, why in cases:
            spec_for_client = f"{spec}@SECLEVEL=0"
            offered = yield self.client_offers(spec_for_client)
            if not offered:
                continue  # see test_server_cipher_list: the server has none of them either
            scan = yield self.scan("-tls1_2", "-cipher", spec_for_client, servername=domain, xmpphost=domain)
            self.assert_refused(scan, ALERT_HANDSHAKE_FAILURE)
            scanned.append(spec)
        # The suites that prove the policy were all really tried.
        self.assertTrue({"ECDHE-ECDSA-AES128-SHA", "aNULL", "AES128-SHA", "AES256-GCM-SHA384",
                         "ECDHE-RSA-AES128-SHA", "NULL-SHA256"} <= set(scanned), scanned)
        # Controls: the same certificates with a strong suite are fine, so the
        # refusals above were about the suite.
        for domain, spec in (("a.example", "ECDHE-ECDSA-AES128-GCM-SHA256"),
                             ("rsa.a.example", "ECDHE-RSA-AES128-GCM-SHA256")):
            scan = yield self.scan("-tls1_2", "-cipher", spec, servername=domain, xmpphost=domain)
            self.assert_strong(scan, "TLSv1.2")
            self.assertEqual(scan.cipher, spec)

    @defer.inlineCallbacks
    def test_tls_1_3_without_the_short_tag_suite(self):
        # CCM_8 has a 64-bit tag; OpenSSL's default TLS 1.3 list, which we
        # keep, leaves it out.
        scan = yield self.scan("-tls1_3", "-ciphersuites", "TLS_AES_128_CCM_8_SHA256")
        self.assert_refused(scan, ALERT_HANDSHAKE_FAILURE)

    def test_server_cipher_list(self):
        # What no client could make the server choose: every TLS 1.2 suite it
        # has is forward secret and AEAD (so no RC4, 3DES, CBC, NULL, static RSA).
        for domain in ("a.example", "rsa.a.example", "chat.a.example"):
            connection = SSL.Connection(self.gateway.tls.server_context(domain), None)
            names = connection.get_cipher_list()
            self.assertTrue(names)
            for name in names:
                if name.startswith("TLS_"):
                    self.assertIn(name, TLS13_SUITES | {"TLS_AES_128_CCM_SHA256"})
                else:
                    self.assertRegex(name, FS_AEAD_12)
            self.assertFalse([n for n in names if re.search(r"RC4|DES|NULL|MD5|EXP|ADH|AECDH", n)])

    @defer.inlineCallbacks
    def test_sni_picks_the_certificate(self):
        # (SNI sent, stream 'to', the one name the certificate must carry)
        cases = [
            ("a.example", "a.example", "a.example"),
            ("chat.a.example", "a.example", "chat.a.example"),
            ("rsa.a.example", "a.example", "rsa.a.example"),
            (None, "chat.a.example", "chat.a.example"),      # no SNI: the stream's 'to'
            ("unknown.example", "a.example", "a.example"),   # SNI for no hosted domain
        ]
        leaves = {}
        for servername, xmpphost, expected in cases:
            scan = yield self.scan("-verify_hostname", expected, servername=servername, xmpphost=xmpphost)
            self.assertTrue(scan.ok, str(scan))
            self.assertEqual(scan.dns_names(), [expected], (servername, xmpphost))
            self.assertEqual(scan.verify_code, 0, f"chain or name {expected} did not verify: {scan}")
            leaves.setdefault(expected, scan.leaf)
        serials = {name: cert.serial_number for name, cert in leaves.items()}
        self.assertEqual(len(set(serials.values())), 3, serials)
        # The name check really bites: chat.a.example's certificate is not a.example's.
        scan = yield self.scan("-verify_hostname", "a.example", servername="chat.a.example")
        self.assertNotEqual(scan.verify_code, 0)
