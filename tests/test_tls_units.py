"""Certificate identity, the certificate store, and the policy checks."""

from __future__ import annotations


import pytest

from fedgate.policy import PeerPolicy
from fedgate.s2s import policy_check
from fedgate.tls.certs import CertificateError, CertificateStore
from fedgate.tls.contexts import TLSInfo
from fedgate.tls.devcert import make_self_signed, write_self_signed
from fedgate.tls.identity import certificate_matches
from tests.support.pki import DAY, NOW, TestCA

CA = TestCA()


@pytest.mark.parametrize("kwargs, domain, expected", [
    (dict(dns=("a.example",)), "a.example", "dns-id"),
    (dict(dns=("A.Example",)), "a.example", "dns-id"),
    (dict(dns=("*.a.example",)), "chat.a.example", "dns-id"),
    (dict(dns=("*.a.example",)), "a.example", None),
    (dict(dns=("*.a.example",)), "x.chat.a.example", None),
    (dict(srv=("a.example",)), "a.example", "srv-id"),
    (dict(srv=("a.example",)), "chat.a.example", None),
    (dict(xmpp=("a.example",)), "a.example", "xmppaddr"),
    (dict(xmpp=("ä.example",)), "xn--4ca.example", "xmppaddr"),
    (dict(dns=("b.example",)), "a.example", None),
    (dict(dns=("a.example.evil",)), "a.example", None),
])
def test_identity(kwargs, domain, expected):
    assert certificate_matches(CA.issue(**kwargs).cert, domain) == expected


def test_store_by_name_wildcard_and_override(tmp_path):
    CA.issue(dns=("a.example", "chat.a.example")).write(tmp_path / "certs", "first")
    CA.issue(dns=("*.b.example",)).write(tmp_path / "certs", "wild")
    (tmp_path / "certs" / "ca-bundle.pem").write_bytes(CA.root_pem())  # no key: ignored
    override = CA.issue(dns=("a.example",))
    cert, key = override.write(tmp_path / "other", "special")
    store = CertificateStore(str(tmp_path / "certs"), {"a.example": (str(cert), str(key))})
    assert store.pair_for("chat.a.example").source.endswith("first.crt")
    assert store.pair_for("muc.b.example").source.endswith("wild.crt")
    assert store.pair_for("a.example").source.endswith("special.crt")
    assert store.pair_for("c.example") is None
    store.check_hosted({"a.example", "chat.a.example", "muc.b.example"})
    with pytest.raises(CertificateError, match="no certificate for hosted domain c.example"):
        store.check_hosted({"a.example", "c.example"})


@pytest.mark.parametrize("issued, words", [
    (CA.issue(dns=("a.example",), not_before=NOW - 9 * DAY, not_after=NOW - DAY), "has expired"),
    (CA.issue(dns=("a.example",), not_before=NOW + DAY, not_after=NOW + 9 * DAY), "not valid yet"),
])
def test_store_refuses_unusable_certificates(tmp_path, issued, words):
    cert, key = issued.write(tmp_path, "a")
    store = CertificateStore(None, {"a.example": (str(cert), str(key))})
    with pytest.raises(CertificateError, match=words):
        store.check_hosted({"a.example"})


def test_store_refuses_a_key_that_does_not_fit(tmp_path):
    cert, _ = CA.issue(dns=("a.example",)).write(tmp_path, "a")
    _, other_key = CA.issue(dns=("a.example",)).write(tmp_path, "b")
    with pytest.raises(CertificateError, match="does not match"):
        CertificateStore(None, {"a.example": (str(cert), str(other_key))})


def test_missing_directory(tmp_path):
    with pytest.raises(CertificateError, match="does not exist"):
        CertificateStore(str(tmp_path / "nope"))


def test_devcert(tmp_path):
    cert_path, key_path = write_self_signed(tmp_path, ["gw.example", "chat.gw.example"])
    assert (key_path.stat().st_mode & 0o777) == 0o600
    store = CertificateStore(str(tmp_path))
    store.check_hosted({"gw.example", "chat.gw.example"})
    from cryptography import x509
    cert = x509.load_pem_x509_certificate(make_self_signed(["x.example"])[0])
    assert certificate_matches(cert, "x.example") == "dns-id"


def _tls(issued=None, errors=()):
    return TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", issued.cert if issued else None, tuple(errors))


class TestPolicyChecks:
    def test_tls_missing(self):
        assert policy_check.tls_missing(PeerPolicy(), None, "r.example").condition == "policy-violation"
        assert policy_check.tls_missing(PeerPolicy(encryption="optional"), None, "r.example") is None
        assert policy_check.tls_missing(PeerPolicy(), _tls(), "r.example") is None

    def test_certificate_refused(self):
        cert_policy = PeerPolicy(authentication="certificate")
        good = _tls(CA.issue(dns=("r.example",)))
        assert policy_check.certificate_refused(cert_policy, good, "r.example") is None
        refusal = policy_check.certificate_refused(cert_policy, good, "s.example")
        assert refusal.condition == "not-authorized" and "does not name s.example" in refusal.text
        broken = _tls(CA.issue(dns=("r.example",)), [(0, 10, "certificate has expired")])
        assert "certificate has expired" in policy_check.certificate_refused(cert_policy, broken, "r.example").text
        assert policy_check.certificate_refused(PeerPolicy(), broken, "r.example") is None

    def test_dialback_request_methods(self):
        good = _tls(CA.issue(dns=("r.example",)))
        assert policy_check.dialback_request(PeerPolicy(), good, "r.example") == (None, "dialback-with-valid-cert")
        assert policy_check.dialback_request(PeerPolicy(), _tls(), "r.example") == (None, "dialback")
        refusal, _ = policy_check.dialback_request(PeerPolicy(), None, "r.example")
        assert refusal.condition == "policy-violation"
        refusal, _ = policy_check.dialback_request(PeerPolicy(authentication="certificate"), _tls(), "r.example")
        assert refusal.condition == "not-authorized"

    def test_sasl_offer(self):
        good = _tls(CA.issue(dns=("r.example",)))
        assert policy_check.sasl_external_offer(good, "r.example")
        assert not policy_check.sasl_external_offer(good, None)
        assert not policy_check.sasl_external_offer(good, "s.example")
        assert not policy_check.sasl_external_offer(None, "r.example")


def test_contexts_release_idle_buffers(tmp_path):
    """Every context (server, SNI-picked, client) frees a connection's TLS
    buffers while they are empty (SSL_MODE_RELEASE_BUFFERS)."""
    from OpenSSL import SSL

    from fedgate.tls.contexts import MODE_RELEASE_BUFFERS, TLSContexts
    assert MODE_RELEASE_BUFFERS == 16  # OpenSSL's SSL_MODE_RELEASE_BUFFERS, on every pyOpenSSL we run
    CA.issue(dns=("a.example",)).write(tmp_path / "certs", "a")
    contexts = TLSContexts(CertificateStore(str(tmp_path / "certs"), {}))
    for ctx in (contexts.server_context(None), contexts.server_context("a.example"),
                contexts.client_context("a.example"), contexts.client_context(None, b"xmpp-server")):
        assert isinstance(ctx, SSL.Context)
        assert ctx.set_mode(0) & MODE_RELEASE_BUFFERS  # set_mode returns the mode now in force


def test_valid_for_answers_are_kept_per_connection_and_bounded():
    from fedgate.tls.contexts import VALID_FOR_CACHE
    info = _tls(CA.issue(dns=("r.example", "*.w.example")))
    assert info.valid_for("r.example") and info.valid_for("r.example")
    assert not info.valid_for("s.example") and not info.valid_for("s.example")
    # A peer naming many domains cannot grow the cache past its bound; the
    # answers past it are still right.
    answers = [info.valid_for(f"d{n}.w.example") for n in range(3 * VALID_FOR_CACHE)]
    assert all(answers)
    assert [info.valid_for(f"x{n}.example") for n in range(VALID_FOR_CACHE)] == [False] * VALID_FOR_CACHE
    assert len(info._valid) == VALID_FOR_CACHE
    # Never true without a trusted chain, whatever was kept.
    assert not _tls(CA.issue(dns=("r.example",)), errors=[(0, 20, "untrusted")]).valid_for("r.example")
