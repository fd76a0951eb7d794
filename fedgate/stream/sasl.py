"""SASL framing shared by S2S (EXTERNAL) and components (RFC 6120 section 6)."""

from __future__ import annotations

import base64
import binascii

from twisted.words.xish import domish

from fedgate.stream import namespaces as ns
from fedgate.stream.serialize import escape_text

FAILURE_CONDITIONS = frozenset({
    "aborted", "account-disabled", "credentials-expired", "encryption-required",
    "incorrect-encoding", "invalid-authzid", "invalid-mechanism", "malformed-request",
    "mechanism-too-weak", "not-authorized", "temporary-auth-failure",
})


def sasl_mechanisms(names) -> domish.Element:
    mechanisms = domish.Element((ns.SASL, "mechanisms"))
    for name in names:
        mechanisms.addElement("mechanism", content=name)
    return mechanisms


def offered_mechanisms(features: domish.Element) -> list[str]:
    for child in features.elements():
        if child.uri == ns.SASL and child.name == "mechanisms":
            return [str(m).strip() for m in child.elements() if m.name == "mechanism"]
    return []


def sasl_failure(condition: str, text: str | None = None) -> str:
    if condition not in FAILURE_CONDITIONS:
        raise ValueError(condition)
    body = f"<{condition}/>"
    if text:
        body += f"<text>{escape_text(text)}</text>"
    return f"<failure xmlns='{ns.SASL}'>{body}</failure>"


def decode_payload(text: str) -> bytes | None:
    """The bytes of a SASL payload ('=' means an empty one); None if malformed."""
    text = (text or "").strip()
    if text in ("", "="):
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def encode_payload(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii") if data else "="


def decode_external(text: str) -> str | None:
    """The authorization identity of an EXTERNAL <auth/> ('' for none)."""
    data = decode_payload(text)
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
