"""Server Dialback (XEP-0220) keys and elements.

Keys follow XEP-0185: HMAC-SHA256 keyed with the lowercase hex SHA-256 of
the secret, over "receiving originating stream-id".  Only the Authoritative
Server ever needs to recompute a key, so the secret never leaves this host.
"""

from __future__ import annotations

import hashlib
import hmac

from twisted.words.xish import domish

from fedgate.stream import namespaces as ns
from fedgate.stream.errors import stanza_error_element

#: The dialback error conditions of XEP-0220 section 2.5, the only ones we
#: send.  The table also lists <remote-connection-failed/>, but that is an
#: RFC 6120 stream error condition, not the stanza error condition the same
#: section requires inside <error/>, and peers do not understand it there;
#: a failed connection to the Authoritative Server is reported as
#: <remote-server-not-found/> or <remote-server-timeout/>, as the table says.
DIALBACK_CONDITIONS = frozenset({
    "item-not-found",           # the target domain is not hosted here
    "remote-server-not-found",  # the Authoritative Server cannot be reached
    "remote-server-timeout",    # the connection to it failed without an answer
    "policy-violation",         # TLS required before dialback
    "not-authorized",           # a certificate (or other proof) is required
    "forbidden",                # the Authoritative Server said "invalid"
    "not-acceptable",           # the asserted identity could not be established
    "resource-constraint",      # no room for another pair or verification now
})


def dialback_key(secret: str | bytes, receiving: str, originating: str, stream_id: str) -> str:
    """The XEP-0185 dialback key (hex)."""
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    hmac_key = hashlib.sha256(secret).hexdigest().encode("ascii")
    message = f"{receiving} {originating} {stream_id}".encode("utf-8")
    return hmac.new(hmac_key, message, hashlib.sha256).hexdigest()


def key_matches(secret: str | bytes, receiving: str, originating: str, stream_id: str,
                key: str) -> bool:
    """Check a presented key in constant time."""
    expected = dialback_key(secret, receiving, originating, stream_id)
    return hmac.compare_digest(expected.encode("ascii"), (key or "").strip().encode("utf-8", "replace"))


def _db(name: str, sender: str, recipient: str, **attrs) -> domish.Element:
    element = domish.Element((ns.DIALBACK, name))
    element["from"] = sender
    element["to"] = recipient
    for key, value in attrs.items():
        if value is not None:
            element[key] = value
    return element


def result_request(originating: str, receiving: str, key: str) -> str:
    """<db:result> asking the Receiving Server to verify our key (prefixed form,
    as some servers look for the db: prefix)."""
    return f"<db:result from='{originating}' to='{receiving}'>{key}</db:result>"


def verify_request(receiving: str, originating: str, stream_id: str, key: str) -> str:
    return f"<db:verify from='{receiving}' to='{originating}' id='{stream_id}'>{key}</db:verify>"


def result_answer(receiving: str, originating: str, valid: bool) -> domish.Element:
    return _db("result", receiving, originating, type="valid" if valid else "invalid")


def verify_answer(originating: str, receiving: str, stream_id: str, valid: bool) -> domish.Element:
    return _db("verify", originating, receiving, id=stream_id, type="valid" if valid else "invalid")


def _checked(condition: str) -> str:
    if condition not in DIALBACK_CONDITIONS:
        raise ValueError(f"not a dialback error condition (XEP-0220 2.5): {condition!r}")
    return condition


def result_error(receiving: str, originating: str, condition: str, text: str | None = None) -> domish.Element:
    _checked(condition)
    element = _db("result", receiving, originating, type="error")
    element.addChild(stanza_error_element(condition, text=text))
    return element


def verify_error(originating: str, receiving: str, stream_id: str, condition: str,
                 text: str | None = None) -> domish.Element:
    _checked(condition)
    element = _db("verify", originating, receiving, id=stream_id, type="error")
    element.addChild(stanza_error_element(condition, text=text))
    return element


def features_element(extra: list | None = None) -> domish.Element:
    """Stream features advertising dialback with error support."""
    features = domish.Element((ns.STREAMS, "features"))
    dialback = features.addElement((ns.DIALBACK_FEATURE, "dialback"))
    dialback.addElement("errors")
    for child in extra or ():
        features.addChild(child)
    return features
