"""fedgate.logformat: twistd's log file lines, formatted faster, never different.

Every event is formatted by the fast formatter and by Twisted's own
``textFileLogObserver`` and the texts compared, on whichever Twisted runs
the suite; a real twistd run checks the fast formatter is in place there."""

from __future__ import annotations

import io
import time

from twisted.logger import (FileLogObserver, Logger, LogLevel, LogPublisher, formatEventAsClassicLogText,
                            formatTime, textFileLogObserver, timeFormatRFC3339)
from twisted.python.failure import Failure
from twisted.trial import unittest

from fedgate.logformat import classic_text, speed_up_text_files
from fedgate.tap import LevelFilter

NOW = time.time()


class Thing:
    def __str__(self):
        return "thing-str"

    def __repr__(self):
        return "<thing>"

    def __format__(self, spec):
        return f"thing-formatted[{spec}]"


def _failure():
    try:
        1 / 0
    except ZeroDivisionError:
        return Failure()


def events():
    base = {"log_namespace": "fedgate.s2s.dialback", "log_level": LogLevel.info, "log_time": NOW}
    yield {**base, "log_format": "Dialback {state} ({method}) for {local} <- {remote} from {peer}",
           "state": "valid", "method": "dialback", "local": "gw.example", "remote": "remote.example",
           "peer": "127.0.0.1:5000"}
    yield {**base, "log_format": "no fields"}
    yield {**base, "log_format": "two\nlines {x}", "x": "and\na third"}
    yield {**base, "log_format": "{n} {n!r} {n:>5} {f:.2f} {t} {t!r} {t:spec} {d[k]} {o.real}",
           "n": 42, "f": 1.0 / 3, "t": Thing(), "d": {"k": "v"}, "o": 3}
    yield {**base, "log_format": "braces {{literal}} {x}", "x": "{not a field}"}
    yield {**base, "log_format": "missing {nothere}"}
    yield {**base, "log_format": "a call {f()}", "f": lambda: "called"}
    yield {**base, "log_format": "positional {}"}
    yield {**base, "log_format": ""}
    yield {**base, "log_format": None}
    yield {**base, "log_format": b"bytes {x}", "x": 1}
    yield {**base, "log_format": "with failure", "log_failure": _failure()}
    yield {**base, "log_format": "with system", "log_system": "sys-7"}
    yield {**base, "log_format": "flat {x}", "x": 1, "log_flattened": {"x!:": "1"}}
    yield {key: value for key, value in base.items() if key != "log_level"} | {"log_format": "no level"}
    yield {key: value for key, value in base.items() if key != "log_namespace"} | {"log_format": "no ns"}
    yield {key: value for key, value in base.items() if key != "log_time"} | {"log_format": "no time"}
    yield {**base, "log_time": 1700000000, "log_format": "an int time"}
    yield {**base, "log_time": 1700000000.9999996, "log_format": "rounds up to the next second"}
    yield {**base, "log_time": 1700000000.9999994, "log_format": "does not round up"}
    yield {**base, "log_time": 1700000001.2, "log_format": "after the one that rounded up"}
    yield {**base, "log_level": LogLevel.warn, "log_format": "péché {x}", "x": "ünïcode"}


class ClassicTextTests(unittest.TestCase):
    def assert_same(self, time_format):
        twisted_format = textFileLogObserver(io.StringIO(), timeFormat=time_format).formatEvent
        fast = classic_text(twisted_format, time_format)
        for event in events():
            for _ in range(2):  # a time stamp cached from the first round
                self.assertEqual(fast(dict(event)), twisted_format(dict(event)), event.get("log_format"))

    def test_same_text_as_twisted(self):
        self.assert_same(timeFormatRFC3339)

    def test_same_text_with_another_time_format_and_none(self):
        self.assert_same("%d/%m %H:%M:%S.%%")
        self.assert_same(None)

    def test_the_time_stamp_follows_the_clock(self):
        twisted_format = textFileLogObserver(io.StringIO()).formatEvent
        fast = classic_text(twisted_format, timeFormatRFC3339)
        for when in (NOW, NOW + 0.5, NOW + 1, NOW + 61, NOW - 3600, NOW + 86400 * 200):
            event = {"log_format": "x", "log_time": float(when), "log_level": LogLevel.info}
            self.assertEqual(fast(event), f"{formatTime(when)} [-#info] x\n")

    def test_the_fast_path_is_taken_for_fedgate_lines(self):
        calls = []

        def fallback(event):
            calls.append(event)
            return formatEventAsClassicLogText(event)
        fast = classic_text(fallback, timeFormatRFC3339)
        fast({"log_format": "a {b}", "b": 1, "log_time": NOW, "log_level": LogLevel.info,
              "log_namespace": "n"})
        self.assertEqual(calls, [])
        fast({"log_format": "a {b()}", "b": lambda: 1, "log_time": NOW})
        self.assertEqual(len(calls), 1)


class SpeedUpTests(unittest.TestCase):
    def test_text_file_observers_wrapped_or_not_get_it_once(self):
        publisher = LogPublisher()
        plain, filtered = io.StringIO(), io.StringIO()
        plain_observer = textFileLogObserver(plain)
        publisher.addObserver(plain_observer)
        publisher.addObserver(LevelFilter(textFileLogObserver(filtered), frozenset({LogLevel.debug})))
        other = []
        publisher.addObserver(other.append)
        custom = FileLogObserver(io.StringIO(), lambda event: "custom\n")
        publisher.addObserver(custom)
        self.assertEqual(speed_up_text_files(publisher), 2)
        self.assertEqual(speed_up_text_files(publisher), 0, "not twice")
        self.assertEqual(custom.formatEvent({}), "custom\n", "another formatter is left alone")
        self.assertEqual(plain_observer.formatEvent.__qualname__, "classic_text.<locals>.format_event")
        log = Logger(namespace="fedgate.test", observer=publisher)
        log.info("Dialback {state} for {local}", state="valid", local="gw.example")
        log.debug("dropped by the filter {x}", x=1)
        first, second = plain.getvalue().splitlines()
        self.assertTrue(first.endswith(" [fedgate.test#info] Dialback valid for gw.example"), first)
        self.assertTrue(second.endswith(" [fedgate.test#debug] dropped by the filter 1"), second)
        self.assertEqual(filtered.getvalue().count("\n"), 1)
        self.assertEqual(len(other), 2)

    def test_a_publisher_without_observers_list_is_left_alone(self):
        self.assertEqual(speed_up_text_files(object()), 0)


class AtStartTests(unittest.TestCase):
    """The service twistd runs puts the fast formatter on twistd's text file
    observer (the global publisher's) when it starts, whatever the level."""

    def test_start_speeds_up_the_global_text_file_observer(self):
        from twisted.internet.testing import MemoryReactorClock
        from twisted.logger import globalLogPublisher

        from fedgate.tap import ExitOnStartFailure

        class Gateway:
            running = False

            def startService(self):
                self.running = True

            def stopService(self):
                self.running = False

        out = io.StringIO()
        observer = textFileLogObserver(out)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        starter = ExitOnStartFailure(Gateway(), MemoryReactorClock(), lambda status: None, log_level="debug")
        starter.startService()
        self.addCleanup(starter.stopService)
        self.assertEqual(observer.formatEvent.__qualname__, "classic_text.<locals>.format_event")
        Logger(namespace="fedgate.test").info("started {what}", what="here")
        self.assertTrue(out.getvalue().endswith(" [fedgate.test#info] started here\n"), out.getvalue())
