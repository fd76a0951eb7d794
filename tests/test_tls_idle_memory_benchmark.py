"""benchmarks/tls_idle_memory.py runs with a few connections and reports
every variant; no thresholds on the figures (a benchmark, not a test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_runs_and_reports_every_variant():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "benchmarks.tls_idle_memory", "--connections", "5"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    rows = {row["variant"]: row for row in report["results"]}
    assert list(rows) == ["bare", "fedgate", "client_cert", "no_verify", "no_release_buffers", "tls12"]
    assert rows["client_cert"]["peer_certificate_kept"] is True
    assert rows["fedgate"]["peer_certificate_kept"] is False
    assert rows["tls12"]["protocol"] == "TLSv1.2"
    assert rows["fedgate"]["protocol"] == "TLSv1.3"
    assert set(report["binding_has"]) == {"SSL_free_buffers", "SSL_CTX_set_num_tickets",
                                          "SSL_MODE_RELEASE_BUFFERS", "SSL_OP_NO_TICKET"}
