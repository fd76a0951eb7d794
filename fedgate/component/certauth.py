"""Certificate authentication of one XEP-0225 component (SASL EXTERNAL).

A certificate that chains to the gateway's trust roots proves nothing about
which component it belongs to: those roots are usually the public CAs, which
issue certificates for the gateway's own domains and for any peer's.  So a
component authenticates by certificate only when its credential pins what
identifies it:

- ``fingerprints``: the SHA-256 of the DER leaf certificate (any one of
  them), or
- ``anchor_pem``: the component's own trust anchor(s); the presented chain
  must verify against these anchors alone (never the global roots), and the
  leaf must carry ``name`` exactly (a subjectAltName dNSName or an
  XmppAddr; a wildcard does not count).

Either way is enough when both are configured (so a pinned certificate can
be replaced by one the anchor issued without a gap).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto

from fedgate.domain import InvalidDomain, normalize_domain
from fedgate.tls.identity import certificate_names

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_FINGERPRINTS = 16
MAX_ANCHORS = 16


def normalize_fingerprint(text) -> str:
    """A SHA-256 fingerprint in lower case hex without separators, from hex
    with or without colons (or spaces); ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError("expected a SHA-256 fingerprint as hex text")
    compact = re.sub(r"[\s:]", "", text).lower()
    if not _HEX64.match(compact):
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
    return compact


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, as :func:`normalize_fingerprint` writes it."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def load_anchors(pem) -> tuple[x509.Certificate, ...]:
    """The CA certificates of a PEM bundle; ValueError if it holds none,
    too many, or something that is not a CA certificate."""
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else bytes(pem)
    try:
        certs = tuple(x509.load_pem_x509_certificates(data)) if hasattr(
            x509, "load_pem_x509_certificates") else _split_pem(data)
    except ValueError as exc:
        raise ValueError(f"not a PEM certificate bundle: {exc}") from None
    if not certs:
        raise ValueError("no PEM certificate found")
    if len(certs) > MAX_ANCHORS:
        raise ValueError(f"at most {MAX_ANCHORS} trust anchor certificates")
    for cert in certs:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ValueError(f"{cert.subject.rfc4514_string()} is not a CA certificate")
    return certs


def _split_pem(data: bytes) -> tuple:
    """cryptography before 39 loads one certificate at a time."""
    marker = b"-----END CERTIFICATE-----"
    parts = [p + marker for p in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in p]
    return tuple(x509.load_pem_x509_certificate(p.strip() + b"\n") for p in parts)


def _has_name(cert: x509.Certificate, name: str) -> bool:
    for candidate in certificate_names(cert):
        try:
            if normalize_domain(candidate) == name:
                return True
        except InvalidDomain:
            continue  # wildcards and junk never match
    return False


@dataclass(frozen=True)
class CertificateAuth:
    """How one component's certificate is recognised (see the module docstring)."""

    fingerprints: frozenset = frozenset()  # normalised hex
    anchor_pem: str | None = field(default=None, repr=False)
    name: str | None = None  # required with anchor_pem
    anchors: tuple = field(default=(), init=False, compare=False, repr=False)

    def __post_init__(self):
        if self.anchor_pem:
            object.__setattr__(self, "anchors", load_anchors(self.anchor_pem))
            if not self.name:
                raise ValueError("a trust anchor needs the exact name the certificate must carry")
        elif self.name:
            raise ValueError("a certificate name only counts together with a trust anchor")
        if not (self.fingerprints or self.anchors):
            raise ValueError("pin a certificate fingerprint or give a trust anchor")

    def refusal(self, leaf: x509.Certificate | None, chain=()) -> str | None:
        """None if ``leaf`` (with the untrusted ``chain`` the peer sent)
        identifies this component, else why not (for the log)."""
        if leaf is None:
            return "no client certificate"
        presented = fingerprint(leaf)
        pinned = False
        for pin in self.fingerprints:  # every pin compared, in constant time
            pinned |= hmac.compare_digest(pin, presented)
        if pinned:
            return None
        if not self.anchors:
            return f"certificate {presented} is not pinned"
        error = _verify_chain(self.anchors, leaf, chain)
        if error is not None:
            return f"certificate does not chain to the component's trust anchor: {error}"
        if not _has_name(leaf, self.name):
            return f"certificate does not carry the name {self.name}"
        return None


def _verify_chain(anchors, leaf: x509.Certificate, chain) -> str | None:
    """Verify ``leaf`` against ``anchors`` only (an intermediate anchor is
    enough: partial chains are allowed); the peer's chain is untrusted."""
    store = crypto.X509Store()
    for anchor in anchors:
        store.add_cert(crypto.X509.from_cryptography(anchor))
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    untrusted = [crypto.X509.from_cryptography(c) for c in chain if c != leaf]
    try:
        crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf), untrusted).verify_certificate()
    except crypto.X509StoreContextError as exc:
        return str(exc)
    return None
