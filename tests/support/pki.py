"""A test PKI made with ``cryptography``: a root CA, an intermediate, and good
and bad server certificates for XMPP domains.

EC P-256 keys keep generation fast.  Everything is written as PEM files so
the gateway (and Prosody) read them as they would in production.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from OpenSSL import SSL, crypto

XMPP_ADDR = ObjectIdentifier("1.3.6.1.5.5.7.8.5")
SRV_NAME = ObjectIdentifier("1.3.6.1.5.5.7.8.7")
NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def _der_string(tag: int, text: str) -> bytes:
    raw = text.encode("utf-8")
    assert len(raw) < 128
    return bytes([tag, len(raw)]) + raw


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple = ()

    def cert_pem(self, with_chain: bool = True) -> bytes:
        certs = [self.cert] + (list(self.chain) if with_chain else [])
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def write(self, directory, name: str, with_chain: bool = True) -> tuple[Path, Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        cert_path.write_bytes(self.cert_pem(with_chain))
        key_path.write_bytes(self.key_pem())
        key_path.chmod(0o600)
        return cert_path, key_path


class TestCA:
    """A root and an intermediate CA that issue server certificates."""

    __test__ = False

    def __init__(self, name: str = "fedgate test"):
        self.root = self._ca(f"{name} root CA", None)
        self.intermediate = self._ca(f"{name} intermediate CA", self.root)

    def _ca(self, common_name: str, parent: Issued | None) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        issuer_cert, issuer_key = (parent.cert, parent.key) if parent else (None, key)
        builder = (x509.CertificateBuilder()
                   .subject_name(_name(common_name))
                   .issuer_name(issuer_cert.subject if issuer_cert else _name(common_name))
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(NOW - DAY)
                   .not_valid_after(NOW + 365 * DAY)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                  critical=True))
        cert = builder.sign(issuer_key, hashes.SHA256())
        return Issued(cert, key, (parent.cert,) if parent else ())

    def root_pem(self) -> bytes:
        return self.root.cert.public_bytes(serialization.Encoding.PEM)

    def write_root(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.root_pem())
        return path

    def issue(self, dns: tuple = (), srv: tuple = (), xmpp: tuple = (), *,
              eku: tuple = ("server", "client"), not_before=None, not_after=None,
              issuer: Issued | None = None, self_signed: bool = False,
              common_name: str | None = None) -> Issued:
        """A server certificate; ``srv`` takes domains (made into _xmpp-server.<d>)."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list = [x509.DNSName(d) for d in dns]
        names += [x509.OtherName(SRV_NAME, _der_string(0x16, f"_xmpp-server.{d}")) for d in srv]
        names += [x509.OtherName(XMPP_ADDR, _der_string(0x0C, d)) for d in xmpp]
        issuer = issuer or self.intermediate
        # A neutral CN: identities come from subjectAltName only (RFC 6125).
        subject = _name(common_name or "fedgate test server")
        builder = (x509.CertificateBuilder()
                   .subject_name(subject)
                   .issuer_name(subject if self_signed else issuer.cert.subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before or NOW - DAY)
                   .not_valid_after(not_after or NOW + 90 * DAY)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        usages = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usages[u] for u in eku]), critical=False)
        cert = builder.sign(key if self_signed else issuer.key, hashes.SHA256())
        chain = () if self_signed else ((issuer.cert,) + issuer.chain if issuer is not self.root else ())
        return Issued(cert, key, chain)

    def other_ca(self) -> "TestCA":
        """An unrelated CA the gateway does not trust."""
        return TestCA("untrusted")


def server_context(issued: Issued) -> SSL.Context:
    """A pyOpenSSL server context presenting ``issued`` (and its chain), for
    the fake TLS servers of the tests."""
    context = SSL.Context(SSL.TLS_METHOD)
    try:  # pyOpenSSL >= 24.3 takes cryptography objects (and deprecates its own)
        context.use_certificate(issued.cert)
        for cert in issued.chain:
            context.add_extra_chain_cert(cert)
        context.use_privatekey(issued.key)
    except TypeError:  # older pyOpenSSL (Debian bookworm's 23.0)
        context.use_certificate(crypto.X509.from_cryptography(issued.cert))
        for cert in issued.chain:
            context.add_extra_chain_cert(crypto.X509.from_cryptography(cert))
        context.use_privatekey(crypto.PKey.from_cryptography_key(issued.key))
    return context
