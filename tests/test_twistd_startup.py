"""Starting ``twistd fedgate`` as an operator does: a listener that cannot
bind ends the process at once with one line naming it, and the soft limit
on open files is raised to the hard one."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import time

import pytest

from tests.support.twistd import REPO, TWISTD, free_ports, loopback_config


def start(tmp_path, config_text: str, **kwargs) -> tuple[subprocess.Popen, object]:
    config = tmp_path / "fedgate.toml"
    config.write_text(config_text)
    output = open(tmp_path / "output.log", "w+")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(TWISTD + ["-n", "--pidfile=", "fedgate", "--config", str(config)],
                            cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT, **kwargs)
    return proc, output


@pytest.mark.parametrize("kind", ["s2s", "components", "admin"])
def test_a_busy_port_ends_the_start_with_one_line(tmp_path, kind):
    s2s, comp, admin = free_ports(3)
    busy = {"s2s": s2s, "components": comp, "admin": admin}[kind]
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", busy))
    holder.listen()
    try:
        started = time.monotonic()
        proc, output = start(tmp_path, loopback_config(tmp_path, s2s, comp, admin))
        try:
            status = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            output.seek(0)
            pytest.fail(f"still running 30 s after start with port {busy} busy:\n{output.read()}")
        elapsed = time.monotonic() - started
    finally:
        holder.close()
    output.seek(0)
    text = output.read()
    assert status == 73, text  # EX_CANTCREAT
    lines = [line for line in text.splitlines() if "cannot listen" in line]
    want = f"fedgate: cannot listen for {kind} on tcp:{busy}:interface=127.0.0.1: Address already in use"
    assert len(lines) == 1 and lines[0].endswith(want), text
    assert "Unhandled error" not in text and "Traceback" not in text, text
    assert elapsed < 20, elapsed
    print(f"\n{kind} on a busy port: exit {status} after {elapsed:.1f} s (interpreter start included)")


def test_an_address_the_host_lacks_ends_the_start(tmp_path):
    s2s, comp, admin = free_ports(3)
    text = loopback_config(tmp_path, s2s, comp, admin).replace(
        f"tcp:{comp}:interface=127.0.0.1", f"tcp:{comp}:interface=192.0.2.1")
    proc, output = start(tmp_path, text)
    status = proc.wait(timeout=30)
    output.seek(0)
    log = output.read()
    assert status == 73, log
    lines = [line for line in log.splitlines() if "cannot listen" in line]
    assert len(lines) == 1 and lines[0].endswith(
        f"fedgate: cannot listen for components on tcp:{comp}:interface=192.0.2.1: "
        "Cannot assign requested address"), log


def _limits(soft: int, hard: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return apply


def _open_files_limit(pid: int) -> tuple[int, int]:
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(tmp_path):
    hard = min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    s2s, comp, admin = free_ports(3)
    proc, output = start(tmp_path, loopback_config(tmp_path, s2s, comp, admin),
                         preexec_fn=_limits(256, hard))
    try:
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline and "Listening for components" not in text:
            assert proc.poll() is None, text
            time.sleep(0.1)
            output.seek(0)
            text = output.read()
        assert "Listening for components" in text, text
        limits = _open_files_limit(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    output.seek(0)
    text = output.read()
    assert f"Raised the open file limit from 256 to {hard}" in text, text
    assert limits == (hard, hard)
