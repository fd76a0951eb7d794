"""Certificates for the domains we host: a directory plus per-domain overrides.

Every certificate in the directory is indexed by the names it carries
(DNS names, wildcards included, and XmppAddrs), so file names do not matter;
a ``<name>.crt`` (or ``.pem``) goes with the ``<name>.key`` beside it, or a
``.pem`` may hold both.  Overrides from the config win.  A hosted domain with
no usable certificate (none, expired, or a key that does not fit) is a
startup error that names the domain.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto

from fedgate.domain import InvalidDomain, normalize_domain
from fedgate.tls.identity import certificate_matches, certificate_names


class CertificateError(Exception):
    """A hosted domain has no usable certificate (the message names it)."""


@dataclass(frozen=True)
class CertificatePair:
    source: str
    chain: tuple  # cryptography certificates, leaf first
    key_pem: bytes

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    def openssl(self):
        """(leaf, extra chain, key) as pyOpenSSL objects."""
        certs = [crypto.X509.from_cryptography(c) for c in self.chain]
        return certs[0], certs[1:], crypto.load_privatekey(crypto.FILETYPE_PEM, self.key_pem)


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    value = getattr(cert, "not_valid_after_utc", None)
    return value if value is not None else cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)


def _not_before(cert: x509.Certificate) -> datetime.datetime:
    value = getattr(cert, "not_valid_before_utc", None)
    return value if value is not None else cert.not_valid_before.replace(tzinfo=datetime.timezone.utc)


def load_pair(cert_path, key_path=None) -> CertificatePair:
    """Load a certificate chain and its key (the key may sit in the same PEM)."""
    cert_path = Path(cert_path)
    data = cert_path.read_bytes()
    chain = tuple(x509.load_pem_x509_certificates(data)) if hasattr(x509, "load_pem_x509_certificates") \
        else _load_chain(data)
    if not chain:
        raise CertificateError(f"{cert_path}: no certificate found")
    key_pem = Path(key_path).read_bytes() if key_path else data
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"{key_path or cert_path}: cannot read the private key: {exc}") from None
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            chain[0].public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise CertificateError(f"{key_path or cert_path}: the key does not match the certificate {cert_path}")
    return CertificatePair(str(cert_path), chain, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _load_chain(data: bytes) -> tuple:
    marker = b"-----END CERTIFICATE-----"
    pieces = [p + marker for p in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in p]
    return tuple(x509.load_pem_x509_certificate(p.strip() + b"\n") for p in pieces)


class CertificateStore:
    def __init__(self, directory: str | None = None, overrides: dict | None = None):
        self._by_name: dict[str, CertificatePair] = {}
        self._overrides: dict[str, CertificatePair] = {}
        if directory:
            self._scan(Path(directory))
        for domain, (cert_path, key_path) in (overrides or {}).items():
            self._overrides[normalize_domain(domain)] = load_pair(cert_path, key_path)

    def _scan(self, directory: Path) -> None:
        if not directory.is_dir():
            raise CertificateError(f"certificate directory {directory} does not exist")
        for path in sorted(directory.iterdir()):
            if path.suffix not in (".crt", ".pem", ".cert"):
                continue
            key_path = path.with_suffix(".key")
            try:
                pair = load_pair(path, key_path if key_path.exists() else None)
            except (CertificateError, ValueError, OSError):
                continue  # not a certificate with a key; other files may be CA bundles
            for name in certificate_names(pair.leaf):
                try:
                    key = name.lower() if name.startswith("*.") else normalize_domain(name)
                except InvalidDomain:
                    continue
                self._by_name.setdefault(key, pair)

    def pair_for(self, domain: str) -> CertificatePair | None:
        """The certificate for ``domain``: an override, an exact name, a wildcard."""
        if domain in self._overrides:
            return self._overrides[domain]
        pair = self._by_name.get(domain)
        if pair is None and "." in domain:
            pair = self._by_name.get("*." + domain.split(".", 1)[1])
        return pair

    def check_hosted(self, domains, now: datetime.datetime | None = None) -> None:
        """Raise CertificateError naming the first hosted domain without a
        usable certificate."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        for domain in sorted(domains):
            pair = self.pair_for(domain)
            if pair is None:
                raise CertificateError(f"no certificate for hosted domain {domain}")
            if certificate_matches(pair.leaf, domain) is None:
                raise CertificateError(f"the certificate {pair.source} is not valid for {domain}")
            if _not_after(pair.leaf) < now:
                raise CertificateError(f"the certificate for {domain} ({pair.source}) has expired")
            if _not_before(pair.leaf) > now:
                raise CertificateError(f"the certificate for {domain} ({pair.source}) is not valid yet")
