"""Flood stanzas through gateways and account for every one of them.

:class:`CountingComponent` is an XEP-0114 component (on the load
generator's cheap expat reader, :mod:`benchmarks.xmpp`) that records, by
stanza id, what it received: delivered stanzas, and bounces (``type='error'``)
with their defined condition.  :class:`Flood` writes ``total`` numbered
messages from one component to a JID at a steady rate, in one write per
tick, and :class:`Tally` puts the sender's bounces and the receiver's
deliveries together:

    sent = delivered + bounced + missing

``missing`` are ids neither delivered nor bounced (yet); ``duplicated``
counts ids delivered more than once.  Each id lands in exactly one of
delivered / bounced (a stanza both delivered and bounced is reported in
``both``), so the sum is a check, not a definition.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from xml.parsers import expat

from twisted.internet import defer, reactor, task

from benchmarks.xmpp import STANZA_NAMES, ComponentStream, connect

STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"


class _Reader:
    """Top-level stanzas as (name, attributes, error condition or None)."""

    def __init__(self, on_header, on_stanza, on_other, on_end):
        self._on_header, self._on_stanza, self._on_other, self._on_end = (
            on_header, on_stanza, on_other, on_end)
        self._depth = 0
        self._top = None
        self._in_error = False
        self._condition = None
        parser = self._parser = expat.ParserCreate("UTF-8", " ")
        parser.StartElementHandler = self._start
        parser.EndElementHandler = self._end

    def feed(self, data: bytes) -> None:
        self._parser.Parse(data, False)

    def _start(self, name, attrs):
        depth = self._depth
        self._depth += 1
        if depth == 0:
            self._on_header(attrs)
        elif depth == 1:
            self._top, self._in_error, self._condition = (name, attrs), False, None
        elif depth == 2:
            self._in_error = name.rpartition(" ")[2] == "error"
        elif depth == 3 and self._in_error and name.startswith(STANZAS_NS + " "):
            local = name.rpartition(" ")[2]
            if local != "text" and self._condition is None:
                self._condition = local

    def _end(self, name):
        self._depth -= 1
        if self._depth == 1:
            top, self._top = self._top, None
            if top[0] in STANZA_NAMES:
                self._on_stanza(top[0], top[1], self._condition)
            else:
                self._on_other(top[0], top[1])
        elif self._depth == 0:
            self._on_end()


class CountingComponent(ComponentStream):
    """A component that counts what it receives, by stanza id."""

    def __init__(self, domain: str, secret: str):
        super().__init__(domain, secret)
        self.delivered: collections.Counter = collections.Counter()
        self.bounced: dict[str, str | None] = {}
        self.bounce_count = 0
        self.other: list = []
        self._wanted: list[tuple[callable, defer.Deferred]] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        self._reader = _Reader(self._header, self._stanza, self._other, self.stream_ended)

    def _other(self, name, attrs) -> None:
        if name.endswith(" handshake") and not self.bound.called:
            self.bound.callback(self)
        elif name.endswith(" error"):
            self.stream_error = "stream error"
        else:
            self.other.append((name, attrs))

    def _stanza(self, name, attrs, condition) -> None:
        stanza_id = attrs.get("id")
        if attrs.get("type") == "error":
            self.bounce_count += 1
            self.bounced.setdefault(stanza_id, condition)
        else:
            self.delivered[stanza_id] += 1
        if self._wanted:
            still = []
            for predicate, d in self._wanted:
                if predicate():
                    d.callback(self)
                else:
                    still.append((predicate, d))
            self._wanted = still

    def when(self, predicate, timeout: float, what: str = "stanzas") -> defer.Deferred:
        """Fires once ``predicate()`` holds (checked as stanzas arrive)."""
        if predicate():
            return defer.succeed(self)
        d = defer.Deferred()
        self._wanted.append((predicate, d))

        def expired(failure):
            failure.trap(defer.TimeoutError)
            self._wanted = [(p, x) for p, x in self._wanted if x is not d]
            raise AssertionError(f"{self.domain}: {what} not within {timeout:g} s")
        return d.addTimeout(timeout, reactor).addErrback(expired)

    def send(self, text: str) -> None:
        self.transport.write(text.encode("utf-8"))


@defer.inlineCallbacks
def connect_counting(port: int, domain: str, secret: str, testcase=None, timeout: float = 10.0):
    """A bound :class:`CountingComponent` on 127.0.0.1:``port``."""
    component = CountingComponent(domain, secret)
    yield connect(reactor, port, component, timeout)
    yield component.bound.addTimeout(timeout, reactor)
    if testcase is not None:
        testcase.addCleanup(lambda: component.transport.abortConnection()
                            if not component.lost.called else None)
    return component


def message(i: int, frm: str, to: str, prefix: str = "f") -> str:
    return (f"<message from='{frm}' to='{to}' type='chat' id='{prefix}{i}'>"
            f"<body>flood {i}</body></message>")


@dataclass
class Flood:
    """``total`` messages from ``sender`` (a connected component) to ``to``,
    ``rate`` a second, written ``1/tick`` times a second in one write each."""

    sender: CountingComponent
    frm: str
    to: str
    total: int
    rate: float
    prefix: str = "f"
    tick: float = 0.01
    sent: int = 0
    started: float = 0.0
    done: defer.Deferred = field(default_factory=defer.Deferred)

    def ids(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(1, self.sent + 1)]

    def start(self) -> "Flood":
        self.started = time.monotonic()
        self._loop = task.LoopingCall(self._tick)
        self._loop.start(self.tick)
        return self

    def _tick(self) -> None:
        if self.sender.lost.called:
            self._finish()
            return
        due = min(self.total, int((time.monotonic() - self.started) * self.rate) + 1)
        if due > self.sent:
            self.sender.send("".join(message(i, self.frm, self.to, self.prefix)
                                     for i in range(self.sent + 1, due + 1)))
            self.sent = due
        if self.sent >= self.total:
            self._finish()

    def _finish(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if not self.done.called:
            self.done.callback(self.sent)

    def until(self, count: int) -> defer.Deferred:
        """Fires once at least ``count`` have been written."""
        from tests.support.clusternodes import poll
        return poll(lambda: self.sent >= count or self.done.called, f"{count} written",
                    count / self.rate + 30)


@dataclass
class Tally:
    """Where every stanza of a flood went."""

    sent: int
    delivered: int
    bounced: int
    missing: int
    duplicated: int
    both: int
    conditions: dict

    @classmethod
    def of(cls, flood: Flood, *receivers: CountingComponent, ids=None) -> "Tally":
        """The tally of ``ids`` (default: every id written) over the
        deliveries of all ``receivers`` (a component that reconnected
        elsewhere is a second receiver)."""
        ids = flood.ids() if ids is None else list(ids)
        received = collections.Counter()
        for receiver in receivers:
            received.update(receiver.delivered)
        delivered = sum(1 for i in ids if received.get(i))
        bounced_ids = {i for i in ids if i in flood.sender.bounced}
        both = sum(1 for i in bounced_ids if received.get(i))
        bounced = len(bounced_ids) - both
        conditions = collections.Counter(flood.sender.bounced[i] for i in bounced_ids)
        return cls(sent=len(ids), delivered=delivered, bounced=bounced,
                   missing=len(ids) - delivered - bounced,
                   duplicated=sum(1 for i in ids if received.get(i, 0) > 1),
                   both=both, conditions=dict(conditions))

    @staticmethod
    def missing_ids(flood: Flood, *receivers: CountingComponent) -> list[str]:
        return [i for i in flood.ids() if i not in flood.sender.bounced
                and not any(r.delivered.get(i) for r in receivers)]

    @property
    def accounted(self) -> bool:
        return self.delivered + self.bounced == self.sent

    def line(self, label: str) -> str:
        return (f"{label}: sent {self.sent} = delivered {self.delivered} + bounced {self.bounced}"
                f" + missing {self.missing}; duplicated {self.duplicated}, delivered and bounced "
                f"{self.both}; bounce conditions {self.conditions}")


def settled(flood: Flood, receivers, timeout: float, allow_missing: int = 0) -> defer.Deferred:
    """Fires with the :class:`Tally` once the flood is written and every
    stanza but ``allow_missing`` is delivered or bounced (over all
    ``receivers``), or with the tally as it stands after ``timeout``."""
    from tests.support.clusternodes import poll

    def check():
        if not flood.done.called:
            return None
        tally = Tally.of(flood, *receivers)
        return tally if tally.missing <= allow_missing else None
    d = poll(check, "the flood to settle", timeout, 0.1)
    d.addErrback(lambda f: f.trap(AssertionError) and Tally.of(flood, *receivers))
    return d
