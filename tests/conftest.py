"""Test-wide settings: with FEDGATE_TEST_LOG=1 every Twisted log event goes
to stderr (pytest shows it for failing tests).  The fuzzers' random seed
(tests/test_fuzz.py) is FEDGATE_FUZZ_SEED, drawn here when not set and
printed at the start and the end of the run."""

import os
import secrets
import sys

from twisted.logger import globalLogPublisher, textFileLogObserver

if os.environ.get("FEDGATE_TEST_LOG"):
    globalLogPublisher.addObserver(textFileLogObserver(sys.stderr))


def pytest_configure(config):
    os.environ.setdefault("FEDGATE_FUZZ_SEED", str(secrets.randbelow(2 ** 32)))


def _fuzz_seed_line() -> str:
    seed = os.environ["FEDGATE_FUZZ_SEED"]
    return f"fuzz random seed: {seed} (repeat with FEDGATE_FUZZ_SEED={seed})"


def pytest_report_header(config):
    return _fuzz_seed_line()


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(_fuzz_seed_line())
