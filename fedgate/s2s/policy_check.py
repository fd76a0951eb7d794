"""Every security-policy decision for S2S, in one place, used by inbound and
outbound streams alike.  Each check returns None when the policy is met, or
a reason in words that goes into the stream error, dialback error or bounce.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedgate.policy import PeerPolicy
from fedgate.tls.contexts import TLSInfo

#: How a domain pair was authenticated (stored in the domain-pair table).
SASL_EXTERNAL = "sasl-external"
DIALBACK = "dialback"
DIALBACK_WITH_CERT = "dialback-with-valid-cert"


@dataclass(frozen=True)
class Refusal:
    condition: str
    text: str
    #: the TLS failure behind it, for the metrics (None: not about TLS)
    reason: str | None = None


#: OpenSSL verify errors -> the metrics' TLS failure reasons
_EXPIRED = {9, 10}  # not yet valid, expired


def _certificate_reason(tls: TLSInfo) -> str:
    if tls.peer_certificate is None:
        return "no-certificate"
    if any(errno in _EXPIRED for _, errno, _ in tls.chain_errors):
        return "expired-certificate"
    if tls.chain_errors:
        return "untrusted-certificate"
    return "name-mismatch"


def tls_missing(policy: PeerPolicy, tls: TLSInfo | None, remote: str) -> Refusal | None:
    """Before any authentication: is the channel encrypted as policy asks?"""
    if tls is None and policy.requires_tls:
        return Refusal("policy-violation", f"policy requires TLS with {remote}", "required-but-unavailable")
    return None


def certificate_refused(policy: PeerPolicy, tls: TLSInfo | None, remote: str) -> Refusal | None:
    """Under the certificate policy the peer's certificate must be valid for it."""
    if not policy.requires_certificate:
        return None
    if tls is None:
        return Refusal("policy-violation", f"policy requires a valid certificate from {remote}, "
                                           "but the stream is not encrypted", "required-but-unavailable")
    if not tls.valid_for(remote):
        why = "; ".join(t for _, _, t in tls.chain_errors) or (
            "no certificate" if tls.peer_certificate is None else f"it does not name {remote}")
        return Refusal("not-authorized", f"policy requires a valid certificate from {remote} ({why})",
                       _certificate_reason(tls))
    return None


def dialback_request(policy: PeerPolicy, tls: TLSInfo | None, originating: str) -> tuple[Refusal | None, str]:
    """Receiving side of <db:result>: (refusal, method).

    The method is ``dialback-with-valid-cert`` when the stream's certificate is
    valid for the originating domain: then the callback to the Authoritative
    Server may be skipped (XEP-0344)."""
    refusal = tls_missing(policy, tls, originating) or certificate_refused(policy, tls, originating)
    if refusal is not None:
        return refusal, DIALBACK
    if tls is not None and tls.valid_for(originating):
        return None, DIALBACK_WITH_CERT
    return None, DIALBACK


def sasl_external_offer(tls: TLSInfo | None, stream_from: str | None) -> bool:
    """Offer EXTERNAL only to a peer whose certificate is valid for the
    stream's 'from' (XEP-0178)."""
    return tls is not None and stream_from is not None and tls.valid_for(stream_from)
