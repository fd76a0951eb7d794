"""SCRAM server side, pinned by the RFC 5802 and RFC 7677 examples."""

import base64

import pytest

from fedgate.component.credentials import Credential, CredentialRegistry
from fedgate.component.scram import ScramError, ScramKeys, ScramServer, check_password, derive

VECTORS = [
    ("SCRAM-SHA-1", "sha1", "QSXCR+Q6sek8bf92", "fyko+d2lbbFgONRv9qkxdawL", "3rfcNHYJY1ZVvWVs7j",
     "v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=", "rmF9pqV8S7suAoZWja4dJRkFsKQ="),
    ("SCRAM-SHA-256", "sha256", "W22ZaJ0SNY7soEsUEjb6gQ==", "rOprNGfwEbeRWgbNEkqO",
     "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0", "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
     "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
]


@pytest.mark.parametrize("mechanism, algorithm, salt, cnonce, snonce, proof, verifier", VECTORS)
def test_rfc_example(mechanism, algorithm, salt, cnonce, snonce, proof, verifier):
    keys = derive("pencil", algorithm, base64.b64decode(salt), 4096)
    server = ScramServer(mechanism, {"user": keys}.get, nonce=snonce)
    first = server.first(f"n,,n=user,r={cnonce}".encode())
    assert first == f"r={cnonce}{snonce},s={salt},i=4096".encode()
    final = server.final(f"c=biws,r={cnonce}{snonce},p={proof}".encode())
    assert final == f"v={verifier}".encode()


@pytest.mark.parametrize("mechanism, algorithm, salt, cnonce, snonce, proof, verifier", VECTORS)
def test_wrong_proof_and_wrong_nonce(mechanism, algorithm, salt, cnonce, snonce, proof, verifier):
    keys = derive("not pencil", algorithm, base64.b64decode(salt), 4096)
    server = ScramServer(mechanism, {"user": keys}.get, nonce=snonce)
    server.first(f"n,,n=user,r={cnonce}".encode())
    with pytest.raises(ScramError, match="not-authorized"):
        server.final(f"c=biws,r={cnonce}{snonce},p={proof}".encode())
    right = ScramServer(mechanism, {"user": derive("pencil", algorithm, base64.b64decode(salt))}.get, nonce="other")
    right.first(f"n,,n=user,r={cnonce}".encode())
    with pytest.raises(ScramError, match="not-authorized"):
        right.final(f"c=biws,r={cnonce}{snonce},p={proof}".encode())


def test_unknown_user_gets_a_challenge_but_never_succeeds():
    server = ScramServer("SCRAM-SHA-256", {}.get)
    first = server.first(b"n,,n=nobody,r=abc").decode()
    assert first.startswith("r=abc") and ",s=" in first and ",i=" in first
    with pytest.raises(ScramError):
        server.final(b"c=biws,r=" + first.split(",")[0][2:].encode() + b",p=" + base64.b64encode(b"x" * 32))


@pytest.mark.parametrize("message, condition", [
    (b"p=tls-unique,,n=user,r=abc", "invalid-mechanism"),
    (b"x,,n=user,r=abc", "malformed-request"),
    (b"n,,r=abc", "malformed-request"),
    (b"\xff", "malformed-request"),
])
def test_bad_first_messages(message, condition):
    with pytest.raises(ScramError, match=condition):
        ScramServer("SCRAM-SHA-1", {}.get).first(message)


def test_keys_round_trip_and_plain_check():
    keys = derive("secret", "sha256")
    assert ScramKeys.decode(keys.encode()) == keys
    assert "secret" not in keys.encode()
    assert check_password(keys, "sha256", "secret")
    assert not check_password(keys, "sha256", "Secret")
    with pytest.raises(ValueError):
        ScramKeys.decode("not:keys")


def test_registry_binding_rules():
    registry = CredentialRegistry({"svc.example": Credential("svc.example", derive("p", "sha1"), None,
                                                             frozenset({"bot.example"}))})
    assert registry.check_plain("SVC.example", "p")
    assert not registry.check_plain("svc.example", "q")
    assert registry.may_bind("svc.example", "svc.example")
    assert registry.may_bind("svc.example", "bot.example")
    assert not registry.may_bind("svc.example", "other.example")
    assert not registry.may_bind("cert.example", "cert.example"), "no credential, no hostname"
    assert registry.keys("SCRAM-SHA-256")("svc.example") is None
    assert registry.hostnames() == {"svc.example", "bot.example"}
