"""The configuration check: the file parses and every key is known.

The loader stops at the first problem and names the key (with a "did you
mean" for a typo); this adds the deprecated keys it still reads."""

from __future__ import annotations

import tomllib

from fedgate.check import ERROR, OK, WARNING, Finding
from fedgate.config import DEPRECATED_KEYS, ConfigError, deprecated_keys, load_config


def check_config(path) -> tuple[object, list[Finding]]:
    """(the Config or None, findings)."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        return None, [Finding("config", ERROR, str(path), str(exc).removeprefix(f"{path}: "),
                              {"key": exc.key})]
    findings = [Finding("config", OK, str(path),
                        f"parses; serving {', '.join(config.domains)}"
                        + (f"; components {', '.join(sorted(config.components.domains))}"
                           if config.components.domains else ""))]
    with open(path, "rb") as handle:
        data = tomllib.load(handle)
    for key in deprecated_keys(data):
        findings.append(Finding("config", WARNING, key, "deprecated: write "
                                + DEPRECATED_KEYS[key.rsplit(".", 1)[1]], {"key": key}))
    return config, findings
