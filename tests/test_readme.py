"""The README's commands, run as written from the checkout: the --help
commands after the set-up, and the "Try it" walk-through against the
gateway `scripts/run` starts (its fixed loopback ports, its ./dev-state).

The walk-through runs only where it cannot disturb anything: no dev-state
in the checkout yet (it is removed afterwards) and its three ports free.
Both need the .venv that scripts/run and scripts/test make."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
VENV = REPO / ".venv" / "bin" / "python"
PORTS = (5269, 5347, 8269)


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def commands(text: str) -> list[str]:
    """The indented (code block) lines of a README section."""
    return [line[4:] for line in text.splitlines() if line.startswith("    ") and line.strip()]


def run(command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDGATE_", "PYTHONPATH"))}
    return subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


needs_venv = pytest.mark.skipif(not VENV.exists(), reason="no .venv: run scripts/run or scripts/test")


@needs_venv
def test_setup_section_commands_work_as_written():
    shown = commands(section("Set up on a fresh machine"))
    assert shown[:2] == ["scripts/run", "scripts/test"]
    helps = shown[2:]
    assert helps == [".venv/bin/fedgatectl --help", ".venv/bin/python -m fedgate.cli --help",
                     ".venv/bin/twistd fedgate --help"]
    for command in helps:
        done = run(command)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        assert ("fedgatectl" in done.stdout) or ("fedgate --config" in done.stdout), command


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@needs_venv
def test_try_it_walk_through():
    if (REPO / "dev-state").exists():
        pytest.skip("./dev-state exists: the walk-through would use (and remove) your development state")
    if not all(_port_free(p) for p in PORTS):
        pytest.skip(f"one of the ports {PORTS} is in use")
    shown = commands(section("Try it"))
    assert shown[:2] == [".venv/bin/fedgatectl status", ".venv/bin/fedgatectl check"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDGATE_", "PYTHONPATH"))}
    gateway = subprocess.Popen(["scripts/run"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (REPO / "dev-state" / "admin.token").exists() or _port_free(8269):
            assert gateway.poll() is None, gateway.stdout.read()
            assert time.monotonic() < deadline, "scripts/run did not start the gateway in 60 s"
            time.sleep(0.2)
        outputs = {}
        for command in shown:
            done = run(command)
            outputs[command] = done.stdout
            # check finds the self-signed certificate and the missing DNS:
            # errors it reports, with exit status 1; everything else succeeds.
            expected = 1 if command.endswith(" check") else 0
            assert done.returncode == expected, (command, done.stdout, done.stderr)
        assert "uptime_seconds" in outputs[".venv/bin/fedgatectl status"]
        report = outputs[".venv/bin/fedgatectl check"]
        assert "the gateway is running" in report
        assert "s2s tcp:5269:interface=127.0.0.1: held by this gateway" in report
        bounce = outputs["scripts/try-component someone@nowhere.invalid"]
        assert "bounced by someone@nowhere.invalid: remote-server-not-found: could not connect to the " \
               "servers of nowhere.invalid: nowhere.invalid itself (port 5269, no SRV records) has no " \
               "address in DNS" in bounce, bounce
        destination = outputs[".venv/bin/fedgatectl destinations show nowhere.invalid"]
        assert re.search(r"^failures\s+1$", destination, re.M), destination
        assert "peers show spam.example" in " ".join(shown)
        shown_peer = outputs[".venv/bin/fedgatectl peers show spam.example"]
        assert re.search(r"^allowed\s+False$", shown_peer, re.M), shown_peer
        assert "abuse report 42" in shown_peer
        status = run(".venv/bin/fedgatectl --json peers show spam.example")
        assert '"allowed": true' in status.stdout and '"note": ""' in status.stdout, status.stdout
        printed = gateway.stdout
    finally:
        os.killpg(gateway.pid, signal.SIGTERM)
        gateway.wait(30)
        shutil.rmtree(REPO / "dev-state", ignore_errors=True)
    out = printed.read()
    assert 'its secret is in ' in out and '[components.domains."component.localhost"] secret' in out
