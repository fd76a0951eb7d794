"""Is a certificate valid for an XMPP domain?  (RFC 6120 13.7.2, RFC 6125)

Three kinds of identifier count for a server: a DNS-ID (``dNSName``, with
wildcards), an SRV-ID (``_xmpp-server.<domain>``, RFC 4985) and an XmppAddr
(``id-on-xmppAddr``, OID 1.3.6.1.5.5.7.8.5).  DNS-ID and SRV-ID go through
``service_identity``; its SRV-ID support is public only in newer releases
(``hazmat``) and private in Debian's 18.1 (``_common``), so that difference
is kept here, in one small function.  ``service_identity`` ignores
XmppAddr, which is read with ``cryptography``.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

from service_identity.exceptions import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname

try:  # service_identity >= 23.1
    from service_identity.hazmat import SRV_ID, verify_service_identity
    from service_identity.cryptography import extract_patterns as _extract
except ImportError:  # Debian bookworm's 18.1
    from service_identity._common import SRV_ID, verify_service_identity
    from service_identity.cryptography import extract_ids as _extract

from fedgate.domain import InvalidDomain, normalize_domain

XMPP_ADDR = ObjectIdentifier("1.3.6.1.5.5.7.8.5")


def _der_utf8(value: bytes) -> str | None:
    """Decode a DER UTF8String (tag 12) as found in otherName values."""
    if len(value) < 2 or value[0] != 0x0C:
        return None
    length = value[1]
    offset = 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(value[2:2 + count], "big")
        offset = 2 + count
    try:
        return value[offset:offset + length].decode("utf-8")
    except UnicodeDecodeError:
        return None


def xmpp_addrs(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    found = []
    for name in san:
        if isinstance(name, x509.OtherName) and name.type_id == XMPP_ADDR:
            text = _der_utf8(name.value)
            if text:
                found.append(text)
    return found


def _srv_id_matches(cert: x509.Certificate, domain_ascii: str) -> bool:
    try:
        verify_service_identity(_extract(cert), obligatory_ids=[SRV_ID(f"_xmpp-server.{domain_ascii}")],
                                optional_ids=[])
        return True
    except (VerificationError, CertificateError, ValueError, TypeError):
        return False


def _ascii(domain: str) -> str:
    if domain.isascii():
        return domain
    import idna
    return idna.encode(domain, uts46=True).decode("ascii")


def certificate_matches(cert: x509.Certificate, domain: str) -> str | None:
    """Which identifier makes ``cert`` valid for ``domain``: 'dns-id',
    'srv-id', 'xmppaddr', or None."""
    try:
        wanted = normalize_domain(domain)
    except InvalidDomain:
        return None
    ascii_domain = _ascii(wanted)
    try:
        verify_certificate_hostname(cert, ascii_domain)
        return "dns-id"
    except (VerificationError, CertificateError, ValueError, TypeError):
        pass
    if _srv_id_matches(cert, ascii_domain):
        return "srv-id"
    for addr in xmpp_addrs(cert):
        try:
            if normalize_domain(addr) == wanted:
                return "xmppaddr"
        except InvalidDomain:
            continue
    return None


def certificate_names(cert: x509.Certificate) -> list[str]:
    """Every DNS name and XmppAddr in the certificate (for picking certs by name)."""
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        pass
    names += xmpp_addrs(cert)
    return names
