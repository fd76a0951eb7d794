"""The twistd plugin as an operator runs it: a real twistd process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedgate.tls.devcert import write_self_signed

REPO = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def run(args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(TWISTD + args, capture_output=True, text=True, env=env, timeout=60,
                          cwd=kwargs.pop("cwd", None), **kwargs)


def test_help_documents_the_options(tmp_path):
    result = run(["fedgate", "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout
    assert "federation gateway" in result.stdout


def test_bad_config_exits_with_one_line_naming_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('state_dir = "x"\ndomains = ["a.example"]\n[s2s]\nlisten = ["tcp:5269"]\ntypo = 1\n')
    result = run(["-n", "--pidfile=", "fedgate", "--config", str(bad)], cwd=tmp_path)
    assert result.returncode == 78
    lines = [l for l in result.stderr.splitlines() if "fedgate" in l]
    assert lines == [f"fedgate: configuration error: {bad}: s2s.typo: unknown key"], result.stderr


def test_missing_config(tmp_path):
    result = run(["-n", "--pidfile=", "fedgate", "--config", str(tmp_path / "none.toml")], cwd=tmp_path)
    assert result.returncode == 78
    assert "none.toml: file not found" in result.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_starts_and_answers_on_its_ports(tmp_path):
    s2s, comp, admin = _free_port(), _free_port(), _free_port()
    config = tmp_path / "fedgate.toml"
    write_self_signed(tmp_path / "certs", ["gw.example", "chat.gw.example"])
    config.write_text(f'''
state_dir = "{tmp_path / 'state'}"
domains = ["gw.example"]
[s2s]
listen = ["tcp:{s2s}:interface=127.0.0.1"]
dns_servers = ["127.0.0.1:1"]
[tls]
certificates = "{tmp_path / 'certs'}"
[components]
listen = ["tcp:{comp}:interface=127.0.0.1"]
[components.domains."chat.gw.example"]
secret = "x"
[admin]
listen = ["tcp:{admin}:interface=127.0.0.1"]
''')
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(TWISTD + ["-n", "--pidfile=", "fedgate", "--config", str(config)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        reply = b""
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", s2s), timeout=5) as sock:
                    sock.sendall(b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                                 b"xmlns:stream='http://etherx.jabber.org/streams' "
                                 b"xmlns:db='jabber:server:dialback' to='gw.example' version='1.0'>")
                    while b"</stream:features>" not in reply:
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        reply += chunk
                break
            except ConnectionRefusedError:
                time.sleep(0.2)
        assert b"<starttls xmlns=\"urn:ietf:params:xml:ns:xmpp-tls\"><required/></starttls>" in reply, reply
        assert b"from='gw.example'" in reply
        assert (tmp_path / "state" / "dialback.secret").exists()
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert f"Listening for s2s on 127.0.0.1:{s2s}" in output
    assert f"Listening for components on 127.0.0.1:{comp}" in output
    assert f"Listening for admin on 127.0.0.1:{admin}" in output
    token = tmp_path / "state" / "admin.token"
    assert oct(token.stat().st_mode & 0o777) == "0o640" and len(token.read_text().strip()) >= 32
