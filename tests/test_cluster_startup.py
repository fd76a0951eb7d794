"""``twistd fedgate`` in cluster mode, as an operator starts it: without
redis-py it stops at once with exit 78 and one line naming python3-redis;
with Redis unreachable it exits 1 with one line; with Redis there, it
serves from the shared store."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request

import pytest

from tests.support.redisserver import RedisServer, redis_py_available, redis_server_available
from tests.support.twistd import REPO, TWISTD, free_ports, loopback_config


def run(tmp_path, extra: str, env_extra: dict | None = None, timeout: float = 30):
    s2s, comp, admin = free_ports(3)
    config = tmp_path / "fedgate.toml"
    config.write_text(loopback_config(tmp_path, s2s, comp, admin, extra=extra))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.update(env_extra or {})
    proc = subprocess.Popen(TWISTD + ["-n", "--pidfile=", "fedgate", "--config", str(config)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc, admin


def finish(proc, timeout=30) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"still running after {timeout} s:\n{out.decode(errors='replace')}")
    return proc.returncode, out.decode(errors="replace")


def test_without_redis_py_exit_78_naming_the_package(tmp_path):
    # A "redis" package that cannot be imported stands for a system without
    # python3-redis (the real one would otherwise be found).
    shadow = tmp_path / "shadow" / "redis"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'redis'\")\n")
    proc, _ = run(tmp_path, '[cluster]\nenabled = true\nredis = "/nonexistent.sock"\n',
                  {"PYTHONPATH": f"{tmp_path / 'shadow'}{os.pathsep}{REPO}"})
    status, text = finish(proc)
    assert status == 78, text
    lines = [line for line in text.splitlines() if "python3-redis" in line]
    assert len(lines) == 1, text
    assert "[cluster] is enabled" in lines[0] and "pip package redis" in lines[0], text
    assert "Traceback" not in text, text


def test_single_node_needs_no_redis_py(tmp_path):
    shadow = tmp_path / "shadow" / "redis"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'redis'\")\n")
    proc, admin = run(tmp_path, "", {"PYTHONPATH": f"{tmp_path / 'shadow'}{os.pathsep}{REPO}"})
    try:
        token = tmp_path / "state" / "admin.token"
        deadline = time.monotonic() + 20
        while not token.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")
        assert token.exists()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.skipif(not redis_py_available(), reason="redis-py is not installed")
def test_redis_unreachable_exit_1_with_one_line(tmp_path):
    proc, _ = run(tmp_path, f'[cluster]\nenabled = true\nredis = "{tmp_path / "none.sock"}"\n')
    status, text = finish(proc)
    assert status == 1, text
    lines = [line for line in text.splitlines() if "cluster's Redis" in line]
    assert len(lines) == 1 and "none.sock" in lines[0], text


@pytest.mark.skipif(not (redis_py_available() and redis_server_available()),
                    reason="redis-server or redis-py is not installed")
def test_cluster_node_serves_from_redis(tmp_path):
    server = RedisServer()
    server.start()
    try:
        proc, admin = run(tmp_path, f'[cluster]\nenabled = true\nredis = "{server.socket_path}"\n'
                                    'node_id = "twistd-1"\n')
        try:
            token_file = tmp_path / "state" / "admin.token"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and proc.poll() is None:
                if token_file.exists():
                    try:
                        request = urllib.request.Request(
                            f"http://127.0.0.1:{admin}/api/v1/peers/blocked.example", method="PUT",
                            data=b'{"allowed": false}',
                            headers={"Authorization": f"Bearer {token_file.read_text().strip()}",
                                     "Content-Type": "application/json"})
                        # never through http_proxy (package builds point it nowhere)
                        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                        with direct.open(request, timeout=5) as reply:
                            assert reply.status == 201
                        break
                    except OSError:
                        pass
                time.sleep(0.1)
            else:
                pytest.fail(proc.communicate(timeout=5)[0].decode(errors="replace"))
            import redis
            client = redis.Redis(unix_socket_path=server.socket_path)
            assert b"blocked.example" in client.hgetall("fedgate:peers")
            assert client.get("fedgate:dialback-secret")
            client.close()
            # No SQLite store and no secret file in state_dir: the state is Redis's.
            assert not (tmp_path / "state" / "fedgate.sqlite3").exists()
            assert not (tmp_path / "state" / "dialback.secret").exists()
        finally:
            proc.terminate()
            status, text = finish(proc)
        # twistd re-raises the SIGTERM after a clean shutdown (newer Twisted)
        assert status in (0, -15), text
        assert "Traceback" not in text, text
    finally:
        server.cleanup()
