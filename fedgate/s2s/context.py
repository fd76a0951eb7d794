"""What every S2S stream needs from the rest of the gateway, in one bundle.

Passing one frozen bundle keeps the stream roles free of globals: tests build
a context with fakes, the service builds it with the real parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from fedgate.policy import PolicyTable
from fedgate.s2s.pairs import ConnectionTable
from fedgate.tls.contexts import TLSContexts
from fedgate.stream.liveness import LivenessSettings, PingRegistry
from fedgate.stream.parser import Limits


class VerificationBudget:
    """Caps dialback verifications in flight across all streams: each one
    may make us open a connection, so an unbounded number is an amplifier.
    A place is held from the request until its answer, or, for one
    cancelled before its connection is up (or left alone on it), until that
    connection is up or gone (see :mod:`fedgate.s2s.verifier`)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0

    def acquire(self) -> bool:
        if self.in_use >= self.limit:
            return False
        self.in_use += 1
        return True

    def release(self) -> None:
        self.in_use = max(0, self.in_use - 1)


@dataclass(frozen=True)
class S2SContext:
    clock: object
    local_domains: frozenset
    secret: str = field(repr=False)
    table: ConnectionTable
    router: object
    verifier: object
    budget: VerificationBudget
    limits: Limits = Limits()
    auth_timeout: float = 90.0
    max_pending_per_stream: int = 10
    #: domain pairs one connection may carry, however they were proven
    max_pairs_per_connection: int = 1000
    policy: PolicyTable = field(default_factory=PolicyTable)
    tls: TLSContexts | None = None
    bidi: bool = True  # offer and request bidirectional streams (XEP-0288)
    #: prove further local domains on a peer's bidi stream (XEP-0288 allows it;
    #: Prosody 0.12 closes the stream when it sees one, so off by default)
    reverse_dialback: bool = False
    log_traffic: bool = False
    log_bodies: bool = False
    #: liveness of authenticated streams (pings, keepalives, idle close);
    #: None: not watched
    liveness: LivenessSettings | None = None
    #: our pings in flight (the router hands their answers back)
    pings: PingRegistry | None = None
    #: XEP-0198: its settings, the resumable sessions and the sender's
    #: delivery hooks (fedgate.s2s.sm.ResumeStore); None: no stream management
    sm: object = None
    #: tls_failure(reason) counts a TLS failure (the metrics)
    tls_failure: Callable[[str], None] = lambda reason: None

    def is_blocked(self, remote: str) -> bool:
        return self.policy.is_blocked(remote)
