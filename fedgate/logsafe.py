"""Peer values in logs and error texts, bounded.

A remote peer chooses the names, addresses and texts it sends, and it can
send the same offence many times on one connection.  Before this module
1,250 elements with 400 KiB names wrote 512 MB of log.  Two tools:

- :func:`short` cuts a peer-supplied value to a few hundred characters,
  saying how long it was, for log fields and error texts.
- :func:`throttled` wraps a :class:`twisted.logger.Logger` for the lines a
  peer can trigger again and again on one connection: a token bucket per
  connection and line, and once lines were dropped, one line saying how many.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

#: characters of one peer value kept in a log line or error text
SHORT_LIMIT = 200


def short(value, limit: int = SHORT_LIMIT):
    """``value`` as text of at most about ``limit`` characters: longer text is
    cut and marked with its original length.  None stays None, so that
    optional fields keep their meaning."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\N{HORIZONTAL ELLIPSIS}({len(text)} chars)"


@dataclass(frozen=True)
class LineRate:
    """How many lines of one kind one connection may log: ``burst`` at once,
    then ``per_second`` on average."""

    burst: int = 20
    per_second: float = 1.0


_rate = LineRate()
#: connection -> {line format: [tokens, last refill, suppressed]}; entries go
#: with their connection, and one connection has a fixed set of formats
_buckets: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def set_line_rate(rate: LineRate) -> None:
    """Apply the configured rate (from ``[logging]``) to every connection."""
    global _rate
    _rate = rate


def line_rate() -> LineRate:
    return _rate


class _Throttled:
    __slots__ = ("_log", "_key", "_clock")

    def __init__(self, log, key, clock):
        self._log, self._key, self._clock = log, key, clock

    def _allow(self, fmt: str) -> int | None:
        """None to drop the line, else how many like it were dropped before."""
        rate = _rate
        now = self._clock()
        try:
            per_connection = _buckets.setdefault(self._key, {})
        except TypeError:  # not weakly referable: nothing to key on
            return 0
        bucket = per_connection.get(fmt)
        if bucket is None:
            bucket = per_connection[fmt] = [float(rate.burst), now, 0]
        tokens = min(float(rate.burst), bucket[0] + (now - bucket[1]) * rate.per_second)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            bucket[2] += 1
            return None
        bucket[0] = tokens - 1.0
        dropped, bucket[2] = bucket[2], 0
        return dropped

    def _emit(self, level: str, fmt: str, kwargs: dict) -> None:
        dropped = self._allow(fmt)
        if dropped is None:
            return
        emit = getattr(self._log, level)
        if dropped:
            emit("Suppressed {suppressed} similar lines: {suppressed_format}",
                 suppressed=dropped, suppressed_format=fmt)
        emit(fmt, **kwargs)

    def debug(self, fmt: str, **kwargs) -> None:
        self._emit("debug", fmt, kwargs)

    def info(self, fmt: str, **kwargs) -> None:
        self._emit("info", fmt, kwargs)

    def warn(self, fmt: str, **kwargs) -> None:
        self._emit("warn", fmt, kwargs)

    def error(self, fmt: str, **kwargs) -> None:
        self._emit("error", fmt, kwargs)


def throttled(log, connection, clock=time.monotonic) -> _Throttled:
    """``log`` limited per ``connection`` (any weakly referable object, usually
    the stream) for lines a peer can repeat: use as ``throttled(log,
    self.io).info(...)``."""
    return _Throttled(log, connection, clock)
