"""The addressing rules every component stanza passes, for both protocols.

'from' must be at one of the stream's own domains (XEP-0114 section 3; the
bound hostnames for XEP-0225), else the stream ends with ``invalid-from``;
a missing 'to' is a ``bad-request`` for that stanza only, and a malformed
'to' or 'from' (RFC 7622) a ``jid-malformed`` for that stanza only (not
answered when the 'from' is the malformed one: there is no one to answer).
"""

from __future__ import annotations

from twisted.words.xish import domish

from fedgate.domain import InvalidDomain
from fedgate.jid import domain_of, domain_part
from fedgate.stream.errors import StanzaFailure, StreamFailure


def checked_domains(stanza: domish.Element, sender: str, own, own_text: str) -> tuple[str, str]:
    """(to domain, from domain) of a component's stanza, or the error."""
    try:
        from_domain = domain_of(sender)
    except InvalidDomain:
        from_domain = domain_part(sender)
        if from_domain is not None and from_domain not in own:
            raise StreamFailure("invalid-from", f"'from' must be at {own_text}") from None
        raise StanzaFailure("jid-malformed", "malformed 'from'") from None
    if from_domain not in own:
        raise StreamFailure("invalid-from", f"'from' must be at {own_text}")
    to = stanza.getAttribute("to")
    if not to:
        raise StanzaFailure("bad-request", "stanza without 'to'")
    try:
        return domain_of(to), from_domain
    except InvalidDomain:
        raise StanzaFailure("jid-malformed", "malformed 'to'") from None
