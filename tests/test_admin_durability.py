"""Acknowledged means durable: SIGKILL a real twistd gateway at random
moments during a stream of PUTs; after each restart every acknowledged write
is there and the database opens cleanly.

Bounded: five kills, each after a fraction of a second of writing.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

from fedgate.storage.sqlite import FILENAME
from tests.support.twistd import REPO, TWISTD, free_ports, loopback_config

TOKEN = "durability-test-token-0123456789"
KILLS = 5


def _request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {TOKEN}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Gateway:
    def __init__(self, tmp_path: Path):
        s2s, comp, self.admin = free_ports(3)
        self.state = tmp_path / "state"
        self.config = tmp_path / "fedgate.toml"
        self.config.write_text(loopback_config(tmp_path, s2s, comp, self.admin, extra=f'token = "{TOKEN}"\n'))
        self.proc: subprocess.Popen | None = None
        self.log = tmp_path / "twistd.log"

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(TWISTD + ["-n", "--pidfile=", "fedgate", "--config", str(self.config)],
                                         cwd=self.config.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if _request(self.admin, "GET", "/api/v1/status", timeout=2)[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the gateway did not start:\n" + self.log.read_text())

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _writer(port: int, prefix: str, acked: list, stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        domain = f"{prefix}-{n}.example"
        try:
            status, _ = _request(port, "PUT", f"/api/v1/peers/{domain}",
                                 {"allowed": n % 2 == 0, "note": f"write {n}"})
        except (OSError, http.client.HTTPException):
            return  # the gateway is gone
        if status != 201:
            return
        acked.append((domain, n))
        n += 1


def _check_database(path: Path) -> None:
    db = sqlite3.connect(str(path))
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def _check_present(port: int, acked: list) -> None:
    status, body = _request(port, "GET", "/api/v1/peers")
    assert status == 200
    stored = {p["domain"]: p for p in json.loads(body)["peers"]}
    missing = [domain for domain, _ in acked if domain not in stored]
    assert not missing, f"acknowledged but lost: {missing[:5]} ({len(missing)} in all)"
    for domain, n in acked:
        assert (stored[domain]["note"], stored[domain]["allowed"]) == (f"write {n}", n % 2 == 0)


def test_acknowledged_writes_survive_sigkill(tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    gateway = Gateway(tmp_path)
    acked: list = []
    try:
        for round_ in range(KILLS):
            gateway.start()
            _check_present(gateway.admin, acked)  # everything acknowledged before the last kill
            stop = threading.Event()
            writer = threading.Thread(target=_writer, args=(gateway.admin, f"r{round_}", acked, stop))
            writer.start()
            time.sleep(rng.uniform(0.05, 0.4))
            gateway.kill()
            stop.set()
            writer.join(timeout=10)
            _check_database(gateway.state / FILENAME)
        gateway.start()
        _check_present(gateway.admin, acked)
    finally:
        gateway.stop()
    assert len(acked) > KILLS, f"too few writes to mean anything (seed {seed})"
