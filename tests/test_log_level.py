"""``logging.level``: events below it are dropped before any observer
formats them (in memory), and twistd's log file gets no debug line unless
the level says so (a real twistd process on loopback)."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest
from twisted.logger import Logger, LogLevel, LogPublisher

from fedgate.config import ConfigError, LoggingConfig
from fedgate.tap import LevelFilter, filter_log_level
from tests.support.twistd import REPO, TWISTD, free_ports, loopback_config


def _publisher():
    publisher, seen = LogPublisher(), []
    publisher.addObserver(seen.append)
    return publisher, seen, Logger(namespace="fedgate.test", observer=publisher)


def test_info_drops_debug_before_the_observer():
    publisher, seen, log = _publisher()
    assert filter_log_level("info", publisher) == 1
    log.debug("dropped {x}", x=1)
    log.info("kept")
    log.warn("kept too")
    assert [e["log_level"] for e in seen] == [LogLevel.info, LogLevel.warn]


def test_error_drops_info_and_warn():
    publisher, seen, log = _publisher()
    filter_log_level("error", publisher)
    log.info("x")
    log.warn("x")
    log.error("y")
    log.critical("z")
    assert [e["log_level"] for e in seen] == [LogLevel.error, LogLevel.critical]


def test_debug_wraps_nothing_and_keeps_everything():
    publisher, seen, log = _publisher()
    assert filter_log_level("debug", publisher) == 0
    log.debug("kept")
    assert len(seen) == 1


def test_a_second_call_does_not_wrap_twice():
    publisher, seen, log = _publisher()
    filter_log_level("info", publisher)
    assert filter_log_level("info", publisher) == 0
    assert all(isinstance(o, LevelFilter) for o in publisher._observers)


def test_config_level_default_and_bad_value():
    from fedgate.config import parse_config
    base = {"state_dir": "/tmp/x", "domains": ["a.example"], "s2s": {"listen": []}}
    assert parse_config(base, "<t>").logging.level == LoggingConfig.level == "info"
    assert parse_config({**base, "logging": {"level": "debug"}}, "<t>").logging.level == "debug"
    with pytest.raises(ConfigError, match="logging.level"):
        parse_config({**base, "logging": {"level": "verbose"}}, "<t>")


def _run_and_close_a_stream(tmp_path, extra: str) -> str:
    """A real twistd; one peer opens a stream and closes it (a debug line:
    'Peer ... closed its stream'); the process's output."""
    s2s, comp, admin = free_ports(3)
    config = tmp_path / "fedgate.toml"
    config.write_text(loopback_config(tmp_path, s2s, comp, admin, extra=extra))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(TWISTD + ["-n", "--pidfile=", "fedgate", "--config", str(config)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", s2s), timeout=5) as sock:
                    sock.sendall(b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                                 b"xmlns:stream='http://etherx.jabber.org/streams' "
                                 b"xmlns:db='jabber:server:dialback' to='gw.example' version='1.0'>"
                                 b"</stream:stream>")
                    while sock.recv(4096):
                        pass
                break
            except ConnectionRefusedError:
                time.sleep(0.2)
        time.sleep(0.5)
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert "Listening for s2s" in output  # it ran
    return output


def test_twistd_writes_no_debug_line_by_default(tmp_path):
    output = _run_and_close_a_stream(tmp_path, "")
    assert "closed its stream" not in output
    assert "#debug]" not in output


def test_twistd_writes_debug_lines_at_level_debug(tmp_path):
    output = _run_and_close_a_stream(tmp_path, '[logging]\nlevel = "debug"\n')
    assert "closed its stream" in output
