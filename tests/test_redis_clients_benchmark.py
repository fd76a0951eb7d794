"""benchmarks/redis_clients.py runs and reports both clients side by side
(tiny counts; it asserts no speed, only the report's shape and that no
command was left hanging)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.redisserver import redis_py_available, redis_server_available
from tests.support.twistd import REPO


@pytest.mark.skipif(not (redis_py_available() and redis_server_available()),
                    reason="redis-server or redis-py is not installed")
def test_runs_and_reports():
    done = subprocess.run([sys.executable, "-m", "benchmarks.redis_clients", "--messages", "400",
                           "--rounds", "1"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    rates = report["throughput_per_s"]
    for key in ("PUBLISH redispy_batched", "PUBLISH redispy_per_call", "SET redispy_batched"):
        assert rates[key] > 0, rates
    clients = ["redis-py"]
    if report["txredisapi"] is None:
        assert "txredisapi is not installed" in done.stderr
    else:
        clients.append("txredisapi")
        assert rates["PUBLISH txredisapi_per_call"] > 0
        assert report["throughput_ratio_to_txredisapi_per_call"]["PUBLISH txredisapi_per_call"] == 1.0
    for name in clients:
        result = report["reconnect"][name]
        assert result["hung"] == 0, result
        assert result["succeeded"] + result["failed"] == result["commands"], result
        assert result["recovered_after_ready_ms"] is not None, result
