"""The benchmark runs end to end with tiny counts and loses nothing.

No speed thresholds: this only proves the load generator, the fake remote
server, the component and the gateway under twistd still work together and
that the JSON report keeps its shape.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MESSAGES, SESSIONS = 50, 5
SCENARIOS = {"s2s_to_component": MESSAGES, "component_to_s2s": MESSAGES, "dialback_sessions": SESSIONS}
BASELINES = {"echo_stanzas": MESSAGES, "echo_connections": SESSIONS}


class BenchmarkSmoke(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        cls.run_result = subprocess.run(
            [sys.executable, "-m", "benchmarks.run", "--messages", str(MESSAGES),
             "--sessions", str(SESSIONS), "--rounds", "1", "--timeout", "10"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
        cls.report = None
        if cls.run_result.stdout.strip():
            cls.report = json.loads(cls.run_result.stdout)

    def setUp(self):
        self.assertEqual(self.run_result.returncode, 0, self.run_result.stderr[-3000:])
        self.assertIsNotNone(self.report, self.run_result.stderr[-3000:])

    def test_report_shape(self):
        for key in ("parameters", "environment", "baselines", "scenarios", "ratios", "gateway"):
            self.assertIn(key, self.report)
        self.assertEqual(set(self.report["scenarios"]), set(SCENARIOS))
        self.assertEqual(set(self.report["baselines"]), set(BASELINES))
        self.assertEqual(set(self.report["ratios"]), set(SCENARIOS))
        for entry in [*self.report["scenarios"].values(), *self.report["baselines"].values()]:
            for key in ("requested", "count", "errors", "seconds", "rate", "unit", "complete"):
                self.assertIn(key, entry)

    def test_nothing_lost(self):
        for name, requested in {**SCENARIOS, **BASELINES}.items():
            entry = self.report["scenarios"].get(name) or self.report["baselines"][name]
            self.assertEqual((entry["requested"], entry["count"], entry["errors"], entry["complete"]),
                             (requested, requested, 0, True), name)
        # Each dialback session was verified over its own connection to the fake remote.
        self.assertEqual(self.report["scenarios"]["dialback_sessions"]["verified"], SESSIONS)
        self.assertEqual(self.report["gateway"]["log"], {"stream_errors": 0, "tracebacks": 0})

    def test_rates_positive(self):
        for section in ("scenarios", "baselines"):
            for name, entry in self.report[section].items():
                self.assertGreater(entry["rate"], 0, name)
                self.assertGreater(entry["seconds"], 0, name)
        for name, ratio in self.report["ratios"].items():
            self.assertGreater(ratio, 0, name)


class TLSResumptionBenchmarkSmoke(unittest.TestCase):
    """benchmarks.tls_resumption runs with tiny counts and prints its figures;
    exit status 0 means each mode behaved (off: none resumed; on: all but
    the first resumed).  No speed is asserted."""

    def test_runs_and_reports(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        result = subprocess.run([sys.executable, "-m", "benchmarks.tls_resumption", "--handshakes", "5",
                                 "--rounds", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
        report = json.loads(result.stdout)
        self.assertEqual(report["problems"], [])
        self.assertEqual(set(report["ratios"]), {"TLSv1.2", "TLSv1.3"})
        for version, modes in report["results"].items():
            self.assertEqual((modes["resumption_off"]["resumed"], modes["resumption_on"]["resumed"]), (0, 4), version)
            for mode in modes.values():
                self.assertGreater(mode["rate"], 0, version)


class VsProsodyBenchmarkSmoke(unittest.TestCase):
    """benchmarks.vs_prosody runs every scenario against fedgate and Prosody
    with tiny counts and reports a median for each server and a ratio for
    each metric.  No speed is asserted."""

    def test_runs_and_reports(self):
        from tests.support.prosody import prosody_available
        if not prosody_available():
            raise unittest.SkipTest("Prosody is not installed")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.vs_prosody", "--rounds", "1", "--messages", "40",
             "--latency-messages", "20", "--sessions", "3", "--idle", "3", "--timeout", "15"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
        report = json.loads(result.stdout)
        self.assertEqual(report["problems"], [])
        from benchmarks.vs_prosody import SCENARIOS
        self.assertEqual(set(report["results"]), {*SCENARIOS, "rss_start", "latency_2000_p99"})
        for metric, row in report["results"].items():
            for server in ("fedgate", "prosody"):
                self.assertIsNotNone(row[server], (metric, server))
            if metric in SCENARIOS:
                self.assertIn("fedgate_generator_cpu", row, metric)
        for metric in ("relay_in", "dialback_concurrent", "sasl_external", "rss_start"):
            self.assertGreater(report["results"][metric]["ratio"], 0, metric)


class VsProsodyProfileSmoke(unittest.TestCase):
    """``--profile DIR`` runs fedgate under cProfile and leaves one pstats
    file per gateway run there (fedgate only: no Prosody needed); an RSS
    scenario gets a gateway of its own."""

    def test_profile_per_round(self):
        import pstats
        import tempfile
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        with tempfile.TemporaryDirectory() as where:
            out = Path(where) / "profiles"
            result = subprocess.run(
                [sys.executable, "-m", "benchmarks.vs_prosody", "--rounds", "1", "--sessions", "3",
                 "--server", "fedgate", "--scenario", "dialback_sequential", "--timeout", "15",
                 "--scenario", "rss_idle_plain", "--idle", "3", "--profile", str(out)],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
            self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
            report = json.loads(result.stdout)
            self.assertEqual(report["problems"], [])
            self.assertGreater(report["results"]["dialback_sequential"]["fedgate"], 0)
            # the RSS scenario ran on a gateway started for it alone
            self.assertEqual(sorted(p.name for p in out.iterdir()),
                             ["fedgate-1-rss_idle_plain.prof", "fedgate-1.prof"])
            stats = pstats.Stats(str(out / "fedgate-1.prof"))
            handled = [key for key in stats.stats if key[2] == "header_received"
                       and key[0].endswith(os.path.join("s2s", "inbound.py"))]
            self.assertEqual(len(handled), 1, "the inbound handshakes ran under the profiler")


class VsProsodyFloorSmoke(unittest.TestCase):
    """``--server floor`` runs benchmarks.dialback_floor for the handshake
    scenarios only (no Prosody needed here); every session was verified by
    the authoritative server over the one connection the floor keeps."""

    def test_floor_runs_the_dialback_scenarios(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.vs_prosody", "--rounds", "1", "--sessions", "3",
             "--server", "floor", "--scenario", "dialback_sequential", "--scenario", "sasl_external",
             "--scenario", "relay_in",
             "--scenario", "rss_idle_plain", "--timeout", "15"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
        report = json.loads(result.stdout)
        self.assertEqual(report["problems"], [])
        results = report["results"]
        self.assertGreater(results["dialback_sequential"]["floor"], 0)
        self.assertGreater(results["sasl_external"]["floor"], 0)
        self.assertIsNone(results["relay_in"]["floor"])  # not a relay
        self.assertIsNone(results["rss_idle_plain"]["floor"])
        self.assertEqual(report["remote_connections_accepted"], {"floor": 1})


class HandshakeCpuBenchmarkSmoke(unittest.TestCase):
    """benchmarks.handshake_cpu runs whole inbound dialback handshakes in
    memory over one reused verification connection and reports a rate and
    the writes of one handshake.  No speed is asserted."""

    def test_runs_and_reports(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        result = subprocess.run([sys.executable, "-m", "benchmarks.handshake_cpu", "20"], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
        report = json.loads(result.stdout)
        self.assertGreater(report["handshakes_per_cpu_second"], 0)
        # header and features, the answer, our close; one db:verify
        self.assertEqual(report["transport_writes_per_handshake"], {"inbound": 3, "verification": 1})


class ClusterBenchmarkSmoke(unittest.TestCase):
    """benchmarks.cluster runs its three comparisons (relay, latency at
    2,000/s, two nodes against one) with tiny counts and reports a figure
    and the CPU of every process for each layout.  No speed is asserted."""

    def test_runs_and_reports(self):
        from tests.support.redisserver import redis_py_available, redis_server_available
        if not (redis_py_available() and redis_server_available()):
            raise unittest.SkipTest("redis-server or redis-py is not installed")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.cluster", "--rounds", "1", "--messages", "200",
             "--latency-messages", "40", "--flood-messages", "200", "--timeout", "20"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
        report = json.loads(result.stdout)
        self.assertEqual(report["problems"], [])
        results = report["results"]
        self.assertEqual(set(results), {"relay", "latency", "cores"})
        self.assertGreater(results["relay"]["ratio_cross_single"], 0)
        self.assertIn("p99_added_ms", results["latency"])
        self.assertGreater(results["cores"]["ratio_two_one"], 0)
        layouts = {"relay": ("single", "cross"), "latency": ("single", "cross"),
                   "cores": ("one_node", "two_nodes")}
        for section, names in layouts.items():
            for name in names:
                entry = results[section][name]
                self.assertGreater(entry["median"], 0, (section, name))
                self.assertEqual(set(entry["cpu"]), {"node_a", "node_b", "redis", "generator"},
                                 (section, name))
        self.assertEqual(report["nodes"]["a"]["tracebacks"] + report["nodes"]["b"]["tracebacks"], 0)
