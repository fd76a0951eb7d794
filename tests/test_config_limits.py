"""The [limits] parser bounds and [logging] line rate keys: defaults, the
example file, errors that name the key, and the gateway's use of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedgate.config import ConfigError, load_config, parse_config
from fedgate.logsafe import LineRate
from fedgate.stream.parser import Limits

REPO = Path(__file__).resolve().parent.parent
KEYS = {"max_attributes": 64, "max_namespace_declarations": 32, "max_name_bytes": 256,
        "max_attribute_bytes": 65536}


def minimal(**extra):
    data = {"state_dir": "/tmp/fedgate-state", "domains": ["gw.example"]}
    data.update(extra)
    return data


def test_defaults_match_the_parser_and_the_example_file():
    config = parse_config(minimal())
    example = load_config(REPO / "etc" / "fedgate.toml")
    text = (REPO / "etc" / "fedgate.toml").read_text()
    for key, default in KEYS.items():
        assert getattr(config.limits, key) == default == getattr(Limits(), key)
        assert getattr(example.limits, key) == default
        assert f"\n{key} = {default}\n" in text, key
    assert (config.logging.peer_lines_burst, config.logging.peer_lines_per_second) == (20, 1.0)
    assert (LineRate().burst, LineRate().per_second) == (20, 1.0)
    assert "\npeer_lines_burst = 20\n" in text and "\npeer_lines_per_second = 1.0\n" in text


def test_values_reach_the_parser_limits():
    config = parse_config(minimal(limits={"max_namespace_declarations": 4, "max_name_bytes": 64,
                                          "max_attribute_bytes": 1000, "max_attributes": 8,
                                          "max_stanza_bytes": 5000},
                                  logging={"peer_lines_burst": 3, "peer_lines_per_second": 0.5}))
    limits = Limits.from_config(config.limits)
    assert limits == Limits(max_stanza_bytes=5000, max_namespace_declarations=4, max_name_bytes=64,
                            max_attribute_bytes=1000, max_attributes=8)
    assert (config.logging.peer_lines_burst, config.logging.peer_lines_per_second) == (3, 0.5)


@pytest.mark.parametrize("table, key, value, words", [
    ("limits", "max_namespace_declarations", 0, "greater than zero"),
    ("limits", "max_name_bytes", "long", "expected int"),
    ("limits", "max_attribute_bytes", -1, "greater than zero"),
    ("limits", "max_attributes", True, "boolean"),
    ("logging", "peer_lines_burst", 0, "greater than zero"),
    ("logging", "peer_lines_per_second", "fast", "expected a number"),
])
def test_errors_name_the_key(table, key, value, words):
    with pytest.raises(ConfigError) as info:
        parse_config(minimal(**{table: {key: value}}), "/etc/fedgate/fedgate.toml")
    assert str(info.value).startswith(f"/etc/fedgate/fedgate.toml: {table}.{key}: "), str(info.value)
    assert words in str(info.value)
