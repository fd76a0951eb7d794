"""Configuration: defaults, validation, and errors that name file and key."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedgate.config import ConfigError, dialback_secret, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def minimal(**extra):
    data = {"state_dir": "/tmp/fedgate-state", "domains": ["Gw.Example"]}
    data.update(extra)
    return data


def test_example_config_is_valid_and_documents_every_key():
    config = load_config(REPO / "etc" / "fedgate.toml")
    assert config.domains == ("example.org",)
    text = (REPO / "etc" / "fedgate.toml").read_text()
    for key in ["connect_timeout", "auth_timeout", "queue_max_stanzas", "queue_max_bytes",
                "queue_max_wait", "backoff_initial", "backoff_max", "dns_servers",
                "max_pending_verifications_per_stream", "max_pending_verifications",
                "dialback_secret", "max_stanza_bytes", "max_depth", "max_elements",
                "xml_traffic", "xml_bodies", "addresses", "secret", "listen", "state_dir",
                "mode", "encryption", "authentication", "allowed", "blocked", "note",
                "max_pairs_per_connection", "allow_private_ranges",
                "pair_timeout", "destination_idle_timeout", "max_destinations",
                "max_connections", "header_timeout", "body_timeout", "max_body_bytes",
                "shutdown_flush", "shutdown_grace"]:
        assert key in text, key


def test_defaults_and_normalisation():
    config = parse_config(minimal(components={"domains": {"Chat.GW.example.": {"secret": "s"}}},
                                  s2s={"peers": {"Peer.Example": {"addresses": ["127.0.0.1:5270", "[::1]:5271", "h.example"]}}}))
    assert config.domains == ("gw.example",)
    assert set(config.components.domains) == {"chat.gw.example"}
    assert config.local_domains == {"gw.example", "chat.gw.example"}
    assert config.s2s.peers["peer.example"].addresses == (("127.0.0.1", 5270), ("::1", 5271), ("h.example", 5269))
    assert config.s2s.auth_timeout == 90.0
    assert config.s2s.max_pending_verifications_per_stream == 10
    assert config.limits.max_stanza_bytes == 512 * 1024
    assert config.s2s.queue_max_wait == 60.0
    assert (config.s2s.pair_timeout, config.s2s.destination_idle_timeout,
            config.s2s.max_destinations) == (30.0, 300.0, 10000)
    assert (config.s2s.shutdown_flush, config.s2s.shutdown_grace) == (5.0, 2.0)
    assert (config.s2s.mode, config.s2s.default_policy.encryption,
            config.s2s.default_policy.authentication) == ("open", "required", "dialback")
    assert (config.s2s.stream_management, config.s2s.sm_ack_every, config.s2s.sm_ack_interval,
            config.s2s.sm_resume_timeout, config.s2s.sm_max_unacked) == (True, 10, 5.0, 60.0, 5000)
    assert config.s2s.sm_close_wait == 1.0


def test_peer_policy():
    config = parse_config(minimal(s2s={
        "policy": {"mode": "allowlist", "authentication": "certificate"},
        "peers": {"ok.example": {"encryption": "optional", "note": "n"},
                  "bad.example": {"blocked": True}}}))
    ok = config.s2s.peers["ok.example"]
    assert (ok.allowed, ok.encryption, ok.authentication, ok.note) == (True, "optional", "certificate", "n")
    assert config.s2s.peers["bad.example"].allowed is False
    assert config.s2s.mode == "allowlist"


def test_outbound_address_settings():
    config = parse_config(minimal())
    assert (config.s2s.allow_private_ranges, config.s2s.max_pairs_per_connection) == ((), 1000)
    config = parse_config(minimal(s2s={"allow_private_ranges": ["loopback", "shared", "10.20.0.0/16"],
                                       "max_pairs_per_connection": 5}))
    assert config.s2s.allow_private_ranges == ("loopback", "shared", "10.20.0.0/16")
    assert config.s2s.max_pairs_per_connection == 5


@pytest.mark.parametrize("data, key, words", [
    (minimal(s2s={"lisen": []}), "s2s.lisen", "unknown key"),
    (minimal(bogus=1), "bogus", "unknown key"),
    (minimal(s2s={"listen": ["nope:5269"]}), "s2s.listen", "bad endpoint"),
    (minimal(s2s={"auth_timeout": "soon"}), "s2s.auth_timeout", "expected a number"),
    (minimal(s2s={"auth_timeout": 0}), "s2s.auth_timeout", "greater than zero"),
    (minimal(s2s={"queue_max_stanzas": True}), "s2s.queue_max_stanzas", "boolean"),
    (minimal(s2s={"pair_timeout": 60}), "s2s.pair_timeout", "less than s2s.queue_max_wait"),
    (minimal(s2s={"queue_max_wait": 20}), "s2s.pair_timeout", "less than s2s.queue_max_wait"),
    (minimal(s2s={"pair_timeout": 0}), "s2s.pair_timeout", "greater than zero"),
    (minimal(s2s={"max_destinations": 0}), "s2s.max_destinations", "greater than zero"),
    (minimal(s2s={"shutdown_flush": -1}), "s2s.shutdown_flush", "negative"),
    (minimal(s2s={"shutdown_grace": 0}), "s2s.shutdown_grace", "greater than zero"),
    (minimal(s2s={"destination_idle_timeout": "long"}), "s2s.destination_idle_timeout", "expected a number"),
    (minimal(domains=["bad domain"]), "domains", "invalid domain"),
    (minimal(domains=[]), "domains", "at least one"),
    ({"domains": ["a.example"]}, "state_dir", "required"),
    (minimal(components={"domains": {"c.example": {}}}), "components.domains.c.example.secret", "required"),
    (minimal(components={"domains": {"c.example": {"secret": "s", "extra": 1}}}), "components.domains.c.example.extra", "unknown key"),
    (minimal(components={"domains": {"gw.example": {"secret": "s"}}}), "components.domains.gw.example", "own domains"),
    (minimal(s2s={"peers": {"p.example": {"addresses": ["host:99999"]}}}), "s2s.peers.p.example.addresses", "bad address"),
    (minimal(logging={"xml_traffic": "yes"}), "logging.xml_traffic", "expected bool"),
    (minimal(s2s={"policy": {"mode": "closed"}}), "s2s.policy.mode", "must be one of"),
    (minimal(s2s={"allow_private_ranges": ["lan"]}), "s2s.allow_private_ranges", "'lan' is neither"),
    (minimal(s2s={"allow_private_ranges": ["10.0.0.1/8"]}), "s2s.allow_private_ranges", "CIDR"),
    (minimal(s2s={"allow_private_ranges": "loopback"}), "s2s.allow_private_ranges", "expected list"),
    (minimal(s2s={"allow_private_ranges": [10]}), "s2s.allow_private_ranges", "range names"),
    (minimal(s2s={"max_pairs_per_connection": 0}), "s2s.max_pairs_per_connection", "greater than zero"),
    (minimal(s2s={"stream_management": "on"}), "s2s.stream_management", "expected bool"),
    (minimal(s2s={"sm_ack_every": 0}), "s2s.sm_ack_every", "greater than zero"),
    (minimal(s2s={"sm_ack_interval": 0}), "s2s.sm_ack_interval", "greater than zero"),
    (minimal(s2s={"sm_resume_timeout": -1}), "s2s.sm_resume_timeout", "must not be negative"),
    (minimal(s2s={"sm_max_unacked": 0}), "s2s.sm_max_unacked", "greater than zero"),
    (minimal(s2s={"sm_close_wait": -1}), "s2s.sm_close_wait", "must not be negative"),
    (minimal(s2s={"peers": {"p.example": {"encryption": "maybe"}}}), "s2s.peers.p.example.encryption", "must be one of"),
    (minimal(admin={"max_connections": 0}), "admin.max_connections", "greater than zero"),
    (minimal(admin={"header_timeout": "10s"}), "admin.header_timeout", "expected a number"),
    (minimal(admin={"body_timeout": -1}), "admin.body_timeout", "greater than zero"),
    (minimal(admin={"max_body_bytes": 64 * 1024 * 1024}), "admin.max_body_bytes", "at most 16777216"),
])
def test_errors_name_the_key(data, key, words):
    with pytest.raises(ConfigError) as info:
        parse_config(data, "/etc/fedgate/fedgate.toml")
    message = str(info.value)
    assert message.startswith(f"/etc/fedgate/fedgate.toml: {key}: "), message
    assert words in message
    assert info.value.key == key


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing.toml: file not found"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("state_dir = \n")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_config(broken)


def test_dialback_secret_generated_once_and_private(tmp_path):
    config = parse_config(minimal(state_dir=str(tmp_path / "state")))
    first = dialback_secret(config)
    assert len(first) >= 32
    assert dialback_secret(config) == first
    mode = stat.S_IMODE(os.stat(tmp_path / "state" / "dialback.secret").st_mode)
    assert mode == 0o600
    configured = parse_config(minimal(state_dir=str(tmp_path / "other"), s2s={"dialback_secret": "given"}))
    assert dialback_secret(configured) == "given"
    assert not (tmp_path / "other" / "dialback.secret").exists()


def test_admin_client_bounds():
    admin = parse_config(minimal()).admin
    assert (admin.max_connections, admin.header_timeout, admin.body_timeout,
            admin.max_body_bytes) == (64, 10.0, 30.0, 1024 * 1024)
    admin = parse_config(minimal(admin={"max_connections": 8, "header_timeout": 2, "body_timeout": 5.5,
                                        "max_body_bytes": 4096})).admin
    assert (admin.max_connections, admin.header_timeout, admin.body_timeout,
            admin.max_body_bytes) == (8, 2.0, 5.5, 4096)


@pytest.mark.parametrize("data, key, words", [
    # A misspelt required key is named as the typo, with the suggestion,
    # not as the missing key it was meant to be.
    ({"state_dir": "/tmp/x", "domainz": ["a.example"]}, "domainz", "did you mean 'domains'?"),
    (minimal(s2s={"conect_timeout": 5}), "s2s.conect_timeout", "did you mean 'connect_timeout'?"),
    (minimal(admin={"metrics_opne": True}), "admin.metrics_opne", "did you mean 'metrics_open'?"),
    (minimal(tls={"trust_root": "system"}), "tls.trust_root", "did you mean 'trust_roots'?"),
])
def test_unknown_keys_suggest_the_nearest(data, key, words):
    with pytest.raises(ConfigError) as info:
        parse_config(data, "f.toml")
    assert info.value.key == key
    assert str(info.value) == f"f.toml: {key}: unknown key ({words})"


def test_unknown_key_far_from_any_has_no_suggestion():
    with pytest.raises(ConfigError) as info:
        parse_config(minimal(zzzzzz=1), "f.toml")
    assert str(info.value) == "f.toml: zzzzzz: unknown key"


def test_peer_allowed_and_the_deprecated_blocked(tmp_path):
    peers = parse_config(minimal(s2s={"peers": {"a.example": {"allowed": False}, "b.example": {"allowed": True},
                                                "c.example": {"blocked": True}, "d.example": {}}})).s2s.peers
    assert [peers[d].allowed for d in ("a.example", "b.example", "c.example", "d.example")] == \
        [False, True, False, True]
    for both in ({"allowed": False, "blocked": False}, {"allowed": False, "blocked": True}):
        with pytest.raises(ConfigError) as info:
            parse_config(minimal(s2s={"peers": {"a.example": both}}))
        assert info.value.key == "s2s.peers.a.example.blocked"
    from fedgate.config import deprecated_keys
    assert deprecated_keys(minimal(s2s={"peers": {"c.example": {"blocked": True}, "a.example": {}}})) == \
        ["s2s.peers.c.example.blocked"]


def test_verification_reuse_keys():
    s2s = parse_config(minimal()).s2s
    assert (s2s.verification_idle_timeout, s2s.verifications_per_connection) == (30.0, 10)
    s2s = parse_config(minimal(s2s={"verification_idle_timeout": 0, "verifications_per_connection": 1})).s2s
    assert (s2s.verification_idle_timeout, s2s.verifications_per_connection) == (0.0, 1)
    for key, bad in (("verification_idle_timeout", -1), ("verifications_per_connection", 0),
                     ("verifications_per_connection", "many")):
        with pytest.raises(ConfigError) as info:
            parse_config(minimal(s2s={key: bad}), "f.toml")
        assert info.value.key == f"s2s.{key}"
    text = (REPO / "etc" / "fedgate.toml").read_text()
    assert "verification_idle_timeout = 30" in text and "verifications_per_connection = 10" in text
