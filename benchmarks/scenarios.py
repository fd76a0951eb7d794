"""The measured scenarios and their baselines.

Each one is bounded by a stanza or session count and by ``lab.timeout``, and
ends by itself: complete, or with what arrived when time ran out.

- ``s2s_to_component``: messages pipelined on one authenticated inbound S2S
  stream, counted as they reach the component.
- ``component_to_s2s``: messages pipelined from the component, counted as
  they reach the fake remote server over the gateway's outbound stream.
- ``dialback_sessions``: fresh inbound connections, each authenticating one
  pair with ``<db:result>`` (which makes the gateway verify it over a second
  connection to the fake remote server) and closing.
- ``echo_stanzas`` and ``echo_connections``: the same stanzas and the same
  number of connections through the echo relay, to divide by.

A message scenario first sends one unmeasured stanza and waits for it, so the
figure is the steady state, not the connection set-up (which
``dialback_sessions`` measures on its own).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from twisted.internet import defer

from benchmarks.processes import COMPONENT_DOMAIN, COMPONENT_SECRET, GATEWAY_DOMAIN, REMOTE_DOMAIN
from benchmarks.xmpp import (ComponentStream, EchoStream, InboundStream, Inbox, RemoteServer,
                             XmppPeer, connect)

BODY = "The quick brown fox jumps over the lazy dog; fedgate load generator payload."


def s2s_message(i: int) -> str:
    return (f"<message from='user{i % 16}@{REMOTE_DOMAIN}/load' to='bot@{COMPONENT_DOMAIN}'"
            f" type='chat' id='s2c-{i}'><body>{BODY} {i}</body></message>")


def component_message(i: int) -> str:
    return (f"<message from='bot@{COMPONENT_DOMAIN}/load' to='user{i % 16}@{REMOTE_DOMAIN}'"
            f" type='chat' id='c2s-{i}'><body>{BODY} {i}</body></message>")


class ScenarioError(Exception):
    """The set-up of a scenario failed (not a slow gateway: a broken one)."""


@dataclass
class Lab:
    """Everything a scenario talks to."""

    reactor: object
    remote: RemoteServer
    echo_port: int
    gateway_s2s_port: int
    gateway_component_port: int
    timeout: float = 30.0
    concurrency: int = 4


@dataclass
class Measurement:
    """One round of one scenario or baseline."""

    requested: int
    count: int
    seconds: float
    unit: str
    complete: bool
    errors: int = 0
    verified: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def failed(cls, requested: int, kind: str, exc: BaseException) -> "Measurement":
        """A round that could not run at all (its set-up failed)."""
        return cls(requested, 0, 0.0, UNITS[kind], complete=False,
                   problems=[f"{type(exc).__name__}: {exc}"])


UNITS = {"messages": "stanzas/s", "sessions": "sessions/s"}


def summarize(rounds: list[Measurement]) -> dict:
    """Several rounds of one measurement as one entry: the median time and
    rate, and the worst count, so a loss in any round shows."""
    first = rounds[0]
    out = {"requested": first.requested,
           "count": min(m.count for m in rounds),
           "errors": sum(m.errors for m in rounds),
           "seconds": round(statistics.median(m.seconds for m in rounds), 6),
           "rate": round(statistics.median(m.rate for m in rounds), 3),
           "unit": first.unit,
           "complete": all(m.complete for m in rounds),
           "rounds": [round(m.rate, 3) for m in rounds]}
    if first.verified is not None:
        out["verified"] = min(m.verified for m in rounds)
    problems = [p for m in rounds for p in m.problems]
    if problems:
        out["problems"] = problems[:5]
    return out


async def within(lab: Lab, d: defer.Deferred, what: str, seconds: float | None = None):
    """Await ``d`` for at most ``seconds`` (default ``lab.timeout``)."""
    seconds = lab.timeout if seconds is None else seconds
    d.addTimeout(max(seconds, 0.001), lab.reactor)
    try:
        return await d
    except defer.TimeoutError:
        raise TimeoutError(f"{what}: nothing after {seconds:.1f} s") from None


# -- set-up and tear-down -----------------------------------------------------
async def open_component(lab: Lab) -> ComponentStream:
    peer = ComponentStream(COMPONENT_DOMAIN, COMPONENT_SECRET)
    await within(lab, connect(lab.reactor, lab.gateway_component_port, peer), "component connect")
    try:
        await within(lab, peer.bound, "component handshake")
    except Exception as exc:
        _abort(peer)
        raise ScenarioError(f"component did not bind: {exc}") from None
    return peer


async def open_inbound(lab: Lab, receiving: str, seconds: float | None = None,
                       tls=None, external: bool = False) -> InboundStream:
    peer = InboundStream(lab.remote, receiving, tls=tls, external=external)
    await within(lab, connect(lab.reactor, lab.gateway_s2s_port, peer), "S2S connect", seconds)
    try:
        answer = await within(lab, peer.authenticated, "dialback answer", seconds)
    except BaseException:
        _abort(peer)
        raise
    if answer != "valid":
        _abort(peer)
        raise ScenarioError(f"the gateway answered dialback with type={answer!r}")
    return peer


def _abort(peer: XmppPeer) -> None:
    if peer.transport is not None and not peer.lost.called:
        peer.transport.abortConnection()


async def close_all(lab: Lab, peers) -> None:
    for peer in peers:
        if peer is None:
            continue
        try:
            await within(lab, peer.close_stream(), "stream close", min(lab.timeout, 5.0))
        except TimeoutError:
            _abort(peer)


# -- message scenarios --------------------------------------------------------
async def _pipeline(lab: Lab, write, inbox: Inbox, n: int, make) -> Measurement:
    """One unmeasured stanza, then ``n`` in a single write; timed from the
    write to the last arrival."""
    inbox.reset()
    write(make(0).encode("utf-8"))
    await within(lab, inbox.wait_for(1), "warm-up stanza")
    inbox.reset()
    data = "".join([make(i) for i in range(1, n + 1)]).encode("utf-8")
    waiter = inbox.wait_for(n)
    start = time.perf_counter()
    write(data)
    problems = []
    try:
        done = await within(lab, waiter, "stanzas")
    except TimeoutError as exc:
        done = time.perf_counter()
        problems.append(str(exc))
    return Measurement(n, inbox.stanzas, done - start, "stanzas/s", complete=inbox.stanzas == n,
                       errors=inbox.errors, problems=problems)


async def s2s_to_component(lab: Lab, n: int) -> Measurement:
    component = inbound = None
    try:
        component = await open_component(lab)
        inbound = await open_inbound(lab, COMPONENT_DOMAIN)
        return await _pipeline(lab, inbound.transport.write, component.inbox, n, s2s_message)
    finally:
        await close_all(lab, [inbound, component])


async def component_to_s2s(lab: Lab, n: int) -> Measurement:
    component = None
    try:
        component = await open_component(lab)
        return await _pipeline(lab, component.transport.write, lab.remote.inbox, n, component_message)
    finally:
        await close_all(lab, [component])


async def echo_stanzas(lab: Lab, n: int) -> Measurement:
    peer = EchoStream()
    await within(lab, connect(lab.reactor, lab.echo_port, peer), "echo connect")
    try:
        await within(lab, peer.echoed, "echoed header")
        return await _pipeline(lab, peer.transport.write, peer.inbox, n, s2s_message)
    finally:
        await close_all(lab, [peer])


# -- session scenarios --------------------------------------------------------
async def _sessions(lab: Lab, m: int, one) -> Measurement:
    """Run ``one(seconds_left)`` ``m`` times, ``lab.concurrency`` at a time."""
    remaining = m
    ok = failed = 0
    problems: list[str] = []
    start = time.perf_counter()
    deadline = start + lab.timeout

    async def worker():
        nonlocal remaining, ok, failed
        while remaining > 0:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            remaining -= 1
            try:
                if await one(left):
                    ok += 1
                else:
                    failed += 1
            except Exception as exc:  # reported, and this worker stops
                failed += 1
                problems.append(f"{type(exc).__name__}: {exc}")
                return
    await defer.gatherResults([defer.ensureDeferred(worker())
                               for _ in range(max(1, min(lab.concurrency, m)))])
    seconds = time.perf_counter() - start
    return Measurement(m, ok, seconds, "sessions/s", complete=ok == m, errors=failed,
                       problems=problems)


async def dialback_sessions(lab: Lab, m: int) -> Measurement:
    verified_before = lab.remote.verifications[True]

    async def one(left: float) -> bool:
        try:
            peer = await open_inbound(lab, GATEWAY_DOMAIN, left)
        except ScenarioError:
            return False
        await close_all(lab, [peer])
        return True
    measurement = await _sessions(lab, m, one)
    measurement.verified = lab.remote.verifications[True] - verified_before
    return measurement


async def echo_connections(lab: Lab, m: int) -> Measurement:
    async def one(left: float) -> bool:
        peer = EchoStream()
        await within(lab, connect(lab.reactor, lab.echo_port, peer), "echo connect", left)
        try:
            await within(lab, peer.echoed, "echoed header", left)
        except BaseException:
            _abort(peer)
            raise
        await close_all(lab, [peer])
        return True
    return await _sessions(lab, m, one)


#: scenario name -> (function, the baseline it is divided by, which count it takes)
SCENARIOS = {
    "s2s_to_component": (s2s_to_component, "echo_stanzas", "messages"),
    "component_to_s2s": (component_to_s2s, "echo_stanzas", "messages"),
    "dialback_sessions": (dialback_sessions, "echo_connections", "sessions"),
}
BASELINES = {
    "echo_stanzas": (echo_stanzas, "messages"),
    "echo_connections": (echo_connections, "sessions"),
}
