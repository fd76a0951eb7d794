"""The real stream roles in memory, each behind the same small interface,
and the oracle run after every fuzz case.

Each role builds its handler on a real :class:`XmppStream` over a
StringTransport with a :class:`Clock`, with real parts where they exist
(the router, the pair table, the verification budget, the credential
registry) and scripted stand-ins where the role would reach the network
(the dialback verifier's answers, the TLS handshake).

The oracle (:func:`run_case`):

- no exception escapes: no ``log.failure`` event, no ``internal-server-error``
  stream error (the shim sends one only for an exception);
- what we wrote is well-formed XML, stream by stream (a peer value that
  was not escaped breaks it);
- once the fuzzer has closed its side (``</stream:stream>``) and the
  authentication timeout and close grace have passed, the stream has ended
  with a stream error or a clean close, unless it authenticated (then only
  TCP's close ends it, which the shim follows at once);
- after the connection is gone, nothing is left behind: no timers, no
  pair-table record, no component route, no verification in flight.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.words.xish import domish

from fedgate.component.credentials import Credential, CredentialRegistry
from fedgate.component.listener import ComponentListenerStream
from fedgate.component.accept import ComponentAccept
from fedgate.component.scram import derive
from fedgate.component.xep0225 import Xep0225Settings, Xep0225Stream
from fedgate.policy import PeerPolicy, PolicyTable
from fedgate.router import Router
from fedgate.s2s.context import VerificationBudget
from fedgate.s2s.dialback import DialbackError
from fedgate.s2s.inbound import InboundS2S
from fedgate.s2s.outbound import OutboundS2S
from fedgate.s2s.pairs import ConnectionTable
from fedgate.s2s.verifier import DialbackVerifier
from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StreamFailure
from fedgate.stream.parser import Limits, StreamParser
from fedgate.stream.protocol import CLOSE_GRACE, XmppStream
from fedgate.tls.contexts import TLSInfo
from tests.fuzz.grammar import Sym, mutate, split
from tests.support.s2s import FakeConnector, FakeOwner, FakeTLS, RecordingSender, TLSRecordingTransport, make_context

AUTH_TIMEOUT = 5.0
LOCAL = frozenset({"gw.example", "chat.gw.example", "muc.gw.example"})
#: tight bounds, so the limits are reached by small inputs too
TIGHT = Limits(max_stanza_bytes=8192, max_depth=8, max_elements=64, max_attributes=8,
               max_namespace_declarations=4, max_name_bytes=48, max_attribute_bytes=1024)


class FuzzFailure(AssertionError):
    pass


class Watch:
    """Collects log events that carry a failure (an exception that escaped
    to the shim or to a Deferred)."""

    def __init__(self):
        self.failures: list = []

    def __call__(self, event):
        if event.get("log_failure") is not None or event.get("isError"):
            self.failures.append(event)

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self)


_CERTS: dict = {}


def certificate(name: str):
    """A leaf certificate for ``name`` from the shared test CA (cached)."""
    if name not in _CERTS:
        from tests.support.gateway import shared_ca
        _CERTS[name] = shared_ca().issue(dns=(name,))
    return _CERTS[name]


def tls_info(name: str) -> TLSInfo:
    cert = certificate(name)
    return TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", cert.cert, (), cert.chain)


class ScriptedVerifier:
    """Answers a verification by its key: 'valid', 'invalid', 'error' a
    moment later, anything else never (until cancelled).  ``pending``
    counts those neither answered nor cancelled."""

    def __init__(self, clock):
        self.clock = clock
        self.pending = 0
        self.started = 0

    def verify(self, receiving, originating, stream_id, key, finished=None):
        self.pending += 1
        self.started += 1
        call = None

        def done():
            self.pending -= 1
            if finished is not None:
                finished()

        def cancel(d):
            if call is not None and call.active():
                call.cancel()
            done()

        d = defer.Deferred(cancel)

        def answer():
            done()
            if key == "valid":
                d.callback(True)
            elif key == "invalid":
                d.callback(False)
            else:
                d.errback(DialbackError("remote-server-not-found", "scripted"))

        if key in ("valid", "invalid", "error"):
            call = self.clock.callLater(0.05, answer)
        return d


@dataclass
class Stats:
    """What the cases of one role reached, for the report."""

    cases: int = 0
    authenticated: int = 0
    bidi: int = 0
    stream_error: int = 0
    clean_close: int = 0
    open_until_tcp_close: int = 0
    bytes_fed: int = 0
    conditions: dict = field(default_factory=dict)

    def add(self, other: "Stats") -> None:
        for name in ("cases", "authenticated", "bidi", "stream_error", "clean_close",
                     "open_until_tcp_close", "bytes_fed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for k, v in other.conditions.items():
            self.conditions[k] = self.conditions.get(k, 0) + v


# -- roles ------------------------------------------------------------------
class Role:
    """One connection of a role under test.  Subclasses set up ``stream``
    (an XmppStream on ``transport``) and say what 'authenticated' means."""

    name = "?"

    def __init__(self, variant: dict):
        self.variant = variant
        self.clock = Clock()
        self.limits = TIGHT if variant.get("tight") else Limits()
        self.transport = TLSRecordingTransport()
        self.stream: XmppStream | None = None

    def connect(self) -> None:
        self.stream.makeConnection(self.transport)

    def feed(self, data: bytes) -> None:
        self.stream.dataReceived(data)

    def resolve(self, sym: Sym) -> bytes | None:
        if sym.name == "wait":  # for an answer (the verifier's) to come
            self.clock.advance(sym.arg)
            return None
        if sym.name == "tls_done":
            # The TLS handshake completes (in memory: its facts, set as the
            # real handshake would, and the handler told).
            if self.transport.tls_calls and self.stream.tls is None and not self.stream.closed:
                self.stream.tls = tls_info(sym.arg)
                self.stream._guard(self.stream.handler.tls_established, self.stream.tls)
            return None
        return None  # an action another role takes

    def output_text(self) -> str:
        return self.transport.value().decode("utf-8", "replace")

    def authenticated(self) -> bool:
        return False

    def bidi_on(self) -> bool:
        return False

    def leftovers(self) -> list[str]:
        return []


class ParserRole(Role):
    """The parser alone: only StreamFailure may come out of it."""

    name = "parser"

    def __init__(self, variant):
        super().__init__(variant)
        self.events = 0
        self.ended = False
        self.failed = None
        self.parser = StreamParser(lambda h: self._count(), lambda e: self._count(), self._end, self.limits)

    def _count(self):
        self.events += 1

    def _end(self):
        self.ended = True

    def connect(self):
        pass

    def feed(self, data):
        if self.failed is not None:
            return
        try:
            self.parser.feed(data)
        except StreamFailure as failure:
            self.failed = failure.condition

    def resolve(self, sym):
        return None


class InboundRole(Role):
    """S2S receiving side (Receiving and Authoritative Server, bidi)."""

    name = "s2s-in"

    def __init__(self, variant):
        super().__init__(variant)
        self.table = ConnectionTable()
        self.verifier = ScriptedVerifier(self.clock)
        self.budget = VerificationBudget(4)
        self.sender = RecordingSender()
        self.router = Router({"gw.example"}, {"chat.gw.example", "muc.gw.example"}, sender=self.sender)
        policy = PolicyTable(PeerPolicy(encryption=variant.get("encryption", "optional")),
                             {"other.example": PeerPolicy("other.example", allowed=False)})
        self.ctx = make_context(self.clock, local_domains=LOCAL, secret="fuzz", table=self.table,
                                router=self.router, verifier=self.verifier, budget=self.budget,
                                auth_timeout=AUTH_TIMEOUT, max_pending_per_stream=3,
                                max_pairs_per_connection=4, policy=policy, limits=self.limits,
                                tls=FakeTLS() if variant.get("tls") or variant.get("direct_tls") else None,
                                bidi=variant.get("bidi", True))
        self.handler = InboundS2S(self.ctx, direct_tls=bool(variant.get("direct_tls")))
        self.stream = XmppStream(self.handler, self.clock, self.limits)

    def authenticated(self):
        return self.handler.record is not None and self.handler.record.authenticated

    def bidi_on(self):
        return self.handler.bidi.on

    def leftovers(self):
        left = []
        if len(self.table):
            left.append(f"{len(self.table)} pair-table records")
        if self.budget.in_use:
            left.append(f"{self.budget.in_use} verification places held")
        if self.verifier.pending:
            left.append(f"{self.verifier.pending} verifications neither answered nor cancelled")
        return left


class OutboundRole(Role):
    """S2S initiating side: our stream to remote.example, fed the peer's bytes."""

    name = "s2s-out"

    def __init__(self, variant):
        super().__init__(variant)
        self.table = ConnectionTable()
        self.owner = FakeOwner()
        self.router = Router({"gw.example"}, {"chat.gw.example"}, sender=RecordingSender())
        self.ctx = make_context(self.clock, local_domains=LOCAL, secret="fuzz", table=self.table,
                                router=self.router, verifier=ScriptedVerifier(self.clock),
                                auth_timeout=AUTH_TIMEOUT, limits=self.limits,
                                encryption=variant.get("encryption", "optional"),
                                tls=FakeTLS() if variant.get("tls") else None,
                                bidi=variant.get("bidi", True))
        self.handler = OutboundS2S(self.ctx, "remote.example", "gw.example", self.owner,
                                   pair_timeout=AUTH_TIMEOUT)
        self.stream = XmppStream(self.handler, self.clock, self.limits)

    def connect(self):
        super().connect()
        self.handler.authenticate("gw.example")  # the sender has a stanza for it

    def resolve(self, sym):
        if sym.name == "authenticate":
            if not self.stream.closed and not self.stream.closing:
                self.handler.authenticate(sym.arg)
            return None
        if sym.name == "send":
            local = sym.arg
            if self.handler.is_valid(local) and not self.stream.closing:
                message = domish.Element((None, "message"))
                message["from"], message["to"] = f"u@{local}", "v@remote.example"
                message.addElement("body", content="<&'\">")
                self.handler.send_stanza(local, message)
            return None
        return super().resolve(sym)

    def authenticated(self):
        return self.handler.record is not None and self.handler.record.authenticated

    def bidi_on(self):
        return self.handler.record is not None and self.handler.record.bidi

    def leftovers(self):
        return [f"{len(self.table)} pair-table records"] if len(self.table) else []


class VerifyRole(Role):
    """The verification connection (Receiving Server asking the Authoritative
    Server), through the real DialbackVerifier."""

    name = "s2s-verify"

    def __init__(self, variant):
        super().__init__(variant)
        self.connector = FakeConnector(self.clock)
        ctx = make_context(self.clock, local_domains={"gw.example"}, secret="fuzz",
                           auth_timeout=AUTH_TIMEOUT, limits=self.limits,
                           tls=FakeTLS() if variant.get("tls") else None)
        # A verification connection that got its answer idles in the pool
        # for idle_timeout (30 s by default) whatever its peer sends short of
        # a complete element (an unterminated processing instruction, say):
        # the same bound as the authentication timeout here, so the oracle's
        # "every connection ended" holds for pooled connections too.
        self.verifier = DialbackVerifier(self.connector, self.clock,
                                         lambda handler: XmppStream(handler, self.clock, self.limits),
                                         timeout=AUTH_TIMEOUT, ctx=ctx, idle_timeout=AUTH_TIMEOUT)
        self.results: list = []
        self.finished: list = []

    def connect(self):
        d = self.verifier.verify("gw.example", "remote.example", "SID", "KEY",
                                 finished=lambda: self.finished.append(True))
        d.addBoth(self.results.append)
        _, factory, connecting = self.connector.attempts[-1]
        self.stream = factory(None)
        self.stream.makeConnection(self.transport)
        connecting.callback(self.stream)

    def authenticated(self):
        return False  # a verification connection ends with its answer or its timeout

    def leftovers(self):
        left = []
        if not self.results:
            left.append("the verification never ended")
        elif not isinstance(self.results[0], bool):
            failure = self.results[0]
            if not failure.check(DialbackError, defer.CancelledError):
                left.append(f"the verification ended with {failure.value!r}")
        if not self.finished:
            left.append("the verification's connection was never reported gone")
        return left


PASSWORD = "fuzz password"
_KEYS: dict = {}


def _keys(algorithm):
    if algorithm not in _KEYS:
        _KEYS[algorithm] = derive(PASSWORD, algorithm, iterations=64)
    return _KEYS[algorithm]


class ComponentRole(Role):
    """The component listener: XEP-0114 or XEP-0225 by the stream header,
    as the gateway runs it."""

    name = "component"
    secrets = {"chat.gw.example": "chat-secret", "muc.gw.example": "muc-secret"}

    def __init__(self, variant):
        super().__init__(variant)
        credentials = {
            "bots.example": Credential("bots.example", _keys("sha1"), _keys("sha256"),
                                       frozenset({"weather.example", "lb.example"})),
        }
        hosted = {"gw.example", "bots.example", "weather.example", "lb.example", *self.secrets}
        self.registry = CredentialRegistry(credentials, own_domains={"gw.example"},
                                           xep0114=self.secrets, hosted=hosted)
        self.sender = RecordingSender()
        self.router = Router({"gw.example"}, set(hosted) - {"gw.example"}, sender=self.sender)
        settings = Xep0225Settings(require_tls=bool(variant.get("require_tls")), auth_timeout=AUTH_TIMEOUT,
                                   max_hostnames=2, load_balanced=frozenset({"lb.example"}))
        listener = ComponentListenerStream(
            lambda connected_at=None: ComponentAccept(self.secrets, self.router, self.clock, AUTH_TIMEOUT,
                                                      connected_at=connected_at),
            lambda connected_at=None: Xep0225Stream(self.registry, self.router, FakeTLS(), settings, LOCAL,
                                                    connected_at=connected_at),
            header_timeout=AUTH_TIMEOUT)
        self.stream = XmppStream(listener, self.clock, self.limits, stream_ns=ns.COMPONENT_ACCEPT)
        self._client_first = None

    def _stream_id(self) -> str:
        handler = self.stream.handler
        return getattr(handler, "stream_id", None) or ""

    def resolve(self, sym):
        if sym.name == "handshake":
            secret = self.secrets.get(sym.arg, "")
            digest = hashlib.sha1((self._stream_id() + secret).encode()).hexdigest()
            return f"<handshake>{digest}</handshake>".encode()
        if sym.name == "scram_first":
            self._client_first = CLIENT_FIRST
            return scram_first(sym.arg)
        if sym.name == "scram_final":
            return self._scram_final(sym.arg)
        return super().resolve(sym)

    def _scram_final(self, algorithm: str) -> bytes | None:
        return scram_final(self.output_text(), self._client_first, algorithm)

    def authenticated(self):
        handler = self.stream.handler
        return bool(getattr(handler, "bound", False)) or getattr(handler, "identity", None) is not None

    def leftovers(self):
        return [f"component routes left: {sorted(self.router.components)}"] if self.router.components else []


def scram_final(output: str, client_first: str | None, algorithm: str) -> bytes | None:
    """The client's final SCRAM message (RFC 5802) over the last challenge
    in ``output`` (what the server wrote), when there is one to answer."""
    start = output.rfind("<challenge")
    if start < 0 or client_first is None or "</challenge>" not in output[start:]:
        return None
    body = output[output.index(">", start) + 1:output.index("</challenge>", start)]
    try:
        server_first = base64.b64decode(body).decode()
        attrs = dict(part.split("=", 1) for part in server_first.split(","))
        salted = hashlib.pbkdf2_hmac(algorithm, PASSWORD.encode(), base64.b64decode(attrs["s"]),
                                     int(attrs["i"]))
    except (ValueError, KeyError):
        return None
    client_key = hmac.new(salted, b"Client Key", algorithm).digest()
    stored = hashlib.new(algorithm, client_key).digest()
    without_proof = f"c={base64.b64encode(b'n,,').decode()},r={attrs['r']}"
    message = f"{client_first},{server_first},{without_proof}".encode()
    signature = hmac.new(stored, message, algorithm).digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature))).decode()
    final = base64.b64encode(f"{without_proof},p={proof}".encode()).decode()
    return f"<response xmlns='{ns.SASL}'>{final}</response>".encode()


CLIENT_FIRST = "n=bots.example,r=fuzznonce"


def scram_first(mechanism: str) -> bytes:
    payload = base64.b64encode(("n,," + CLIENT_FIRST).encode()).decode()
    return f"<auth xmlns='{ns.SASL}' mechanism='{mechanism}'>{payload}</auth>".encode()


ROLES = {cls.name: cls for cls in (ParserRole, InboundRole, OutboundRole, VerifyRole, ComponentRole)}


# -- the oracle ---------------------------------------------------------------------
def _our_streams(data: bytes) -> list[bytes]:
    """What we wrote, one piece per stream we opened (every header of ours
    starts with the XML declaration)."""
    marker = b"<?xml version='1.0'?>"
    pieces = data.split(marker)
    return [pieces[0]] + [marker + p for p in pieces[1:]] if pieces[0] else [marker + p for p in pieces[1:]]


def check_output(data: bytes) -> list[str]:
    problems = []
    for piece in _our_streams(data):
        elements: list = []
        parser = StreamParser(lambda h: None, elements.append, lambda: None)
        try:
            parser.feed(piece)
        except StreamFailure as failure:
            problems.append(f"we wrote XML a peer cannot parse ({failure.condition}: {failure.text}): "
                            f"{piece[:300]!r}")
    return problems


def _error_conditions(data: bytes) -> list[str]:
    found = []
    for piece in _our_streams(data):
        elements: list = []
        parser = StreamParser(lambda h: None, elements.append, lambda: None)
        try:
            parser.feed(piece)
        except StreamFailure:
            pass
        for element in elements:
            if element.uri == ns.STREAMS and element.name == "error":
                found += [c.name for c in element.elements() if c.uri == ns.STREAM_ERRORS and c.name != "text"]
    return found


def run_case(role_name: str, variant: dict, steps: list) -> Stats:
    """Feed one case to a fresh connection of ``role_name``; raise
    :class:`FuzzFailure` naming every broken rule."""
    stats = Stats(cases=1)
    with Watch() as watch:
        role = ROLES[role_name](variant)
        role.connect()
        pending = b""
        reached = bidi = False
        for step in steps:
            item = step.item
            data = role.resolve(item) if isinstance(item, Sym) else item
            if data:
                pending += mutate(data, step.mutations) if step.mutations else data
            if step.flush and pending:
                for piece in split(pending, step.cuts):
                    role.feed(piece)
                stats.bytes_fed += len(pending)
                pending = b""
            if step.advance:
                role.clock.advance(step.advance)
            reached = reached or role.authenticated()
            bidi = bidi or role.bidi_on()
        if pending:
            role.feed(pending)
            stats.bytes_fed += len(pending)
        problems: list[str] = []
        if isinstance(role, ParserRole):
            role.feed(b"</stream:stream>")
        else:
            stats.authenticated += reached or role.authenticated()
            stats.bidi += bidi or role.bidi_on()
            _finish(role, stats, problems)
        for event in watch.failures:
            failure = event.get("log_failure")
            text = failure.getTraceback() if failure is not None else repr(event)
            problems.append(f"logged failure: {event.get('log_format')}\n{text}")
    if problems:
        raise FuzzFailure(f"{role_name} {variant}: " + "\n".join(problems))
    return stats


def _finish(role: Role, stats: Stats, problems: list[str]) -> None:
    stream = role.stream
    # The fuzzer closes its stream; the authentication timeout and the
    # close grace pass.
    stream.dataReceived(b"</stream:stream>")
    role.clock.advance(AUTH_TIMEOUT + 1)
    role.clock.advance(CLOSE_GRACE + 1)
    output = role.transport.value()
    conditions = _error_conditions(output)
    for condition in conditions:
        stats.conditions[condition] = stats.conditions.get(condition, 0) + 1
    if "internal-server-error" in conditions:
        problems.append("internal-server-error stream error (an exception reached the shim)")
    if role.transport.disconnecting:
        if conditions:
            stats.stream_error += 1
        else:
            stats.clean_close += 1
            if stream.header_sent and not output.endswith(b"</stream:stream>"):
                problems.append(f"closed without closing our stream: {output[-200:]!r}")
    elif role.authenticated():
        stats.open_until_tcp_close += 1
    else:
        problems.append(f"still open {AUTH_TIMEOUT + CLOSE_GRACE + 2:.0f} s after the fuzzer closed its "
                        f"stream, unauthenticated; we wrote {output[-300:]!r}")
    problems += check_output(output)
    # The connection goes (TCP close, or our close completing).
    stream.connectionLost(Failure(ConnectionDone()))
    role.clock.advance(0)
    left = [c for c in role.clock.getDelayedCalls() if c.active()]
    if left:
        problems.append(f"timers left after the connection was gone: {left}")
    problems += role.leftovers()
