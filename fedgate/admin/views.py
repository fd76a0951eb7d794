"""JSON shapes of the admin API, both ways, in one place.

Out: peers, the global policy, connections (serialised generically from the
record's dataclass fields, so fields the S2S core adds later show up without
a change here), destinations and components.  In: peer and policy bodies,
validated strictly: an unknown field or a wrong type is a 422 naming the
field, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from typing import Any

from fedgate.admin.web import ApiError
from fedgate.domain import InvalidDomain, normalize_domain
from fedgate.policy import AUTHENTICATIONS, ENCRYPTIONS, MODES, PeerPolicy
from fedgate.s2s.pairs import VALID

MAX_NOTE = 2000
MAX_ADDRESSES = 16
MAX_STANZA_LIMIT = 64 * 1024 * 1024
MAX_ANCHOR_PEM = 64 * 1024
CERTIFICATE_FIELDS = ("certificate_sha256", "trust_anchor_pem", "certificate_name")

PEER_FIELDS = ("allowed", "encryption", "authentication", "addresses", "max_stanza_bytes",
               "rate_limit", "note")
DEFAULT_FIELDS = ("encryption", "authentication", "max_stanza_bytes", "rate_limit")


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, f"{field}: {message}", field=field)


def path_domain(text: str) -> str:
    """A domain from the URL, normalised (RFC 7622), or a 422."""
    try:
        return normalize_domain(text)
    except InvalidDomain as exc:
        raise ApiError(422, str(exc), field="domain") from None


# -- addresses ----------------------------------------------------------------

def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: Any, field: str = "addresses") -> tuple[str, int]:
    if not isinstance(text, str) or not text:
        raise invalid(field, "expected 'host:port' strings")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("5269" if not rest else "")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, "5269"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise invalid(field, f"bad port in {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            host = normalize_domain(host)
        except InvalidDomain:
            raise invalid(field, f"bad host in {text!r}") from None
    return host, int(port)


# -- peers ----------------------------------------------------------------------

def peer_json(policy: PeerPolicy, source: str) -> dict:
    return {
        "domain": policy.domain,
        "allowed": policy.allowed,
        "encryption": policy.encryption,
        "authentication": policy.authentication,
        "addresses": [format_address(h, p) for h, p in policy.addresses],
        "max_stanza_bytes": policy.max_stanza_bytes,
        "rate_limit": policy.rate_limit,
        "note": policy.note,
        "source": source,
    }


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _fields(body: dict, allowed: tuple[str, ...], extra: tuple[str, ...] = ()) -> None:
    for name in body:
        if name not in allowed and name not in extra:
            raise invalid(name, f"unknown field (expected one of {', '.join(allowed)})")


def _value(name: str, value: Any) -> Any:
    if name == "allowed":
        if not isinstance(value, bool):
            raise invalid(name, "expected true or false")
    elif name == "encryption":
        if value not in ENCRYPTIONS:
            raise invalid(name, f"must be one of {', '.join(ENCRYPTIONS)}")
    elif name == "authentication":
        if value not in AUTHENTICATIONS:
            raise invalid(name, f"must be one of {', '.join(AUTHENTICATIONS)}")
    elif name == "addresses":
        if not isinstance(value, list) or len(value) > MAX_ADDRESSES:
            raise invalid(name, f"expected a list of at most {MAX_ADDRESSES} 'host:port' strings")
        return tuple(parse_address(item) for item in value)
    elif name == "max_stanza_bytes":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 < value <= MAX_STANZA_LIMIT):
            raise invalid(name, f"expected null or an integer from 1 to {MAX_STANZA_LIMIT}")
    elif name == "rate_limit":
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise invalid(name, "expected null or a number of stanzas per second above 0")
        return float(value) if value is not None else None
    elif name == "note":
        if not isinstance(value, str) or len(value) > MAX_NOTE:
            raise invalid(name, f"expected text of at most {MAX_NOTE} characters")
    return value


def parse_peer(domain: str, body: Any, base: PeerPolicy) -> PeerPolicy:
    """``base`` with the fields of ``body`` applied (PUT passes the default
    policy as base, PATCH the current peer)."""
    body = _object(body)
    _fields(body, PEER_FIELDS, ("domain", "source"))
    if "domain" in body:
        try:
            same = normalize_domain(body["domain"]) == domain
        except (InvalidDomain, TypeError):
            same = False
        if not same:
            raise invalid("domain", "does not match the domain in the path")
    changes = {name: _value(name, body[name]) for name in PEER_FIELDS if name in body}
    return dataclasses.replace(base, domain=domain, **changes)


# -- the global policy ----------------------------------------------------------

def default_json(default: PeerPolicy) -> dict:
    return {name: getattr(default, name) for name in DEFAULT_FIELDS}


def parse_global(body: Any, mode: str, default: PeerPolicy) -> tuple[str, PeerPolicy]:
    body = _object(body)
    _fields(body, ("mode", "default"), ("source",))
    if "mode" in body:
        if body["mode"] not in MODES:
            raise invalid("mode", f"must be one of {', '.join(MODES)}")
        mode = body["mode"]
    if "default" in body:
        part = _object(body["default"])
        for name in part:
            if name not in DEFAULT_FIELDS:
                raise invalid(f"default.{name}", f"unknown field (expected one of {', '.join(DEFAULT_FIELDS)})")
        default = dataclasses.replace(default, **{n: _value(n, v) for n, v in part.items()})
    return mode, dataclasses.replace(default, domain=None)


# -- live state -------------------------------------------------------------------

def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.asdict(value))
    return str(value)


def connection_state(record) -> str:
    return "authenticated" if record.authenticated else "authenticating"


def connection_json(record, now: float, detail: bool = False) -> dict:
    out = {f.name: _plain(getattr(record, f.name)) for f in dataclasses.fields(record)
           if not f.name.startswith("_") and f.name != "pairs"}
    pairs = list(record.pairs.values())
    out.setdefault("tls", None)
    out.setdefault("bidi", False)
    out["state"] = connection_state(record)
    out["age_seconds"] = round(max(0.0, now - record.opened_at), 3)
    out["auth_methods"] = sorted({p.method for p in pairs if p.state == VALID and p.method})
    out["counters"] = {"stanzas_in": sum(p.stanzas_in for p in pairs),
                       "stanzas_out": sum(p.stanzas_out for p in pairs)}
    out["pair_count"] = len(pairs)
    out["stream_management"] = record.stream_management()
    if detail:
        out["pairs"] = [_plain(dataclasses.asdict(p)) for p in pairs]
    return out


def destination_json(status, now: float, blocked: bool) -> dict:
    """One destination, from the sender's :class:`~fedgate.s2s.destination.DestinationStatus`."""
    oldest = status.oldest_since
    return {
        "domain": status.domain,
        "state": status.state,
        "blocked": blocked,
        "queue": {"stanzas": status.queued_stanzas, "bytes": status.queued_bytes,
                  "oldest_age_seconds": round(now - oldest, 3) if oldest is not None else None},
        "failures": status.failures,
        "last_error": status.last_error,
        "retry_at": status.retry_at,
        "retry_in_seconds": round(max(0.0, status.retry_at - now), 3) if status.retry_at else None,
        "connection_id": status.connection_id,
        "connection_ids": list(status.connection_ids),
        "pending_pairs": [{"local": local, "connection_id": connection_id,
                           "age_seconds": round(max(0.0, now - since), 3)}
                          for local, connection_id, since in status.pending_pairs],
    }


def component_json(domain: str, registry) -> dict:
    record = registry.current(domain)
    sessions = registry.sessions(domain)
    xep0225 = bool(record.scram_sha1 or record.scram_sha256 or record.allowed or record.certificate_auth)
    first = sessions[0] if sessions else None
    return {
        "domain": domain,
        "source": registry.source(domain),
        "protocols": (["xep-0114"] if record.secret else []) + (["xep-0225"] if xep0225 else []),
        "secret_set": bool(record.secret),
        "password_set": bool(record.scram_sha1 or record.scram_sha256),
        "allowed_hostnames": list(record.allowed),
        "certificate_sha256": list(record.certificate_sha256),
        "trust_anchor_set": bool(record.trust_anchor_pem),
        "certificate_name": (record.certificate_name or domain) if record.trust_anchor_pem else None,
        "note": record.note,
        "connected": bool(sessions),
        "bound_hostnames": registry.bound_hostnames(domain),
        "peer": first.peer if first is not None else None,
        "stanzas_in": sum(s.stanzas_in for s in sessions),
        "stanzas_out": sum(s.stanzas_out for s in sessions),
    }


def parse_component(domain: str, body: Any, base) -> Any:
    """``base`` (a ComponentCredential) with the fields of ``body`` applied;
    a password becomes salted SCRAM keys here and is never kept."""
    body = _object(body)
    _fields(body, ("secret", "password", "allowed_hostnames", "note") + CERTIFICATE_FIELDS)
    changes: dict = {}
    if "secret" in body:
        secret = body["secret"]
        if secret is not None and (not isinstance(secret, str) or not 16 <= len(secret) <= 1024):
            raise invalid("secret", "expected null or text of 16 to 1024 characters")
        changes["secret"] = secret
    if "password" in body:
        password = body["password"]
        if password is not None and (not isinstance(password, str) or not 12 <= len(password) <= 1024):
            raise invalid("password", "expected null or text of 12 to 1024 characters")
        from fedgate.component.scram import derive
        changes["scram_sha1"] = derive(password, "sha1").encode() if password else None
        changes["scram_sha256"] = derive(password, "sha256").encode() if password else None
    if "allowed_hostnames" in body:
        names = body["allowed_hostnames"]
        if names is None:
            names = []
        if not isinstance(names, list) or len(names) > 64:
            raise invalid("allowed_hostnames", "expected a list of at most 64 domains")
        try:
            normalized = sorted({normalize_domain(n) for n in names if isinstance(n, str)})
        except InvalidDomain as exc:
            raise invalid("allowed_hostnames", str(exc)) from None
        if len(normalized) != len({n for n in names if isinstance(n, str)}) or \
                not all(isinstance(n, str) for n in names):
            raise invalid("allowed_hostnames", "expected distinct domain names")
        changes["allowed"] = tuple(n for n in normalized if n != domain)
    if "note" in body:
        if not isinstance(body["note"], str) or len(body["note"]) > MAX_NOTE:
            raise invalid("note", f"expected text of at most {MAX_NOTE} characters")
        changes["note"] = body["note"]
    changes.update(_certificate_changes(body))
    result = dataclasses.replace(base, domain=domain, **changes)
    if not result.trust_anchor_pem:
        if "certificate_name" in body and body["certificate_name"] is not None:
            raise invalid("certificate_name", "only counts together with trust_anchor_pem")
        result = dataclasses.replace(result, certificate_name=None)
    elif not result.certificate_name:
        result = dataclasses.replace(result, certificate_name=domain)
    if not (result.secret or result.scram_sha1 or result.scram_sha256 or result.allowed
            or result.certificate_auth):
        raise invalid("secret", "give a secret (XEP-0114), or a password, certificate_sha256, "
                                "trust_anchor_pem or allowed_hostnames (XEP-0225)")
    return result


def _certificate_changes(body: dict) -> dict:
    """XEP-0225 certificate authentication fields (SASL EXTERNAL)."""
    from fedgate.component.certauth import MAX_FINGERPRINTS, load_anchors, normalize_fingerprint
    changes: dict = {}
    if "certificate_sha256" in body:
        pins = body["certificate_sha256"] if body["certificate_sha256"] is not None else []
        if not isinstance(pins, list) or len(pins) > MAX_FINGERPRINTS:
            raise invalid("certificate_sha256", f"expected a list of at most {MAX_FINGERPRINTS} "
                                                "SHA-256 fingerprints")
        try:
            changes["certificate_sha256"] = tuple(sorted({normalize_fingerprint(p) for p in pins}))
        except ValueError as exc:
            raise invalid("certificate_sha256", str(exc)) from None
    if "trust_anchor_pem" in body:
        pem = body["trust_anchor_pem"]
        if pem is not None and (not isinstance(pem, str) or len(pem) > MAX_ANCHOR_PEM):
            raise invalid("trust_anchor_pem", f"expected null or PEM text of at most {MAX_ANCHOR_PEM} "
                                              "characters")
        if pem:
            try:
                load_anchors(pem)
            except ValueError as exc:
                raise invalid("trust_anchor_pem", str(exc)) from None
        changes["trust_anchor_pem"] = pem or None
    if "certificate_name" in body:
        name = body["certificate_name"]
        if name is not None:
            try:
                name = normalize_domain(name) if isinstance(name, str) else None
            except InvalidDomain as exc:
                raise invalid("certificate_name", str(exc)) from None
            if name is None:
                raise invalid("certificate_name", "expected null or a domain name")
        changes["certificate_name"] = name
    return changes
