"""The certificate check: every hosted and component domain has a
certificate that names it (DNS-ID or SRV-ID), is valid now, and has the
key beside it that fits.

Warnings, each on its own: no chain to the system's public roots (what
remote servers will trust), no chain to ``tls.trust_roots`` (what this
gateway trusts), expiry within :data:`EXPIRY_WARNING_DAYS`, an XmppAddr
name (ejabberd 23.01 crashes on peer certificates that carry one), a
match by XmppAddr only (many servers look at DNS-IDs only).

The certificate is picked exactly as the gateway picks it
(:class:`~fedgate.tls.certs.CertificateStore`); a file the store had to
skip (a key that does not fit, an unreadable key) is reported for the
domains it names, so "no certificate" comes with its reason.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from cryptography import x509
from OpenSSL import crypto

from fedgate.check import ERROR, OK, WARNING, Finding
from fedgate.domain import InvalidDomain, normalize_domain
from fedgate.tls.certs import CertificateError, CertificateStore, _not_after, _not_before, load_pair
from fedgate.tls.identity import certificate_matches, certificate_names, xmpp_addrs

EXPIRY_WARNING_DAYS = 30


def system_roots() -> tuple[str | None, str | None]:
    """(cafile, capath) of the system's public roots, as OpenSSL finds them."""
    paths = ssl.get_default_verify_paths()
    return paths.cafile, paths.capath


def _store(cafile: str | None, capath: str | None) -> crypto.X509Store:
    store = crypto.X509Store()
    store.load_locations(cafile, capath)
    return store


def chains_to(pair, store: crypto.X509Store) -> str | None:
    """None if the pair's chain verifies against ``store``, else why not."""
    leaf, *rest = [crypto.X509.from_cryptography(c) for c in pair.chain]
    try:
        crypto.X509StoreContext(store, leaf, rest).verify_certificate()
    except crypto.X509StoreContextError as exc:
        return str(exc)
    return None


def _broken_files(config) -> dict[str, str]:
    """name -> why, for certificate files the store skips because of their key."""
    broken: dict[str, str] = {}
    directory = config.tls.certificates
    if not directory or not Path(directory).is_dir():
        return broken
    for path in sorted(Path(directory).iterdir()):
        if path.suffix not in (".crt", ".pem", ".cert"):
            continue
        key_path = path.with_suffix(".key")
        try:
            load_pair(path, key_path if key_path.exists() else None)
        except (CertificateError, ValueError, OSError) as exc:
            try:
                certs = x509.load_pem_x509_certificates(path.read_bytes()) \
                    if hasattr(x509, "load_pem_x509_certificates") else \
                    [x509.load_pem_x509_certificate(path.read_bytes())]
            except ValueError:
                continue  # not a certificate at all
            for name in certificate_names(certs[0]) if certs else ():
                try:
                    broken.setdefault(normalize_domain(name.removeprefix("*.")), f"{path}: {exc}")
                except InvalidDomain:
                    continue
    return broken


def check_certificates(config, now: datetime.datetime | None = None,
                       public_roots: tuple | None = None) -> list[Finding]:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        store = CertificateStore(config.tls.certificates, config.tls.domains)
    except (CertificateError, ValueError, OSError) as exc:
        return [Finding("certificates", ERROR, "", str(exc))]
    public = _store(*(public_roots or system_roots()))
    trusted = _store(config.tls.trust_roots, None) if config.tls.trust_roots else None
    broken = _broken_files(config)
    findings = []
    for domain in sorted(config.local_domains):
        findings += _check_domain(domain, store, public, trusted, broken, now)
    return findings


def _check_domain(domain, store, public, trusted, broken, now) -> list[Finding]:
    def finding(level, message, **facts):
        return Finding("certificates", level, domain, message, facts)

    pair = store.pair_for(domain)
    if pair is None:
        parent = domain.split(".", 1)[1] if "." in domain else domain
        why = broken.get(domain) or broken.get(parent)
        return [finding(ERROR, f"no usable certificate{f' ({why})' if why else ''}")]
    leaf = pair.leaf
    not_after = _not_after(leaf)
    facts = {"file": pair.source, "not_after": not_after.isoformat(),
             "days_left": (not_after - now).days}
    out = []
    how = certificate_matches(leaf, domain)
    if how is None:
        return [finding(ERROR, f"{pair.source} does not name {domain} (no DNS-ID, SRV-ID or "
                               "XmppAddr for it)", **facts)]
    if not_after < now:
        return [finding(ERROR, f"{pair.source} expired on {not_after:%Y-%m-%d}", **facts)]
    if _not_before(leaf) > now:
        return [finding(ERROR, f"{pair.source} is not valid before {_not_before(leaf):%Y-%m-%d}",
                        **facts)]
    out.append(finding(OK, f"{pair.source}: {how.upper()}, key fits, valid until "
                           f"{not_after:%Y-%m-%d} ({facts['days_left']} days)", match=how, **facts))
    if how == "xmppaddr":
        out.append(finding(WARNING, "matches only by XmppAddr: servers that check DNS-IDs and "
                                    "SRV-IDs will not accept it"))
    if (not_after - now).days < EXPIRY_WARNING_DAYS:
        out.append(finding(WARNING, f"expires within {EXPIRY_WARNING_DAYS} days "
                                    f"({not_after:%Y-%m-%d}): renew it", **facts))
    if xmpp_addrs(leaf):
        out.append(finding(WARNING, "carries an XmppAddr name: ejabberd 23.01 crashes on such "
                                    "peer certificates; prefer a certificate with DNS names only"))
    why = chains_to(pair, public)
    if why is not None:
        out.append(finding(WARNING, "does not chain to the system's public roots: remote servers "
                                    f"that check certificates will not trust it ({why})"))
    if trusted is not None:
        why = chains_to(pair, trusted)
        if why is not None:
            out.append(finding(WARNING, "does not chain to tls.trust_roots, which this gateway "
                                        f"trusts for peers ({why})"))
    return out
