"""Make a self-signed development certificate for some domains.

    python3 -m fedgate.tls.devcert --out DIR example.org chat.example.org

writes DIR/<first domain>.crt and .key (key mode 0600), one certificate
naming every domain as a DNS-ID and an XmppAddr.  For development and
testing only: peers that validate certificates will not trust it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedgate.tls.identity import XMPP_ADDR


def _utf8_der(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) < 128:
        return bytes([0x0C, len(raw)]) + raw
    return bytes([0x0C, 0x82]) + len(raw).to_bytes(2, "big") + raw


def make_self_signed(domains: list[str], days: int = 365) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for ``domains``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domains[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt = [x509.DNSName(d) for d in domains] + [x509.OtherName(XMPP_ADDR, _utf8_der(d)) for d in domains]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def write_self_signed(directory, domains: list[str], days: int = 365) -> tuple[Path, Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = make_self_signed(domains, days)
    cert_path, key_path = directory / f"{domains[0]}.crt", directory / f"{domains[0]}.key"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key_pem)
    cert_path.write_bytes(cert_pem)
    return cert_path, key_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for the .crt and .key files")
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("domains", nargs="+")
    args = parser.parse_args(argv)
    cert_path, key_path = write_self_signed(args.out, args.domains, args.days)
    print(f"wrote {cert_path} and {key_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
