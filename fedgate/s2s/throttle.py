"""Per-peer stanza rate limits: a token bucket per stream and remote domain.

Over the limit we stop reading from the connection until a token is due,
rather than dropping or bouncing: TCP pushes back on the peer and nothing
is lost (the peer's own queue grows instead of ours).
"""

from __future__ import annotations

from fedgate.stream.interfaces import RATE_LIMIT


class TokenBucket:
    def __init__(self, rate: float, clock, burst: float | None = None):
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 10.0)
        self.clock = clock
        self.tokens = self.burst
        self.stamp = clock.seconds()

    def take(self) -> float:
        """Take one token; return 0 if allowed now, else seconds to wait."""
        now = self.clock.seconds()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1.0
        if self.tokens >= 0:
            return 0.0
        return -self.tokens / self.rate


class StreamThrottle:
    """Pauses one stream's reading while a remote domain is over its rate."""

    def __init__(self, io, clock):
        self.io = io
        self.clock = clock
        self.buckets: dict[str, TokenBucket] = {}
        self._resume = None
        self.pauses = 0

    def stanza(self, remote: str, rate: float | None) -> None:
        if not rate:
            return
        bucket = self.buckets.get(remote)
        if bucket is None or bucket.rate != rate:
            bucket = self.buckets[remote] = TokenBucket(rate, self.clock)
        wait = bucket.take()
        if wait > 0 and self._resume is None:
            self.pauses += 1
            self.io.pause_reading(RATE_LIMIT)
            self._resume = self.clock.callLater(wait, self._go)

    def _go(self) -> None:
        self._resume = None
        self.io.resume_reading(RATE_LIMIT)

    def stop(self) -> None:
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None
