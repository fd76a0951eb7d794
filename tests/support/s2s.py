"""Fixtures for the S2S roles in memory: a context with test defaults, and
the fakes a role talks to (the dialback verifier, the sender's owner of an
outbound stream, TLS contexts, a transport that accepts startTLS, the
connector of outbound streams and the sender behind a router).

Each fake keeps every call for the test to inspect or answer, and behaves
like the real part where a role depends on it: a verification's
``finished`` comes when its connection would be gone (with its answer or
its cancellation), as the real verifier's does.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.testing import StringTransport

from fedgate.policy import PeerPolicy, PolicyTable
from fedgate.s2s.connect import ConnectError
from fedgate.s2s.context import S2SContext, VerificationBudget
from fedgate.s2s.pairs import ConnectionTable
from tests.support.memory import MemoryStream

#: The domains a test gateway hosts, unless a test names others.
LOCAL_DOMAINS = frozenset({"gw.example", "chat.gw.example"})


def make_context(clock, *, local_domains=LOCAL_DOMAINS, secret: str = "s3cret", table=None,
                 router=None, verifier=None, budget=None, encryption: str = "optional",
                 **overrides) -> S2SContext:
    """An S2SContext for tests.  By default: a fresh pair table, a budget of
    ten verifications and a policy with ``encryption`` for every peer
    ("optional", so plaintext dialback works without TLS contexts).  Any
    other S2SContext field can be given in ``overrides`` (``policy`` replaces
    the one built from ``encryption``)."""
    overrides.setdefault("policy", PolicyTable(PeerPolicy(encryption=encryption)))
    return S2SContext(clock=clock, local_domains=frozenset(local_domains), secret=secret,
                      table=ConnectionTable() if table is None else table, router=router,
                      verifier=verifier, budget=VerificationBudget(10) if budget is None else budget,
                      **overrides)


class FakeVerifier:
    """Hands out a Deferred per verification and keeps it, so a test can
    answer as the Authoritative Server would, at the moment it chooses.

    ``calls`` holds ``((receiving, originating, stream_id, key), deferred)``;
    ``cancelled`` the (receiving, originating) of each cancelled one."""

    def __init__(self):
        self.calls: list = []
        self.cancelled: list = []
        #: False: the test says when each verification's connection is gone
        #: (by calling what ``finishers`` holds)
        self.finish_with_answer = True
        self.finishers: list = []

    def verify(self, receiving, originating, stream_id, key, finished=None):
        # Like a verification whose connection ends with its answer (or
        # with its cancellation): ``finished`` comes then.
        d = defer.Deferred(lambda _: self.cancelled.append((receiving, originating)))
        if finished is not None:
            if self.finish_with_answer:
                d.addBoth(lambda result: (finished(), result)[1])
            else:
                self.finishers.append(finished)
        self.calls.append(((receiving, originating, stream_id, key), d))
        return d

    def answer(self, receiving, originating, valid=True):
        """Answer the one verification of (receiving, originating)."""
        [d] = [d for (args, d) in self.calls if args[:2] == (receiving, originating)]
        if not d.called:  # a cancelled verification's answer never arrives
            d.callback(valid)


class FakeOwner:
    """The sender's side of an outbound stream: records what it is told."""

    def __init__(self):
        self.events: list = []

    def stream_open(self, stream):
        self.events.append(("open",))

    def pair_result(self, stream, local, state, condition, text=None):
        self.events.append(("pair", local, state))

    def stream_closed(self, stream):
        self.events.append(("closed",))


class FakeTLS:
    """Stands in for TLSContexts: creators are just labels here."""

    class store:
        @staticmethod
        def pair_for(domain):
            return None

    def server_creator(self, default_domain, alpn=None):
        return ("server", default_domain)

    def client_creator(self, local, remote, alpn=None):
        return ("client", local, remote)


class TLSRecordingTransport(StringTransport):
    """A StringTransport that accepts startTLS (nothing is encrypted here)
    and notes where in its output TLS would start."""

    def __init__(self):
        super().__init__()
        self.tls_calls: list = []  # (creator, bytes written before the switch)

    def startTLS(self, creator):
        self.tls_calls.append((creator, len(self.value())))

    @property
    def tls_creator(self):
        """The creator of the last startTLS."""
        return self.tls_calls[-1][0]

    def before_tls(self) -> bytes:
        return self.value()[:self.tls_calls[0][1]]

    def after_tls(self) -> bytes:
        return self.value()[self.tls_calls[0][1]:]


class RecordingSender:
    """Stands in for the S2S sender behind a router: keeps what it is given."""

    def __init__(self):
        self.sent: list = []

    def send(self, local, remote, stanza):
        self.sent.append((local, remote, stanza))


class FakeConnector:
    """Connection attempts the test completes or fails by hand."""

    def __init__(self, clock):
        self.clock = clock
        self.attempts: list = []

    def connect(self, domain, factory):
        d = defer.Deferred()
        self.attempts.append((domain, factory, d))
        return d

    def succeed(self, index=-1) -> MemoryStream:
        domain, factory, d = self.attempts[index]
        protocol = factory(None)
        peer = MemoryStream(None, self.clock, stream=protocol)
        d.callback(protocol)
        return peer

    def fail(self, index=-1, condition="remote-server-not-found"):
        self.attempts[index][2].errback(ConnectError(condition, "nothing there"))
