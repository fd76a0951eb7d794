"""The [components] configuration of XEP-0225 credentials: certificate
authentication settings, and hostnames no two identities may share (errors
that name the key)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedgate.component.certauth import fingerprint
from fedgate.component.scram import derive
from fedgate.config import ConfigError, parse_config
from tests.support.pki import TestCA

REPO = Path(__file__).resolve().parent.parent
CA = TestCA("config")
BOT = CA.issue(dns=("bots.example",))
SCRAM = derive("a password", "sha256").encode()


def config(credentials: dict, **components) -> dict:
    components["credentials"] = credentials
    return {"state_dir": "/tmp/fedgate-state", "domains": ["gw.example"], "components": components}


def colons(digest: str) -> str:
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2)).upper()


def test_example_config_documents_the_certificate_keys():
    text = (REPO / "etc" / "fedgate.toml").read_text()
    for key in ("certificate_sha256", "trust_anchor", "certificate_name"):
        assert f"# {key} = " in text, key


def test_certificate_settings(tmp_path):
    anchor = CA.write_root(tmp_path / "bots-ca.pem")
    parsed = parse_config(config({
        "pinned.example": {"certificate_sha256": [colons(fingerprint(BOT.cert))]},
        "anchored.example": {"trust_anchor": str(anchor), "scram_sha256": SCRAM},
        "named.example": {"trust_anchor": str(anchor), "certificate_name": "Bots.Example"},
        "scram.example": {"scram_sha256": SCRAM},
    }))
    credentials = parsed.components.credentials
    pinned = credentials["pinned.example"].certificate
    assert pinned.fingerprints == {fingerprint(BOT.cert)}
    assert pinned.refusal(BOT.cert, BOT.chain) is None
    assert credentials["pinned.example"].scram_sha256 is None, "a certificate alone is enough"
    assert credentials["anchored.example"].certificate.name == "anchored.example", "default: the identity"
    assert credentials["named.example"].certificate.name == "bots.example"
    assert credentials["named.example"].certificate.refusal(BOT.cert, BOT.chain) is None
    assert credentials["scram.example"].certificate is None, "no EXTERNAL by default"


def _errors(tmp_path):
    anchor = str(CA.write_root(tmp_path / "ca.pem"))
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(BOT.cert_pem(with_chain=False))
    pin = fingerprint(BOT.cert)
    c = "components.credentials."
    return [
        (config({"b.example": {}}), f"{c}b.example.scram_sha256", "a way to authenticate"),
        (config({"b.example": {"certificate_sha256": ["ab:cd"]}}), f"{c}b.example.certificate_sha256",
         "not a SHA-256 fingerprint"),
        (config({"b.example": {"certificate_sha256": [pin] * 17}}), f"{c}b.example.certificate_sha256",
         "at most 16"),
        (config({"b.example": {"certificate_sha256": pin}}), f"{c}b.example.certificate_sha256", "expected list"),
        (config({"b.example": {"trust_anchor": str(tmp_path / "missing.pem")}}), f"{c}b.example.trust_anchor",
         "cannot read"),
        (config({"b.example": {"trust_anchor": str(leaf)}}), f"{c}b.example.trust_anchor", "not a CA"),
        (config({"b.example": {"scram_sha256": SCRAM, "certificate_name": "b.example"}}),
         f"{c}b.example.certificate_name", "only counts together with trust_anchor"),
        (config({"b.example": {"trust_anchor": anchor, "certificate_name": "a b"}}),
         f"{c}b.example.certificate_name", "invalid domain"),
        # Hostnames that belong to someone else.
        (config({"gw.example": {"scram_sha256": SCRAM}}), f"{c}gw.example", "gateway's own domains"),
        (config({"b.example": {"scram_sha256": SCRAM, "allowed": ["gw.example"]}}), f"{c}b.example.allowed",
         "gateway's own domains"),
        (config({"b.example": {"scram_sha256": SCRAM, "allowed": ["chat.gw.example"]}},
                domains={"chat.gw.example": {"secret": "s"}}), f"{c}b.example.allowed", "XEP-0114"),
        (config({"b.example": {"scram_sha256": SCRAM, "allowed": ["shared.example"]},
                 "c.example": {"certificate_sha256": [pin], "allowed": ["shared.example"]}}),
         f"{c}b.example.allowed", "shared.example is configured for the component identity c.example"),
        (config({"b.example": {"scram_sha256": SCRAM},
                 "c.example": {"scram_sha256": SCRAM, "allowed": ["b.example"]}}),
         f"{c}b.example", "b.example is configured for the component identity c.example"),
    ]


@pytest.mark.parametrize("index", range(13))
def test_errors_name_the_key(tmp_path, index):
    cases = _errors(tmp_path)
    assert len(cases) == 13
    data, key, words = cases[index]
    with pytest.raises(ConfigError) as info:
        parse_config(data, "/etc/fedgate/fedgate.toml")
    message = str(info.value)
    assert message.startswith(f"/etc/fedgate/fedgate.toml: {key}: "), message
    assert words in message, message
    assert info.value.key == key


def test_an_identity_may_have_both_protocols_under_its_own_domain():
    parsed = parse_config(config({"chat.gw.example": {"scram_sha256": SCRAM}},
                                 domains={"chat.gw.example": {"secret": "s"}}))
    assert set(parsed.components.credentials) == {"chat.gw.example"}


BOUND_KEYS = {"header_timeout": 10.0, "auth_timeout": 30.0, "throttle_free_failures": 3,
              "throttle_base_delay": 1.0, "throttle_max_delay": 60.0, "throttle_forget_after": 600.0,
              "throttle_address_free_failures": 100, "throttle_max_entries": 10000,
              "password_threads": 2, "password_queue": 32}


def test_component_bounds_have_documented_defaults():
    from fedgate.config import load_config
    example = load_config(REPO / "etc" / "fedgate.toml").components
    default = parse_config(config({})).components
    text = (REPO / "etc" / "fedgate.toml").read_text()
    for key, value in BOUND_KEYS.items():
        assert getattr(default, key) == value, key
        assert getattr(example, key) == value, key
        assert f"\n{key} = " in text, key


def test_component_bounds_are_read():
    parsed = parse_config(config({}, header_timeout=2, throttle_free_failures=0, throttle_max_delay=5,
                                 throttle_base_delay=0.5, password_queue=4)).components
    assert (parsed.header_timeout, parsed.throttle_free_failures, parsed.throttle_max_delay,
            parsed.throttle_base_delay, parsed.password_queue) == (2.0, 0, 5.0, 0.5, 4)


@pytest.mark.parametrize("values, key, message", [
    ({"header_timeout": 0}, "header_timeout", "greater than zero"),
    ({"header_timeout": "soon"}, "header_timeout", "expected a number"),
    ({"throttle_free_failures": -1}, "throttle_free_failures", "zero or more"),
    ({"throttle_address_free_failures": 1.5}, "throttle_address_free_failures", "expected int"),
    ({"throttle_max_delay": 1, "throttle_base_delay": 2}, "throttle_max_delay", "at least"),
    ({"throttle_max_entries": 0}, "throttle_max_entries", "greater than zero"),
    ({"password_threads": 0}, "password_threads", "greater than zero"),
    ({"password_queue": True}, "password_queue", "boolean"),
])
def test_component_bound_errors_name_the_key(values, key, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(config({}, **values), "/etc/fedgate/fedgate.toml")
    assert f"components.{key}: " in str(caught.value) and message in str(caught.value), str(caught.value)
