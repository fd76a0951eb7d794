"""[cluster]: defaults (off), validation, errors that name the key and the file."""

from __future__ import annotations

import socket

import pytest

from fedgate.config import ClusterConfig, ConfigError, _hostname, parse_config, redis_address


def minimal(**cluster):
    return {"state_dir": "/tmp/fedgate-state", "domains": ["gw.example"], "cluster": cluster}


def test_off_by_default_with_documented_defaults():
    config = parse_config({"state_dir": "/tmp/s", "domains": ["gw.example"]})
    cluster = config.cluster
    assert cluster.enabled is False
    assert (cluster.redis, cluster.lease, cluster.heartbeat, cluster.key_prefix, cluster.threads,
            cluster.max_pending) == ("127.0.0.1:6379", 6.0, 2.0, "fedgate", 4, 10000)
    assert cluster.node_id == _hostname() and cluster.node_id
    assert _hostname().startswith(socket.gethostname().split(".")[0][:1])
    assert cluster.password is None and cluster.tls is False


def test_values_and_address_forms(tmp_path):
    secret = tmp_path / "redis.password"
    secret.write_text("s3cret\n")
    config = parse_config(minimal(enabled=True, redis="[2001:db8::5]:6380", password_file=str(secret),
                                  tls=True, node_id="gw-1", lease=3, heartbeat=1))
    c = config.cluster
    assert (c.enabled, c.password, c.node_id, c.lease, c.heartbeat) == (True, "s3cret", "gw-1", 3.0, 1.0)
    address = redis_address(c)
    assert (address.host, address.port, address.tls, address.password) == ("2001:db8::5", 6380, True, "s3cret")
    assert "s3cret" not in repr(c)
    unix = redis_address(parse_config(minimal(redis="/run/redis/redis-server.sock")).cluster)
    assert unix.path == "/run/redis/redis-server.sock"


@pytest.mark.parametrize("cluster, key, words", [
    ({"enabeld": True}, "cluster.enabeld", "did you mean 'enabled'"),
    ({"enabled": "yes"}, "cluster.enabled", "expected bool"),
    ({"redis": "host:99999"}, "cluster.redis", "bad port"),
    ({"redis": "2001:db8::1"}, "cluster.redis", "[addr]:port"),
    ({"redis": "unix:relative.sock"}, "cluster.redis", "absolute path"),
    ({"redis": "/run/redis.sock", "tls": True}, "cluster.tls", "TCP address"),
    ({"password": "a", "password_file": "/x"}, "cluster.password_file", "not both"),
    ({"password": ""}, "cluster.password", "must not be empty"),
    ({"password_file": "/nonexistent/redis.password"}, "cluster.password_file", "cannot read"),
    ({"tls_ca_file": "/nonexistent/ca.pem"}, "cluster.tls_ca_file", "no such file"),
    ({"node_id": "a b"}, "cluster.node_id", "letters, digits"),
    ({"node_id": "x" * 65}, "cluster.node_id", "1 to 64"),
    ({"key_prefix": "a:b"}, "cluster.key_prefix", "letters, digits"),
    ({"lease": 0}, "cluster.lease", "greater than zero"),
    ({"heartbeat": 6}, "cluster.heartbeat", "shorter than lease"),
    ({"threads": 0}, "cluster.threads", "greater than zero"),
    ({"max_pending": -1}, "cluster.max_pending", "greater than zero"),
])
def test_errors_name_the_key_and_file(cluster, key, words):
    with pytest.raises(ConfigError) as info:
        parse_config(minimal(**cluster), "/etc/fedgate/fedgate.toml")
    message = str(info.value)
    assert message.startswith(f"/etc/fedgate/fedgate.toml: {key}: "), message
    assert words in message, message


def test_empty_password_file(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="cluster.password_file: .* is empty"):
        parse_config(minimal(password_file=str(empty)))


def test_example_config_documents_every_cluster_key():
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "etc" / "fedgate.toml").read_text()
    section = text[text.index("[cluster]"):]
    for name in ClusterConfig.__dataclass_fields__:
        assert name in section, name
