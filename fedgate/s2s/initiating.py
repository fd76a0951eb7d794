"""Stream negotiation on connections we open: header, STARTTLS, bidi, SASL EXTERNAL.

Shared by the outbound S2S stream (:mod:`fedgate.s2s.outbound`, the
Originating Server), the verification connection (:mod:`fedgate.s2s.verifier`,
the Receiving Server asking the Authoritative Server) and ``/diagnose``
(:mod:`fedgate.admin.diagnose`, which watches it through an observer).

States, and every move between them (:data:`TRANSITIONS`)::

    AWAIT_FEATURES --starttls--> STARTTLS        we sent <starttls/>
    STARTTLS       --restart---> AWAIT_FEATURES  <proceed/>: TLS starts, new header
    AWAIT_FEATURES --auth------> SASL            we sent <auth mechanism='EXTERNAL'/>
    SASL           --restart---> AWAIT_FEATURES  <success/>: new header
    SASL           --fallback--> READY           <failure/>: dialback if policy allows
    AWAIT_FEATURES --ready-----> READY           negotiation over: pairs may be proved
    (any but CLOSED) --refuse--> FAILED          policy, or the peer refused TLS
    (any)          --lost------> CLOSED          the connection is gone

Negotiation runs ordered steps (:data:`STEPS`) on each set of features:
TLS -> POLICY -> BIDI -> SASL -> SASL_DONE, then READY.  A step returns
:data:`NEXT` (go on), :data:`WAIT` (it sent a request; the answer resumes)
or a :class:`Refusal`; the answer to a request returns :data:`RESTART`, a
value, and the stream restarts: the next features resume at the step after
the one that asked.  Nothing calls back into negotiation, and once READY no
TLS or SASL restart may follow (RFC 6120 5.4.3.3 and 6.4.6 would have us
forget the pairs proved since).

1. (Direct TLS only) TLS starts as soon as TCP is up, SNI = the XMPP domain.
2. Send our header; wait for the peer's header and features.
3. STARTTLS when offered (and we can); after ``<proceed/>`` TLS starts, the
   parser restarts (bytes after ``<proceed/>`` in the same read are dropped,
   never parsed as if they came over TLS) and a new header goes out.
4. Policy: no TLS when TLS is required, or a certificate not valid for the
   remote domain under the certificate policy, ends the attempt with a
   reason (and the owner bounces with it).
5. Bidi (XEP-0288) when wanted and offered: after TLS, before SASL.
6. SASL EXTERNAL when wanted and offered (authzid: our domain, XEP-0178);
   on failure, dialback if policy allows.
7. :meth:`ready` with the final features; subclasses go on from there.

The features of the latest stream (after the last restart) are kept in
:attr:`features`: whether the peer offers dialback there
(:attr:`offers_dialback`) decides whether further domains may piggyback.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.words.xish import domish
from zope.interface import implementer

from fedgate.logsafe import short, throttled
from fedgate.s2s import policy_check
from fedgate.s2s.bidi import Bidi
from fedgate.stream import namespaces as ns
from fedgate.stream.errors import StreamFailure
from fedgate.stream.interfaces import IStreamHandler
from fedgate.stream.sasl import encode_payload, offered_mechanisms
from fedgate.stream.states import Machine
from fedgate.tls.contexts import ALPN_S2S

log = Logger(namespace="fedgate.s2s.initiating")

AWAIT_FEATURES = "await-features"
STARTTLS = "starttls"
SASL = "sasl"
READY = "ready"
FAILED = "failed"
CLOSED = "closed"

TRANSITIONS = {
    (AWAIT_FEATURES, "starttls"): STARTTLS,
    (STARTTLS, "restart"): AWAIT_FEATURES,
    (AWAIT_FEATURES, "auth"): SASL,
    (SASL, "restart"): AWAIT_FEATURES,
    (SASL, "fallback"): READY,
    (AWAIT_FEATURES, "ready"): READY,
    **{(state, "refuse"): FAILED for state in (AWAIT_FEATURES, STARTTLS, SASL, READY, FAILED)},
    **{(state, "lost"): CLOSED for state in (AWAIT_FEATURES, STARTTLS, SASL, READY, FAILED)},
}

#: what a negotiation step returns (besides a Refusal)
NEXT, WAIT, RESTART = "next", "wait", "restart"

#: the negotiation steps, in order
STEPS = ("tls", "policy", "bidi", "sasl", "sasl_done")


def _child(features: domish.Element, uri: str, name: str):
    for child in features.elements():
        if child.uri == uri and child.name == name:
            return child
    return None


class NegotiationObserver:
    """Hears each negotiation step of one initiating stream (``/diagnose``
    records them); every method is optional to override."""

    def header(self, header) -> None: ...
    def features(self, features) -> None: ...
    def tls(self, info) -> None: ...
    def step(self, name: str, outcome) -> None: ...
    def element(self, element) -> None: ...
    def refused(self, refusal) -> None: ...
    def closed(self, reason) -> None: ...


@implementer(IStreamHandler)
class InitiatingStream:
    """Base handler for streams we initiate to ``remote`` as ``local``."""

    use_sasl = False
    use_bidi = False

    def __init__(self, ctx, local: str, remote: str, observer: NegotiationObserver | None = None):
        self.ctx = ctx
        self.local = local
        self.remote = remote
        self.io = None
        self.direct_tls = False
        self.stream_id: str | None = None
        self.stream_error: str | None = None
        self.failure: policy_check.Refusal | None = None
        self.machine = Machine(type(self).__name__, TRANSITIONS, AWAIT_FEATURES)
        #: the next negotiation step to run (an index into STEPS)
        self._step = 0
        self.bidi = Bidi(self)
        self.observer = observer
        #: the peer's features since the last restart (None before they come)
        self.features: domish.Element | None = None
        self.pre_1_0 = False

    @property
    def state(self) -> str:
        return self.machine.state

    @property
    def offers_dialback(self) -> bool:
        """Did the peer offer dialback (XEP-0220 stream feature) after the
        last restart?  A pre-1.0 peer has no features and only dialback."""
        if self.pre_1_0:
            return True
        return self.features is not None and _child(self.features, ns.DIALBACK_FEATURE, "dialback") is not None

    @property
    def policy(self):
        return self.ctx.policy.for_peer(self.remote)

    def for_target(self, target) -> "InitiatingStream":
        """Called for the connection attempt to ``target`` (Direct TLS or not)."""
        self.direct_tls = bool(getattr(target, "direct_tls", False))
        return self

    # -- lifecycle -------------------------------------------------------------
    def connected(self, io) -> None:
        self.io = io
        if self.direct_tls:
            io.start_tls(self.ctx.tls.client_creator(self.local, self.remote, ALPN_S2S))
        self._send_header()

    def _send_header(self) -> None:
        self.io.open_stream({"to": self.remote, "from": self.local, "version": "1.0"})

    def error_header(self) -> dict:
        return {"to": self.remote, "from": self.local, "version": "1.0"}

    def tls_established(self, info) -> None:
        if self.observer is not None:
            self.observer.tls(info)

    def header_received(self, header) -> None:
        if header.default_ns != ns.SERVER:
            raise StreamFailure("invalid-namespace", "S2S streams use jabber:server")
        self.stream_id = header.get("id")
        if self.observer is not None:
            self.observer.header(header)
        if header.get("version") is None:
            self.pre_1_0 = True
            self._negotiate(None)  # pre-1.0 peer: no features will come

    def element_received(self, element: domish.Element) -> None:
        uri, name = element.uri, element.name
        if self.observer is not None:
            self.observer.element(element)
        if uri == ns.STREAMS and name == "features":
            self._negotiate(element)
        elif uri == ns.TLS and name == "proceed":
            if self.state != STARTTLS:
                raise StreamFailure("unsupported-stanza-type", "<proceed/> without <starttls/>")
            self._restart(self._proceed())
        elif uri == ns.TLS and name == "failure":
            self.refuse(policy_check.Refusal("remote-server-timeout", f"{self.remote} refused STARTTLS",
                                             "refused"))
        elif uri == ns.SASL and name == "success":
            if self.state != SASL:
                raise StreamFailure("unsupported-stanza-type", "<success/> without <auth/>")
            self._restart(self._sasl_success())
        elif uri == ns.SASL and name == "failure":
            if self.state == SASL:
                self._sasl_failed(element)
            else:
                throttled(log, self.io).info("Ignoring a SASL failure we did not ask for from {remote}",
                                             remote=self.remote)
        elif uri == ns.STREAMS and name == "error":
            self.stream_error = next((c.name for c in element.elements()
                                      if c.uri == ns.STREAM_ERRORS and c.name != "text"),
                                     "undefined-condition")
            text = next((str(c) for c in element.elements() if c.name == "text"), "")
            log.info("Stream error {condition} from {remote}: {text}", condition=short(self.stream_error),
                     remote=self.remote, text=short(text))
        else:
            self.negotiated_element(element)

    def disconnected(self, reason) -> None:
        self.machine.fire("lost")
        if self.observer is not None:
            self.observer.closed(reason)

    # -- negotiation: ordered steps ----------------------------------------------
    def _negotiate(self, features: domish.Element | None) -> None:
        """Run the steps from where the last one left off, on this set of
        features (None: a pre-1.0 peer, which sends none)."""
        if self.state != AWAIT_FEATURES:
            throttled(log, self.io).info("Ignoring features in state {state} from {remote}",
                                         state=self.state, remote=self.remote)
            return
        if features is not None:
            self.features = features
            if self.observer is not None:
                self.observer.features(features)
        while self._step < len(STEPS):
            name = STEPS[self._step]
            outcome = getattr(self, "_step_" + name)(features)
            if self.observer is not None:
                self.observer.step(name, outcome)
            if outcome is WAIT:
                return  # the answer resumes
            if isinstance(outcome, policy_check.Refusal):
                self.refuse(outcome)
                return
            self._step += 1
        self.machine.fire("ready")
        self.ready(features)

    def _restart(self, outcome) -> None:
        """An answer's outcome: a RESTART value restarts the stream, and the
        steps resume after the one that asked."""
        if outcome is RESTART:
            self.machine.fire("restart")
            self._step += 1
            self.features = None
            self.io.restart(self._send_header)

    def _step_tls(self, features):
        if (features is not None and self.io.tls is None and not self.direct_tls
                and self.ctx.tls is not None and _child(features, ns.TLS, "starttls") is not None):
            self.machine.fire("starttls")
            self.io.write(f"<starttls xmlns='{ns.TLS}'/>")
            return WAIT
        return NEXT

    def _proceed(self):
        self.io.start_tls(self.ctx.tls.client_creator(self.local, self.remote))
        return RESTART

    def _step_policy(self, features):
        policy, tls = self.policy, self.io.tls
        refusal = policy_check.tls_missing(policy, tls, self.remote)
        if refusal is None and tls is not None:
            refusal = policy_check.certificate_refused(policy, tls, self.remote)
        return refusal or NEXT

    def _step_bidi(self, features):
        # XEP-0288: after TLS, before SASL or dialback; no answer comes.
        if self.use_bidi:
            self.bidi.request(features)
        return NEXT

    def _step_sasl(self, features):
        io = self.io
        if (self.use_sasl and features is not None
                and io.tls is not None and io.tls.valid_for(self.remote)
                and "EXTERNAL" in offered_mechanisms(features)
                and self.ctx.tls.store.pair_for(self.local) is not None):
            self.machine.fire("auth")
            io.write(f"<auth xmlns='{ns.SASL}' mechanism='EXTERNAL'>"
                     f"{encode_payload(self.local.encode('utf-8'))}</auth>")
            return WAIT
        self._step += 1  # no SASL: the sasl_done step has nothing to announce
        return NEXT

    def _sasl_success(self):
        # The pair counts once the restarted stream is up (its features
        # arrive), so nothing is sent between <success/> and our new header.
        return RESTART

    def _step_sasl_done(self, features):
        self.sasl_succeeded()
        return NEXT

    def _sasl_failed(self, element: domish.Element) -> None:
        condition = next((c.name for c in element.elements() if c.name != "text"), "not-authorized")
        log.info("SASL EXTERNAL with {remote} failed: {condition}", remote=self.remote, condition=condition)
        if self.observer is not None:
            self.observer.step("sasl_failed", condition)
        if self.policy.requires_certificate:
            self.refuse(policy_check.Refusal(
                "policy-violation", f"{self.remote} refused SASL EXTERNAL ({condition}) and policy "
                                    "requires certificate authentication"))
            return
        self.machine.fire("fallback")
        self.ready(None)  # fall back to dialback on this stream

    def refuse(self, refusal: policy_check.Refusal) -> None:
        """End this attempt; the owner bounces with the reason."""
        log.info("Giving up on {remote}: {text}", remote=self.remote, text=refusal.text)
        self.machine.fire("refuse")
        if refusal.reason:
            self.ctx.tls_failure(refusal.reason)
        self.failure = refusal
        if self.observer is not None:
            self.observer.refused(refusal)
        self.io.close()

    # -- for subclasses ----------------------------------------------------------
    def ready(self, features: domish.Element | None) -> None:
        raise NotImplementedError

    def sasl_succeeded(self) -> None:
        pass

    def negotiated_element(self, element: domish.Element) -> None:
        pass

    def reject_stanza(self, stanza, failure) -> None:
        pass
