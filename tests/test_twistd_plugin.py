"""The twistd plugin as an operator runs it: a real twistd process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

from tests.support.twistd import REPO, TWISTD, free_ports, loopback_config



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


def test_starts_and_answers_on_its_ports(tmp_path):
    s2s, comp, admin = free_ports(3)
    config = tmp_path / "fedgate.toml"
    config.write_text(loopback_config(tmp_path, s2s, comp, admin, ("gw.example", "chat.gw.example"),
                                      '[components.domains."chat.gw.example"]\nsecret = "x"\n'))
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


def _peers(admin: int, token: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{admin}/api/v1/peers",
                                     headers={"Authorization": f"Bearer {token}"})
    # Straight to loopback, whatever http_proxy says (pybuild points it at a
    # dead port so that builds cannot reach the network).
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(request, timeout=10) as response:
        return {p["domain"]: p for p in json.load(response)["peers"]}


def test_sighup_reloads_the_config_and_keeps_running(tmp_path):
    s2s, comp, admin = free_ports(3)
    config = tmp_path / "fedgate.toml"
    text = loopback_config(tmp_path, s2s, comp, admin)
    config.write_text(text)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(TWISTD + ["-n", "--pidfile=", "fedgate", "--config", str(config)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _reload_while_serving(proc, config, text, tmp_path, s2s, admin)
    except Exception as exc:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
        raise AssertionError(f"{exc!r}\n-- the gateway's output:\n{output}") from exc
    finally:
        if proc.poll() is None:
            proc.terminate()
    output, _ = proc.communicate(timeout=30)
    assert f"Reloaded {config}: peers added: spam.example; certificates unchanged" in output, output


def _reload_while_serving(proc, config, text, tmp_path, s2s, admin):
    """Add a blocked peer to the file, SIGHUP, and see the admin API list it
    while a stream opened before stays open."""
    token_file = tmp_path / "state" / "admin.token"
    deadline = time.monotonic() + 30
    while True:
        try:
            peers = _peers(admin, token_file.read_text().strip())
            break
        except (OSError, ValueError):
            assert proc.poll() is None and time.monotonic() < deadline, "the admin API never answered"
            time.sleep(0.2)
    assert "spam.example" not in peers
    # A stream open across the reload stays open.
    stream = socket.create_connection(("127.0.0.1", s2s), timeout=10)
    with stream:
        stream.sendall(b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                       b"xmlns:stream='http://etherx.jabber.org/streams' "
                       b"xmlns:db='jabber:server:dialback' to='gw.example' version='1.0'>")
        reply = b""
        while b"</stream:features>" not in reply:
            chunk = stream.recv(4096)
            assert chunk, reply
            reply += chunk

        config.write_text(text + '[s2s.peers."spam.example"]\nblocked = true\nnote = "reloaded"\n')
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "spam.example" not in peers:
            assert proc.poll() is None, "SIGHUP ended the gateway"
            assert time.monotonic() < deadline, "SIGHUP did not reload the configuration"
            time.sleep(0.1)
            peers = _peers(admin, token_file.read_text().strip())
        assert (peers["spam.example"]["allowed"], peers["spam.example"]["note"],
                peers["spam.example"]["source"]) == (False, "reloaded", "config")
        stream.settimeout(0.5)
        try:
            assert stream.recv(4096) != b"", "the open stream was closed"
        except socket.timeout:
            pass  # nothing sent, nothing closed
    assert proc.poll() is None
