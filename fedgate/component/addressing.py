"""The addressing rules every component stanza passes, for both protocols.

'from' must be at one of the stream's own domains (XEP-0114 section 3; the
bound hostnames for XEP-0225), else the stream ends with ``invalid-from``;
a missing 'to' is a ``bad-request`` for that stanza only.
"""

from __future__ import annotations

from twisted.words.xish import domish

from fedgate.domain import InvalidDomain, domain_of
from fedgate.stream.errors import StanzaFailure, StreamFailure


def checked_domains(stanza: domish.Element, sender: str, own, own_text: str) -> tuple[str, str]:
    """(to domain, from domain) of a component's stanza, or the error."""
    try:
        from_domain = domain_of(sender)
    except InvalidDomain:
        raise StreamFailure("improper-addressing", "malformed 'from'") from None
    if from_domain not in own:
        raise StreamFailure("invalid-from", f"'from' must be at {own_text}")
    to = stanza.getAttribute("to")
    if not to:
        raise StanzaFailure("bad-request", "stanza without 'to'")
    try:
        return domain_of(to), from_domain
    except InvalidDomain:
        raise StanzaFailure("jid-malformed", "malformed 'to'") from None
