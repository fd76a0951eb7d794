"""SCRAM (RFC 5802, RFC 7677) for the server side, and the keys we store.

Credentials are kept only as salted SCRAM keys (StoredKey and ServerKey per
hash, RFC 5802 section 3), never as passwords.  PLAIN is checked against the
same keys by deriving them from the offered password with the stored salt.
Channel binding is not offered (no -PLUS mechanisms), so a client that says
it requires it ("p=") is refused.

    python3 -m fedgate.component.scram            # asks for a password
prints the values for the config file.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import secrets
import sys
from dataclasses import dataclass, field

HASHES = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}
DEFAULT_ITERATIONS = 4096


@dataclass(frozen=True)
class ScramKeys:
    """One hash's stored keys: 'salt:iterations:storedkey:serverkey' (base64)."""

    salt: bytes
    iterations: int
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def encode(self) -> str:
        b64 = lambda b: base64.b64encode(b).decode("ascii")
        return f"{b64(self.salt)}:{self.iterations}:{b64(self.stored_key)}:{b64(self.server_key)}"

    @classmethod
    def decode(cls, text: str) -> "ScramKeys":
        try:
            salt, iterations, stored, server = text.split(":")
            keys = cls(base64.b64decode(salt, validate=True), int(iterations),
                       base64.b64decode(stored, validate=True), base64.b64decode(server, validate=True))
        except (ValueError, TypeError):
            raise ValueError("expected 'salt:iterations:storedkey:serverkey' in base64") from None
        if keys.iterations < 1:
            raise ValueError("iterations must be positive")
        return keys


def _hmac(algorithm: str, key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, algorithm).digest()


def derive(password: str, algorithm: str, salt: bytes | None = None,
           iterations: int = DEFAULT_ITERATIONS) -> ScramKeys:
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac(algorithm, password.encode("utf-8"), salt, iterations)
    client_key = _hmac(algorithm, salted, b"Client Key")
    stored_key = hashlib.new(algorithm, client_key).digest()
    server_key = _hmac(algorithm, salted, b"Server Key")
    return ScramKeys(salt, iterations, stored_key, server_key)


_DECOY_SECRET = secrets.token_bytes(32)


def decoy_keys(algorithm: str, username: str) -> ScramKeys:
    """Keys for a user that does not exist: a per-process keyed salt (the
    same name gets the same salt, as a real user would) and random keys that
    no proof can match.  HMACs only: unknown users cost no PBKDF2."""
    salt = hmac.new(_DECOY_SECRET, username.encode("utf-8", "replace"), "sha256").digest()[:16]
    size = hashlib.new(algorithm).digest_size
    return ScramKeys(salt, DEFAULT_ITERATIONS, secrets.token_bytes(size), secrets.token_bytes(size))


def check_password(keys: ScramKeys, algorithm: str, password: str) -> bool:
    """Does ``password`` produce these stored keys?  (For SASL PLAIN.)"""
    candidate = derive(password, algorithm, keys.salt, keys.iterations)
    return hmac.compare_digest(candidate.stored_key, keys.stored_key)


def _attributes(message: str) -> dict:
    out = {}
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ValueError(f"malformed SCRAM attribute {part!r}")
        out[part[0]] = part[2:]
    return out


def _unescape_name(name: str) -> str:
    if "=" in name.replace("=2C", "").replace("=3D", ""):
        raise ValueError("bad escaping in the SCRAM user name")
    return name.replace("=2C", ",").replace("=3D", "=")


class ScramServer:
    """One SCRAM exchange.  Feed the client's messages; each step returns the
    server's next message, or raises :class:`ScramError` with the SASL
    failure condition."""

    def __init__(self, mechanism: str, lookup, nonce: str | None = None):
        self.algorithm = HASHES[mechanism]
        self.mechanism = mechanism
        self.lookup = lookup  # username -> ScramKeys for this hash, or None
        self.server_nonce = nonce or secrets.token_urlsafe(18)
        self.username: str | None = None
        self.authzid: str | None = None
        self._keys: ScramKeys | None = None

    def first(self, client_first: bytes) -> bytes:
        try:
            text = client_first.decode("utf-8")
            flag, authz, bare = text.split(",", 2)
        except (UnicodeDecodeError, ValueError):
            raise ScramError("malformed-request") from None
        if flag.startswith("p="):
            raise ScramError("invalid-mechanism", "channel binding is not supported")
        if flag not in ("n", "y"):
            raise ScramError("malformed-request")
        if authz:
            if not authz.startswith("a="):
                raise ScramError("malformed-request")
            self.authzid = _unescape_name(authz[2:])
        try:
            attrs = _attributes(bare)
            self.username = _unescape_name(attrs["n"])
            self.client_nonce = attrs["r"]
        except (KeyError, ValueError):
            raise ScramError("malformed-request") from None
        self.gs2_header = f"{flag},{authz},"
        self.client_first_bare = bare
        keys = self.lookup(self.username)
        # An unknown user still gets a believable challenge (no user probing):
        # decoy keys, cheap to make (no PBKDF2 on the reactor for anyone who
        # asks), with a salt that stays the same for the same name.
        self._keys = keys or decoy_keys(self.algorithm, self.username)
        self._known = keys is not None
        self.nonce = self.client_nonce + self.server_nonce
        salt = base64.b64encode(self._keys.salt).decode("ascii")
        self.server_first = f"r={self.nonce},s={salt},i={self._keys.iterations}"
        return self.server_first.encode("utf-8")

    def final(self, client_final: bytes) -> bytes:
        try:
            text = client_final.decode("utf-8")
            without_proof, _, proof_part = text.rpartition(",p=")
            attrs = _attributes(without_proof)
            proof = base64.b64decode(proof_part, validate=True)
            binding = base64.b64decode(attrs["c"], validate=True)
        except (UnicodeDecodeError, ValueError, KeyError):
            raise ScramError("malformed-request") from None
        if binding != self.gs2_header.encode("utf-8") or attrs.get("r") != self.nonce:
            raise ScramError("not-authorized")
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode("utf-8")
        keys = self._keys
        signature = _hmac(self.algorithm, keys.stored_key, auth_message)
        if len(proof) != len(signature):
            raise ScramError("not-authorized")
        client_key = bytes(a ^ b for a, b in zip(proof, signature))
        ok = hmac.compare_digest(hashlib.new(self.algorithm, client_key).digest(), keys.stored_key)
        if not (ok and self._known):
            raise ScramError("not-authorized")
        server_signature = _hmac(self.algorithm, keys.server_key, auth_message)
        return b"v=" + base64.b64encode(server_signature)


class ScramError(Exception):
    def __init__(self, condition: str, text: str | None = None):
        super().__init__(condition)
        self.condition = condition
        self.text = text


def main() -> int:
    password = getpass.getpass("Password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    if not password:
        print("no password given", file=sys.stderr)
        return 2
    print(f'scram_sha1 = "{derive(password, "sha1").encode()}"')
    print(f'scram_sha256 = "{derive(password, "sha256").encode()}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
