"""XMPP addresses (JIDs) as fedgate accepts them (RFC 7622).

Every address that enters the gateway, from a remote server, a component,
the admin API, passes :func:`domain_of`, which checks the whole address,
not only the domainpart the router needs: each part 1 to 1023 bytes of
UTF-8, and the rules below, so that one malformed address never travels
further (a 1024-byte localpart once reached the component).

The parts, split as RFC 7622 section 3.2 says (first '/' ends the bare
address, first '@' before it ends the localpart):

- **domainpart**: :func:`fedgate.domain.normalize_domain` (IDNA2008).
- **localpart**: the structural rules of the PRECIS IdentifierClass under
  the UsernameCaseMapped profile (RFC 8264, RFC 8265): no space, control,
  format, private-use, surrogate or unassigned code point, none of
  ``" & ' / : < > @`` (RFC 7622 section 3.3.1), and in Unicode NFC.
- **resourcepart**: the OpaqueString profile's structural rules: no control,
  surrogate or unassigned code point, and in NFC.

We check, we do not rewrite: an address that enforcement would change
(case, width) is still accepted and compared by its domain, as before.  No
PRECIS library is used: none is installed on both of our stacks, and the
checks above are what keeps malformed input out; the full profile mappings
matter to the server that owns the address, not to a gateway that relays it.

The ASCII case, nearly all real traffic, is two regular expression
searches; results are cached for short addresses only, so the cache has a
byte bound however long the addresses a peer sends.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from fedgate.domain import InvalidDomain, normalize_domain

#: RFC 7622 section 3.1: each part at most 1023 bytes of UTF-8.
MAX_PART_BYTES = 1023
#: Addresses longer than this (in characters) are checked without the cache:
#: 16384 entries of at most 256 characters bound it to a few megabytes.
_CACHED_LENGTH = 256

_BAD_ASCII_LOCAL = re.compile(r"[\x00-\x20\"&'/:<>@\x7f]")
_BAD_ASCII_RESOURCE = re.compile(r"[\x00-\x1f\x7f]")
_BAD_LOCAL_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})
_BAD_RESOURCE_CATEGORIES = frozenset({"Cc", "Cs", "Cn"})


class InvalidJID(InvalidDomain):
    """The text is not a well-formed XMPP address (a subclass of
    :class:`InvalidDomain`, so callers that only want the domain still
    catch it)."""


def split_jid(text: str) -> tuple[str | None, str, str | None]:
    """(localpart or None, domainpart as given, resourcepart or None), by the
    separators alone; raises :class:`InvalidJID` for an empty part."""
    if not isinstance(text, str) or not text:
        raise InvalidJID("empty address")
    bare, slash, resource = text.partition("/")
    if slash and not resource:
        raise InvalidJID("empty resourcepart")
    local, at, domain = bare.partition("@")
    if not at:
        local, domain = None, bare
    elif not local:
        raise InvalidJID("empty localpart")
    if not domain:
        raise InvalidJID("empty domainpart")
    return local, domain, (resource if slash else None)


def _too_long(part: str) -> bool:
    if part.isascii():
        return len(part) > MAX_PART_BYTES
    return len(part) > MAX_PART_BYTES or len(part.encode("utf-8")) > MAX_PART_BYTES


def check_localpart(local: str) -> None:
    if _too_long(local):
        raise InvalidJID("localpart longer than 1023 bytes")
    if local.isascii():
        if _BAD_ASCII_LOCAL.search(local):
            raise InvalidJID("forbidden character in localpart")
        return
    if _BAD_ASCII_LOCAL.search(local) or any(
            unicodedata.category(c) in _BAD_LOCAL_CATEGORIES for c in local):
        raise InvalidJID("forbidden character in localpart")
    if not unicodedata.is_normalized("NFC", local):
        raise InvalidJID("localpart is not in Unicode NFC")


def check_resourcepart(resource: str) -> None:
    if _too_long(resource):
        raise InvalidJID("resourcepart longer than 1023 bytes")
    if resource.isascii():
        if _BAD_ASCII_RESOURCE.search(resource):
            raise InvalidJID("control character in resourcepart")
        return
    if any(unicodedata.category(c) in _BAD_RESOURCE_CATEGORIES for c in resource):
        raise InvalidJID("forbidden character in resourcepart")
    if not unicodedata.is_normalized("NFC", resource):
        raise InvalidJID("resourcepart is not in Unicode NFC")


def _domain(domain: str) -> str:
    try:
        normalized = normalize_domain(domain)
    except InvalidDomain as exc:
        raise InvalidJID(str(exc)) from None
    if not normalized.isascii() and len(normalized.encode("utf-8")) > MAX_PART_BYTES:
        raise InvalidJID("domainpart longer than 1023 bytes")
    return normalized


def _check(jid: str) -> str:
    local, domain, resource = split_jid(jid)
    normalized = _domain(domain)
    if local is not None:
        check_localpart(local)
    if resource is not None:
        check_resourcepart(resource)
    return normalized


_check_cached = functools.lru_cache(maxsize=16384)(_check)


def domain_of(jid: str) -> str:
    """The normalised domainpart of a well-formed JID; raises
    :class:`InvalidJID` (an :class:`InvalidDomain`) for any malformed part.

    This runs on the hot path for both 'to' and 'from' of every stanza."""
    if isinstance(jid, str) and len(jid) <= _CACHED_LENGTH:
        return _check_cached(jid)
    return _check(jid)


def is_valid_jid(jid) -> bool:
    try:
        domain_of(jid)
    except InvalidDomain:
        return False
    return True


def domain_part(jid) -> str | None:
    """The normalised domainpart of ``jid`` when that part alone is valid,
    whatever the other parts are (for deciding, on the slow path, which
    domain a malformed address was meant for); else None."""
    try:
        return _domain(split_jid(jid)[1])
    except InvalidDomain:
        return None
