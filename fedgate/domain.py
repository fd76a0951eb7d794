"""Domain names as XMPP compares them (RFC 7622 section 3.2).

One function, used by the config, stream headers, the domain-pair table and
storage alike, so that two spellings of a domain never become two peers.
"""

from __future__ import annotations

import functools
import re

import idna

_PLAIN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")


class InvalidDomain(ValueError):
    """The text is not a valid XMPP domainpart."""


@functools.lru_cache(maxsize=4096)
def normalize_domain(text: str) -> str:
    """Return the canonical form of a domain: lower case U-labels, no final dot.

    IDNA2008 through the ``idna`` package (with UTS 46 mapping), not Python's
    built-in IDNA2003 codec.  IP literals are accepted as they are.
    """
    if not isinstance(text, str) or not text:
        raise InvalidDomain("empty domain")
    candidate = text[:-1] if text.endswith(".") else text
    if not candidate or len(candidate) > 1023:
        raise InvalidDomain(f"invalid domain {text!r}")
    lowered = candidate.lower()
    if _PLAIN.match(lowered) and "xn--" not in lowered:
        return lowered
    if lowered.startswith("[") and lowered.endswith("]"):
        return lowered
    try:
        ascii_form = idna.encode(candidate, uts46=True)
        return idna.decode(ascii_form)
    except (idna.IDNAError, UnicodeError) as exc:
        raise InvalidDomain(f"invalid domain {text!r}: {exc}") from None


@functools.lru_cache(maxsize=16384)
def domain_of(jid: str) -> str:
    """The normalised domainpart of a JID string (raises InvalidDomain).

    Cached: the same addresses recur on every stanza of a conversation, and
    this runs on the hot path for both 'to' and 'from'."""
    if not jid:
        raise InvalidDomain("empty address")
    rest = jid
    at = rest.find("@")
    slash = rest.find("/")
    if slash != -1:
        if at != -1 and at > slash:
            at = -1
        rest = rest[:slash]
    if at != -1:
        if at == 0:
            raise InvalidDomain(f"empty localpart in {jid!r}")
        rest = rest[at + 1:]
    if slash != -1 and slash == len(jid) - 1:
        raise InvalidDomain(f"empty resourcepart in {jid!r}")
    return normalize_domain(rest)
