"""Memory under parser attacks, measured on a real ``twistd fedgate`` process.

The figure of the issue: after 40 namespace-flood stream headers (20,000
declarations, 518 KB each) and after 300 streams with unique 400 KiB element
names and 300 with unique 400 KiB addresses, the gateway's resident set
returns to within 20 MB of its baseline once the streams are closed.  A
separate process gives a clean measure (``VmRSS`` in /proc/<pid>/status).
Each attack ends with a stream error; every reply is checked for one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.twistd import REPO, TWISTD, free_ports, loopback_config

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server'"
          b" xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback'"
          b" to='gw.example' from='b.example' version='1.0'%s>")
FLOOD = HEADER % b"".join(b" xmlns:p%d='u:%d'" % (i, i) for i in range(20000))  # 451 KB
BIG = 400 * 1024
MARGIN = 20 * 1024 * 1024


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def long_name(i: int) -> bytes:
    return b"n%06d" % i + b"x" * (BIG - 7)


def long_jid(i: int) -> bytes:
    return b"u%06d@b.example/" % i + b"r" * (BIG - 18)


def exchange(port: int, payload: bytes, wait: float = 30.0) -> bytes:
    """Send ``payload``, read until the gateway closes (or ``wait`` seconds
    pass: then we close); its reply."""
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused part way: the reply is what counts
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return reply


def attack(port: int, payloads: list[bytes], workers: int = 8, wait: float = 30.0) -> list[bytes]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: exchange(port, p, wait), payloads))


def settle(pid: int) -> int:
    """RSS once it stops falling (the gateway frees after the close)."""
    time.sleep(0.5)
    last = rss(pid)
    for _ in range(10):
        time.sleep(0.3)
        now = rss(pid)
        if now >= last:
            return now
        last = now
    return last


@pytest.fixture
def gateway(tmp_path):
    s2s, comp, admin = free_ports(3)
    config = tmp_path / "fedgate.toml"
    config.write_text(loopback_config(tmp_path, s2s, comp, admin))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = open(tmp_path / "twistd.log", "w")
    proc = subprocess.Popen(TWISTD + ["-n", "--pidfile=", "fedgate", "--config", str(config)],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", s2s), timeout=1).close()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, (tmp_path / "twistd.log").read_text()
                time.sleep(0.2)
        yield proc, s2s
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_rss_returns_to_baseline_after_parser_attacks(gateway):
    proc, port = gateway
    started = time.monotonic()
    # Warm-up: one of each, so that first-use allocations are in the baseline.
    warm = attack(port, [HEADER % b"" + b"<x/>", HEADER % b"" + b"<" + long_name(999999) + b"/>",
                         HEADER % b"" + b"<message to='" + long_jid(999999) + b"'/>"])
    assert all(b"stream:error" in r for r in warm), warm
    baseline = settle(proc.pid)

    # Forty at once, each held until refused (or 3 s, then closed by us).
    replies = attack(port, [FLOOD] * 40, workers=40, wait=3.0)
    after_flood = settle(proc.pid)
    replies += attack(port, [HEADER % b"" + b"<" + long_name(i) + b"/>" for i in range(300)])
    after_names = settle(proc.pid)
    replies += attack(port, [HEADER % b"" + b"<message to='" + long_jid(i) + b"' from='e@b.example'/>"
                             for i in range(300)])
    after_jids = settle(proc.pid)
    elapsed = time.monotonic() - started
    mib = 1024 * 1024
    print(f"\nRSS baseline {baseline / mib:.1f} MiB; after 40 namespace floods "
          f"{after_flood / mib:.1f} MiB ({after_flood / baseline:.2f}x); after 300 unique 400 KiB "
          f"names {after_names / mib:.1f} MiB ({after_names / baseline:.2f}x); after 300 unique "
          f"400 KiB JIDs {after_jids / mib:.1f} MiB ({after_jids / baseline:.2f}x); {elapsed:.1f} s")
    assert after_flood - baseline <= MARGIN
    assert after_names - baseline <= MARGIN
    assert after_jids - baseline <= MARGIN
    assert all(b"stream:error" in r for r in replies)
    assert sum(b"policy-violation" in r for r in replies) == len(replies), \
        [r[-300:] for r in replies if b"policy-violation" not in r][:3]
