"""[cluster] keys of the cross-node routing: defaults, values, errors
naming the key; the annotated example file carries the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedgate.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def minimal(**cluster):
    return {"state_dir": "/tmp/fedgate-state", "domains": ["gw.example"], "cluster": cluster}


def test_defaults():
    c = parse_config(minimal()).cluster
    assert (c.ack_timeout, c.max_in_flight, c.max_in_flight_bytes) == (6.0, 10000, 16 * 1024 * 1024)


def test_values():
    c = parse_config(minimal(ack_timeout=0.5, max_in_flight=5, max_in_flight_bytes=1000)).cluster
    assert (c.ack_timeout, c.max_in_flight, c.max_in_flight_bytes) == (0.5, 5, 1000)


@pytest.mark.parametrize("key, value", [("ack_timeout", 0), ("ack_timeout", "soon"),
                                        ("max_in_flight", 0), ("max_in_flight_bytes", -1)])
def test_errors_name_the_key(key, value):
    with pytest.raises(ConfigError) as caught:
        parse_config(minimal(**{key: value}))
    assert f"cluster.{key}" in str(caught.value)


def test_example_file_documents_the_defaults():
    c = load_config(REPO / "etc" / "fedgate.toml").cluster
    assert (c.ack_timeout, c.max_in_flight, c.max_in_flight_bytes) == (6.0, 10000, 16 * 1024 * 1024)
