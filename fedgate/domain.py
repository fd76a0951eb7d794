"""Domain names as XMPP compares them (RFC 7622 section 3.2).

One function, used by the config, stream headers, the domain-pair table and
storage alike, so that two spellings of a domain never become two peers.
Whole addresses (JIDs) are checked in :mod:`fedgate.jid`.
"""

from __future__ import annotations

import functools
import ipaddress
import re

import idna

_PLAIN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")


class InvalidDomain(ValueError):
    """The text is not a valid XMPP domainpart."""


#: Domains longer than this (in characters) are normalised without the
#: cache: 4096 entries of at most 256 characters bound it to a few megabytes
#: whatever names a peer sends (a valid domain may have 1023 bytes).
_CACHED_LENGTH = 256


def normalize_domain(text: str) -> str:
    """Return the canonical form of a domain: lower case U-labels, no final dot.

    IDNA2008 through the ``idna`` package (with UTS 46 mapping), not Python's
    built-in IDNA2003 codec.  IP literals are accepted as they are.
    """
    if isinstance(text, str) and len(text) <= _CACHED_LENGTH:
        return _normalize_cached(text)
    return _normalize(text)


def _normalize(text: str) -> str:
    if not isinstance(text, str) or not text:
        raise InvalidDomain("empty domain")
    candidate = text[:-1] if text.endswith(".") else text
    if not candidate:
        raise InvalidDomain("empty domain")
    if len(candidate) > 1023 or (not candidate.isascii() and len(candidate.encode("utf-8")) > 1023):
        raise InvalidDomain("domain longer than 1023 bytes")  # RFC 7622 section 3.2
    lowered = candidate.lower()
    if _PLAIN.match(lowered) and "xn--" not in lowered:
        return lowered
    if lowered.startswith("[") and lowered.endswith("]"):
        inner = lowered[1:-1]
        try:
            if "%" in inner:  # a zone index is no part of an XMPP address
                raise ValueError(inner)
            return f"[{ipaddress.IPv6Address(inner).compressed}]"
        except ValueError:
            raise InvalidDomain("invalid IPv6 literal") from None
    try:
        ascii_form = idna.encode(candidate, uts46=True)
        return idna.decode(ascii_form)
    except (idna.IDNAError, UnicodeError) as exc:
        raise InvalidDomain(f"invalid domain {text[:80]!r}: {exc}") from None


_normalize_cached = functools.lru_cache(maxsize=4096)(_normalize)
