"""Test-wide settings: with FEDGATE_TEST_LOG=1 every Twisted log event goes
to stderr (pytest shows it for failing tests)."""

import os
import sys

from twisted.logger import globalLogPublisher, textFileLogObserver

if os.environ.get("FEDGATE_TEST_LOG"):
    globalLogPublisher.addObserver(textFileLogObserver(sys.stderr))
